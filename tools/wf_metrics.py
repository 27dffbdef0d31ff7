"""Example workflow sources: measuring prompt adherence on the generated world (Atelier Mini)."""

from wf_basic import mini_images


def mini_prompt_adherence(g):
    g.note("Atelier Mini (SD1.5 topology, 64 px) draws four images for a world caption; Atelier Prompt Adherence finds the objects "
           "in them (exact ground truth: the world's colours and shapes) and reports the share of requested "
           "objects and colours found, against chance. The preview shows a labelled box per detected object.")
    prompt = "a red circle left of a blue square"
    img = mini_images(g, prompt)
    score = g.node("AtelierPromptAdherence", image=img[0], prompt=prompt)
    g.node("SaveImage", images=score[3], filename_prefix="atelier_mini_prompt_adherence")


WORKFLOWS = {"mini_prompt_adherence.json": mini_prompt_adherence}
