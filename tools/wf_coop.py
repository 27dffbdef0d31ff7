"""Example workflows for the Coop bridge (PanGu-Draw Coop-Diffusion)."""

from wf_basic import SD15, SDXL, checkpoint_prompts
from wf_dit import FLUX_DEV, flux_loaders
from wf_time_experts import struct_texture

PROMPT = "a red circle left of a blue square, flat colours"


def coop_sd15_sdxl_fused(g):
    g.note("Coop-Diffusion (PanGu-Draw): SDXL (model A, 1024 px) and SD1.5 (model B, at b_scale 0.5 = 512 px) "
           "denoise one image together. Every bridge step SD1.5's clean estimate is decoded with its VAE, resized and "
           "encoded with SDXL's VAE, turned into an SDXL-space noise prediction and fused: "
           "eps = d*eps_SDXL + (1-d)*eps_SD15. fusion_d = 1 is plain SDXL. bridge_every = 2 halves the cost of B. "
           "The guider variant (AtelierCoopGuider) plugs into SamplerCustomAdvanced the same way.")
    a, pa, na = checkpoint_prompts(g, SDXL, "SDXL (A)", PROMPT)
    b, pb, nb = checkpoint_prompts(g, SD15, "SD1.5 (B)", PROMPT)
    lat = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    ks = g.node("AtelierCoopSampler", model_a=a[0], vae_a=a[2], positive_a=pa[0], negative_a=na[0], cfg_a=7.0,
                model_b=b[0], vae_b=b[2], positive_b=pb[0], negative_b=nb[0], cfg_b=7.0, fusion_d=0.6,
                bridge_every=2, start_percent=0.0, end_percent=0.8, b_scale=0.5, resize_method="bicubic",
                latent_image=lat[0], seed=42, steps=8, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=a[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_coop_fused")


def coop_sd15_to_sdxl_upscale(g):
    g.note("Single-stage super-resolution across families: SD1.5 denoises the first half of the schedule at 512 px; "
           "its clean estimate is decoded, upscaled x2 in pixel space, encoded with SDXL's VAE and re-noised to the "
           "same level with fresh white noise; SDXL finishes at 1024 px. Compare with a latent upscale + second "
           "KSampler (hires fix), whose bilinear-upscaled noise is correlated.")
    lo, plo, nlo = checkpoint_prompts(g, SD15, "SD1.5 (low res)", PROMPT)
    hi, phi, nhi = checkpoint_prompts(g, SDXL, "SDXL (high res)", PROMPT)
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    rb = g.node("AtelierResolutionBridgeSampler", model_low=lo[0], vae_low=lo[2], positive_low=plo[0],
                negative_low=nlo[0], model_high=hi[0], vae_high=hi[2], positive_high=phi[0], negative_high=nhi[0],
                latent_image=lat[0], seed=42, steps=8, sampler_name="euler", scheduler="normal", cfg_low=7.0,
                cfg_high=7.0, switch_at=0.5, scale=2.0, resize_method="bicubic")
    img = g.node("VAEDecode", samples=rb[0], vae=hi[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_coop_sd15_to_sdxl")


def coop_noise_aware_hires(g):
    g.note("A noise-aware hires fix with core samplers: KSamplerAdvanced stops at step 4 of 8 with leftover noise; "
           "Atelier's upscaler estimates the clean image at that level, upscales it x2 in pixel space and re-noises "
           "it with fresh white noise; a second KSamplerAdvanced continues from step 4 with add_noise disabled. "
           "Keep steps/sampler/scheduler/end_at_step equal across the three nodes.")
    ck, pos, neg = checkpoint_prompts(g, SD15, "SD1.5", PROMPT)
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    _noise_aware_hires(g, ck[0], ck[2], pos[0], neg[0], lat[0], "atelier_coop_noise_aware_hires", steps=8, switch=4,
                       cfg=7.0, scheduler="normal", scale=2.0)


def _noise_aware_hires(g, model, vae, positive, negative, latent, prefix, steps, switch, cfg, scheduler, scale):
    """KSamplerAdvanced to step ``switch`` with leftover noise, Atelier's noise-aware upscale, a second
    KSamplerAdvanced from ``switch`` on (the three nodes with the same steps, sampler, scheduler and switch step),
    VAEDecode and SaveImage."""
    common = {"model": model, "noise_seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler",
              "scheduler": scheduler, "positive": positive, "negative": negative}
    k1 = g.node("KSamplerAdvanced", add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=switch,
                return_with_leftover_noise="enable", **common)
    up = g.node("AtelierNoiseAwareLatentUpscale", model=model, vae=vae, positive=positive, negative=negative,
                samples=k1[0], cfg=cfg, steps=steps, sampler_name="euler", scheduler=scheduler, end_at_step=switch,
                scale=scale, resize_method="bicubic", seed=7)
    k2 = g.node("KSamplerAdvanced", add_noise="disable", latent_image=up[0], start_at_step=switch, end_at_step=10000,
                return_with_leftover_noise="disable", **common)
    img = g.node("VAEDecode", samples=k2[0], vae=vae)
    g.node("SaveImage", images=img[0], filename_prefix=prefix)


# ---------------------------------------------------------------- across UNet and flow/DiT families (issue 18)
TINY = ("With `python tools/atelier.py run --tiny` (or --mini) every loader is replaced by Atelier's tiny seeded "
        "model of its family and the latents by their tiny sizes, so the graph runs without weights.")
VRAM = ("VRAM: Flux dev (12 B parameters, ~24 GB in bf16, ~12 GB in fp8) and SDXL (~7 GB) are loaded by ComfyUI's "
        "model management one after the other here (one stage each); on a 24 GB card pick the fp8 Flux weights "
        "(weight_dtype fp8_e4m3fn) so both fit, smaller cards stream them (lowvram) and take longer.")


def _flux(g, prompt, title="Flux (structure)", guidance=3.5):
    model, clip, vae = flux_loaders(g, FLUX_DEV, (f"{title}: model", f"{title}: text encoders", f"{title}: VAE"))
    pos = g.node("CLIPTextEncode", title=f"{title}: prompt", text=prompt, clip=clip[0])
    guided = g.node("FluxGuidance", conditioning=pos[0], guidance=guidance)
    neg = g.node("CLIPTextEncode", title=f"{title}: negative (unused at cfg 1)", text="", clip=clip[0])
    return model, vae, guided, neg


def coop_flux_to_sdxl(g):
    g.note("Flux structure → SDXL texture through the Coop bridge (PanGu-Draw): Flux dev lays out the picture for "
           "t ∈ [1000, 500] of its own flow schedule (t = 1000·sigma, so 500 is sigma 0.5, signal = noise, whatever "
           "ModelSamplingFlux's shift); at T_struct its clean estimate is decoded with the Flux VAE, encoded with "
           "SDXL's VAE and re-noised with fresh white noise of SDXL's shape at the same noise-to-signal ratio "
           "(an SDXL sigma of 0.5 / (1 − 0.5) = 1.0); SDXL, e.g. a finetune with its LoRAs, adds texture on its own "
           "schedule from there. Flux runs at cfg 1 with Flux Guidance, SDXL at texture_cfg 6. " + VRAM + " " + TINY)
    fm, fv, fpos, fneg = _flux(g, PROMPT)
    x, xpos, xneg = checkpoint_prompts(g, SDXL, "SDXL (texture)", PROMPT)
    lat = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    struct_texture(g, (fm[0], fpos[0], fneg[0]), (x[0], xpos[0], xneg[0]), lat[0], x[2], "atelier_coop_flux_to_sdxl",
                   seed=42, steps=12, cfg=1.0, sampler_name="euler", scheduler="simple", t_struct=500, denoise=1.0,
                   structure_vae=fv[0], texture_vae=x[2], texture_scale=1.0, texture_cfg=6.0)


def coop_sdxl_to_flux(g):
    g.note("SDXL structure → Flux texture: SDXL (an SD finetune's composition, its LoRAs) denoises t ≥ 500 of its "
           "own schedule; the bridge hands its clean estimate to Flux through both VAEs with fresh 16-channel noise "
           "at the flow sigma of the same noise-to-signal ratio (SDXL sigma s → Flux sigma s / (1 + s)), and Flux dev "
           "finishes at cfg 1 with Flux Guidance (texture_cfg 1). " + VRAM + " " + TINY)
    x, xpos, xneg = checkpoint_prompts(g, SDXL, "SDXL (structure)", PROMPT)
    fm, fv, fpos, fneg = _flux(g, PROMPT, "Flux (texture)")
    lat = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    struct_texture(g, (x[0], xpos[0], xneg[0]), (fm[0], fpos[0], fneg[0]), lat[0], fv[0], "atelier_coop_sdxl_to_flux",
                   seed=42, steps=12, cfg=6.0, sampler_name="euler", scheduler="normal", t_struct=500, denoise=1.0,
                   structure_vae=x[2], texture_vae=fv[0], texture_scale=1.0, texture_cfg=1.0)


def coop_flux_noise_aware_hires(g):
    g.note("Flux hires fix with the noise-aware upscale on 16-channel latents: KSamplerAdvanced stops at step 6 of 12 "
           "with leftover noise (ComfyUI returns a flow latent as x0 + sigma/(1 − sigma)·noise); Atelier's upscaler "
           "estimates the clean image at that level, upscales it ×1.5 in pixel space through the Flux VAE and "
           "re-noises it with fresh white noise at the same level; a second KSamplerAdvanced continues from step 6 "
           "with add_noise disabled (a bilinear latent upscale would correlate the noise: lag-1 autocorrelation "
           "~0.7 instead of ~0). With SamplerCustomAdvanced instead, connect SplitSigmas' low_sigmas to the "
           "upscaler's 'sigmas' input. Keep steps/sampler/scheduler/end_at_step equal across the three nodes. " + TINY)
    fm, fv, fpos, fneg = _flux(g, PROMPT, "Flux")
    lat = g.node("EmptySD3LatentImage", width=768, height=768, batch_size=1)
    _noise_aware_hires(g, fm[0], fv[0], fpos[0], fneg[0], lat[0], "atelier_coop_flux_noise_aware_hires", steps=12,
                       switch=6, cfg=1.0, scheduler="simple", scale=1.5)


WORKFLOWS = {
    "coop_sd15_sdxl_fused.json": coop_sd15_sdxl_fused,
    "coop_sd15_to_sdxl_upscale.json": coop_sd15_to_sdxl_upscale,
    "coop_noise_aware_hires.json": coop_noise_aware_hires,
    "coop_flux_to_sdxl.json": coop_flux_to_sdxl,
    "coop_sdxl_to_flux.json": coop_sdxl_to_flux,
    "coop_flux_noise_aware_hires.json": coop_flux_noise_aware_hires,
}
