"""Atelier metrics: classical, model-free measures of what an image shows.

Pure numpy/scipy (+ torch only to read tensors and resize); no ComfyUI imports. Every
function takes numpy arrays or torch tensors: an image is (H, W, 3) — or a ComfyUI IMAGE
batch of one, (1, H, W, 3) — float in [0, 1] or uint8; a mask is (H, W) bool or float.

* Detection (:func:`detect_objects`): objects on world-like images (saturated shapes on a
  low-saturation, low-contrast background), each with a named colour and a shape kind.
* Prompt adherence (:func:`prompt_adherence`) and its chance level (:func:`chance_levels`,
  :func:`shuffled_baseline`).
* Region adherence (:func:`region_adherence`): IoU of a colour's detected area and a mask.
* Sketch adherence (:func:`sketch_adherence`): edge F1 with a pixel tolerance and symmetric
  Chamfer distance between an image's edges (:func:`image_edges`) and a sketch.
* Handoff coherence (:func:`handoff_coherence`): edge agreement, colour-histogram similarity
  and low-frequency PSNR between two images (e.g. two stages of a handoff).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from . import world
from .world import COLORS, SHAPES, Request

__all__ = [
    "as_image", "as_mask", "check_color", "rgb_to_lab", "nearest_color",
    "Detection", "detect_objects", "classify_shape", "shape_features",
    "Adherence", "prompt_adherence", "as_requests", "chance_levels", "shuffled_baseline",
    "concept_mask", "mask_iou", "region_adherence", "region_iou_chance",
    "image_edges", "sketch_edges", "edge_f1", "chamfer_distance", "sketch_adherence",
    "color_histogram", "histogram_intersection", "histogram_chi2", "lowfreq_psnr",
    "handoff_coherence", "match_sizes", "draw_detections", "edge_overlay", "region_overlay",
]

PSNR_CAP = 100.0           # dB reported for identical images
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# ======================================================================================
# inputs


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):     # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - reported as a clear input error
        raise ValueError(f"{name}: expected an image array or tensor, got {type(x).__name__}") from exc


def as_image(image, name: str = "image") -> np.ndarray:
    """One RGB image as float32 (H, W, 3) in [0, 1].

    Accepts (H, W, C) or a batch of one (1, H, W, C) with C in 1, 3, 4 (alpha is dropped),
    or (H, W) grey; uint8, bool or float in [0, 1]; numpy or torch."""
    a = _to_numpy(image, name)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{name}: expected one image, got a batch of {a.shape[0]}; "
                             "pass the images one at a time (e.g. image[i:i+1])")
        a = a[0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected (H, W, 3) channels-last like ComfyUI's IMAGE, got shape "
                         f"{tuple(a.shape)}; move the channel axis last")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: image is {a.shape[0]}x{a.shape[1]} pixels; need at least 2x2")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or infinite values; check the upstream node")
        if a.min() < -1e-3 or a.max() > 1.0 + 1e-3:
            raise ValueError(f"{name}: float values must lie in [0, 1] (got {a.min():.3g}..{a.max():.3g}); "
                             "divide 0-255 data by 255")
        a = np.clip(a, 0.0, 1.0)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def as_mask(mask, name: str = "mask") -> np.ndarray:
    """One mask as bool (H, W); floats are thresholded at 0.5. A batch of one is accepted."""
    a = _to_numpy(mask, name)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected one (H, W) mask, got shape {tuple(a.shape)}; "
                         "pick one mask from the batch")
    if a.dtype == bool:
        return a.copy()
    return a.astype(np.float32) >= 0.5


def check_color(color: str, name: str = "color") -> str:
    if color not in COLORS:
        raise ValueError(f"{name}: unknown colour {color!r}; use one of {', '.join(COLORS)}")
    return color


def _same_size(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"{name_b}: size {b.shape[1]}x{b.shape[0]} differs from {name_a}'s "
                         f"{a.shape[1]}x{a.shape[0]}; resize one of them to match")


# ======================================================================================
# colour


rgb_to_lab = world.rgb_to_lab   # sRGB in [0, 1] (..., 3) -> CIE L*a*b* (D65)

_PALETTE_LAB = rgb_to_lab(np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32) / 255.0)
_L_WEIGHT = 0.5     # lightness counts half: shading and exposure change L more than hue


def _palette_distances(lab: np.ndarray) -> np.ndarray:
    """(..., n_colors) weighted distances of Lab values to the named colours."""
    d = lab[..., None, :] - _PALETTE_LAB
    d = d * np.array([_L_WEIGHT, 1.0, 1.0], dtype=np.float32)
    return np.sqrt((d * d).sum(-1))


def nearest_color(rgb) -> tuple[str, float]:
    """Name of the named colour nearest to an sRGB triple (0-255 ints or 0-1 floats), and
    its distance (Lab, lightness weighted by 1/2)."""
    v = np.asarray(rgb, dtype=np.float32).reshape(3)
    if v.max() > 1.0:
        v = v / 255.0
    d = _palette_distances(rgb_to_lab(v))
    k = int(np.argmin(d))
    return COLOR_NAMES[k], float(d[k])


# ======================================================================================
# background and detection

_BORDER_FRAC = 0.04
_MIN_DELTA = 12.0      # min Lab distance from the background model for a foreground pixel
_SPREAD_K = 2.5        # ... and at least this many times the background's own spread
_SMOOTH = 0.6          # Gaussian pre-smoothing (px): keeps noisy blobs whole, costs little detail


def _background_model(lab: np.ndarray) -> tuple[np.ndarray, float]:
    """A plane per Lab channel fitted robustly to the image border: (H, W, 3) estimate of the
    background, and the spread (95th percentile of inlier residuals) of the border about it."""
    h, w = lab.shape[:2]
    b = max(2, int(round(_BORDER_FRAC * min(h, w))))
    border = np.zeros((h, w), dtype=bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones_like(xx), xx / w - 0.5, yy / h - 0.5], axis=-1)
    a_b, p_b = design[border], lab[border]
    keep = np.ones(len(p_b), dtype=bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a_b[keep], p_b[keep], rcond=None)
        res = np.linalg.norm(p_b - a_b @ coef, axis=1)
        keep = res <= np.percentile(res, 75)
    spread = float(np.percentile(res[keep], 95)) if keep.any() else 0.0
    return (design @ coef).astype(np.float32), spread


@dataclasses.dataclass
class Detection:
    """A detected object. ``bbox`` (x0, y0, x1, y1) exclusive ends; ``center`` (x, y) in
    pixel coordinates (pixel centres at +0.5); ``mask`` (H, W) bool."""

    color: str
    shape: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int
    rgb: tuple[int, int, int]
    color_distance: float
    features: dict
    mask: np.ndarray = dataclasses.field(repr=False)

    def describe(self) -> str:
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("mask")
        return d


def _radial_profile(alpha: np.ndarray, cy: float, cx: float, n_angles: int = 128) -> np.ndarray:
    """Distance from (cy, cx) to the alpha = 0.5 crossing along ``n_angles`` rays (sub-pixel)."""
    h, w = alpha.shape
    r_max = math.hypot(h, w)
    step = 0.25
    radii = np.arange(0.0, r_max, step, dtype=np.float32)
    ang = np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False, dtype=np.float32)
    # alpha[i, j] is the value at pixel centre (j + .5, i + .5): map_coordinates indexes by centre
    ys = cy - 0.5 + np.sin(ang)[:, None] * radii[None, :]
    xs = cx - 0.5 + np.cos(ang)[:, None] * radii[None, :]
    vals = ndimage.map_coordinates(alpha, [ys.ravel(), xs.ravel()], order=1, mode="constant",
                                   cval=0.0).reshape(n_angles, -1)
    below = vals < 0.5
    below[:, -1] = True
    first = below.argmax(axis=1)
    prev = np.maximum(first - 1, 0)
    v0 = vals[np.arange(n_angles), prev]
    v1 = vals[np.arange(n_angles), first]
    frac = np.where(v0 > v1, (v0 - 0.5) / np.maximum(v0 - v1, 1e-6), 0.0)
    return np.maximum(radii[prev] + np.clip(frac, 0, 1) * step, 1e-3)


def shape_features(alpha: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Rotation-invariant features of one blob.

    ``alpha`` is the blob's coverage in [0, 1] (or a bool mask), ``mask`` its binary mask
    (default ``alpha >= 0.5``). Features: ``hole`` (fraction of the filled blob that is a
    hole), ``solidity`` (area / convex-hull area), and ``h2``..``h8``, the amplitudes of the
    harmonics of the radial signature r(θ)/mean(r) (circle: all ~0; triangle: h3; square and
    cross: h4; star: h5)."""
    alpha = np.asarray(alpha, dtype=np.float32)
    mask = alpha >= 0.5 if mask is None else np.asarray(mask, dtype=bool)
    filled = ndimage.binary_fill_holes(mask)
    area_f = int(filled.sum())
    if area_f == 0:
        raise ValueError("shape_features: empty mask")
    hole = 1.0 - mask.sum() / area_f
    # Outer contour: the hole counts as inside.
    outer = np.where(filled & ~mask, 1.0, alpha)
    outer = np.where(ndimage.binary_dilation(filled, iterations=2), outer, 0.0)
    wts = outer * (outer >= 0.5)
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
    tot = wts.sum()
    cy, cx = float((wts * (ys + 0.5)).sum() / tot), float((wts * (xs + 0.5)).sum() / tot)
    r = _radial_profile(outer, cy, cx)
    rho = r / r.mean()
    amp = np.abs(np.fft.rfft(rho)) * 2.0 / len(rho)
    feats = {"hole": float(hole), "solidity": _solidity(filled)}
    for k in range(2, 9):
        feats[f"h{k}"] = float(amp[k])
    feats["mean_radius"] = float(r.mean())
    return feats


def _solidity(filled: np.ndarray) -> float:
    """Area / area of the convex hull of the pixel squares."""
    ys, xs = np.nonzero(filled)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        from scipy.spatial import ConvexHull
        hull = ConvexHull(corners.astype(np.float64))
        return float(len(xs) / hull.volume)
    except Exception:  # noqa: BLE001 - degenerate (a line of pixels): call it solid
        return 1.0


# Shape decision thresholds, set midway between the classes as measured on 450 world
# samples at 64 and 128 px (ring holes are >= 0.25 of the filled area).
_HOLE_RING = 0.08
_ROUND_MAX = 0.06      # max of h3, h4, h5 below this: circle (world: circles <= 0.01, others >= 0.11)
_CROSS_H4 = 0.22       # h4 above this: cross, else square (world: squares <= 0.15, crosses >= 0.29)


def classify_shape(features: dict) -> str:
    """The shape kind for :func:`shape_features` output (fixed rules, no learning)."""
    if features["hole"] >= _HOLE_RING:
        return "ring"
    h = {k: features[f"h{k}"] for k in (3, 4, 5)}
    k = max(h, key=h.get)
    if h[k] < _ROUND_MAX:
        return "circle"
    if k == 3:
        return "triangle"
    if k == 5:
        return "star"
    if h[4] >= _CROSS_H4:
        return "cross"
    return "square"


def detect_objects(image, *, min_area: int | None = None, threshold: float | None = None,
                   smooth: float = _SMOOTH) -> list[Detection]:
    """Objects that stand out from the background, with colour and shape.

    The image is converted to Lab and smoothed (Gaussian, ``smooth`` px: noise would break
    blobs apart). The background is a robust plane fit (per Lab channel) to the image border;
    pixels farther than ``threshold`` from it (default: max(12, 2.5 x the border's spread),
    Lab units) are foreground.
    Each connected foreground blob (8-connectivity) of at least ``min_area`` pixels (default
    0.3% of the image, at least 6) is one object — unless its interior holds several named
    colours in force, when it is split by colour. Its mask is refined by unmixing each pixel
    between the background and the blob's colour (coverage >= 0.5), its colour is the named
    colour nearest to the median of its interior, its shape comes from :func:`classify_shape`.
    Detections are sorted left to right."""
    img = as_image(image)
    h, w = img.shape[:2]
    lab = rgb_to_lab(img)
    if smooth > 0:
        lab = ndimage.gaussian_filter(lab, (smooth, smooth, 0))
    bg, spread = _background_model(lab)
    diff = lab - bg
    dist = np.linalg.norm(diff, axis=-1)
    thr = float(threshold) if threshold is not None else max(_MIN_DELTA, _SPREAD_K * spread)
    fg = dist > thr
    min_area = int(min_area) if min_area is not None else max(6, int(0.003 * h * w))
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    detections: list[Detection] = []
    pad = 3
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        comp = labels[y0:y1, x0:x1] == k
        if comp.sum() < min_area:
            continue
        for piece in _split_by_color(comp, lab[y0:y1, x0:x1], min_area):
            det = _describe_blob(piece, lab[y0:y1, x0:x1], diff[y0:y1, x0:x1], img[y0:y1, x0:x1],
                                 (y0, x0), (h, w), min_area)
            if det is not None:
                detections.append(det)
    detections.sort(key=lambda d: d.center[0])
    return detections


def _split_by_color(comp: np.ndarray, lab: np.ndarray, min_area: int) -> list[np.ndarray]:
    """One blob, or its parts when its interior holds several named colours in force."""
    core = ndimage.binary_erosion(comp)
    if core.sum() < 4:
        return [comp]
    cls = np.argmin(_palette_distances(lab[core]), axis=-1)
    counts = np.bincount(cls, minlength=len(COLOR_NAMES))
    strong = np.nonzero(counts >= max(min_area / 2, 0.2 * core.sum()))[0]
    if len(strong) <= 1:
        return [comp]
    means = np.stack([np.median(lab[core][cls == c], axis=0) for c in strong])
    d = np.linalg.norm(lab[comp][:, None, :] - means[None], axis=-1)
    assign = np.full(comp.shape, -1)
    assign[comp] = np.argmin(d, axis=1)
    pieces = []
    for j in range(len(strong)):
        lab_j, n_j = ndimage.label(assign == j, structure=np.ones((3, 3), dtype=bool))
        for m in range(1, n_j + 1):
            part = lab_j == m
            if part.sum() >= min_area:
                pieces.append(part)
    return pieces or [comp]


def _describe_blob(piece, lab, diff, rgb, offset, full_shape, min_area) -> Detection | None:
    core = ndimage.binary_erosion(piece)
    if core.sum() < 3:
        core = piece
    obj_lab = np.median(lab[core], axis=0)
    # Unmix: alpha = projection of (pixel - background) on (object - background).
    bg_at = lab - diff
    ref = obj_lab[None, None, :] - bg_at
    alpha = (diff * ref).sum(-1) / np.maximum((ref * ref).sum(-1), 1e-6)
    region = ndimage.binary_dilation(piece, iterations=1)
    alpha = np.where(region, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)
    mask = alpha >= 0.5
    if mask.sum() < min_area:
        return None
    inner = ndimage.binary_erosion(mask)
    if inner.sum() < 3:
        inner = mask
    color_lab = np.median(lab[inner], axis=0)
    dists = _palette_distances(color_lab)
    ci = int(np.argmin(dists))
    feats = shape_features(alpha, mask)
    y0, x0 = offset
    ys, xs = np.nonzero(mask)
    full = np.zeros(full_shape, dtype=bool)
    full[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
    median_rgb = tuple(int(round(float(v) * 255)) for v in np.median(rgb[inner], axis=0))
    return Detection(
        color=COLOR_NAMES[ci], shape=classify_shape(feats),
        bbox=(int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + 1 + x0, int(ys.max()) + 1 + y0),
        center=(float(xs.mean()) + 0.5 + x0, float(ys.mean()) + 0.5 + y0), area=int(mask.sum()),
        rgb=median_rgb, color_distance=float(dists[ci]), features=feats, mask=full)


# ======================================================================================
# prompt adherence


_SIZE_WORDS = frozenset({"small", "medium", "large", "big", "tiny"})
#: nouns that ask for "any shape" ("something red", "a red object")
_ANY_SHAPE = frozenset({"object", "objects", "thing", "things", "shape", "shapes", "something", "one", "ones"})
#: words (and punctuation) that end an object phrase
_PHRASE_END = frozenset({"a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "next", "beside",
                         "near", "left", "right", "above", "below", "under", "over", "background",
                         ",", ".", ";", ":", "!", "?"})


def unknown_words(text: str) -> list[tuple[str, str, str]]:
    """Words of a prompt that stand where a colour or a shape is asked for but that the world does not
    know, as (words, "colour" | "shape", the neighbouring word): "a chartreuse circle" ->
    [("chartreuse", "colour", "circle")], "a red hexagon" -> [("hexagon", "shape", "red")].

    A word before a known colour ("a shiny red circle") or outside an object phrase ("a photo of") is
    not a slot and stays ignored, as in :func:`world.parse_caption`."""
    out: list[tuple[str, str, str]] = []
    color: str | None = None
    pre: list[str] = []
    post: list[str] = []

    def end_phrase():
        nonlocal color, pre, post
        if color is not None and post:
            out.append((" ".join(post), "shape", color))
        color, pre, post = None, [], []

    for tok in re.findall(r"[a-z]+|[,.;:!?]", text.lower()):
        word = world._singular(tok) if tok.isalpha() else tok
        if word in COLORS:
            if color is not None:
                end_phrase()
            color, pre, post = word, [], []
        elif word in SHAPES or word in _ANY_SHAPE:
            if color is None and pre:
                out.append((" ".join(pre), "colour", word))
            color, pre, post = None, [], []
        elif word in _PHRASE_END:
            end_phrase()
        elif word in _SIZE_WORDS or word in world.VOCABULARY:
            continue
        elif color is None:
            pre.append(word)
        else:
            post.append(word)
    end_phrase()
    return out


def _refuse_unknown(text: str, name: str) -> None:
    bad = unknown_words(text)
    if not bad:
        return
    words, kind, near = bad[0]
    if kind == "colour":
        where = f"{words!r} (before {near!r}) is not a colour the Atelier world knows"
        fix = f"use one of the colours {', '.join(COLORS)}, or drop the word to accept any colour"
    else:
        where = f"{words!r} (after {near!r}) is not a shape the Atelier world knows"
        fix = f"use one of the shapes {', '.join(SHAPES)}, or write '{near} object' to accept any shape"
    more = f" (also: {', '.join(repr(w) for w, _, _ in bad[1:])})" if len(bad) > 1 else ""
    raise ValueError(f"{name}: {where}{more}, so the metric cannot check it; {fix}")


def as_requests(prompt, name: str = "prompt") -> list[Request]:
    """Requested objects from a caption/prompt string, world objects, Requests or
    (colour, shape) pairs. A word in a colour or shape slot that the world does not know
    ("a chartreuse circle") is an error naming ``name`` and listing the known words."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{name}: empty; write what the image should show, e.g. 'a red circle'")
        _refuse_unknown(prompt, name)
        reqs = world.parse_caption(prompt)
        if not reqs:
            raise ValueError(f"{name}: no colour or shape words in {prompt!r}; use colours "
                             f"({', '.join(COLORS)}) and shapes ({', '.join(SHAPES)}), e.g. 'a red circle'")
        return reqs
    reqs = []
    for item in prompt:
        if isinstance(item, Request):
            reqs.append(item)
        elif isinstance(item, (world.WorldObject, Detection)):
            reqs.append(Request(item.color, item.shape))
        else:
            try:
                color, shape = item
            except (TypeError, ValueError):
                raise ValueError(f"{name}: cannot read {item!r} as a (colour, shape) pair") from None
            reqs.append(Request(color, shape))
    for r in reqs:
        if r.color is not None:
            check_color(r.color, name)
        if r.shape is not None and r.shape not in SHAPES:
            raise ValueError(f"{name}: unknown shape {r.shape!r}; use one of {', '.join(SHAPES)}")
    if not reqs:
        raise ValueError(f"{name}: asks for no objects")
    return reqs


def _max_matching(n_left: int, n_right: int, ok) -> list[int]:
    """Maximum bipartite matching (Kuhn); returns right index per left item or -1."""
    match_right = [-1] * n_right

    def try_assign(i, seen):
        for j in range(n_right):
            if ok(i, j) and not seen[j]:
                seen[j] = True
                if match_right[j] == -1 or try_assign(match_right[j], seen):
                    match_right[j] = i
                    return True
        return False

    for i in range(n_left):
        try_assign(i, [False] * n_right)
    left = [-1] * n_left
    for j, i in enumerate(match_right):
        if i >= 0:
            left[i] = j
    return left


@dataclasses.dataclass
class Adherence:
    """How well an image shows what a prompt asks for.

    ``object_score``: fraction of requested objects found with the requested colour and shape
    (each detection serves one request); ``color_score`` / ``shape_score``: the same for the
    colour / shape alone; ``count_match``: as many objects detected as requested."""

    object_score: float
    color_score: float
    shape_score: float
    count_match: bool
    requests: list[Request]
    detections: list[Detection]
    matched: list[int]          # detection index per request (object criterion), -1 if none

    def report(self) -> str:
        lines = [f"objects {self.object_score:.2f}  colours {self.color_score:.2f}  "
                 f"shapes {self.shape_score:.2f}  count {len(self.detections)}/{len(self.requests)}"]
        for r, j in zip(self.requests, self.matched):
            found = self.detections[j].describe() if j >= 0 else "missing"
            lines.append(f"  {r.describe()}: {found}")
        extra = [d.describe() for j, d in enumerate(self.detections) if j not in self.matched]
        if extra:
            lines.append(f"  also seen: {', '.join(extra)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"object_score": self.object_score, "color_score": self.color_score,
                "shape_score": self.shape_score, "count_match": self.count_match,
                "requests": [dataclasses.asdict(r) for r in self.requests],
                "detections": [d.to_dict() for d in self.detections], "matched": self.matched}


def prompt_adherence(image, prompt, detections: Sequence[Detection] | None = None) -> Adherence:
    """Score an image (or its precomputed ``detections``) against a prompt.

    ``prompt``: a caption/free text (parsed by :func:`world.parse_caption`), or a sequence of
    :class:`world.Request`, world objects or (colour, shape) pairs."""
    reqs = as_requests(prompt)
    dets = list(detections) if detections is not None else detect_objects(image)

    def fits(r: Request, d: Detection, use_color: bool, use_shape: bool) -> bool:
        return ((not use_color or r.color is None or r.color == d.color)
                and (not use_shape or r.shape is None or r.shape == d.shape))

    scores = []
    matched = []
    for use_color, use_shape in ((True, True), (True, False), (False, True)):
        m = _max_matching(len(reqs), len(dets),
                          lambda i, j, c=use_color, s=use_shape: fits(reqs[i], dets[j], c, s))
        scores.append(sum(j >= 0 for j in m) / len(reqs))
        if use_color and use_shape:
            matched = m
    return Adherence(scores[0], scores[1], scores[2], len(dets) == len(reqs), reqs, dets, matched)


def chance_levels(objects_per_image: Sequence[int] = (1, 2, 3), n_colors: int = len(COLORS),
                  n_shapes: int = len(SHAPES)) -> dict[str, float]:
    """Expected adherence scores by chance, for requests naming a colour and a shape.

    ``random_image_*``: the score of a prompt against an unrelated world image whose object
    count is uniform over ``objects_per_image``, colours distinct, shapes independent
    (exact for a perfect detector: a requested colour is present with probability m/C, with
    the requested shape m/(C·S)). ``guess_*``: the score of guessing one uniformly random
    colour / shape / object."""
    ms = np.asarray(objects_per_image, dtype=np.float64)
    if len(ms) == 0 or ms.min() < 1 or ms.max() > n_colors:
        raise ValueError("objects_per_image: counts must lie in 1..n_colors")
    return {
        "random_image_object": float(ms.mean() / (n_colors * n_shapes)),
        "random_image_color": float(ms.mean() / n_colors),
        "random_image_shape": float(np.mean(1.0 - (1.0 - 1.0 / n_shapes) ** ms)),
        "guess_object": 1.0 / (n_colors * n_shapes),
        "guess_color": 1.0 / n_colors,
        "guess_shape": 1.0 / n_shapes,
    }


def shuffled_baseline(prompts: Sequence, images: Sequence | None = None,
                      detections: Sequence[Sequence[Detection]] | None = None) -> dict[str, float]:
    """Empirical chance: mean adherence of prompt i against image i+1 (mod n).

    Give ``images`` or their precomputed ``detections`` (one list per image)."""
    n = len(prompts)
    if n < 2:
        raise ValueError("shuffled_baseline: need at least 2 prompt/image pairs")
    if detections is None:
        if images is None or len(images) != n:
            raise ValueError("shuffled_baseline: give one image (or detection list) per prompt")
        detections = [detect_objects(im) for im in images]
    sums = np.zeros(3)
    for i in range(n):
        a = prompt_adherence(None, prompts[i], detections=detections[(i + 1) % n])
        sums += (a.object_score, a.color_score, a.shape_score)
    sums /= n
    return {"object": float(sums[0]), "color": float(sums[1]), "shape": float(sums[2])}


# ======================================================================================
# region adherence


def mask_iou(a, b) -> float:
    """Intersection over union of two masks (1.0 when both are empty)."""
    a, b = as_mask(a, "mask_a"), as_mask(b, "mask_b")
    if a.shape != b.shape:
        raise ValueError(f"mask_b: shape {b.shape} differs from mask_a's {a.shape}; resize to match")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def concept_mask(image, color: str, detections: Sequence[Detection] | None = None) -> np.ndarray:
    """Where the named colour is: union of the masks of objects detected in that colour."""
    check_color(color)
    img = as_image(image)
    dets = detect_objects(img) if detections is None else detections
    out = np.zeros(img.shape[:2], dtype=bool)
    for d in dets:
        if d.color == color:
            out |= d.mask
    return out


def region_adherence(image, region, color: str, detections: Sequence[Detection] | None = None) -> dict:
    """How well a colour concept sits in its requested region.

    Returns ``iou`` (detected colour area vs region), ``precision`` (share of the colour's
    area inside the region), ``recall`` (share of the region the colour covers) and the areas
    as fractions of the image."""
    check_color(color)
    img = as_image(image)
    reg = as_mask(region, "region")
    _same_size(img, reg, "image", "region mask")
    if not reg.any():
        raise ValueError("region mask: empty; paint the area where the colour should appear")
    found = concept_mask(img, color, detections)
    inter = float(np.logical_and(found, reg).sum())
    n = float(reg.size)
    return {
        "iou": mask_iou(found, reg),
        "precision": inter / found.sum() if found.any() else 0.0,
        "recall": inter / reg.sum(),
        "found_area": found.sum() / n,
        "region_area": reg.sum() / n,
    }


def region_iou_chance(region_fraction: float, concept_fraction: float) -> float:
    """Expected IoU if a concept of the given area fraction were scattered uniformly at random
    over the image (pixel-independent placement)."""
    a, b = float(region_fraction), float(concept_fraction)
    inter = a * b
    union = a + b - inter
    return 0.0 if union <= 0 else inter / union


# ======================================================================================
# edges, sketch adherence

_EDGE_LOW = 6.0        # hysteresis thresholds on the colour gradient (Lab units per pixel)
_EDGE_HIGH = 10.0


def image_edges(image, *, sigma: float = 1.0, low: float = _EDGE_LOW, high: float = _EDGE_HIGH) -> np.ndarray:
    """Thin edges of an image (H, W) bool, Canny-like on the colour gradient.

    Lab channels are smoothed (Gaussian ``sigma``), Sobel-differentiated and combined into
    the largest eigenvalue of the colour structure tensor (Di Zenzo), so edges between
    colours of equal brightness count; then non-maximum suppression and hysteresis between
    ``low`` and ``high`` (Lab units per pixel; a step of height ΔE peaks near 0.4·ΔE/sigma).
    The defaults ignore the world's low-contrast background textures."""
    lab = rgb_to_lab(as_image(image))
    gxx = gyy = gxy = 0.0
    for c in range(3):
        ch = ndimage.gaussian_filter(lab[..., c], sigma) if sigma > 0 else lab[..., c]
        gx = ndimage.sobel(ch, axis=1) / 8.0
        gy = ndimage.sobel(ch, axis=0) / 8.0
        gxx, gyy, gxy = gxx + gx * gx, gyy + gy * gy, gxy + gx * gy
    tr, det_term = gxx + gyy, np.sqrt((gxx - gyy) ** 2 + 4 * gxy ** 2)
    mag = np.sqrt(np.maximum(0.5 * (tr + det_term), 0.0))
    theta = 0.5 * np.arctan2(2 * gxy, gxx - gyy)       # direction of largest change
    return _hysteresis(_non_max_suppression(mag, theta), low, high)


def _non_max_suppression(mag: np.ndarray, theta: np.ndarray) -> np.ndarray:
    ang = (np.rad2deg(theta) + 180.0) % 180.0
    q = (np.round(ang / 45.0).astype(int)) % 4          # 0: x, 1: diagonal, 2: y, 3: anti-diagonal
    p = np.pad(mag, 1)
    h, w = mag.shape

    def shifted(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # y grows downwards: angle 45° points to (dx, dy) = (1, 1).
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros_like(mag, dtype=bool)
    for k, (dy, dx) in offsets.items():
        sel = q == k
        keep |= sel & (mag >= shifted(dy, dx)) & (mag > shifted(-dy, -dx))
    return np.where(keep, mag, 0.0)


def _hysteresis(mag: np.ndarray, low: float, high: float) -> np.ndarray:
    weak = mag >= low
    labels, n = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return weak
    strong_labels = np.unique(labels[mag >= high])
    return np.isin(labels, strong_labels[strong_labels > 0])


def sketch_edges(sketch, threshold: float = 0.5) -> np.ndarray:
    """Stroke pixels of a sketch: white strokes on black or black strokes on white (decided
    by the median brightness, i.e. the paper colour), thresholded at ``threshold``. A bool
    or one-channel mask is taken as is (True = stroke)."""
    a = _to_numpy(sketch, "sketch")
    if a.dtype == bool:
        return as_mask(a, "sketch")
    gray = as_image(a, "sketch").mean(-1)
    if np.median(gray) > 0.5:
        gray = 1.0 - gray
    return gray > threshold


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask`` (non-empty)."""
    return ndimage.distance_transform_edt(~mask)


def edge_f1(pred, ref, tolerance: float = 2.0) -> dict[str, float]:
    """Precision, recall and F1 of edge maps with a tolerance in pixels.

    A predicted pixel is correct if a reference pixel lies within ``tolerance`` (Euclidean);
    a reference pixel is found if a predicted pixel lies within it. Two empty maps score 1."""
    p, r = as_mask(pred, "edges"), as_mask(ref, "reference edges")
    if p.shape != r.shape:
        raise ValueError(f"reference edges: shape {r.shape} differs from edges {p.shape}; resize to match")
    if not p.any() and not r.any():
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if not p.any() or not r.any():
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision = float((_distance_to(r)[p] <= tolerance).mean())
    recall = float((_distance_to(p)[r] <= tolerance).mean())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def chamfer_distance(a, b) -> float:
    """Symmetric Chamfer distance in pixels: the mean of (mean distance of a's pixels to b)
    and (mean distance of b's pixels to a). 0 for two empty maps; the image diagonal when
    exactly one is empty."""
    a, b = as_mask(a, "edges_a"), as_mask(b, "edges_b")
    if a.shape != b.shape:
        raise ValueError(f"edges_b: shape {b.shape} differs from edges_a {a.shape}; resize to match")
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float(math.hypot(*a.shape))
    return float(0.5 * (_distance_to(b)[a].mean() + _distance_to(a)[b].mean()))


def sketch_adherence(image, sketch, tolerance: float = 2.0, **edge_kwargs) -> dict[str, float]:
    """Edge F1 (precision, recall) within ``tolerance`` px and Chamfer distance between the
    image's edges (:func:`image_edges`) and the sketch's strokes (:func:`sketch_edges`).

    Every stroke pixel counts for recall, so strokes much thicker than twice the tolerance
    lower it: draw one- to three-pixel strokes (or pass edge maps)."""
    img = as_image(image)
    sk = sketch_edges(sketch)
    _same_size(img, sk, "image", "sketch")
    edges = image_edges(img, **edge_kwargs)
    out = edge_f1(edges, sk, tolerance)
    out["chamfer"] = chamfer_distance(edges, sk)
    return out


# ======================================================================================
# handoff coherence


def color_histogram(image, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram with ``bins`` per channel, normalised to sum 1 (bins**3,).

    Soft binning: each pixel's vote is shared trilinearly between the nearest bin centres,
    so a small colour shift moves a little mass instead of flipping whole bins."""
    if int(bins) < 2:
        raise ValueError(f"bins: need at least 2 per channel (got {bins})")
    img = as_image(image).reshape(-1, 3).astype(np.float64)
    pos = np.clip(img * bins - 0.5, 0.0, bins - 1.0)       # position in bin-centre units
    lo = np.minimum(np.floor(pos).astype(np.int64), bins - 2)
    frac = pos - lo
    hist = np.zeros(bins ** 3, dtype=np.float64)
    for corner in range(8):
        offs = [(corner >> c) & 1 for c in range(3)]
        idx = lo + np.array(offs)
        w = np.prod([frac[:, c] if offs[c] else 1.0 - frac[:, c] for c in range(3)], axis=0)
        flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
        hist += np.bincount(flat, weights=w, minlength=bins ** 3)
    return hist / hist.sum()


def histogram_intersection(p: np.ndarray, q: np.ndarray) -> float:
    """Sum of bin-wise minima of two normalised histograms: 1 identical, 0 disjoint."""
    return float(np.minimum(p, q).sum())


def histogram_chi2(p: np.ndarray, q: np.ndarray) -> float:
    """Symmetric chi-square distance 0.5·Σ (p−q)²/(p+q): 0 identical, 1 disjoint."""
    s = p + q
    nz = s > 0
    return float(0.5 * ((p[nz] - q[nz]) ** 2 / s[nz]).sum())


def lowfreq_psnr(a, b, sigma: float | None = None) -> float:
    """PSNR (dB, peak 1) between Gaussian-blurred images: agreement of layout and colour,
    blind to fine detail. ``sigma`` defaults to the short side / 32. Capped at PSNR_CAP."""
    x, y = as_image(a, "image_a"), as_image(b, "image_b")
    _same_size(x, y, "image_a", "image_b")
    s = max(1.0, min(x.shape[:2]) / 32.0) if sigma is None else float(sigma)
    bx = ndimage.gaussian_filter(x, (s, s, 0))
    by = ndimage.gaussian_filter(y, (s, s, 0))
    mse = float(np.mean((bx - by) ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(-10.0 * math.log10(mse))


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def match_sizes(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both images at the smaller one's size (antialiased downscale); aspect ratios must agree."""
    x, y = as_image(a, "image_a"), as_image(b, "image_b")
    (ha, wa), (hb, wb) = x.shape[:2], y.shape[:2]
    if (ha, wa) == (hb, wb):
        return x, y
    if abs(ha / wa - hb / wb) > 0.02 * (ha / wa):
        raise ValueError(f"image_b: aspect {wb}x{hb} differs from image_a's {wa}x{ha}; "
                         "crop one of them to the same aspect ratio")
    if ha * wa <= hb * wb:
        return x, _resize(y, ha, wa)
    return _resize(x, hb, wb), y


def handoff_coherence(a, b, tolerance: float = 2.0, bins: int = 8) -> dict[str, float]:
    """How much two images (e.g. the stages before and after a handoff) agree.

    Images of different sizes (same aspect) are compared at the smaller size. Returns
    ``edge_f1`` (edges of a vs edges of b, ``tolerance`` px), ``chamfer``,
    ``hist_intersection`` and ``hist_chi2`` (joint RGB histograms, ``bins`` per channel)
    and ``lowfreq_psnr`` (dB)."""
    x, y = match_sizes(a, b)
    ea, eb = image_edges(x), image_edges(y)
    hx, hy = color_histogram(x, bins), color_histogram(y, bins)
    return {
        "edge_f1": edge_f1(ea, eb, tolerance)["f1"],
        "chamfer": chamfer_distance(ea, eb),
        "hist_intersection": histogram_intersection(hx, hy),
        "hist_chi2": histogram_chi2(hx, hy),
        "lowfreq_psnr": lowfreq_psnr(x, y),
    }


# ======================================================================================
# previews (pure drawing, used by the nodes)


def _upscale(img: np.ndarray, min_side: int) -> tuple[np.ndarray, int]:
    f = max(1, int(math.ceil(min_side / min(img.shape[:2]))))
    return np.repeat(np.repeat(img, f, 0), f, 1), f


def draw_detections(image, detections: Iterable[Detection], min_side: int = 256) -> np.ndarray:
    """The image (upscaled to at least ``min_side``) with a labelled box per detection;
    float32 (H', W', 3) in [0, 1]."""
    from PIL import Image, ImageDraw
    img, f = _upscale(as_image(image), min_side)
    pil = Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for d in detections:
        x0, y0, x1, y1 = (v * f for v in d.bbox)
        fill = COLORS[d.color]
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(0, 0, 0), width=3)
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=fill, width=1)
        label = d.describe()
        ty = y0 - 12 if y0 >= 12 else y1 + 2
        draw.rectangle([x0 - 1, ty, x0 + 6 * len(label) + 2, ty + 11], fill=(0, 0, 0))
        draw.text((x0 + 1, ty), label, fill=(255, 255, 255))
    return np.asarray(pil, dtype=np.float32) / 255.0


def edge_overlay(edges, reference, min_side: int = 256) -> np.ndarray:
    """Two edge maps in one picture: reference only green, edges only red, both yellow."""
    e, r = as_mask(edges, "edges"), as_mask(reference, "reference")
    out = np.zeros(e.shape + (3,), dtype=np.float32)
    out[..., 0] = e
    out[..., 1] = r
    return _upscale(out, min_side)[0]


def region_overlay(image, region, found, min_side: int = 256) -> np.ndarray:
    """The image dimmed, with the requested region's outline in white and the detected
    concept tinted: green inside the region, red outside it."""
    img = as_image(image)
    reg, fnd = as_mask(region, "region"), as_mask(found, "found")
    out = img * 0.5
    out[fnd & reg] = 0.5 * out[fnd & reg] + 0.5 * np.array([0.1, 0.9, 0.1], dtype=np.float32)
    out[fnd & ~reg] = 0.5 * out[fnd & ~reg] + 0.5 * np.array([0.95, 0.1, 0.1], dtype=np.float32)
    out[world.edges_from_masks(reg)] = 1.0
    return _upscale(out, min_side)[0]
