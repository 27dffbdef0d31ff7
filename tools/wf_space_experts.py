"""Example workflow sources: space experts (RAPHAEL Space-MoE), paint-with-words (eDiff-I), MoE sampler; on SD1.5,
Flux.1 dev and PixArt-Σ."""
from wf_dit import FLUX_DEV, PIXART, SDXL_VAE, T5XXL, TINY_NOTE, flux_loaders

from wf_basic import NEGATIVE, SD15, ksample

PROMPT = "a red circle and a blue square on a wooden table"


def _base(g, prompt=PROMPT):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    neg = g.node("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    return ck, neg, lat


def _bank(g, clip, texts):
    bank = None
    for name, text in texts:
        c = g.node("CLIPTextEncode", title=f"Expert: {name}", text=text, clip=clip)
        kw = {"experts": bank} if bank is not None else {}
        bank = g.node("AtelierSpaceExpert", title=f"Space expert: {name}", conditioning=c[0], name=name, **kw)
    return bank


def space_experts_attention(g):
    g.note("RAPHAEL Space-MoE without training. 'Atelier Space Experts' finds where the model itself puts "
           "'red circle' and 'blue square' (cross-attention ≥ 0.2 × max, mid-resolution blocks, from "
           "timestep 500 down) and has each region painted by the expert the text gate picks "
           "(glossy ruby glass / matte cobalt ceramic). One UNet pass per step; the patched MODEL works in "
           "the core KSampler and with other attention patches (IPAdapter-style) on the same model.")
    ck, neg, lat = _base(g)
    bank = _bank(g, ck[1], [("ruby glass", "a glossy ruby glass sphere, red, shiny"),
                            ("cobalt ceramic", "a matte cobalt blue ceramic cube")])
    sp = g.node("AtelierSpaceExperts", model=ck[0], clip=ck[1], prompt=PROMPT,
                phrases="red circle, blue square", experts=bank[0], alpha=0.2, routing="gate", gate_noise=0.0,
                seed=0, mask_start_t=500, capture="mid-resolution", pww_weight=0.0)
    ksample(g, sp[0], sp[1], neg[0], lat[0], ck[2], "atelier_space_experts")


def paint_with_words(g):
    g.note("eDiff-I paint-with-words from a colour map built in the graph: a red canvas with a blue right "
           "half (Empty Image + Image Composite Masked; paint your own and load it instead). 'red: red circle; "
           "blue: blue square' turns each colour into its phrase's region; the bias w·log(1+σ)·max(QKᵀ) pulls "
           "the phrase's tokens into the region, strongest while the image is still noise. The regions are "
           "also painted by two space experts.")
    ck, neg, lat = _base(g, "a red circle and a blue square")
    red = g.node("EmptyImage", title="Canvas (red)", width=512, height=512, batch_size=1, color=0xFF0000)
    blue = g.node("EmptyImage", title="Brush (blue)", width=256, height=512, batch_size=1, color=0x0000FF)
    cmap = g.node("ImageCompositeMasked", title="Colour map", destination=red[0], source=blue[0], x=256, y=0,
                  resize_source=False)
    regions = g.node("AtelierRegionsFromColorMap", color_map=cmap[0], mapping="red: red circle; blue: blue square",
                     tolerance=0.1)
    g.node("PreviewImage", title="Colour map", images=cmap[0])
    bank = _bank(g, ck[1], [("ruby", "a ruby red glossy circle"), ("cobalt", "a cobalt blue square tile")])
    pww = g.node("AtelierPaintWithWords", model=ck[0], clip=ck[1], prompt="a red circle and a blue square",
                 regions=regions[0], weight=1.0, experts=bank[0], alpha=0.2, routing="in order", gate_noise=0.0,
                 seed=0)
    ksample(g, pww[0], pww[1], neg[0], lat[0], ck[2], "atelier_paint_with_words")


def moe_sampler(g):
    g.note("The full mixture of experts: Atelier Time Experts routes each step by noise level (the base "
           "checkpoint above timestep 500, a second SD1.5 checkpoint, e.g. a fine-tune, below), Atelier Space Experts routes each "
           "phrase's region to an expert, and the Atelier MoE Sampler runs both and draws the routes taken "
           "over the output: the experts' regions tinted on the image, one row per attention block and one "
           "column per step underneath, the time expert as the top strip.")
    ck, neg, lat = _base(g)
    ck2 = g.node("CheckpointLoaderSimple", title="Texture expert", ckpt_name="dreamshaper_8.safetensors")
    te = g.node("AtelierTimeExperts", model_1=ck[0], model_2=ck2[0], mode="timestep", boundaries="500")
    bank = _bank(g, ck[1], [("ruby glass", "a glossy ruby glass sphere, red, shiny"),
                            ("cobalt ceramic", "a matte cobalt blue ceramic cube")])
    sp = g.node("AtelierSpaceExperts", model=ck[0], clip=ck[1], prompt=PROMPT,
                phrases="red circle, blue square", experts=bank[0], alpha=0.2, routing="gate", gate_noise=0.0,
                seed=0, mask_start_t=500, capture="mid-resolution", pww_weight=0.0)
    moe = g.node("AtelierMoESampler", model=te[0], positive=sp[1], negative=neg[0], latent_image=lat[0],
                 seed=42, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                 space=sp[2], vae=ck[2])
    img = g.node("VAEDecode", samples=moe[0], vae=ck[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_moe")
    g.node("SaveImage", title="Routes", images=moe[1], filename_prefix="atelier_moe_routes")


# ----------------------------------------------------------------------------- DiT / MMDiT (issue 21)

DIT_PROMPT = "a red circle left of a blue square on a wooden table"


def flux_space_experts(g):
    g.note("Regional prompting on Flux.1 dev from the model's own attention, no hand-drawn masks: 'Atelier Space "
           "Experts' reads where the joint attention puts 'red circle' and 'blue square' (image queries x the "
           "phrase's T5 tokens, double-stream and early single-stream blocks, from timestep 500 down) and has each "
           "region painted by the expert the text gate picks. An expert's prompt joins the joint sequence of the "
           "same pass, masked so only its region sees it (no extra model call); Flux's pooled vector and guidance "
           "stay the base prompt's. The MoE Sampler draws the regions and routes under the picture. "
           + TINY_NOTE.format(family="Flux", size=1024))
    model, clip, vae = flux_loaders(g, FLUX_DEV)
    sampling = g.node("ModelSamplingFlux", model=model[0], max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    bank = _bank(g, clip[0], [("ruby glass", "a glossy ruby glass sphere, red, shiny"),
                              ("cobalt ceramic", "a matte cobalt blue ceramic cube")])
    sp = g.node("AtelierSpaceExperts", model=sampling[0], clip=clip[0], prompt=DIT_PROMPT,
                phrases="red circle, blue square", experts=bank[0], alpha=0.2, routing="gate", gate_noise=0.0,
                seed=0, mask_start_t=500, capture="mid-resolution", pww_weight=0.0)
    guided = g.node("FluxGuidance", conditioning=sp[1], guidance=3.5)
    neg = g.node("CLIPTextEncode", title="Negative (unused at cfg 1)", text="", clip=clip[0])
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    moe = g.node("AtelierMoESampler", model=sp[0], positive=guided[0], negative=neg[0], latent_image=latent[0],
                 seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0,
                 space=sp[2], vae=vae[0])
    img = g.node("VAEDecode", samples=moe[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_flux_space_experts")
    g.node("SaveImage", title="Routes", images=moe[1], filename_prefix="atelier_flux_space_routes")


def flux_paint_with_words(g):
    g.note("eDiff-I paint-with-words on Flux.1 dev from a colour map (built in the graph: a red canvas with a blue "
           "right half; paint your own and load it instead). Each colour's region pulls its phrase's T5 tokens "
           "with the bias w·log(1+σ')·max(QKᵀ) inside every joint attention block; σ' is the flow schedule's "
           "noise-to-signal ratio t/(1-t), so a weight means the same strength as on SD1.5 at the same noise "
           "level. One model call per step. " + TINY_NOTE.format(family="Flux", size=1024))
    model, clip, vae = flux_loaders(g, FLUX_DEV)
    sampling = g.node("ModelSamplingFlux", model=model[0], max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    red = g.node("EmptyImage", title="Canvas (red)", width=1024, height=1024, batch_size=1, color=0xFF0000)
    blue = g.node("EmptyImage", title="Brush (blue)", width=512, height=1024, batch_size=1, color=0x0000FF)
    cmap = g.node("ImageCompositeMasked", title="Colour map", destination=red[0], source=blue[0], x=512, y=0,
                  resize_source=False)
    regions = g.node("AtelierRegionsFromColorMap", color_map=cmap[0], mapping="red: red circle; blue: blue square",
                     tolerance=0.1)
    g.node("PreviewImage", title="Colour map", images=cmap[0])
    pww = g.node("AtelierPaintWithWords", model=sampling[0], clip=clip[0], prompt=DIT_PROMPT, regions=regions[0],
                 weight=1.0, alpha=0.2, routing="in order", gate_noise=0.0, seed=0)
    guided = g.node("FluxGuidance", conditioning=pww[1], guidance=3.5)
    neg = g.node("CLIPTextEncode", title="Negative (unused at cfg 1)", text="", clip=clip[0])
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    ks = g.node("KSampler", model=pww[0], positive=guided[0], negative=neg[0], latent_image=latent[0],
                seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_flux_paint_with_words")


def pixart_space_experts(g):
    g.note("Space experts on PixArt-Σ: the regions come from the T5 tokens' cross-attention in the middle half of "
           "the DiT blocks; each region's expert mixes into the same blocks' cross-attention (one pass per step). "
           f"{PIXART} in models/diffusion_models/, {T5XXL} (CLIPLoader, type pixart), the SDXL VAE. "
           + TINY_NOTE.format(family="PixArt-Σ", size=1024))
    model = g.node("UNETLoader", title="Load Diffusion Model", unet_name=PIXART, weight_dtype="default")
    clip = g.node("CLIPLoader", title="Text encoder (T5-XXL)", clip_name=T5XXL, type="pixart")
    vae = g.node("VAELoader", title="SDXL VAE", vae_name=SDXL_VAE)
    bank = _bank(g, clip[0], [("ruby glass", "a glossy ruby glass sphere, red, shiny"),
                              ("cobalt ceramic", "a matte cobalt blue ceramic cube")])
    sp = g.node("AtelierSpaceExperts", model=model[0], clip=clip[0], prompt=DIT_PROMPT,
                phrases="red circle, blue square", experts=bank[0], alpha=0.2, routing="gate", gate_noise=0.0,
                seed=0, mask_start_t=500, capture="mid-resolution", pww_weight=0.0)
    neg = g.node("CLIPTextEncode", title="Negative", text="blurry, low quality", clip=clip[0])
    latent = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    ks = g.node("KSampler", model=sp[0], positive=sp[1], negative=neg[0], latent_image=latent[0],
                seed=42, steps=20, cfg=4.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_pixart_space_experts")


WORKFLOWS = {
    "space_experts_attention.json": space_experts_attention,
    "paint_with_words_colormap.json": paint_with_words,
    "moe_sampler.json": moe_sampler,
    "flux_space_experts.json": flux_space_experts,
    "flux_paint_with_words_colormap.json": flux_paint_with_words,
    "pixart_space_experts.json": pixart_space_experts,
}
