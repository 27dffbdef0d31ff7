"""The Atelier world: seeded images of simple shapes with captions and exact ground truth.

Pure numpy + stdlib (no ComfyUI, no scipy). Every sample is a pure function of
``(seed, index, size)``: sample ``i`` is drawn from its own random stream, so it can be
made without generating samples ``0..i-1``. Geometry is drawn in units of the image side,
so ``sample(s, i, 64)`` and ``sample(s, i, 128)`` show the same scene at two resolutions.

The world
---------
* 1 to 3 objects, never overlapping, each of a different colour (so a colour names one
  object and one region).
* Shapes (:data:`SHAPES`): circle, square, triangle, star, cross, ring; squares, triangles,
  stars and crosses stand upright with up to ±10° of tilt.
* Colours (:data:`COLORS`): eight saturated hues; the drawn colour is the named one with a
  small per-channel jitter (``color_jitter``).
* Sizes (:data:`SIZES`): small, medium, large (radius as a fraction of the image side, see
  :data:`SIZE_RADIUS`); captions say "small" and "large", medium is unmarked.
* Backgrounds (:data:`BACKGROUNDS`): plain, striped, checkered or gradient, always of low
  saturation and low contrast; the base colour is at least 35 Lab units (ΔE76) from every
  object's colour, so objects stand out from it.

Captions (the whole grammar; the vocabulary is :data:`VOCABULARY`)
------------------------------------------------------------------
* one object:    ``a small green star``
* two objects:   ``a red circle left of a blue square`` (relations: left of, right of,
  above, below; the first object is the subject, the relation is unambiguous by construction)
* three objects: ``a red circle, a large blue square and a green star`` (listed left to right)
* then, for a textured background: `` on a striped background`` (striped, checkered, gradient)

Articles follow English ("an orange ring").
"""
from __future__ import annotations

import colorsys
import dataclasses
import math
import re
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "COLORS", "SHAPES", "SIZES", "SIZE_RADIUS", "BACKGROUNDS", "RELATIONS", "VOCABULARY",
    "WorldConfig", "WorldObject", "ObjectSpec", "Background", "Sample", "Request",
    "sample", "iter_samples", "prompt_sample", "prompt_set", "render", "caption_for", "without_colours",
    "parse_caption",
    "relation", "edges_from_masks", "rgb_to_lab",
]

#: Named object colours (sRGB). Hues are at least ~35° apart; all are saturated.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (235, 210, 40),
    "green": (45, 165, 70),
    "cyan": (40, 190, 200),
    "blue": (45, 85, 215),
    "purple": (135, 60, 185),
    "pink": (240, 110, 175),
}

#: Shape kinds.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

#: Size classes and their radius range as a fraction of the image side.
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_RADIUS: dict[str, tuple[float, float]] = {
    "small": (0.09, 0.11),
    "medium": (0.13, 0.16),
    "large": (0.19, 0.23),
}
_SIZE_WORD = {"small": "small", "medium": "", "large": "large"}

#: Background kinds; all but "plain" are named in the caption.
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "gradient")

#: Spatial relations used in two-object captions.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Every word a caption can contain.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "on", "and", "background", "of", "left", "right", "above", "below",
     "small", "large"}
    | set(COLORS) | set(SHAPES) | (set(BACKGROUNDS) - {"plain"})
))

# Shape geometry, in units of the object's radius r.
_SQUARE_HALF = 0.85          # half side
_TRIANGLE_R = 1.15           # circumradius
_STAR_R, _STAR_INNER = 1.15, 0.45   # outer radius, inner/outer ratio
_CROSS_HALF, _CROSS_ARM = 1.0, 0.33  # half extent, half arm width
_RING_INNER = 0.55           # inner/outer radius ratio
#: Radius of the circle that encloses each shape (for placement), in units of r.
_BOUND = {
    "circle": 1.0,
    "square": _SQUARE_HALF * math.sqrt(2.0),
    "triangle": _TRIANGLE_R,
    "star": _STAR_R,
    "cross": math.hypot(_CROSS_HALF, _CROSS_ARM),
    "ring": 1.0,
}
_ROTATING = {"square", "triangle", "star", "cross"}

_STREAM_TRAIN = 0
_STREAM_PROMPTS = 1
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What the generator may draw. The defaults are the Atelier Mini world."""

    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    color_jitter: int = 8            # max per-channel deviation from the named colour
    max_rotation: float = 10.0       # degrees of tilt for shapes that rotate

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError("WorldConfig: need 1 <= min_objects <= max_objects <= 3")
        if self.max_objects > len(self.colors):
            raise ValueError("WorldConfig: max_objects exceeds the number of colours "
                             "(objects in one image have distinct colours)")
        for name, allowed, values in (("shapes", SHAPES, self.shapes), ("colors", COLORS, self.colors),
                                      ("sizes", SIZES, self.sizes),
                                      ("backgrounds", BACKGROUNDS, self.backgrounds)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"WorldConfig.{name}: {bad or 'empty'}; choose from {list(allowed)}")


DEFAULT_CONFIG = WorldConfig()


@dataclasses.dataclass(frozen=True)
class WorldObject:
    """One object. Geometry in pixels of the rendered image (x right, y down; pixel (row i,
    column j) covers [j, j+1) x [i, i+1)); ``bbox`` is (x0, y0, x1, y1), exclusive ends, of
    its mask."""

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    rotation: float
    bbox: tuple[int, int, int, int]

    def phrase(self) -> str:
        words = [w for w in (_SIZE_WORD[self.size], self.color, self.shape) if w]
        return f"{_article(words[0])} {' '.join(words)}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Background:
    kind: str
    rgb: tuple[int, int, int]       # base colour
    amplitude: float                # texture amplitude (brightness, 0..1 scale)
    period: float                   # stripe period / checker cell, fraction of the side (0: none)
    angle: float                    # stripe / gradient direction in degrees

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Sample:
    """One generated image and its ground truth.

    ``image`` (H, W, 3) uint8; ``masks`` (N, H, W) bool, one per object in caption order
    (pixels at least half covered by the object); ``edges`` (H, W) bool, the one-pixel
    inner boundaries of the masks (ring holes included)."""

    seed: int
    index: int
    size: int
    image: np.ndarray
    caption: str
    objects: list[WorldObject]
    masks: np.ndarray
    edges: np.ndarray
    background: Background

    def requests(self) -> list["Request"]:
        return [Request(o.color, o.shape, o.size) for o in self.objects]

    def to_dict(self) -> dict:
        """JSON-safe ground truth (no pixel arrays)."""
        return {"seed": self.seed, "index": self.index, "size": self.size, "caption": self.caption,
                "objects": [o.to_dict() for o in self.objects],
                "background": self.background.to_dict()}


@dataclasses.dataclass(frozen=True)
class Request:
    """An object asked for by a prompt; ``None`` means "any"."""

    color: str | None
    shape: str | None
    size: str | None = None

    def describe(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape or "object") if w)


# --------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def relation(a: WorldObject, b: WorldObject) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of their centres' offset."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption_for(objects: Sequence[WorldObject], background: Background | str | None = None) -> str:
    """The caption of a scene, in the grammar of the module docstring.

    Objects are described in the given order (samples keep three objects sorted left to
    right); ``background`` (a :class:`Background` or its kind) adds "on a ... background"
    unless it is plain."""
    if not objects:
        raise ValueError("caption_for: objects is empty; a scene has 1 to 3 objects")
    phrases = [o.phrase() for o in objects]
    if len(objects) == 1:
        text = phrases[0]
    elif len(objects) == 2:
        text = f"{phrases[0]} {relation(objects[0], objects[1])} {phrases[1]}"
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    kind = background.kind if isinstance(background, Background) else background
    if kind and kind != "plain":
        if kind not in BACKGROUNDS:
            raise ValueError(f"caption_for: unknown background {kind!r}; choose from {list(BACKGROUNDS)}")
        text += f" on a {kind} background"
    return text


def without_colours(caption: str) -> str:
    """``caption`` with its colour words removed and its articles fixed ("an orange ring left of a blue star" ->
    "a ring left of a star"): shapes, sizes, layout and background are still named, the colours left open."""
    text = " ".join(w for w in caption.split() if w.rstrip(",") not in COLORS)
    return re.sub(r"\b(an?) (\w)", lambda m: f"{_article(m.group(2))} {m.group(2)}", text)


_SIZE_FROM_WORD = {"small": "small", "large": "large", "big": "large", "tiny": "small"}


def _singular(word: str) -> str:
    if word in SHAPES:
        return word
    if word.endswith("es") and word[:-2] in SHAPES:
        return word[:-2]
    if word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1]
    return word


def parse_caption(text: str) -> list[Request]:
    """The objects a caption or free prompt asks for, in order.

    Reads ``[size] colour shape`` groups; words outside :data:`VOCABULARY` are skipped, so
    "a shiny red circle" still asks for a red circle. A colour with no shape before the next
    colour (or the end) asks for that colour in any shape; a shape with no colour asks for
    that shape in any colour. Plurals are read as one object. Relations are not parsed."""
    requests: list[Request] = []
    color = size = None
    for word in re.findall(r"[a-z]+", text.lower()):
        word = _singular(word)
        if word in _SIZE_FROM_WORD:
            size = _SIZE_FROM_WORD[word]
        elif word in COLORS:
            if color is not None:
                requests.append(Request(color, None, size))
                size = None
            color = word
        elif word in SHAPES:
            requests.append(Request(color, word, size))
            color = size = None
        elif word == "background":
            color = size = None     # "on a striped background": nothing asked
    if color is not None:
        requests.append(Request(color, None, size))
    return requests


# --------------------------------------------------------------------------------------
# colour


def rgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) to CIE L*a*b* (D65)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]], dtype=np.float32)
    xyz = (lin @ m.T) / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    eps = 216.0 / 24389.0
    f = np.where(xyz > eps, np.cbrt(xyz), (24389.0 / 27.0 * xyz + 16.0) / 116.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)
    return lab.astype(np.float32)



# --------------------------------------------------------------------------------------
# geometry and rendering


def _polygon(shape: str) -> np.ndarray | None:
    """Vertices (K, 2) in the shape's own frame (units of r, y down, apex up)."""
    if shape == "square":
        h = _SQUARE_HALF
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        return _TRIANGLE_R * np.stack([np.cos(ang), np.sin(ang)], 1)
    if shape == "star":
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, _STAR_R, _STAR_R * _STAR_INNER)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    if shape == "cross":
        e, w = _CROSS_HALF, _CROSS_ARM
        return np.array([[-w, -e], [w, -e], [w, -w], [e, -w], [e, w], [w, w],
                         [w, e], [-w, e], [-w, w], [-e, w], [-e, -w], [-w, -w]])
    return None


def _in_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            xi, yi = verts[i]
            xj, yj = verts[i - 1]
            crosses = (yi > y) != (yj > y)
            x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
            inside ^= crosses & (x < x_at)
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v), in the shape frame and units of r."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 > _RING_INNER ** 2)
    return _in_polygon(u, v, _polygon(shape))


def _coverage(shape: str, cx: float, cy: float, r: float, rotation: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (H, W) float32, by 4x4 supersampling."""
    cov = np.zeros((size, size), dtype=np.float32)
    b = _BOUND[shape] * r + 1.0
    x0, x1 = max(0, int(math.floor(cx - b))), min(size, int(math.ceil(cx + b)))
    y0, y1 = max(0, int(math.floor(cy - b))), min(size, int(math.ceil(cy + b)))
    if x1 <= x0 or y1 <= y0:
        return cov
    ss = _SUPERSAMPLE
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1)[:, None] + offs[None, :]).ravel() - cx
    ys = (np.arange(y0, y1)[:, None] + offs[None, :]).ravel() - cy
    dx, dy = np.meshgrid(xs, ys)
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    u = (c * dx + s * dy) / r           # rotate the points by -rotation into the shape frame
    v = (-s * dx + c * dy) / r
    inside = _inside(shape, u, v)
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return cov


def _background_image(bg: Background, size: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    base = np.asarray(bg.rgb, dtype=np.float32) / 255.0
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    t = math.radians(bg.angle)
    proj = x * math.cos(t) + y * math.sin(t)
    if bg.kind == "striped":
        pattern = np.where(np.floor(proj / bg.period) % 2 == 0, 1.0, -1.0)
    elif bg.kind == "checkered":
        pattern = np.where((np.floor(x / bg.period) + np.floor(y / bg.period)) % 2 == 0, 1.0, -1.0)
    elif bg.kind == "gradient":
        lo, hi = proj.min(), proj.max()
        pattern = 2.0 * (proj - lo) / max(hi - lo, 1e-6) - 1.0
    else:
        pattern = np.zeros_like(x)
    img = base[None, None, :] + bg.amplitude * pattern[..., None].astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def edges_from_masks(masks: np.ndarray) -> np.ndarray:
    """One-pixel inner boundaries (4-neighbourhood) of a stack of masks (N, H, W) -> (H, W) bool."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    edges = np.zeros(masks.shape[1:], dtype=bool)
    for m in masks:
        p = np.pad(m, 1, constant_values=False)
        interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edges |= m & ~interior
    return edges


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """An object to draw: centre (cx, cy) and radius r as fractions of the image side,
    rotation in degrees, ``size`` the class name, ``rgb`` the colour actually drawn."""

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    r: float
    rotation: float


def render(specs: Sequence[ObjectSpec], background: Background, size: int):
    """Draw relative-unit object specs on a background at ``size`` px.

    Returns (image uint8 (H,W,3), objects, masks (N,H,W) bool, edges (H,W) bool)."""
    img = _background_image(background, size)
    objects, masks = [], []
    for sp in specs:
        cx, cy, r = sp.cx * size, sp.cy * size, sp.r * size
        cov = _coverage(sp.shape, cx, cy, r, sp.rotation, size)
        rgb = np.asarray(sp.rgb, dtype=np.float32) / 255.0
        img = img * (1.0 - cov[..., None]) + rgb[None, None, :] * cov[..., None]
        mask = cov >= 0.5
        ys, xs = np.nonzero(mask)
        bbox = ((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                if len(xs) else (0, 0, 0, 0))
        objects.append(WorldObject(sp.shape, sp.color, sp.size, sp.rgb, (cx, cy), r, sp.rotation, bbox))
        masks.append(mask)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    masks_arr = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return image, objects, masks_arr, edges_from_masks(masks_arr)


# --------------------------------------------------------------------------------------
# sampling


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), stream]))


_MIN_CONTRAST = 35.0   # min Lab distance between the background's base colour and every object colour


def _draw_background(rng: np.random.Generator, cfg: WorldConfig, colors: Sequence[str]) -> Background:
    kind = str(cfg.backgrounds[rng.integers(len(cfg.backgrounds))])
    objects_lab = rgb_to_lab(np.array([COLORS[c] for c in colors], dtype=np.float32) / 255.0)
    for _ in range(100):   # redraw the base colour until every object stands out from it
        h, s, v = rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.88)
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
        lab = rgb_to_lab(np.array(rgb, dtype=np.float32) / 255.0)
        if np.linalg.norm(objects_lab - lab, axis=-1).min() >= _MIN_CONTRAST:
            break
    amplitude = float(rng.uniform(0.03, 0.06)) if kind != "plain" else 0.0
    period = float(rng.uniform(0.08, 0.2)) if kind in ("striped", "checkered") else 0.0
    if kind == "striped":
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
    elif kind == "gradient":
        angle = float(rng.uniform(0.0, 360.0))
        amplitude = float(rng.uniform(0.06, 0.1))
    else:
        angle = 0.0
    return Background(kind, rgb, amplitude, period, angle)


_GAP = 0.04          # min free space between two objects' bounding circles (fraction of side)
_MARGIN = 0.03       # min space between an object and the image border
_REL_DOMINANCE = 1.5  # two objects: the dominant axis offset is >= this times the other
_X_GAP_3 = 0.06      # three objects: min horizontal gap between neighbouring centres


def _place(rng, shapes, sizes, max_tries=200):
    """Radii and centres (relative units) for the objects, or None."""
    n = len(shapes)
    bounds_unit = np.array([_BOUND[s] for s in shapes])
    for _ in range(max_tries):
        r = np.array([rng.uniform(*SIZE_RADIUS[s]) for s in sizes])
        bound = bounds_unit * r
        lo = bound + _MARGIN
        hi = 1.0 - bound - _MARGIN
        c = rng.uniform(lo[:, None].repeat(2, 1), hi[:, None].repeat(2, 1))
        ok = True
        for i in range(n):
            for j in range(i + 1, n):
                if np.hypot(*(c[i] - c[j])) < bound[i] + bound[j] + _GAP:
                    ok = False
        if ok and n == 2:
            dx, dy = np.abs(c[0] - c[1])
            ok = max(dx, dy) >= _REL_DOMINANCE * min(dx, dy)
        if ok and n == 3:
            xs = np.sort(c[:, 0])
            ok = bool(np.all(np.diff(xs) >= _X_GAP_3))
        if ok:
            return r, c
    return None


def _draw_specs(rng: np.random.Generator, cfg: WorldConfig) -> tuple[list[ObjectSpec], Background]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = [cfg.colors[i] for i in rng.choice(len(cfg.colors), n, replace=False)]
    background = _draw_background(rng, cfg, colors)
    shapes = [cfg.shapes[i] for i in rng.integers(len(cfg.shapes), size=n)]
    sizes = [cfg.sizes[i] for i in rng.integers(len(cfg.sizes), size=n)]
    rotations = rng.uniform(-cfg.max_rotation, cfg.max_rotation, size=n)
    jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=(n, 3))
    placed = _place(rng, shapes, sizes)
    while placed is None:
        # Too crowded: shrink the largest object one class and try again (deterministic).
        order = [SIZES.index(s) for s in sizes]
        k = int(np.argmax(order))
        if order[k] == 0:
            raise RuntimeError("world: cannot place three small objects (should not happen)")
        sizes[k] = SIZES[order[k] - 1]
        placed = _place(rng, shapes, sizes)
    radii, centres = placed
    specs = []
    for i in range(n):
        rgb = tuple(int(np.clip(COLORS[colors[i]][k] + jitter[i, k], 0, 255)) for k in range(3))
        rot = float(rotations[i]) if shapes[i] in _ROTATING else 0.0
        specs.append(ObjectSpec(shapes[i], colors[i], sizes[i], rgb, float(centres[i, 0]),
                           float(centres[i, 1]), float(radii[i]), rot))
    if n == 3:
        specs.sort(key=lambda sp: sp.cx)
    return specs, background


def _make(seed: int, index: int, size: int, cfg: WorldConfig, stream: int) -> Sample:
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels (got {size!r}); 64 and 128 are standard")
    rng = _rng(seed, index, stream)
    specs, background = _draw_specs(rng, cfg)
    image, objects, masks, edges = render(specs, background, int(size))
    return Sample(int(seed), int(index), int(size), image, caption_for(objects, background),
                  objects, masks, edges, background)


def sample(seed: int, index: int, size: int = 64, config: WorldConfig = DEFAULT_CONFIG) -> Sample:
    """Training sample ``index`` of the world drawn from ``seed``, rendered at ``size`` px."""
    return _make(seed, index, size, config, _STREAM_TRAIN)


def iter_samples(seed: int, start: int = 0, count: int | None = None, size: int = 64,
                 config: WorldConfig = DEFAULT_CONFIG) -> Iterator[Sample]:
    """Samples ``start, start+1, ...`` (``count`` of them, or forever)."""
    i = start
    while count is None or i < start + count:
        yield sample(seed, i, size, config)
        i += 1


def prompt_sample(seed: int, index: int, size: int = 64, config: WorldConfig = DEFAULT_CONFIG) -> Sample:
    """Benchmark prompt ``index`` of ``seed`` (see :func:`prompt_set`)."""
    return _make(seed, index, size, config, _STREAM_PROMPTS)


def prompt_set(seed: int, n: int, size: int = 64, config: WorldConfig = DEFAULT_CONFIG) -> list[Sample]:
    """``n`` seeded benchmark prompts with their intended objects.

    Each entry is a :class:`Sample` from a stream disjoint from the training stream of the
    same seed: ``.caption`` is the prompt, ``.objects``/``.requests()`` what it asks for,
    ``.masks`` where each object is meant to be (for region adherence) and ``.image`` a
    reference rendering of the intended scene."""
    if n < 0:
        raise ValueError(f"prompt_set: n must be >= 0 (got {n})")
    return [prompt_sample(seed, i, size, config) for i in range(n)]
