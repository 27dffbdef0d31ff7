"""Example workflows for time experts (RAPHAEL Time-MoE, eDiff-I expert denoisers, PanGu-Draw)."""

from wf_basic import NEGATIVE, SD15, SDXL, checkpoint_prompts, ksample

SD15_B = "dreamshaper_8.safetensors"
REFINER = "sd_xl_refiner_1.0.safetensors"
PROMPT = "a red circle left of a blue square, flat colours"


def _model(g, ckpt, title, refiner=False, size=1024):
    if not refiner:
        return checkpoint_prompts(g, ckpt, title, PROMPT)
    ck = g.node("CheckpointLoaderSimple", title=title, ckpt_name=ckpt)
    pos = g.node("CLIPTextEncodeSDXLRefiner", title=f"{title}: positive", ascore=6.0, width=size, height=size,
                 text=PROMPT, clip=ck[1])
    neg = g.node("CLIPTextEncodeSDXLRefiner", title=f"{title}: negative", ascore=2.5, width=size, height=size,
                 text=NEGATIVE, clip=ck[1])
    return ck, pos, neg


def struct_texture(g, structure, texture, latent, vae, prefix, **settings):
    """Atelier Struct->Texture Sampler from the (model, positive, negative) outputs of the structure and the
    texture model, then VAEDecode with ``vae``, SaveImage and Draw Routes of the run; ``settings``: the sampler's
    other inputs."""
    st = g.node("AtelierStructTextureSampler", structure_model=structure[0], structure_positive=structure[1],
                structure_negative=structure[2], texture_model=texture[0], texture_positive=texture[1],
                texture_negative=texture[2], latent_image=latent, **settings)
    img = g.node("VAEDecode", samples=st[0], vae=vae)
    g.node("SaveImage", images=img[0], filename_prefix=prefix)
    g.node("AtelierDrawRoutes", routes=st[1], samples=st[0], height=96, column_width=12)
    return st


def time_experts_sd15(g):
    g.note("Two SD1.5 checkpoints as time experts (eDiff-I / RAPHAEL): the first denoises timesteps 1000-500 "
           "(composition), the second 500-0 (detail). The switch is by noise level, so it stays at the same sigma when "
           "you change steps, scheduler or denoise; the routed MODEL works in KSampler, KSamplerAdvanced and "
           "SamplerCustomAdvanced. Any SD1.5 checkpoints (or one checkpoint with and without a LoRA) work. "
           "Atelier Draw Routes shows which expert ran at each step.")
    a, pos, neg = _model(g, SD15, "Expert 1 (high noise)")
    b = g.node("CheckpointLoaderSimple", title="Expert 2 (low noise)", ckpt_name=SD15_B)
    te = g.node("AtelierTimeExperts", model_1=a[0], model_2=b[0], mode="timestep", boundaries="500")
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    ks, _ = ksample(g, te[0], pos[0], neg[0], lat[0], a[2], "atelier_time_experts", steps=12)
    g.node("AtelierDrawRoutes", routes=te[1], samples=ks[0], height=96, column_width=12)


def time_experts_sdxl_refiner(g):
    g.note("SDXL base → refiner by timestep: the base denoises t ≥ 200, the refiner the rest. Unlike the usual "
           "two-KSamplerAdvanced chain (end_at_step / start_at_step), the switch is a noise level: change steps or "
           "scheduler and it stays at t = 200. The refiner has its own text encoder, so it gets its own conditioning; "
           "this is why base→refiner uses the Struct→Texture sampler rather than the routed MODEL.")
    base, bpos, bneg = _model(g, SDXL, "SDXL base")
    ref, rpos, rneg = _model(g, REFINER, "SDXL refiner", refiner=True)
    lat = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    struct_texture(g, (base[0], bpos[0], bneg[0]), (ref[0], rpos[0], rneg[0]), lat[0], base[2],
                   "atelier_sdxl_base_refiner", seed=42, steps=12, cfg=7.0, sampler_name="euler", scheduler="normal",
                   t_struct=200, denoise=1.0)


def time_experts_struct_texture(g):
    g.note("PanGu-Draw structure → texture: SD1.5 lays out the structure at 512 px for t ∈ [1000, 500]; at "
           "T_struct = 500 its clean estimate goes through the Coop bridge (decode, upscale x2 in pixels, SDXL VAE "
           "encode, fresh noise at the same level) and SDXL adds texture at 1024 px for t < 500. With two models of "
           "one family at one size the handoff is the plain core two-KSamplerAdvanced chain.")
    s, spos, sneg = _model(g, SD15, "Structure (SD1.5)")
    t, tpos, tneg = _model(g, SDXL, "Texture (SDXL)")
    lat = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
    struct_texture(g, (s[0], spos[0], sneg[0]), (t[0], tpos[0], tneg[0]), lat[0], t[2], "atelier_struct_texture",
                   structure_vae=s[2], texture_vae=t[2], texture_scale=2.0, seed=42, steps=12, cfg=7.0,
                   sampler_name="euler", scheduler="normal", t_struct=500, denoise=1.0)


WORKFLOWS = {
    "time_experts_sd15.json": time_experts_sd15,
    "time_experts_sdxl_refiner.json": time_experts_sdxl_refiner,
    "time_experts_struct_texture.json": time_experts_struct_texture,
}
