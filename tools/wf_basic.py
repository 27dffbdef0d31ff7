"""Example workflow sources: the plain text-to-image graph every demo starts from, and the pieces of it the
other builders (tools/wf_*.py) share."""

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
NEGATIVE = "blurry, low quality"


def txt2img(g, ckpt=SD15, prompt="a red circle left of a blue square", size=512, steps=20, seed=42):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", title="Positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    return ck, pos, neg, lat


def checkpoint_prompts(g, ckpt, title, prompt):
    """A titled checkpoint loader with its positive and negative prompt: (loader, positive, negative)."""
    ck = g.node("CheckpointLoaderSimple", title=title, ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", title=f"{title}: positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title=f"{title}: negative", text=NEGATIVE, clip=ck[1])
    return ck, pos, neg


def ksample(g, model, positive, negative, latent, vae, save=None, seed=42, steps=20, cfg=7.0, sampler_name="euler",
            scheduler="normal"):
    """The core KSampler (denoise 1) and VAEDecode, then a SaveImage with the filename prefix ``save`` when given;
    the inputs are outputs (``ck[0]``). Returns (KSampler, VAEDecode)."""
    ks = g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=vae)
    if save:
        g.node("SaveImage", images=img[0], filename_prefix=save)
    return ks, img


def mini_images(g, prompt="a red circle left of a blue square"):
    """Atelier Mini (sd15, 64 px) draws four images of ``prompt``: returns the VAEDecode."""
    ck = g.node("AtelierMiniCheckpointLoader", family="sd15")
    pos = g.node("CLIPTextEncode", title="Positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text="", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=4)
    return ksample(g, ck[0], pos[0], neg[0], lat[0], ck[2], seed=7, steps=20, cfg=5.0)[1]


def basic_txt2img(g):
    g.note("Plain text-to-image with the core KSampler. With `python tools/atelier.py run --tiny` the "
           "checkpoint loader is replaced by Atelier's tiny seeded model (and the 512 px latent by a "
           "64 px one), so it runs without weights.")
    ck, pos, neg, lat = txt2img(g)
    ksample(g, ck[0], pos[0], neg[0], lat[0], ck[2], "atelier_basic_txt2img", steps=8)


def mini_txt2img(g):
    g.note("Atelier Mini: the small SD1.5-topology model trained on Atelier's world of coloured shapes, "
           "shipped with the pack (no download). It knows the world's words only: shapes (circle, square, "
           "triangle, star, cross, ring), eight colours, small/large, left of/right of/above/below, and "
           "striped/checkered/gradient backgrounds. 64 px is its native size.")
    img = mini_images(g)
    g.node("SaveImage", images=img[0], filename_prefix="atelier_mini_txt2img")


WORKFLOWS = {"basic_txt2img.json": basic_txt2img, "mini_txt2img.json": mini_txt2img}
