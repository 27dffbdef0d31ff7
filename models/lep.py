"""Latent edge predictor (LEP) for sketch guidance (Voynov et al., "Sketch-Guided Text-to-Image
Diffusion Models"). Pure torch + numpy/scipy: no ComfyUI imports.

What is here
------------
* :data:`LAYERS` — which UNet activations feed the predictor, per model family. SD1.5 is the
  paper's: input blocks 2, 4, 8; middle block 0, 1, 2 (its three sub-layers: ResBlock,
  SpatialTransformer, ResBlock); output blocks 2, 4, 8. SDXL (our choice, documented): input
  blocks 2, 5, 8 (the last block of each of SDXL's three input resolutions, as SD1.5's 2/4/8 give
  one feature per resolution 1, 1/2, 1/4), middle 0, 1, 2, output blocks 2, 4, 8 (same indices:
  output 2 ends the coarsest level with its upsampler, 4 sits in the middle level, 8 ends the
  finest level — the coarse-to-fine sweep SD1.5's 2/4/8 make).
* :class:`FeatureCapture` — forward hooks on those modules for the duration of a ``with`` block.
* :class:`LatentEdgePredictor` — the per-pixel MLP (1x1 convolutions): hidden 512, 256, 128, 64,
  output 4, ReLU and batch norm, with a sinusoidal encoding of the timestep (0..999) appended to
  every pixel's feature vector.
* :class:`DenoisedEdgeHead` — the fast form's predictor: three 3x3 convolutions from the model's
  denoised latent x0_hat (+ timestep) to the same edge latent; its gradient needs no UNet backward.
* Sketch preprocessing (:func:`preprocess_sketch`): stroke polarity auto-detection, threshold,
  thin to one pixel (Zhang-Suen) or thicken; :func:`sobel_edges`, :func:`canny_edges`;
  :func:`rasterize_strokes` for the canvas widget's JSON.
* Guidance maths (:func:`guidance_shift`): the paper moves z_t against grad L with
  alpha = beta * ||z_t - z_{t-1}|| / ||grad L||. In denoised-prediction form (what a ComfyUI
  post-CFG hook corrects) this is D' = D - beta * ||x - D|| * grad L / ||grad L|| for any
  first-order sampler: an Euler step from x with D' moves x by (sigma - sigma_next)/sigma * (D' - D),
  and ||z_t - z_{t-1}|| = (sigma - sigma_next)/sigma * ||x - D||, so the step sizes cancel.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AtelierError

HIDDEN = (512, 256, 128, 64)
OUT_CHANNELS = 4
PE_DIM = 32  # sinusoidal timestep encoding width
HEAD_HIDDEN = 96  # DenoisedEdgeHead width
HEAD_DEPTH = 3

#: UNets: (block kind, block index, sub-layer index or None) per family. DiTs: (block kind, relative depth), the
#: block at round(depth * (n - 1)) of the model's n blocks of that kind (nodes/dit_hooks.py: kinds, token layout).
LAYERS: dict[str, tuple[tuple, ...]] = {
    "sd15": (("input", 2, None), ("input", 4, None), ("input", 8, None),
             ("middle", 0, 0), ("middle", 0, 1), ("middle", 0, 2),
             ("output", 2, None), ("output", 4, None), ("output", 8, None)),
    "sdxl": (("input", 2, None), ("input", 5, None), ("input", 8, None),
             ("middle", 0, 0), ("middle", 0, 1), ("middle", 0, 2),
             ("output", 2, None), ("output", 4, None), ("output", 8, None)),
    # A DiT has one resolution, so the paper's spread over resolutions becomes a spread over depth.
    # PixArt (28 blocks in PixArt-Σ: 7, 14, 20, 27): a quarter, half, three quarters and the last block.
    "pixart": (("block", 0.25), ("block", 0.5), ("block", 0.75), ("block", 1.0)),
    # Flux (19 double-stream + 38 single-stream blocks: double 9, 18; single 9, 19, 28): the middle and the end of
    # the double stream (image tokens on their own) and the first three quarters of the single stream (image
    # tokens after the text tokens); its last quarter mostly renders the output, as the paper leaves out SD1.5's
    # last full-resolution decoder blocks.
    "flux": (("double", 0.5), ("double", 1.0), ("single", 0.25), ("single", 0.5), ("single", 0.75)),
    # SD3 (24 joint blocks in SD3.5 medium, 38 in large): a quarter, half, three quarters and the last block.
    "sd3": (("joint", 0.25), ("joint", 0.5), ("joint", 0.75), ("joint", 1.0)),
}



def every_block(kind: str, n: int) -> tuple[tuple, ...]:
    """Layer specs for every one of ``n`` DiT blocks of ``kind`` (the widest alternative to a spread)."""
    return tuple((kind, i / max(1, n - 1)) for i in range(n))


class LEPError(AtelierError):
    """Bad input for the sketch/LEP code; the message names the input and the fix."""


def is_dit_spec(spec) -> bool:
    return len(spec) == 2 and isinstance(spec[1], float)


def spec_name(spec) -> str:
    if is_dit_spec(spec):
        return f"{spec[0]}@{spec[1]:g}"
    k, b, s = spec
    return f"{k}.{b}" + ("" if s is None else f".{s}")


def layer_names(family: str, layers=None) -> list[str]:
    """The layer names a predictor records (``input.2``, ``middle.0.1``; DiT ``double@0.5``)."""
    if layers is None:
        if family not in LAYERS:
            raise LEPError(f"family: no LEP layer map for {family!r}; supported: {sorted(LAYERS)}")
        layers = LAYERS[family]
    return [spec_name(s) for s in layers]


def parse_layer_names(names: Sequence[str]) -> tuple[tuple, ...]:
    """Recorded names back to layer specs (the inverse of :func:`layer_names`)."""
    out = []
    for n in names:
        if "@" in n:
            k, pos = n.split("@", 1)
            out.append((k, float(pos)))
        else:
            parts = n.split(".")
            out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None))
    return tuple(out)


def resolve_modules(unet: nn.Module, family: str) -> list[nn.Module]:
    """The modules of a UNetModel (ComfyUI's openaimodel layout) whose outputs the LEP reads."""
    mods = []
    for kind, block, sub in LAYERS[family]:
        if kind == "input":
            seq = unet.input_blocks
        elif kind == "output":
            seq = unet.output_blocks
        else:
            seq = [unet.middle_block]
        if block >= len(seq):
            raise LEPError(f"model: this UNet has no {kind} block {block}; is it really {family}?")
        m = seq[block]
        if sub is None:
            # Blocks are TimestepEmbedSequential, whose layers ComfyUI calls one by one (the container's
            # own forward hooks never fire): the block's output is its last layer's output.
            m = m[-1]
        else:
            if sub >= len(m):
                raise LEPError(f"model: the {kind} block has no sub-layer {sub}; is it really {family}?")
            m = m[sub]
        mods.append(m)
    return mods


class FeatureCapture:
    """Forward hooks on the LEP layers while the ``with`` block runs; ``features`` holds the
    captured outputs in layer order (the last call's). Hooks live only inside the block, so a
    shared UNet is untouched outside it and other packs' hooks are unaffected.

    ``stop_grad_after_last``: once the last LEP layer has run, autograd recording is switched off
    for the rest of the forward (the caller's ``torch.enable_grad()`` block restores it): the
    layers after it (SD1.5's full-resolution output blocks 9-11) never reach the loss, so keeping
    their activations for a backward would only cost memory. Numerics are unchanged."""

    def __init__(self, unet: nn.Module, family: str, stop_grad_after_last: bool = False):
        self.unet = unet
        self.modules = resolve_modules(unet, family)
        self.stop_grad_after_last = stop_grad_after_last
        self.features: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = []

    def _hook(self, i):
        last = i == len(self.modules) - 1

        def fn(_module, _inputs, output):
            self.features[i] = output[0] if isinstance(output, (tuple, list)) else output
            if last and self.stop_grad_after_last:
                torch.set_grad_enabled(False)
        return fn

    def _restart(self, _module, _inputs):
        torch.set_grad_enabled(self._grad_mode)   # a second forward inside the block records again

    def __enter__(self):
        self.features = [None] * len(self.modules)
        self._grad_mode = torch.is_grad_enabled()
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        if self.stop_grad_after_last:
            self._handles.append(self.unet.register_forward_pre_hook(self._restart))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        torch.set_grad_enabled(self._grad_mode)
        return False

    def take(self) -> list[torch.Tensor]:
        feats = self.features
        if any(f is None for f in feats):
            missing = [i for i, f in enumerate(feats) if f is None]
            raise LEPError(f"model: LEP layers {missing} produced no activations during the forward pass")
        self.features = [None] * len(self.modules)
        return feats


def concat_features(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize every activation to the latent size (bilinear) and concatenate on channels."""
    out = []
    for f in features:
        f = f.float()
        if tuple(f.shape[-2:]) != tuple(size):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def timestep_encoding(t: torch.Tensor, dim: int = PE_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding of timesteps (B,) in 0..999 → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def with_timestep(x: torch.Tensor, timestep: torch.Tensor, pe_dim: int) -> torch.Tensor:
    """x (B, C, H, W) with the timestep's sinusoidal encoding appended to every pixel: (B, C + pe_dim, H, W).
    A single timestep is broadcast over the batch."""
    b, _, h, w = x.shape
    t = timestep.reshape(-1).to(x.device)
    if t.numel() == 1:
        t = t.expand(b)
    pe = timestep_encoding(t, pe_dim).to(x.dtype)[:, :, None, None].expand(b, pe_dim, h, w)
    return torch.cat([x, pe], dim=1)


class LatentEdgePredictor(nn.Module):
    """Per-pixel MLP: (B, C, H, W) features + timestep → (B, 4, H, W) predicted edge latent."""

    def __init__(self, in_channels: int, hidden: Sequence[int] = HIDDEN, out_channels: int = OUT_CHANNELS,
                 pe_dim: int = PE_DIM):
        super().__init__()
        self.in_channels, self.pe_dim, self.out_channels = int(in_channels), int(pe_dim), int(out_channels)
        self.hidden = tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        c = self.in_channels + self.pe_dim
        for h in self.hidden:
            layers += [nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), nn.ReLU(inplace=True)]
            c = h
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if feats.shape[1] != self.in_channels:
            raise LEPError(f"lep: expects {self.in_channels} feature channels, the model gave {feats.shape[1]}; "
                           "the LEP was trained on a different model architecture")
        return self.net(with_timestep(feats, timestep, self.pe_dim))


class DenoisedEdgeHead(nn.Module):
    """The cheaper guidance form's predictor: the edge latent from the model's own denoised
    prediction x0_hat (B, 4, H, W) and the timestep, through three 3x3 convolutions (a 7x7-cell
    receptive field). Its gradient with respect to x0_hat needs no backward pass through the UNet:
    the manifold-preserving shortcut of He et al. 2023 (MPGD), which takes the guidance gradient
    on the clean estimate instead of on z_t. Trained next to the LEP, on the same batches."""

    def __init__(self, in_channels: int = OUT_CHANNELS, hidden: int = HEAD_HIDDEN, depth: int = HEAD_DEPTH,
                 out_channels: int = OUT_CHANNELS, pe_dim: int = PE_DIM):
        super().__init__()
        self.in_channels, self.hidden, self.depth, self.pe_dim = int(in_channels), int(hidden), int(depth), int(pe_dim)
        self.out_channels = int(out_channels)
        layers: list[nn.Module] = []
        c = self.in_channels + self.pe_dim
        for _ in range(self.depth):
            layers += [nn.Conv2d(c, self.hidden, 3, padding=1), nn.SiLU()]
            c = self.hidden
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x0: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if x0.shape[1] != self.in_channels:
            raise LEPError(f"lep: the denoised-latent head expects {self.in_channels} latent channels, the model "
                           f"gave {x0.shape[1]}; the LEP was trained on a different model family")
        return self.net(with_timestep(x0, timestep, self.pe_dim))


def lep_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (B,), the paper's ||P(F) - E(e)||^2 averaged over pixels."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- guidance maths

def guidance_shift(x: torch.Tensor, denoised: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """The corrected denoised prediction D' = D - beta * ||x - D|| * g / ||g|| (norms per sample).

    Equivalent to the paper's z_{t-1} <- z_{t-1} - alpha grad L with
    alpha = beta ||z_t - z_{t-1}|| / ||grad L|| for Euler-type steps (see the module docstring)."""
    if beta == 0:
        return denoised
    b = x.shape[0]
    step = (x - denoised).reshape(b, -1).norm(dim=1)
    g = grad.to(denoised.dtype)
    gn = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    if g.shape[0] != b:
        g, gn = g.expand(b, *g.shape[1:]), gn.expand(b)
    scale = (beta * step / gn).reshape(b, *([1] * (x.dim() - 1)))
    return denoised - scale * g


def paper_alpha(beta: float, z_t: torch.Tensor, z_prev: torch.Tensor, grad: torch.Tensor) -> float:
    """alpha = beta * ||z_t - z_{t-1}|| / ||grad L|| as written in the paper (whole tensors)."""
    return float(beta * (z_t - z_prev).norm() / grad.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------- sketches and edges

def _gray(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) IMAGE in 0..1 → (B, H, W) luminance."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise LEPError(f"sketch: expected an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c >= 3:
        return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return image[..., 0]


def detect_polarity(gray: torch.Tensor) -> str:
    """'black' if strokes are dark on a light paper (median brightness > 0.5), else 'white'."""
    return "black" if float(gray.median()) > 0.5 else "white"


def _thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a bool mask (H, W) to one-pixel-wide strokes."""
    img = np.pad(mask.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p = img
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            # neighbours P2..P9 clockwise from north
            c = p[1:-1, 1:-1]
            b = sum(x.astype(np.int32) for x in n)
            seq = n + [n[0]]
            a = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.int32) for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                cond = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                cond = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            rm = (c == 1) & (b >= 2) & (b <= 6) & (a == 1) & cond
            if rm.any():
                img = img.copy()
                img[1:-1, 1:-1][rm] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, H, W) bool → dilated by a disc of ``radius`` px."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    yy, xx = torch.meshgrid(torch.arange(k) - radius, torch.arange(k) - radius, indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= radius * radius + 0.5).float()[None, None]
    out = F.conv2d(mask.float()[:, None], disc, padding=radius)
    return out[:, 0] > 0


def preprocess_sketch(image: torch.Tensor, polarity: str = "auto", threshold: float = 0.5,
                      stroke: str = "keep", thicken_px: int = 1) -> torch.Tensor:
    """A sketch IMAGE → stroke mask (B, H, W) bool (True = stroke).

    polarity: 'auto' (dark strokes on light paper if the median is bright), 'black strokes' or
    'white strokes'. threshold: on the stroke darkness/brightness (0..1). stroke: 'keep',
    'thin' (one pixel wide, Zhang-Suen) or 'thicken' (dilate by ``thicken_px``)."""
    gray = _gray(image.float().cpu())
    pol = polarity.split()[0] if polarity != "auto" else detect_polarity(gray)
    if pol not in ("black", "white"):
        raise LEPError(f"polarity: {polarity!r}; choose auto, black strokes or white strokes")
    strength = 1.0 - gray if pol == "black" else gray
    if not 0.0 < threshold < 1.0:
        raise LEPError(f"threshold: {threshold} must be between 0 and 1 (0.5 suits clean line drawings)")
    mask = strength > threshold
    if stroke == "thin":
        mask = torch.from_numpy(np.stack([_thin(m) for m in mask.numpy()]))
    elif stroke == "thicken":
        mask = _dilate(mask, int(thicken_px))
    elif stroke != "keep":
        raise LEPError(f"stroke: {stroke!r}; choose keep, thin or thicken")
    return mask


def mask_to_edge_image(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool → IMAGE (B, H, W, 3), white edges on black (the LEP's target convention)."""
    return mask.float()[..., None].expand(*mask.shape, 3).contiguous()


def sobel_edges(image: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """IMAGE (B, H, W, C) → (B, H, W) bool: Sobel gradient magnitude of luminance, normalised
    to its per-image maximum, thresholded."""
    g = _gray(image.float().cpu())[:, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None] / 8.0
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(gp, kx)
    gy = F.conv2d(gp, kx.transpose(-1, -2))
    mag = (gx ** 2 + gy ** 2).sqrt()[:, 0]
    mx = mag.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    return (mag / mx) > threshold


def canny_edges(image: torch.Tensor, sigma: float = 1.0, low: float = 6.0, high: float = 10.0) -> torch.Tensor:
    """IMAGE (B, H, W, C) → (B, H, W) bool: colour Canny (Lab gradient, non-maximum suppression,
    hysteresis; thresholds in Lab units per pixel), shared with the sketch-adherence metric."""
    from .metrics import image_edges
    arr = (image.float().cpu().clamp(0, 1).numpy()[..., :3] * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return torch.from_numpy(np.stack([image_edges(a, sigma=sigma, low=low, high=high) for a in arr]))


# ----------------------------------------------------------------------------- canvas strokes

MAX_CANVAS = 4096
MAX_POINTS = 200_000


def parse_canvas(text: str) -> dict:
    """Validate the canvas widget's JSON: {"version": 1, "width", "height", "strokes":
    [{"mode": "draw"|"erase", "size": px, "points": [[x, y], ...]}], "background": data URL or ""}."""
    if not isinstance(text, str) or not text.strip():
        raise LEPError("sketch: the canvas is empty; draw some strokes on it (or connect a sketch IMAGE instead)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LEPError(f"sketch: the canvas data is not valid JSON ({e.msg}); clear the canvas and draw again") from None
    if not isinstance(data, dict):
        raise LEPError("sketch: the canvas data must be a JSON object; clear the canvas and draw again")
    try:
        w, h = int(data.get("width", 0)), int(data.get("height", 0))
    except (TypeError, ValueError):
        raise LEPError("sketch: canvas width/height must be integers") from None
    if not (8 <= w <= MAX_CANVAS and 8 <= h <= MAX_CANVAS):
        raise LEPError(f"sketch: canvas size {w}x{h} is out of range 8..{MAX_CANVAS}")
    strokes = data.get("strokes", [])
    if not isinstance(strokes, list):
        raise LEPError("sketch: 'strokes' must be a list")
    clean, total = [], 0
    for i, s in enumerate(strokes):
        if not isinstance(s, dict):
            raise LEPError(f"sketch: stroke {i} must be an object")
        mode = s.get("mode", "draw")
        if mode not in ("draw", "erase"):
            raise LEPError(f"sketch: stroke {i} has mode {mode!r}; expected draw or erase")
        try:
            size = float(s.get("size", 4))
            pts = np.asarray(s.get("points", []), dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise LEPError(f"sketch: stroke {i} has malformed size or points") from None
        if not (0.5 <= size <= 512) or not np.isfinite(pts).all():
            raise LEPError(f"sketch: stroke {i} has an invalid brush size or point")
        total += len(pts)
        if total > MAX_POINTS:
            raise LEPError(f"sketch: more than {MAX_POINTS} points; clear the canvas or simplify the drawing")
        clean.append({"mode": mode, "size": size, "points": pts})
    return {"width": w, "height": h, "strokes": clean}


def rasterize_strokes(width: int, height: int, strokes: Iterable[dict]) -> np.ndarray:
    """Round-capped polylines → (H, W) bool; 'erase' strokes clear pixels, in drawing order.
    Points are in canvas pixels (x right, y down, pixel centres at +0.5)."""
    out = np.zeros((height, width), dtype=bool)
    for s in strokes:
        pts = np.asarray(s["points"], dtype=np.float64).reshape(-1, 2)
        if len(pts) == 0:
            continue
        r = max(float(s["size"]) / 2.0, 0.5)
        if len(pts) == 1:
            pts = np.concatenate([pts, pts])
        val = s["mode"] == "draw"
        for a, b in zip(pts[:-1], pts[1:]):
            x0 = int(max(math.floor(min(a[0], b[0]) - r), 0))
            x1 = int(min(math.ceil(max(a[0], b[0]) + r), width))
            y0 = int(max(math.floor(min(a[1], b[1]) - r), 0))
            y1 = int(min(math.ceil(max(a[1], b[1]) + r), height))
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            px, py = xx + 0.5, yy + 0.5
            d = b - a
            L2 = float(d @ d)
            tt = np.zeros_like(px) if L2 == 0 else np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / L2, 0, 1)
            dist2 = (px - a[0] - tt * d[0]) ** 2 + (py - a[1] - tt * d[1]) ** 2
            sel = dist2 <= r * r
            out[y0:y1, x0:x1][sel] = val
    return out


# ----------------------------------------------------------------------------- weights

def state_to_tensors(lep: LatentEdgePredictor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in lep.state_dict().items()}


def lep_from_tensors(sd: dict[str, torch.Tensor], meta: dict) -> LatentEdgePredictor:
    """Rebuild an LEP from its safetensors state dict; shapes are read from the weights (keys),
    never from the file name."""
    first = sd.get("net.0.weight")
    if first is None or first.dim() != 4:
        raise LEPError("lep_name: this file is not an Atelier latent edge predictor (no net.0.weight)")
    pe_dim = int(meta.get("pe_dim", PE_DIM))
    convs = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4)
    hidden = [v.shape[0] for _, v in convs[:-1]]
    lep = LatentEdgePredictor(first.shape[1] - pe_dim, hidden, convs[-1][1].shape[0], pe_dim)
    lep.load_state_dict(sd)
    return lep.eval()


HEAD_PREFIX = "head."


def split_head(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A saved LEP file's tensors → (LEP tensors, denoised-head tensors without the prefix)."""
    lep = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    return lep, head


def head_from_tensors(sd: dict[str, torch.Tensor], meta: dict) -> DenoisedEdgeHead:
    """Rebuild the denoised-latent head from its tensors (shapes read from the weights)."""
    convs = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4)
    if not convs:
        raise LEPError("lep_name: the file's denoised-latent head has no weights; retrain the LEP")
    pe_dim = int(meta.get("pe_dim", PE_DIM))
    first, last = convs[0][1], convs[-1][1]
    head = DenoisedEdgeHead(first.shape[1] - pe_dim, first.shape[0], len(convs) - 1, last.shape[0], pe_dim)
    head.load_state_dict(sd)
    return head.eval()
