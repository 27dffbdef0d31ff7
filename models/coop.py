"""Coop-Diffusion (PanGu-Draw §4.2): two diffusion models with different latent spaces or
resolutions denoising together. Pure torch; no ComfyUI imports.

Conventions
-----------
Every function that needs a model's noise parametrisation takes that model's ``model_sampling``
object (duck-typed: anything with ComfyUI's ``noise_scaling(sigma, noise, latent)`` and
``calculate_denoised(sigma, model_output, model_input)``), never a hard-coded formula. Both maps
are affine, so their coefficients are read off by probing them with ones and zeros:

    z_t = a(σ)·x0 + s(σ)·ε                     (noise_scaling;  VP/EPS/V: a = 1, s = σ;
                                                               flow/CONST: a = 1−σ, s = σ)
    x0  = c_x(σ)·z_t + c_out(σ)·model_output    (calculate_denoised; EPS: 1, −σ;
                                                 V: 1/(σ²+1), −σ/√(σ²+1))

ComfyUI samples VP models (SD1.5, SDXL, SD2-v) in the k-diffusion form x = x0 + σ·ε with
σ = √((1−ᾱ)/ᾱ); the network sees x/√(1+σ²) = √ᾱ·x0 + √(1−ᾱ)·ε, the classic DDPM z_t. The
"same noise level" in two models is the same noise-to-signal ratio s/a (equal SNR); for two VP
models on one schedule that is the same σ. Latents here are the models' *internal* latents
(after ``process_latent_in``); decode/encode callables given to the bridges map internal
latents to pixels (N, C, H, W, values in [0, 1]) and back.

Fusing in ε (the paper: ε = d·ε_A + (1−d)·ε̂) is the same as fusing x0 or the raw model
output, because for a fixed z_t and σ the maps between them are affine.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Codec = Callable[[torch.Tensor], torch.Tensor]
RESIZE_METHODS = ("bicubic", "bilinear", "area", "nearest-exact")


# ---------------------------------------------------------------- parametrisation probes

def _dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _sig(sigma, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(sigma):
        sigma = sigma.detach().reshape(-1)[0]
    return torch.as_tensor(sigma, dtype=_dtype(like), device=like.device).reshape(())


def _linear_coeffs(fn, sigma, like: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(sigma, 1, 0), fn(sigma, 0, 1)) as 0-dim tensors: the two coefficients of a model_sampling map that is
    linear in its two tensor inputs (noise_scaling, calculate_denoised)."""
    like = torch.zeros(()) if like is None else like
    sig = _sig(sigma, like)
    one = torch.ones((1, 1), dtype=_dtype(like), device=like.device)
    zero = torch.zeros((1, 1), dtype=_dtype(like), device=like.device)
    return fn(sig, one.clone(), zero.clone()).reshape(()), fn(sig, zero.clone(), one.clone()).reshape(())


def noise_coeffs(ms, sigma, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) with z_t = a·x0 + s·ε for this model_sampling at sigma (0-dim tensors)."""
    s, a = _linear_coeffs(ms.noise_scaling, sigma, like)  # noise_scaling(sigma, noise, latent_image)
    return a, s


def denoise_coeffs(ms, sigma, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_x, c_out) with x0 = c_x·z_t + c_out·model_output."""
    c_out, c_x = _linear_coeffs(ms.calculate_denoised, sigma, like)  # calculate_denoised(sigma, output, input)
    return c_x, c_out


def x0_from_output(ms, sigma, z_t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The model's clean-latent estimate from its raw output (ε, v, x0, flow velocity...)."""
    c_x, c_out = denoise_coeffs(ms, sigma, z_t)
    return c_x.to(z_t.dtype) * z_t + c_out.to(z_t.dtype) * output


def output_from_x0(ms, sigma, z_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Inverse of x0_from_output: the raw model output that yields x0 (ε for EPS, v for V)."""
    c_x, c_out = denoise_coeffs(ms, sigma, z_t)
    if float(c_out) == 0.0:
        raise ValueError("output_from_x0: this parametrisation predicts x0 directly; its output is x0 itself")
    return (x0 - c_x.to(z_t.dtype) * z_t) / c_out.to(z_t.dtype)


def eps_from_x0(ms, sigma, z_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (z_t − a·x0)/s: the noise a clean estimate implies at this level."""
    a, s = noise_coeffs(ms, sigma, z_t)
    return (z_t - a.to(z_t.dtype) * x0) / s.to(z_t.dtype)


def x0_from_eps(ms, sigma, z_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (z_t − s·ε)/a."""
    a, s = noise_coeffs(ms, sigma, z_t)
    return (z_t - s.to(z_t.dtype) * eps) / a.to(z_t.dtype)


def zt_from_x0(ms, sigma, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_t = a·x0 + s·ε (the model's own forward noising)."""
    a, s = noise_coeffs(ms, sigma, x0)
    return a.to(x0.dtype) * x0 + s.to(x0.dtype) * eps


def noise_to_signal(ms, sigma) -> float:
    """s/a at sigma: the level in a form that is comparable between models (1/√SNR)."""
    a, s = noise_coeffs(ms, sigma)
    a, s = float(a), float(s)
    return math.inf if a <= 0.0 else s / a


def equivalent_sigma(ms_from, sigma, ms_to, lo: float = 1e-6, hi: float = 1e6) -> float:
    """The sigma of ``ms_to`` at the same noise-to-signal ratio as ``sigma`` in ``ms_from``.

    Returns ``sigma`` itself when both parametrisations agree there (two VP models: always).
    Otherwise solves s/a = r by bisection in log σ (the ratio increases with σ for every
    ComfyUI parametrisation); flow models (σ ∈ (0, 1)) are searched below 1. A level noisier than
    the target was trained at — pure noise (a flow model at σ = 1, r = ∞), or a σ above the target's
    ``sigma_max`` (PixArt-Σ's schedule reaches 157, SDXL's 14.6) — maps to the target's ``sigma_max``,
    the closest level it knows: a model called far above it draws garbage.
    """
    sigma = float(sigma)
    r = noise_to_signal(ms_from, sigma)
    top_to = getattr(ms_to, "sigma_max", None)
    top_to = float(top_to) if top_to is not None else None
    if sigma > 0 and noise_to_signal(ms_to, sigma) == r:
        return min(sigma, top_to) if top_to is not None else sigma
    if r == 0.0:
        return 0.0
    if math.isinf(r):  # pure noise (a flow model at sigma 1): the target's noisiest level, as close as it gets
        if top_to is None:
            raise ValueError("equivalent_sigma: sigma is pure noise in the source model; nothing to match")
        return top_to
    top = hi
    if not math.isfinite(noise_to_signal(ms_to, min(hi, 1.0))):  # flow: a(1) = 0
        top = 1.0 - 1e-7
    lo_l, hi_l = math.log(lo), math.log(top)
    for _ in range(80):
        mid = 0.5 * (lo_l + hi_l)
        if noise_to_signal(ms_to, math.exp(mid)) < r:
            lo_l = mid
        else:
            hi_l = mid
    found = math.exp(0.5 * (lo_l + hi_l))
    return min(found, top_to) if top_to is not None else found


# ------------------------------------------------------------ closed forms (checked by the tests)

def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ComfyUI's k-diffusion sigma of a discrete VP schedule: √((1−ᾱ)/ᾱ)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def vp_x0_from_v(z_vp: torch.Tensor, v: torch.Tensor, alpha_bar) -> torch.Tensor:
    """v-prediction: x0 = √ᾱ·z − √(1−ᾱ)·v."""
    ab = torch.as_tensor(alpha_bar, dtype=z_vp.dtype)
    return ab.sqrt() * z_vp - (1 - ab).sqrt() * v


# ------------------------------------------------------------------------------- fusion

def check_fusion_weight(d: float, name: str = "fusion_d") -> float:
    d = float(d)
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise ValueError(f"{name}: {d} is outside [0, 1]; 1 = model A alone, 0 = model B alone (bridged), "
                         "0.5 = equal say")
    return d


def fuse_eps(eps_a: torch.Tensor, eps_b_in_a: torch.Tensor, d: float) -> torch.Tensor:
    """ε = d·ε_A + (1−d)·ε̂ (paper eq. 6); d = 1 returns eps_a itself."""
    d = check_fusion_weight(d)
    if d == 1.0:
        return eps_a
    if d == 0.0:
        return eps_b_in_a
    return d * eps_a + (1.0 - d) * eps_b_in_a


# ------------------------------------------------------------------------------ resizing

def target_size(h: int, w: int, scale: float, name: str = "scale") -> tuple[int, int]:
    """(round(h·scale), round(w·scale)), or a ValueError when scale does not give whole latent pixels."""
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: {scale} must be a positive number (2.0 doubles the width and height)")
    th, tw = h * scale, w * scale
    if abs(th - round(th)) > 1e-6 or abs(tw - round(tw)) > 1e-6 or round(th) < 1 or round(tw) < 1:
        ok = sorted({k / g for g in (1, 2, 4, 8) for k in range(1, 8 * g + 1)
                     if abs(h * k / g - round(h * k / g)) < 1e-9 and abs(w * k / g - round(w * k / g)) < 1e-9
                     and 0.25 <= k / g <= 8})
        near = min(ok, key=lambda v: abs(v - scale)) if ok else None
        raise ValueError(f"{name}: {scale} times a {h}x{w} latent is {th:g}x{tw:g}, not a whole number of latent "
                         f"pixels; use a scale that divides evenly (nearest that works: {near})")
    return round(th), round(tw)


def resize_pixels(img: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize (N, C, H, W) pixels in [0, 1]; antialiased when shrinking; clamped back to [0, 1]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize_method: {method!r} unknown; choose one of {RESIZE_METHODS}")
    kw = {}
    if method in ("bicubic", "bilinear"):
        kw = {"align_corners": False, "antialias": size[0] < img.shape[-2] or size[1] < img.shape[-1]}
    out = F.interpolate(img.float(), size=size, mode=method, **kw)
    return out.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- the bridges

def latent_bridge(x0_b: torch.Tensor, decode_b: Codec, encode_a: Codec,
                  pixel_size_a: tuple[int, int] | None = None, resize_method: str = "bicubic") -> torch.Tensor:
    """B's clean estimate → decode with VAE_B → (resize to A's pixel size) → encode with VAE_A.

    Returns A's internal clean latent ẑ0. With ``eps_from_x0(ms_a, σ, z_t, ẑ0)`` it becomes the
    A-space noise prediction ε̂ of the paper.
    """
    pixels = decode_b(x0_b)
    if pixel_size_a is not None:
        pixels = resize_pixels(pixels, pixel_size_a, resize_method)
    return encode_a(pixels)


def renoise(ms, sigma, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise a clean latent to ``sigma`` with the given (white) noise in the model's own form."""
    if noise.shape != x0.shape:
        raise ValueError(f"renoise: noise {tuple(noise.shape)} and latent {tuple(x0.shape)} differ in shape")
    return zt_from_x0(ms, sigma, x0, noise.to(x0))


def gaussian_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded N(0, 1) noise of x's shape, drawn on the CPU (same numbers on every device)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return torch.randn(tuple(x.shape), generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def resolution_bridge(x0_low: torch.Tensor, decode_low: Codec, encode_high: Codec, scale: float,
                      ms_high, sigma_high, seed: int, resize_method: str = "bicubic",
                      latent_downscale: int = 8, name: str = "scale") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IID-preserving upsampling of a partly denoised latent (paper §4.2, fig. 2c).

    x̂0 (low-res) → decode → resize ×scale in pixel space → encode → z0_high, then
    z_t = a·z0_high + s·n with *fresh* Gaussian n at ``sigma_high`` in the high-res model's form.
    ``latent_downscale`` is the low-res VAE's pixels per latent pixel; ``decode_low``/``encode_high``
    define which latent form goes in and comes out (the nodes pass ComfyUI's VAEs and the high model's
    ``process_latent_in``, so ``z0_high`` is its internal latent). Returns (z_t_high, z0_high, n).
    Bilinear upsampling of z_t instead would correlate the noise. ``name`` is the input a bad
    ``scale`` is reported on.
    """
    th, tw = target_size(x0_low.shape[-2], x0_low.shape[-1], scale, name=name)
    pixels = decode_low(x0_low)
    pixels = resize_pixels(pixels, (th * latent_downscale, tw * latent_downscale), resize_method)
    z0 = encode_high(pixels)
    n = gaussian_like(z0, seed)
    return renoise(ms_high, sigma_high, z0, n), z0, n


# ------------------------------------------------------------------------------ measures

def spatial_autocorrelation(x: torch.Tensor, lag: int = 1) -> float:
    """Mean lag-``lag`` correlation between horizontally and vertically adjacent latent pixels,
    per sample and channel after removing the channel mean. White noise gives ≈ 0; bilinear ×2
    upsampling of white noise gives ≈ 0.5–0.6."""
    if x.ndim < 3:
        raise ValueError("spatial_autocorrelation: need a (..., H, W) tensor")
    x = x.float().reshape(-1, x.shape[-2], x.shape[-1])
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    var = (x * x).mean(dim=(-2, -1))
    h = (x[:, :, :-lag] * x[:, :, lag:]).mean(dim=(-2, -1))
    v = (x[:, :-lag, :] * x[:, lag:, :]).mean(dim=(-2, -1))
    ok = var > 0
    if not ok.any():
        return 0.0
    return float(((h[ok] + v[ok]) / (2 * var[ok])).mean())
