"""Example workflow sources: plain text-to-image on the DiT and flow-matching families (issue 17), built
as users build them in ComfyUI, with the files named as they are published (README, Models).

- Flux.1 dev: UNETLoader + DualCLIPLoader (type flux) + VAELoader, FluxGuidance, ModelSamplingFlux,
  BasicGuider / BasicScheduler / RandomNoise / SamplerCustomAdvanced, EmptySD3LatentImage.
- Flux.1 schnell: the same loaders, the core KSampler at cfg 1 and 4 steps (no guidance embedding).
- SD3.5 medium: the checkpoint (model + VAE) with TripleCLIPLoader for its three text encoders.
- PixArt-Σ: UNETLoader + CLIPLoader (type pixart, T5) + VAELoader (the SDXL VAE), the core KSampler.

``python tools/atelier.py run --tiny`` (or ``--mini``, ``ATELIER_TINY_MODELS``) puts the tiny models of the
family the file names tell in place of each loader (models/tiny_substitution.py).
"""
from wf_basic import NEGATIVE, ksample

FLUX_DEV = "flux1-dev.safetensors"
FLUX_SCHNELL = "flux1-schnell.safetensors"
CLIP_L = "clip_l.safetensors"
CLIP_G = "clip_g.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
SD35 = "sd3.5_medium.safetensors"
PIXART = "PixArt-Sigma-XL-2-1024-MS.safetensors"
SDXL_VAE = "sdxl_vae.safetensors"

PROMPT = "a red circle left of a blue square"
TINY_NOTE = ("With `python tools/atelier.py run --tiny` (or --mini, or a server started with "
             "ATELIER_TINY_MODELS=1) each loader is replaced by Atelier's tiny seeded {family} model and the "
             "{size} px latent by its tiny size, so it runs without weights (noise-like pictures).")


def flux_loaders(g, unet=FLUX_DEV, titles=("Load Diffusion Model", "Text encoders (CLIP-L + T5-XXL)", "Flux VAE")):
    """Flux.1's loader trio as ComfyUI's example builds it: (UNETLoader, DualCLIPLoader type flux, VAELoader),
    titled ``titles``."""
    model = g.node("UNETLoader", title=titles[0], unet_name=unet, weight_dtype="default")
    clip = g.node("DualCLIPLoader", title=titles[1], clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    vae = g.node("VAELoader", title=titles[2], vae_name=FLUX_VAE)
    return model, clip, vae


def _prompts(g, clip, positive="Positive", negative="Negative", negative_text=NEGATIVE):
    """The positive (PROMPT) and negative text encodes on ``clip`` (an output), titled."""
    pos = g.node("CLIPTextEncode", title=positive, text=PROMPT, clip=clip)
    neg = g.node("CLIPTextEncode", title=negative, text=negative_text, clip=clip)
    return pos, neg


def flux_dev_txt2img(g):
    g.note(f"Flux.1 dev text-to-image as ComfyUI's own example builds it: {FLUX_DEV} in models/diffusion_models/, "
           f"{CLIP_L} and {T5XXL} in models/text_encoders/, {FLUX_VAE} in models/vae/. Flux dev is "
           "guidance-distilled: FluxGuidance sets the guidance the model reads (no CFG, one model call per step); "
           "ModelSamplingFlux shifts the flow schedule for the image size. "
           + TINY_NOTE.format(family="Flux", size=1024))
    model, clip, vae = flux_loaders(g, FLUX_DEV)
    sampling = g.node("ModelSamplingFlux", model=model[0], max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    pos = g.node("CLIPTextEncode", title="Prompt", text=PROMPT, clip=clip[0])
    guided = g.node("FluxGuidance", conditioning=pos[0], guidance=3.5)
    guider = g.node("BasicGuider", model=sampling[0], conditioning=guided[0])
    noise = g.node("RandomNoise", noise_seed=42)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=sampling[0], scheduler="simple", steps=20, denoise=1.0)
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                 latent_image=latent[0])
    img = g.node("VAEDecode", samples=out[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_flux_dev_txt2img")


def flux_schnell_txt2img(g):
    g.note(f"Flux.1 schnell text-to-image: {FLUX_SCHNELL} in models/diffusion_models/, the text encoders and VAE "
           f"of Flux dev ({CLIP_L}, {T5XXL}, {FLUX_VAE}). Schnell is step-distilled: 4 steps, cfg 1 (the negative "
           "prompt is then unused). " + TINY_NOTE.format(family="Flux schnell", size=1024))
    model, clip, vae = flux_loaders(g, FLUX_SCHNELL)
    pos, neg = _prompts(g, clip[0], "Prompt", "Negative (unused at cfg 1)", "")
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    ksample(g, model[0], pos[0], neg[0], latent[0], vae[0], "atelier_flux_schnell_txt2img", steps=4, cfg=1.0,
            scheduler="simple")


def sd35_txt2img(g):
    g.note(f"Stable Diffusion 3.5 medium text-to-image: {SD35} in models/checkpoints/ (model and VAE), its "
           f"three text encoders {CLIP_L}, {CLIP_G} and {T5XXL} in models/text_encoders/ through TripleCLIPLoader. "
           "ModelSamplingSD3 sets the flow shift (3.0, the model's own). "
           + TINY_NOTE.format(family="SD3.5", size=1024))
    ck = g.node("CheckpointLoaderSimple", ckpt_name=SD35)
    clip = g.node("TripleCLIPLoader", title="Text encoders (CLIP-L, CLIP-G, T5-XXL)", clip_name1=CLIP_L,
                  clip_name2=CLIP_G, clip_name3=T5XXL)
    sampling = g.node("ModelSamplingSD3", model=ck[0], shift=3.0)
    pos, neg = _prompts(g, clip[0])
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    ksample(g, sampling[0], pos[0], neg[0], latent[0], ck[2], "atelier_sd35_txt2img", cfg=4.5, scheduler="sgm_uniform")


def pixart_sigma_txt2img(g):
    g.note(f"PixArt-Σ text-to-image: {PIXART} in models/diffusion_models/, {T5XXL} in models/text_encoders/ "
           f"(CLIPLoader, type pixart), the SDXL VAE {SDXL_VAE} in models/vae/ (PixArt-Σ draws in SDXL's latent "
           "space). " + TINY_NOTE.format(family="PixArt-Σ", size=1024))
    model = g.node("UNETLoader", title="Load Diffusion Model", unet_name=PIXART, weight_dtype="default")
    clip = g.node("CLIPLoader", title="Text encoder (T5-XXL)", clip_name=T5XXL, type="pixart")
    vae = g.node("VAELoader", title="SDXL VAE", vae_name=SDXL_VAE)
    pos, neg = _prompts(g, clip[0])
    latent = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    ksample(g, model[0], pos[0], neg[0], latent[0], vae[0], "atelier_pixart_sigma_txt2img", cfg=4.5)


WORKFLOWS = {
    "flux_dev_txt2img.json": flux_dev_txt2img,
    "flux_schnell_txt2img.json": flux_schnell_txt2img,
    "sd35_txt2img.json": sd35_txt2img,
    "pixart_sigma_txt2img.json": pixart_sigma_txt2img,
}
