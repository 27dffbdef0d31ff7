"""Example workflows for the Coop bridge (PanGu-Draw Coop-Diffusion)."""

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"


def _model(g, ckpt, prompt, title):
    ck = g.node("CheckpointLoaderSimple", title=title, ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", title=f"{title}: positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title=f"{title}: negative", text="blurry, low quality", clip=ck[1])
    return ck, pos, neg


def coop_sd15_sdxl_fused(g):
    g.note("Coop-Diffusion (PanGu-Draw): SDXL (model A, 1024 px) and SD1.5 (model B, at b_scale 0.5 = 512 px) "
           "denoise one image together. Every bridge step SD1.5's clean estimate is decoded with its VAE, resized and "
           "encoded with SDXL's VAE, turned into an SDXL-space noise prediction and fused: "
           "eps = d*eps_SDXL + (1-d)*eps_SD15. fusion_d = 1 is plain SDXL. bridge_every = 2 halves the cost of B. "
           "The guider variant (AtelierCoopGuider) plugs into SamplerCustomAdvanced the same way.")
    a, pa, na = _model(g, SDXL, "a red circle left of a blue square, flat colours", "SDXL (A)")
    b, pb, nb = _model(g, SD15, "a red circle left of a blue square, flat colours", "SD1.5 (B)")
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
    lo, plo, nlo = _model(g, SD15, "a red circle left of a blue square, flat colours", "SD1.5 (low res)")
    hi, phi, nhi = _model(g, SDXL, "a red circle left of a blue square, flat colours", "SDXL (high res)")
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
    ck, pos, neg = _model(g, SD15, "a red circle left of a blue square, flat colours", "SD1.5")
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    common = {"model": ck[0], "noise_seed": 42, "steps": 8, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": pos[0], "negative": neg[0]}
    k1 = g.node("KSamplerAdvanced", add_noise="enable", latent_image=lat[0], start_at_step=0, end_at_step=4,
                return_with_leftover_noise="enable", **common)
    up = g.node("AtelierNoiseAwareLatentUpscale", model=ck[0], vae=ck[2], positive=pos[0], negative=neg[0],
                samples=k1[0], cfg=7.0, steps=8, sampler_name="euler", scheduler="normal", end_at_step=4, scale=2.0,
                resize_method="bicubic", seed=7)
    k2 = g.node("KSamplerAdvanced", add_noise="disable", latent_image=up[0], start_at_step=4, end_at_step=10000,
                return_with_leftover_noise="disable", **common)
    img = g.node("VAEDecode", samples=k2[0], vae=ck[2])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_coop_noise_aware_hires")


WORKFLOWS = {
    "coop_sd15_sdxl_fused.json": coop_sd15_sdxl_fused,
    "coop_sd15_to_sdxl_upscale.json": coop_sd15_to_sdxl_upscale,
    "coop_noise_aware_hires.json": coop_noise_aware_hires,
}
