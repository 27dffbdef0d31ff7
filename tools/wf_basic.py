"""Example workflow sources: the plain text-to-image graph every demo starts from."""

SD15 = "v1-5-pruned-emaonly.safetensors"


def txt2img(g, ckpt=SD15, prompt="a red circle left of a blue square", size=512, steps=20, seed=42):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", title="Positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text="blurry, low quality", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    return ck, pos, neg, lat


def basic_txt2img(g):
    g.note("Plain text-to-image with the core KSampler. With `python tools/atelier.py run --tiny` the "
           "checkpoint loader is replaced by Atelier's tiny seeded model (and the 512 px latent by a "
           "64 px one), so it runs without weights.")
    ck, pos, neg, lat = txt2img(g)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0], latent_image=lat[0],
                seed=42, steps=8, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=ck[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_basic_txt2img")


def mini_txt2img(g):
    g.note("Atelier Mini: the small SD1.5-topology model trained on Atelier's world of coloured shapes, "
           "shipped with the pack (no download). It knows the world's words only: shapes (circle, square, "
           "triangle, star, cross, ring), eight colours, small/large, left of/right of/above/below, and "
           "striped/checkered/gradient backgrounds. 64 px is its native size.")
    ck = g.node("AtelierMiniCheckpointLoader", family="sd15")
    pos = g.node("CLIPTextEncode", title="Positive", text="a red circle left of a blue square", clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text="", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=4)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0], latent_image=lat[0],
                seed=7, steps=20, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=ck[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_mini_txt2img")


WORKFLOWS = {"basic_txt2img.json": basic_txt2img, "mini_txt2img.json": mini_txt2img}
