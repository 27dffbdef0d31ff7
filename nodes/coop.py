"""Coop bridge nodes (PanGu-Draw Coop-Diffusion): two models with different latent spaces or
resolutions denoise together. Math in ../models/coop.py; this file is ComfyUI glue.

Nodes
  AtelierCoopGuider               GUIDER for SamplerCustomAdvanced: A and B fused every k steps.
  AtelierCoopSampler              the same as a KSampler-like node.
  AtelierResolutionBridgeSampler  low-res model → IID bridge → high-res model, single stage.
  AtelierNoiseAwareLatentUpscale  upscale a KSamplerAdvanced leftover-noise latent without
                                  correlating its noise; continue with add_noise disabled.

Public function for other features (the time-experts struct→texture handoff):
  bridge_latent(latent, sigma, model_from, vae_from, model_to, vae_to, scale=1.0, seed=0, *,
                positive=None, negative=None, cfg=1.0, denoised=None, resize_method="bicubic")
      → (latent dict in model_to's space, leftover-noise form, at the equivalent level; sigma_to)

VRAM: the guider registers B and both VAEs as additional models of (a clone of) A, so ComfyUI's
own ``prepare_sampling`` loads all four in one ``load_models_gpu`` call, with B's and the VAEs'
working memory added to A's estimate. Where they do not all fit, ComfyUI loads them partially
(its lowvram mode): what fits stays on the GPU and the remaining weights are streamed layer by
layer at use, so A and B take turns on the GPU inside every step instead of being swapped whole.
"""
from __future__ import annotations

import logging
import math

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..models import coop
from .glue import SigmaWindow, check_conditioning, check_vae, hook_key, vae_downscale

LOG = logging.getLogger("atelier.coop")
ADDITIONAL_KEY = hook_key("coop")

# ------------------------------------------------------------------------- validation
# VAE/model pairing is checked by the glue (``check_vae``: channels, downscale and, for TAESD-type
# VAEs, the family recorded in ``glue.FAMILIES``), the same way for every family and every node.


def check_two(model_a, model_b) -> None:
    if model_b.is_clone(model_a) or model_b.model is model_a.model:
        raise ValueError("model_b: shares its weights with model_a (both come from one checkpoint). Coop fuses two "
                         "different checkpoints; for one checkpoint with two prompts use core DualCFGGuider or "
                         "ConditioningCombine")


# ------------------------------------------------------------------- codec adapters

class _Codec:
    """decode/encode between a model's *internal* latents and pixels (N, 3, H, W) in [0, 1], on
    the sampling device, without going through VAE.decode's own load_models_gpu call (which may
    unload a UNet in the middle of sampling)."""

    def __init__(self, model, vae):
        self.model, self.vae = model, vae
        self.ds = vae_downscale(vae)

    @torch.no_grad()
    def decode(self, z_int: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = self.model.model.process_latent_out(z_int.float())
        px = vae.first_stage_model.decode(z.to(device=vae.device, dtype=vae.vae_dtype))
        return vae.process_output(px.float()).to(z_int.device)

    @torch.no_grad()
    def encode(self, px: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        x = vae.process_input(px.float()).to(device=vae.device, dtype=vae.vae_dtype)
        z = vae.first_stage_model.encode(x).float().to(px.device)
        return self.model.model.process_latent_in(z)


# ------------------------------------------------------------------------- the guider

class CoopGuider(comfy.samplers.CFGGuider):
    """CFGGuider over model A whose prediction is fused with model B's, bridged through pixels.

    One trajectory lives in A's latent space. On a bridge step: A's x̂0 → decode A → resize →
    encode B → noised to the equivalent σ of B (with A's own noise estimate when the latent
    shapes agree, else a fixed seeded noise) → B with its own conds and cfg → x̂0_B → decode B →
    resize → encode A → ε̂ → ε = d·ε_A + (1−d)·ε̂. Between bridge steps ε̂ is reused. d = 1 is
    exactly model A (B is never loaded).
    """

    def __init__(self, model_a, vae_a, model_b, vae_b, fusion_d=0.5, bridge_every=1,
                 start_percent=0.0, end_percent=1.0, b_scale=1.0, resize_method="bicubic"):
        self.fusion_d = coop.check_fusion_weight(fusion_d)
        self.window_spec = SigmaWindow(start_percent, end_percent, bridge_every, "start_percent", "end_percent",
                                       "bridge_every")
        check_vae(model_a, vae_a, "model_a", "vae_a")
        check_vae(model_b, vae_b, "model_b", "vae_b")
        check_two(model_a, model_b)
        if resize_method not in coop.RESIZE_METHODS:
            raise ValueError(f"resize_method: {resize_method!r} unknown; choose one of {coop.RESIZE_METHODS}")
        b_scale = float(b_scale)
        if not (math.isfinite(b_scale) and b_scale > 0):
            raise ValueError(f"b_scale: {b_scale} must be a positive number")
        self.active = self.fusion_d < 1.0 and self.window_spec.start < self.window_spec.end
        patcher = model_a
        if self.active:
            patcher = model_a.clone()
            patcher.set_additional_models(ADDITIONAL_KEY, [model_b, vae_a.patcher, vae_b.patcher])
        super().__init__(patcher)
        self.model_b, self.vae_a, self.vae_b = model_b, vae_a, vae_b
        self.b_scale, self.resize_method = b_scale, resize_method
        self.cfg_b = 1.0
        self.b_original_conds = {}
        self.stats = {"bridges": 0, "reused": 0, "a_only": 0}

    def set_conds(self, positive, negative, positive_b=None, negative_b=None):
        self.inner_set_conds({"positive": positive, "negative": negative})
        if positive_b is not None:
            self.b_original_conds = {"positive": comfy.sampler_helpers.convert_cond(positive_b),
                                     "negative": comfy.sampler_helpers.convert_cond(negative_b)}

    def set_cfg(self, cfg, cfg_b=None):
        self.cfg = cfg
        if cfg_b is not None:
            self.cfg_b = cfg_b

    # -- shapes
    def _b_shape(self, shape):
        ds_a, ds_b = _Codec(self.model_patcher, self.vae_a).ds, _Codec(self.model_b, self.vae_b).ds
        ph, pw = coop.target_size(shape[-2] * ds_a, shape[-1] * ds_a, self.b_scale, name="b_scale")
        if ph % ds_b or pw % ds_b:
            raise ValueError(f"b_scale: {self.b_scale} gives {pw}x{ph} px for model B, not a multiple of its VAE's "
                             f"{ds_b} px; pick a scale that lands on a multiple of {ds_b}")
        c_b = self.model_b.model.latent_format.latent_channels
        return (shape[0], c_b, ph // ds_b, pw // ds_b), (ph, pw), (shape[-2] * ds_a, shape[-1] * ds_a)

    # -- loading: one load_models_gpu for A, B and both VAEs, with everyone's working memory
    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        if self.active and not self.b_original_conds:
            raise ValueError("AtelierCoopGuider: model B has no conditioning (set_conds with positive_b/negative_b)")
        if self.active:
            b_shape = self._b_shape(noise.shape)[0]
            try:
                mem_a, min_a = comfy.sampler_helpers.estimate_memory(self.model_patcher, noise.shape, self.conds)
                mem_b, min_b = comfy.sampler_helpers.estimate_memory(self.model_b, b_shape, self.b_original_conds)
                vae_mem = (self.vae_a.memory_used_decode(noise.shape, self.vae_a.vae_dtype)
                           + self.vae_b.memory_used_decode(b_shape, self.vae_b.vae_dtype))
                mm.load_models_gpu([self.model_patcher] + self.model_patcher.get_nested_additional_models(),
                                   memory_required=max(mem_a, mem_b) + vae_mem,
                                   minimum_memory_required=max(min_a, min_b) + vae_mem)
            except Exception as e:  # noqa: BLE001  estimates are advisory; prepare_sampling loads them anyway
                LOG.debug("coop: joint memory estimate failed (%s); relying on prepare_sampling", e)
        return super().outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if not self.active:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed)
        self._begin_b(noise, device, sigmas, seed)
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed)
        finally:
            self._end_b()

    def _begin_b(self, noise, device, sigmas, seed):
        B = self.model_b
        self.b_shape, self.px_b, self.px_a = self._b_shape(noise.shape)
        conds = {k: [c.copy() for c in v] for k, v in self.b_original_conds.items()}
        comfy.samplers.preprocess_conds_hooks(conds)
        self.b_model_options = comfy.model_patcher.create_model_options_clone(B.model_options)
        self.b_model_options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(B, conds, self.b_model_options)
        comfy.samplers.filter_registered_hooks_on_conds(conds, self.b_model_options)
        comfy.samplers.cast_to_load_options(self.b_model_options, device=device, dtype=B.model_dtype())
        B.pre_run()
        self._b_running = True
        template = torch.zeros(self.b_shape, device=device)
        self.b_conds = comfy.samplers.process_conds(B.model, template, conds, device, None, None, seed)
        self.ms_a = self.inner_model.model_sampling
        self.ms_b = B.get_model_object("model_sampling")
        s = [float(v) for v in sigmas]
        self.b_model_options["transformer_options"]["sample_sigmas"] = torch.tensor(
            [coop.equivalent_sigma(self.ms_a, v, self.ms_b) if v > 0 else 0.0 for v in s], device=device)
        self.sample_sigmas = s
        hi, lo = self.window_spec.sigmas(self.ms_a)
        self.bridge_steps = self.window_spec.chosen_steps(self.ms_a, s)
        self.window = (lo, hi)
        self.codec_a = _Codec(self.model_patcher, self.vae_a)
        self.codec_b = _Codec(B, self.vae_b)
        self.fixed_b_noise = coop.gaussian_like(template, (seed or 0) + 7919)
        self.eps_hat = None
        self.x0_hat = None

    def _end_b(self):
        B = self.model_b
        try:
            if getattr(self, "_b_running", False):
                B.cleanup()
        finally:
            self._b_running = False
            cast_opts = getattr(self, "b_model_options", None)
            if cast_opts is not None:
                comfy.samplers.cast_to_load_options(cast_opts, device=B.offload_device)
            B.restore_hook_patches()
            for name in ("b_conds", "eps_hat", "x0_hat", "fixed_b_noise", "codec_a", "codec_b"):
                self.__dict__.pop(name, None)

    def _step_index(self, s: float):
        for i, v in enumerate(self.sample_sigmas[:-1]):
            if abs(v - s) <= 1e-5 * max(1.0, abs(v)):
                return i
        return None

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006  (CFGGuider signature)
        den_a = super().predict_noise(x, timestep, model_options, seed)
        if not self.active:
            return den_a
        s = float(timestep.reshape(-1)[0])
        lo, hi = self.window
        if not (lo <= s <= hi):
            self.stats["a_only"] += 1
            return den_a
        i = self._step_index(s)
        pure = float(coop.noise_coeffs(self.ms_a, s)[0]) <= 0.0  # a flow model at sigma 1: z_t holds no x0
        if self.eps_hat is None or (i is not None and i in self.bridge_steps) or self.eps_hat.shape != x.shape:
            mm.throw_exception_if_processing_interrupted()
            x0_b_in_a = self.bridge_b(x, timestep, den_a, seed)
            self.eps_hat = coop.eps_from_x0(self.ms_a, s, x, x0_b_in_a)
            self.x0_hat = x0_b_in_a if pure else None
            self.stats["bridges"] += 1
        else:
            if self.x0_hat is not None:  # reused after a pure-noise step: B's clean estimate, at this level
                self.eps_hat = coop.eps_from_x0(self.ms_a, s, x, self.x0_hat)
                self.x0_hat = None
            self.stats["reused"] += 1
        if pure:  # the eps form cannot give x0 here; fusing the clean estimates is the same fusion (affine maps)
            return coop.fuse_eps(den_a, self.x0_hat, self.fusion_d)
        eps = coop.fuse_eps(coop.eps_from_x0(self.ms_a, s, x, den_a), self.eps_hat, self.fusion_d)
        return coop.x0_from_eps(self.ms_a, s, x, eps)

    def bridge_b(self, x, timestep, den_a, seed):
        """B's clean estimate at A's level, expressed in A's internal latent space."""
        s = float(timestep.reshape(-1)[0])
        z0_b = coop.latent_bridge(den_a, self.codec_a.decode, self.codec_b.encode, self.px_b, self.resize_method)
        s_b = coop.equivalent_sigma(self.ms_a, s, self.ms_b)
        noise = coop.eps_from_x0(self.ms_a, s, x, den_a) if tuple(z0_b.shape) == tuple(x.shape) else self.fixed_b_noise
        z_b = coop.zt_from_x0(self.ms_b, s_b, z0_b, noise.to(z0_b))
        t_b = torch.full_like(timestep, s_b)
        den_b = comfy.samplers.sampling_function(self.model_b.model, z_b, t_b, self.b_conds.get("negative"),
                                                 self.b_conds.get("positive"), self.cfg_b,
                                                 model_options=self.b_model_options, seed=seed)
        return coop.latent_bridge(den_b, self.codec_b.decode, self.codec_a.encode, self.px_a, self.resize_method)


def make_coop_guider(model_a, vae_a, positive_a, negative_a, cfg_a, model_b, vae_b, positive_b, negative_b, cfg_b,
                     fusion_d, bridge_every, start_percent, end_percent, b_scale=1.0, resize_method="bicubic"):
    for model, cond, m_name, c_name in ((model_a, positive_a, "model_a", "positive_a"),
                                        (model_a, negative_a, "model_a", "negative_a"),
                                        (model_b, positive_b, "model_b", "positive_b"),
                                        (model_b, negative_b, "model_b", "negative_b")):
        if model is not None and hasattr(model, "model"):
            check_conditioning(model, cond, m_name, c_name)
    g = CoopGuider(model_a, vae_a, model_b, vae_b, fusion_d, bridge_every, start_percent, end_percent,
                   b_scale, resize_method)
    g.set_conds(positive_a, negative_a, positive_b, negative_b)
    g.set_cfg(cfg_a, cfg_b)
    return g


# -------------------------------------------------------------- public bridge function

def _internal_to_leftover(model, z_int: torch.Tensor, sigma: float) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    return model.model.process_latent_out(ms.inverse_noise_scaling(torch.tensor(float(sigma)), z_int))


def estimate_x0(model, latent: dict, sigma: float, positive, negative, cfg: float, seed: int = 0) -> torch.Tensor:
    """The model's clean estimate (external latent) of a leftover-noise latent at ``sigma``: one
    model evaluation (with CFG) through ComfyUI's sampler machinery, as a single Euler step to 0."""
    if positive is None or negative is None:
        raise ValueError("positive/negative: estimating x0 needs the conditioning the latent was sampled with "
                         "(or pass denoised=)")
    lat = latent["samples"]
    sigmas = torch.tensor([float(sigma), 0.0])
    sampler = comfy.samplers.sampler_object("euler")
    noise = torch.zeros_like(lat)
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, lat,
                                      noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)


@torch.no_grad()
def bridge_latent(latent: dict, sigma: float, model_from, vae_from, model_to, vae_to, scale: float = 1.0,
                  seed: int = 0, *, positive=None, negative=None, cfg: float = 1.0, denoised: torch.Tensor | None = None,
                  resize_method: str = "bicubic",
                  names: tuple[str, str, str, str] = ("model_from", "vae_from", "model_to", "vae_to"),
                  scale_input: str = "scale") -> tuple[dict, float]:
    """Carry a partly denoised latent from one model's space (and resolution) to another's.

    ``latent``: {"samples": leftover-noise latent of ``model_from`` at ``sigma``} (what
    KSamplerAdvanced returns with return_with_leftover_noise). Its x̂0 is ``denoised`` (external
    latent) when given, else estimated with ``model_from`` and ``positive``/``negative``/``cfg``.
    x̂0 → decode (vae_from) → resize ×scale in pixels → encode (vae_to) → re-noised with fresh
    seeded Gaussian noise at the equivalent level of ``model_to``. Returns ({"samples": ...}
    in model_to's leftover-noise form, ready for KSamplerAdvanced with add_noise disabled /
    SamplerCustom with noise disabled; sigma_to). Raises ValueError on mismatched VAE/model or a
    scale that does not give whole latent pixels.
    """
    check_vae(model_from, vae_from, names[0], names[1])
    check_vae(model_to, vae_to, names[2], names[3])
    lat = latent["samples"]
    if lat.ndim != 4:
        raise ValueError(f"latent: expected an image latent (N, C, H, W), got shape {tuple(lat.shape)}")
    ds_f, ds_t = vae_downscale(vae_from), vae_downscale(vae_to)
    coop.target_size(lat.shape[-2], lat.shape[-1], scale, name=scale_input)
    ph, pw = coop.target_size(lat.shape[-2] * ds_f, lat.shape[-1] * ds_f, scale, name=scale_input)
    if ph % ds_t or pw % ds_t:
        raise ValueError(f"{scale_input}: {scale} gives {pw}x{ph} px, not a multiple of the target VAE's {ds_t} px")
    if resize_method not in coop.RESIZE_METHODS:
        raise ValueError(f"resize_method: {resize_method!r} unknown; choose one of {coop.RESIZE_METHODS}")
    sigma = float(sigma)
    if denoised is None:
        denoised = estimate_x0(model_from, latent, sigma, positive, negative, cfg, seed)
    ms_f, ms_t = model_from.get_model_object("model_sampling"), model_to.get_model_object("model_sampling")
    sigma_to = coop.equivalent_sigma(ms_f, sigma, ms_t) if sigma > 0 else 0.0

    def decode(z_ext):  # external latent of model_from → (N, 3, H, W) pixels in [0, 1]
        return vae_from.decode(z_ext).movedim(-1, 1)

    def encode(px):     # pixels → model_to's internal latent
        return model_to.model.process_latent_in(vae_to.encode(px.movedim(1, -1)).float())
    z_t, _, _ = coop.resolution_bridge(denoised, decode, encode, scale, ms_t, sigma_to, seed, resize_method,
                                       latent_downscale=ds_f, name=scale_input)
    out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    out["samples"] = _internal_to_leftover(model_to, z_t, sigma_to).to(mm.intermediate_device())
    return out, sigma_to


# ------------------------------------------------------------------------------ nodes

_TT = {
    "model_a": "Model A: the trajectory lives in its latent space and at its resolution.",
    "vae_a": "The VAE of model A's checkpoint (decodes/encodes A's latents for the bridge).",
    "positive_a": "Positive prompt encoded with model A's CLIP.",
    "negative_a": "Negative prompt encoded with model A's CLIP.",
    "cfg_a": "Classifier-free guidance scale of model A.",
    "model_b": "Model B: any other image model (another family, latent space or native resolution).",
    "vae_b": "The VAE of model B's checkpoint.",
    "positive_b": "Positive prompt encoded with model B's CLIP.",
    "negative_b": "Negative prompt encoded with model B's CLIP.",
    "cfg_b": "Classifier-free guidance scale of model B.",
    "fusion_d": "d in eps = d*eps_A + (1-d)*eps_B→A. 1 = model A alone (bit-identical, B never loaded), "
                "0 = model B alone carried through A's latent space, 0.5 = equal say.",
    "bridge_every": "Run model B and the VAE bridge on every k-th step of the window; in between its last "
                    "A-space noise prediction is reused (k=4 costs about a quarter of k=1).",
    "start_percent": "Start of the fusion window as a fraction of the denoising schedule (0 = first step).",
    "end_percent": "End of the fusion window (1 = last step). Outside the window model A runs alone.",
    "b_scale": "Model B's pixel resolution relative to A's (0.5: SDXL 1024 as A with SD1.5 at 512 as B; 2: the "
               "other way round). Must give whole latent pixels.",
    "resize_method": "Pixel-space resize used by the bridge (antialiased when shrinking).",
}


def _resize_input():
    return io.Combo.Input("resize_method", options=list(coop.RESIZE_METHODS), default="bicubic",
                          tooltip=_TT["resize_method"])


def _guider_inputs():
    return [
        io.Model.Input("model_a", tooltip=_TT["model_a"]),
        io.Vae.Input("vae_a", tooltip=_TT["vae_a"]),
        io.Conditioning.Input("positive_a", tooltip=_TT["positive_a"]),
        io.Conditioning.Input("negative_a", tooltip=_TT["negative_a"]),
        io.Float.Input("cfg_a", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_TT["cfg_a"]),
        io.Model.Input("model_b", tooltip=_TT["model_b"]),
        io.Vae.Input("vae_b", tooltip=_TT["vae_b"]),
        io.Conditioning.Input("positive_b", tooltip=_TT["positive_b"]),
        io.Conditioning.Input("negative_b", tooltip=_TT["negative_b"]),
        io.Float.Input("cfg_b", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_TT["cfg_b"]),
        io.Float.Input("fusion_d", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=_TT["fusion_d"]),
        io.Int.Input("bridge_every", default=1, min=1, max=1000, tooltip=_TT["bridge_every"]),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_TT["start_percent"]),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=_TT["end_percent"]),
        io.Float.Input("b_scale", default=1.0, min=0.125, max=8.0, step=0.125, tooltip=_TT["b_scale"]),
        _resize_input(),
    ]


class AtelierCoopGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierCoopGuider",
            display_name="Atelier Coop Guider",
            category="atelier/coop",
            description=(
                "PanGu-Draw Coop-Diffusion for SamplerCustomAdvanced: two models with different latent spaces "
                "(e.g. SD1.5 and SDXL) denoise one image together. B's prediction is carried into A's space "
                "through pixels (decode with VAE_B, encode with VAE_A) and fused with A's: "
                "eps = d*eps_A + (1-d)*eps_B→A, every k steps inside a step window."),
            inputs=_guider_inputs(),
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced (noise, sampler and sigmas as usual; "
                                              "sigmas from model A's scheduler).")],
        )

    @classmethod
    def execute(cls, model_a, vae_a, positive_a, negative_a, cfg_a, model_b, vae_b, positive_b, negative_b, cfg_b,
                fusion_d, bridge_every, start_percent, end_percent, b_scale, resize_method) -> io.NodeOutput:
        return io.NodeOutput(make_coop_guider(model_a, vae_a, positive_a, negative_a, cfg_a, model_b, vae_b,
                                              positive_b, negative_b, cfg_b, fusion_d, bridge_every, start_percent,
                                              end_percent, b_scale, resize_method))


def _sampler_common_inputs():
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the initial noise (and of the fresh noise the bridge adds)."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Total denoising steps."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampling algorithm."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Noise schedule."),
    ]


def _run_guider(guider, model, latent, seed, steps, sampler_name, scheduler, denoise):
    lat = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(lat, seed, latent.get("batch_index"))
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    sampler = comfy.samplers.sampler_object(sampler_name)
    callback = latent_preview.prepare_callback(model, ks.sigmas.shape[-1] - 1)
    samples = guider.sample(noise, lat, sampler, ks.sigmas, denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = samples.to(mm.intermediate_device())
    return out


class AtelierCoopSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierCoopSampler",
            display_name="Atelier Coop KSampler",
            category="atelier/coop",
            description=(
                "A KSampler for two models with different latent spaces (e.g. SD1.5 + SDXL) that denoise one image "
                "together (PanGu-Draw Coop-Diffusion). The latent is model A's; decode it with vae_a. fusion_d = 1 "
                "gives exactly the core KSampler on model A."),
            inputs=_guider_inputs() + [io.Latent.Input("latent_image", tooltip="Model A's latent (e.g. EmptyLatentImage "
                                                                              "at A's resolution).")]
            + _sampler_common_inputs()
            + [io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                              tooltip="As in KSampler: below 1 starts from the input latent part-way down the schedule.")],
            outputs=[io.Latent.Output(tooltip="The fused result in model A's latent space.")],
        )

    @classmethod
    def execute(cls, model_a, vae_a, positive_a, negative_a, cfg_a, model_b, vae_b, positive_b, negative_b, cfg_b,
                fusion_d, bridge_every, start_percent, end_percent, b_scale, resize_method, latent_image, seed, steps,
                sampler_name, scheduler, denoise) -> io.NodeOutput:
        guider = make_coop_guider(model_a, vae_a, positive_a, negative_a, cfg_a, model_b, vae_b, positive_b,
                                  negative_b, cfg_b, fusion_d, bridge_every, start_percent, end_percent, b_scale,
                                  resize_method)
        return io.NodeOutput(_run_guider(guider, model_a, latent_image, seed, steps, sampler_name, scheduler, denoise))


def _schedule(model, steps, sampler_name, scheduler):
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas.cpu()


def same_latent_space(a, b) -> bool:
    """Two MODELs that read and write one latent space (same latent format, channels, scale and shift), e.g.
    PixArt-Σ and SDXL: a leftover-noise latent passes between them without a VAE round trip."""
    fa, fb = a.model.latent_format, b.model.latent_format
    return (type(fa) is type(fb) and fa.latent_channels == fb.latent_channels
            and getattr(fa, "scale_factor", None) == getattr(fb, "scale_factor", None)
            and getattr(fa, "shift_factor", None) == getattr(fb, "shift_factor", None))


def bridged_two_stage(first, second, latent: dict, sigmas: torch.Tensor, split: int, *, vae_first, vae_second,
                      seed: int, steps: int, sampler_name: str, scheduler: str, cfg_first: float, positive_first,
                      negative_first, cfg_second: float, positive_second, negative_second, scale: float,
                      resize_method: str = "bicubic", bridge_seed: int, second_seed: int, sample_first=None,
                      sample_second=None, names=("model_from", "vae_from", "model_to", "vae_to"),
                      scale_input: str = "scale") -> tuple[dict, dict | None]:
    """The one two-stage sampler with the Coop bridge between the stages (Resolution Bridge Sampler,
    Struct→Texture across latent families or resolutions).

    1. ``first`` denoises ``sigmas[:split + 1]`` (its schedule) from ``latent`` with fresh noise (``seed``),
       leaving leftover noise at ``sigmas[split]``, as KSamplerAdvanced with return_with_leftover_noise does
       (split 0: the latent is only noised to ``sigmas[0]``). ``split`` at the end of ``sigmas``: that is the
       whole result, returned as (latent, None) without a bridge.
    2. ``bridge_latent``: x̂0 → decode → resize ×``scale`` in pixels → encode → fresh noise (``bridge_seed``)
       at the equivalent level σ' of ``second`` (the same noise-to-signal ratio through each model's own
       ``model_sampling``: a flow σ and an ε σ meet at σ_ε = σ_flow / (1 − σ_flow)). Two models of one latent
       space at ``scale`` 1 (PixArt-Σ ↔ SDXL) need no VAE: ComfyUI's leftover-noise latent is x0 + (s/a)·ε in
       every parametrisation, so it is handed over unchanged (its noise untouched) at σ'.
    3. ``second`` finishes on its own schedule (``steps``, ``scheduler``) from σ': [σ'] + its sigmas below σ'
       (``second_seed`` for ancestral samplers' noise).

    ``sample_first``/``sample_second`` are the patchers that sample (e.g. clones that record their calls; the
    bridge's x̂0 estimate uses ``first`` itself); default the models. Returns (result in ``second``'s latent
    space, the bridged latent)."""
    sample_first = first if sample_first is None else sample_first
    sample_second = second if sample_second is None else sample_second
    sampler = comfy.samplers.sampler_object(sampler_name)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    lat = comfy.sample.fix_empty_latent_channels(first, latent["samples"])
    noise = comfy.sample.prepare_noise(lat, seed, latent.get("batch_index"))
    out = dict(latent)
    if split > 0:
        out["samples"] = comfy.sample.sample_custom(
            sample_first, noise, cfg_first, sampler, sigmas[: split + 1], positive_first, negative_first, lat,
            noise_mask=latent.get("noise_mask"), callback=latent_preview.prepare_callback(sample_first, steps),
            disable_pbar=disable_pbar, seed=seed)
        if split == len(sigmas) - 1:
            return out, None
    else:
        ms = first.get_model_object("model_sampling")
        z = first.model.process_latent_in(lat.float())
        out["samples"] = first.model.process_latent_out(ms.noise_scaling(sigmas[0], noise, z))
    mm.throw_exception_if_processing_interrupted()
    if same_latent_space(first, second) and abs(float(scale) - 1.0) <= 1e-9:
        s = float(sigmas[split])
        ms_f, ms_t = first.get_model_object("model_sampling"), second.get_model_object("model_sampling")
        sigma_to = coop.equivalent_sigma(ms_f, s, ms_t) if s > 0 else 0.0
        bridged = dict(out)
    else:
        bridged, sigma_to = bridge_latent(out, float(sigmas[split]), first, vae_first, second, vae_second, scale,
                                          bridge_seed, positive=positive_first, negative=negative_first,
                                          cfg=cfg_first, resize_method=resize_method, names=names,
                                          scale_input=scale_input)
    own = _schedule(second, steps, sampler_name, scheduler)
    tail = torch.cat([torch.tensor([sigma_to], dtype=own.dtype), own[own < sigma_to - 1e-6]])
    if float(tail[-1]) != 0.0:
        tail = torch.cat([tail, tail.new_zeros(1)])
    z = bridged["samples"]
    samples = comfy.sample.sample_custom(
        sample_second, torch.zeros_like(z), cfg_second, sampler, tail, positive_second, negative_second, z,
        callback=latent_preview.prepare_callback(sample_second, len(tail) - 1), disable_pbar=disable_pbar,
        seed=second_seed)
    res = {k: v for k, v in bridged.items() if k != "samples"}
    res["samples"] = samples
    return res, bridged


def resolution_bridge_sample(model_low, vae_low, positive_low, negative_low, model_high, vae_high, positive_high,
                             negative_high, latent, seed, steps, cfg_low, cfg_high, sampler_name, scheduler,
                             switch_at, scale, resize_method="bicubic"):
    """Low-res model for the first switch_at of the steps → IID bridge ×scale → high-res model."""
    check_vae(model_low, vae_low, "model_low", "vae_low")
    check_vae(model_high, vae_high, "model_high", "vae_high")
    for model, cond, m_name, c_name in ((model_low, positive_low, "model_low", "positive_low"),
                                        (model_low, negative_low, "model_low", "negative_low"),
                                        (model_high, positive_high, "model_high", "positive_high"),
                                        (model_high, negative_high, "model_high", "negative_high")):
        check_conditioning(model, cond, m_name, c_name)
    lat = comfy.sample.fix_empty_latent_channels(model_low, latent["samples"])
    coop.target_size(lat.shape[-2], lat.shape[-1], scale)
    if not (0.0 < switch_at < 1.0):
        raise ValueError(f"switch_at: {switch_at} must be strictly between 0 and 1 (the fraction of steps at low "
                         "resolution)")
    n = round(steps * switch_at)
    if not 1 <= n <= steps - 1:
        raise ValueError(f"switch_at: {switch_at} of {steps} steps leaves no step for one of the models; raise steps "
                         "or move switch_at towards 0.5")
    return bridged_two_stage(
        model_low, model_high, latent, _schedule(model_low, steps, sampler_name, scheduler), n, vae_first=vae_low,
        vae_second=vae_high, seed=seed, steps=steps, sampler_name=sampler_name, scheduler=scheduler,
        cfg_first=cfg_low, positive_first=positive_low, negative_first=negative_low, cfg_second=cfg_high,
        positive_second=positive_high, negative_second=negative_high, scale=scale, resize_method=resize_method,
        bridge_seed=seed + 1, second_seed=seed + 2, names=("model_low", "vae_low", "model_high", "vae_high"))


class AtelierResolutionBridgeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierResolutionBridgeSampler",
            display_name="Atelier Resolution Bridge Sampler",
            category="atelier/coop",
            description=(
                "Single-stage super-resolution (PanGu-Draw Coop-Diffusion): the low-resolution model denoises the "
                "first part of the schedule, its clean estimate is decoded, upscaled in pixel space, encoded with "
                "the high-resolution model's VAE and re-noised to the same level with fresh Gaussian noise (the noise "
                "stays white, unlike latent upscaling), and the high-resolution model finishes. The models may be "
                "of different families (SD1.5 → SDXL)."),
            inputs=[
                io.Model.Input("model_low", tooltip="Low-resolution model (e.g. SD1.5 at 512 px)."),
                io.Vae.Input("vae_low", tooltip="The VAE of the low-resolution model's checkpoint."),
                io.Conditioning.Input("positive_low", tooltip="Positive prompt for the low-resolution model."),
                io.Conditioning.Input("negative_low", tooltip="Negative prompt for the low-resolution model."),
                io.Model.Input("model_high", tooltip="High-resolution model (e.g. SDXL at 1024 px)."),
                io.Vae.Input("vae_high", tooltip="The VAE of the high-resolution model's checkpoint."),
                io.Conditioning.Input("positive_high", tooltip="Positive prompt for the high-resolution model."),
                io.Conditioning.Input("negative_high", tooltip="Negative prompt for the high-resolution model."),
                io.Latent.Input("latent_image", tooltip="Low-resolution starting latent (EmptyLatentImage at the low "
                                                        "model's size)."),
                *_sampler_common_inputs(),
                io.Float.Input("cfg_low", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale of the low-resolution model."),
                io.Float.Input("cfg_high", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale of the high-resolution model."),
                io.Float.Input("switch_at", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="Fraction of the steps done at low resolution; the bridge happens at that "
                                       "step's noise level (PanGu-Draw's T_struct=500 of 1000 is about 0.5)."),
                io.Float.Input("scale", default=2.0, min=0.25, max=8.0, step=0.25,
                               tooltip="Pixel upscale factor from the low to the high resolution; must give whole "
                                       "latent pixels (2 takes 512 px to 1024 px)."),
                _resize_input(),
            ],
            outputs=[io.Latent.Output(display_name="samples", tooltip="High-resolution result (decode with vae_high)."),
                     io.Latent.Output(display_name="bridged", tooltip="The re-noised high-resolution latent right after "
                                                                      "the bridge (leftover-noise form), for inspection.")],
        )

    @classmethod
    def execute(cls, model_low, vae_low, positive_low, negative_low, model_high, vae_high, positive_high, negative_high,
                latent_image, seed, steps, sampler_name, scheduler, cfg_low, cfg_high, switch_at, scale,
                resize_method) -> io.NodeOutput:
        out, bridged = resolution_bridge_sample(model_low, vae_low, positive_low, negative_low, model_high, vae_high,
                                                positive_high, negative_high, latent_image, seed, steps, cfg_low,
                                                cfg_high, sampler_name, scheduler, switch_at, scale, resize_method)
        return io.NodeOutput(out, bridged)


class AtelierNoiseAwareLatentUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierNoiseAwareLatentUpscale",
            display_name="Atelier Noise-Aware Latent Upscale",
            category="atelier/coop",
            description=(
                "Upscales a partly denoised latent from KSamplerAdvanced (return_with_leftover_noise enabled) without "
                "smearing its noise: the model estimates the clean image at the current noise level, which is decoded, "
                "upscaled in pixel space, encoded and re-noised to the same level with fresh white noise. Continue with "
                "a KSamplerAdvanced at the same steps/scheduler, start_at_step = end_at_step, add_noise disabled. The "
                "noise level is computed from steps, scheduler and end_at_step (copy them from the first sampler)."),
            inputs=[
                io.Model.Input("model", tooltip="The model that produced the latent (it estimates the clean image)."),
                io.Vae.Input("vae", tooltip="The VAE of that model's checkpoint."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning the latent was sampled with."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning the latent was sampled with."),
                io.Latent.Input("samples", tooltip="Leftover-noise latent from KSamplerAdvanced."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale for the clean-image estimate (use the first sampler's)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The first KSamplerAdvanced's steps."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The first KSamplerAdvanced's sampler (some samplers shift the schedule)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The first KSamplerAdvanced's scheduler."),
                io.Int.Input("end_at_step", default=10, min=1, max=10000,
                             tooltip="The first KSamplerAdvanced's end_at_step: the latent's noise level."),
                io.Float.Input("scale", default=2.0, min=0.25, max=8.0, step=0.25,
                               tooltip="Upscale factor; must give whole latent pixels."),
                _resize_input(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the fresh noise."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="SamplerCustomAdvanced path (e.g. Flux): the SIGMAS the second sampler continues "
                                        "on (SplitSigmas' low_sigmas); their first sigma is the latent's noise level, "
                                        "and steps/sampler/scheduler/end_at_step are not used."),
            ],
            outputs=[io.Latent.Output(tooltip="Upscaled latent with white leftover noise at the same level.")],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, samples, cfg, steps, sampler_name, scheduler, end_at_step, scale,
                resize_method, seed, sigmas=None) -> io.NodeOutput:
        check_vae(model, vae, "model", "vae")
        check_conditioning(model, positive, "model", "positive")
        check_conditioning(model, negative, "model", "negative")
        if sigmas is not None:
            flat = torch.as_tensor(sigmas).flatten()
            if flat.numel() < 2 or not float(flat[0]) > 0:
                raise ValueError("sigmas: expected the schedule the second sampler continues on (SplitSigmas' "
                                 "low_sigmas, at least two values, the first above 0); connect that output")
            sigma = float(flat[0])
        else:
            if not 1 <= end_at_step < steps:
                raise ValueError(f"end_at_step: {end_at_step} must be between 1 and steps-1 ({steps - 1}); at step 0 "
                                 "the latent is pure noise (use a plain latent upscale) and at the end it has no noise "
                                 "left")
            sigma = float(_schedule(model, steps, sampler_name, scheduler)[end_at_step])
        out, _ = bridge_latent(samples, sigma, model, vae, model, vae, scale, seed, positive=positive,
                               negative=negative, cfg=cfg, resize_method=resize_method,
                               names=("model", "vae", "model", "vae"))
        return io.NodeOutput(out)


NODES = [AtelierCoopGuider, AtelierCoopSampler, AtelierResolutionBridgeSampler, AtelierNoiseAwareLatentUpscale]
