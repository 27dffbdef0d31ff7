"""Example workflow sources: measuring prompt adherence on the generated world (Atelier Mini)."""


def mini_prompt_adherence(g):
    g.note("Atelier Mini (SD1.5 topology, 64 px) draws four images for a world caption; Atelier Prompt Adherence finds the objects "
           "in them (exact ground truth: the world's colours and shapes) and reports the share of requested "
           "objects and colours found, against chance. The preview shows a labelled box per detected object.")
    prompt = "a red circle left of a blue square"
    ck = g.node("AtelierMiniCheckpointLoader", family="sd15")
    pos = g.node("CLIPTextEncode", title="Positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text="", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=4)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0], latent_image=lat[0],
                seed=7, steps=20, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=ck[2])
    score = g.node("AtelierPromptAdherence", image=img[0], prompt=prompt)
    g.node("SaveImage", images=score[3], filename_prefix="atelier_mini_prompt_adherence")


WORKFLOWS = {"mini_prompt_adherence.json": mini_prompt_adherence}
