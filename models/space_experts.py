"""Space experts (RAPHAEL Space-MoE, training-free) and paint-with-words (eDiff-I), pure torch.

Tensors and options in, tensors out; nothing here imports ComfyUI. The node glue in
``nodes/space_experts.py`` calls these from ComfyUI's list-type attention patches.

Pieces:
- phrase -> token positions in the tokenised prompt (``phrase_token_positions``);
- cross-attention probabilities, head-averaged per phrase (``phrase_maps``), aggregated over
  blocks of different resolutions (``MapAggregator``);
- RAPHAEL's masks  mask_i = [M[:, i] >= alpha * max(M[:, i])]  (``masks_from_maps``);
- the text gate: cosine similarity of phrase embeddings to expert embeddings, plus optional
  seeded noise, argmax (``text_gate``);
- region mixing: at every pixel the mean over the experts whose region covers it of that expert's
  attention output, the base prompt's output elsewhere (``mix_regions``);
- eDiff-I's attention bias  w * log(1 + sigma) * max(QK^T)  on a region's tokens (``pww_bias``);
- a painted colour map -> one mask per colour (``parse_colour_phrases``, ``colour_map_masks``);
- drawing the routes taken (``draw_routes``).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_ALPHA = 0.2

# ----------------------------------------------------------------------------- tokens


def phrase_token_positions(prompt_chunks: Sequence[Sequence[int]], phrase_ids: Sequence[int],
                           chunk_len: int | None = None) -> list[int]:
    """Positions (in the concatenated context) of every occurrence of ``phrase_ids`` in the prompt.

    ``prompt_chunks``: token ids of the tokenised prompt, one list per 77-token chunk (special
    tokens included, as the tokenizer returns them). ``phrase_ids``: the phrase's token ids
    without start/end/padding. A multi-token word or a multi-word phrase is matched as a
    contiguous subsequence. Returns [] when the phrase does not occur.
    """
    phrase = list(phrase_ids)
    if not phrase:
        return []
    out: list[int] = []
    n = len(phrase)
    offset = 0
    for chunk in prompt_chunks:
        ids = list(chunk)
        for s in range(0, len(ids) - n + 1):
            if ids[s:s + n] == phrase:
                out.extend(range(offset + s, offset + s + n))
        offset += chunk_len if chunk_len is not None else len(ids)
    return sorted(set(out))


def content_ids(token_ids: Sequence[int], special: set[int]) -> list[int]:
    """Token ids with the tokenizer's start/end/padding ids removed."""
    return [t for t in token_ids if t not in special]


def split_phrases(text: str) -> list[str]:
    """'red circle, blue square' or one per line -> ['red circle', 'blue square'] (';' too)."""
    parts = re.split(r"[,\n;|]", text or "")
    return [p.strip() for p in parts if p.strip()]


# ----------------------------------------------------------------------------- geometry


def block_hw(latent_hw: Sequence[int], n_tokens: int) -> tuple[int, int]:
    """Spatial size of a block whose sequence has ``n_tokens`` tokens, for a latent of ``latent_hw``.

    UNet downsampling halves with ceil at every level; the first factor 2**k whose ceil-sizes
    multiply to n_tokens wins.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for k in range(0, 8):
        f = 2 ** k
        bh, bw = -(-h // f), -(-w // f)
        if bh * bw == n_tokens:
            return bh, bw
    side = int(round(math.sqrt(n_tokens)))
    if side * side == n_tokens:
        return side, side
    raise ValueError(f"cannot place {n_tokens} attention tokens on a latent of {h}x{w}")


def downscale_of(latent_hw: Sequence[int], hw: Sequence[int]) -> int:
    return max(1, int(round(int(latent_hw[0]) / max(1, int(hw[0])))))


def resize_maps(maps: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """(B, G, h, w) continuous maps -> (B, G, H, W): bilinear up, area down."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    if maps.shape[-2] >= hw[0] and maps.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(maps, tuple(hw))
    return F.interpolate(maps, size=tuple(hw), mode="bilinear", align_corners=False)


def resize_masks(masks: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """(..., h, w) binary masks -> (..., H, W) binary masks (area coverage >= 0.5, nearest up)."""
    lead = masks.shape[:-2]
    m = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    if tuple(m.shape[-2:]) != tuple(hw):
        if m.shape[-2] >= hw[0] and m.shape[-1] >= hw[1]:
            m = F.adaptive_avg_pool2d(m, tuple(hw)) >= 0.5
        else:
            m = F.interpolate(m, size=tuple(hw), mode="nearest") >= 0.5
    else:
        m = m >= 0.5
    return m.reshape(*lead, *hw)


# ----------------------------------------------------------------------------- attention


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention_logits(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected q (B, N, C), k (B, T, C) -> scaled logits QK^T/sqrt(d) (B, heads, N, T) in fp32."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return (qh @ kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)


def attend(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Probabilities (B, heads, N, T) times projected v (B, T, C) -> (B, N, C)."""
    return merge_heads(probs @ split_heads(v.float(), heads))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain softmax attention (B, N, C) x (B, T, C) -> (B, N, C), in q's dtype."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k.to(q.dtype), heads),
                                         split_heads(v.to(q.dtype), heads))
    return merge_heads(out)


def phrase_maps(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Cross-attention probabilities (B, heads, N, T) -> per-phrase maps (B, G, N).

    Averaged over heads; a phrase of several tokens takes the mean of its tokens' maps.
    """
    mean = probs.mean(dim=1)  # (B, N, T)
    cols = []
    T = mean.shape[-1]
    for g in groups:
        idx = [i for i in g if i < T]
        if not idx:
            raise ValueError(f"phrase token positions {list(g)} lie outside the context of {T} tokens")
        cols.append(mean[..., idx].mean(dim=-1))
    return torch.stack(cols, dim=1)


class MapAggregator:
    """Averages per-phrase maps from blocks of different resolutions at one common resolution."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, maps: torch.Tensor) -> None:
        """maps: (B, G, h, w). The first (or a larger) resolution seen becomes the common one."""
        maps = maps.float()
        if self.total is None:
            self.total, self.count = maps.clone(), 1
            return
        if maps.shape[-1] * maps.shape[-2] > self.total.shape[-1] * self.total.shape[-2]:
            self.total = resize_maps(self.total, maps.shape[-2:])
        self.total = self.total + resize_maps(maps, self.total.shape[-2:])
        self.count += 1

    def result(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count


def masks_from_maps(maps: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """RAPHAEL's masks: mask_i = [M[..., i, :] >= alpha * max(M[..., i, :])].

    ``maps``: (B, G, ...) with the spatial dimensions last (flattened or 2-D); the max is taken
    per batch item and phrase over all spatial positions. alpha > 1 gives empty masks.
    """
    flat = maps.reshape(*maps.shape[:2], -1)
    thr = alpha * flat.amax(dim=-1, keepdim=True)
    return (flat >= thr).reshape(maps.shape)


# ----------------------------------------------------------------------------- gate


def text_gate(phrase_emb: torch.Tensor, expert_emb: torch.Tensor, noise: float = 0.0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RAPHAEL's text gate, training-free: route(y_i) = argmax(cos(E(y_i), e_k) + noise * N(0, 1)).

    phrase_emb (P, D), expert_emb (E, D) -> (route (P,) long, scores (P, E)). The noise is drawn
    from a CPU generator seeded with ``seed`` so a route never depends on the device.
    """
    if phrase_emb.ndim != 2 or expert_emb.ndim != 2 or phrase_emb.shape[1] != expert_emb.shape[1]:
        raise ValueError(f"gate: phrase embeddings {tuple(phrase_emb.shape)} and expert embeddings "
                         f"{tuple(expert_emb.shape)} must be (P, D) and (E, D) with the same D")
    scores = F.normalize(phrase_emb.float().cpu(), dim=-1) @ F.normalize(expert_emb.float().cpu(), dim=-1).T
    if noise > 0:
        g = torch.Generator().manual_seed(int(seed))
        scores = scores + noise * torch.randn(scores.shape, generator=g)
    return scores.argmax(dim=-1), scores


def expert_masks(phrase_masks: torch.Tensor, route: Sequence[int], n_experts: int) -> torch.Tensor:
    """(B, P, N) phrase masks + route (P,) -> (E, B, N): each expert's region = union of its phrases.

    A route entry of -1 sends its phrase to no expert."""
    B, _P, N = phrase_masks.shape
    out = torch.zeros(n_experts, B, N, dtype=torch.bool, device=phrase_masks.device)
    for p, e in enumerate(route):
        if int(e) >= 0:  # -1: the phrase goes to no expert here
            out[int(e)] |= phrase_masks[:, p].bool()
    return out


# ----------------------------------------------------------------------------- mixing


def mix_regions(background: torch.Tensor, expert_outs: Sequence[torch.Tensor | None],
                masks: torch.Tensor) -> torch.Tensor:
    """RAPHAEL's layer output, training-free: mean over experts of each expert's output on its region.

    background (B, N, C): the base prompt's output, kept where no region covers a pixel.
    expert_outs: E tensors (B, N, C) (None for an expert with an empty region).
    masks (E, B, N) bool. Pixels covered by k experts get the mean of those k outputs.
    """
    acc = torch.zeros_like(background, dtype=torch.float32)
    cnt = torch.zeros(background.shape[:2] + (1,), dtype=torch.float32, device=background.device)
    for e, out in enumerate(expert_outs):
        if out is None:
            continue
        m = masks[e].unsqueeze(-1).float()
        acc = acc + out.float() * m
        cnt = cnt + m
    covered = cnt > 0
    mixed = torch.where(covered, acc / cnt.clamp_min(1.0), background.float())
    return mixed.to(background.dtype)


def pww_tokens(region_masks: torch.Tensor, groups: Sequence[Sequence[int]], T: int, dtype=torch.float32,
               device=None) -> torch.Tensor:
    """A of paint-with-words, (B, N, T): 1 where pixel j lies in region r and token i is one of region r's
    tokens (region_masks (B, R, N) bool; groups: R lists of token positions, those >= T ignored)."""
    B, _R, N = region_masks.shape
    A = torch.zeros(B, N, T, dtype=dtype, device=device if device is not None else region_masks.device)
    for r, g in enumerate(groups):
        idx = torch.tensor([i for i in g if i < T], dtype=torch.long, device=A.device)
        if idx.numel() == 0:
            continue
        m = region_masks[:, r].to(dtype)  # (B, N)
        A[:, :, idx] = torch.maximum(A[:, :, idx], m.unsqueeze(-1).expand(B, N, idx.numel()))
    return A


def pww_bias(logits: torch.Tensor, region_masks: torch.Tensor, groups: Sequence[Sequence[int]],
             weight: float, sigma: float | torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """eDiff-I paint-with-words: logits + w * log(1 + sigma) * max(QK^T) * A.

    logits (B, heads, N, T) scaled QK^T/sqrt(d) (adding the bias before or after the 1/sqrt(d)
    scaling is the same thing when max is taken on the same logits); region_masks (B, R, N) bool;
    groups: R lists of token positions; A[j, i] = 1 where pixel j is in region r and token i is
    one of region r's tokens (``pww_tokens``; pass it as ``tokens`` when already made). sigma: a float
    or (B,) tensor. The max is per batch item and head, clamped at 0 so a bias never pushes attention
    away from the painted tokens.
    """
    B, _H, N, T = logits.shape
    A = tokens if tokens is not None else pww_tokens(region_masks, groups, T, logits.dtype, logits.device)
    s = torch.as_tensor(sigma, dtype=logits.dtype, device=logits.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(B)
    scale = weight * torch.log1p(s).view(B, 1, 1, 1) * logits.amax(dim=(-1, -2), keepdim=True).clamp_min(0)
    return logits + scale * A.unsqueeze(1)


# ----------------------------------------------------------------------------- colour maps

NAMED_COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0),
    "orange": (255, 128, 0), "purple": (128, 0, 128), "gray": (128, 128, 128), "grey": (128, 128, 128),
}


def parse_colour(text: str) -> tuple[int, int, int]:
    """'red', '#ff0000', 'ff0000' or '255,0,0' -> (r, g, b)."""
    t = text.strip().lower()
    if t in NAMED_COLOURS:
        return NAMED_COLOURS[t]
    h = t[1:] if t.startswith("#") else t
    if re.fullmatch(r"[0-9a-f]{6}", h):
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    parts = [p for p in re.split(r"[\s,/]+", t) if p]
    if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise ValueError(f"unknown colour {text!r}: use a name ({', '.join(sorted(NAMED_COLOURS))}), "
                     "#rrggbb or r,g,b")


def parse_colour_phrases(text: str) -> list[tuple[tuple[int, int, int], str]]:
    """'red: a red circle; blue: a blue square' (';' or new lines) -> [((255,0,0), 'a red circle'), ...]."""
    out = []
    for entry in re.split(r"[;\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        if ":" not in entry:
            raise ValueError(f"colour map entry {entry!r} has no ':'; write 'colour: phrase', "
                             "e.g. 'red: a red circle; blue: a blue square'")
        colour, phrase = entry.split(":", 1)
        if not phrase.strip():
            raise ValueError(f"colour map entry {entry!r} names no phrase")
        out.append((parse_colour(colour), phrase.strip()))
    if not out:
        raise ValueError("the colour → phrase mapping is empty; write e.g. 'red: a red circle; blue: a blue square'")
    return out


def colour_map_masks(image: torch.Tensor, colours: Sequence[tuple[int, int, int]],
                     tolerance: float = 0.1) -> torch.Tensor:
    """(H, W, 3) image in [0, 1] -> (R, H, W) masks: pixels within ``tolerance`` (max abs per
    channel, in [0, 1] units) of each colour."""
    img = image[..., :3].float()
    masks = []
    for c in colours:
        ref = torch.tensor(c, dtype=torch.float32, device=img.device) / 255.0
        masks.append(((img - ref).abs().amax(dim=-1) <= tolerance))
    return torch.stack(masks).float()


# ----------------------------------------------------------------------------- routes picture

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (0, 128, 128),
]


def expert_colour(e: int) -> torch.Tensor:
    return torch.tensor(PALETTE[e % len(PALETTE)], dtype=torch.float32) / 255.0


def draw_routes(image: torch.Tensor, region_experts: torch.Tensor | None, grid: torch.Tensor,
                time_row: Sequence[int] | None = None, cell: int = 6, opacity: float = 0.45) -> torch.Tensor:
    """The routes taken, as a picture (RAPHAEL's "diffusion paths").

    image (H, W, 3): the output; region_experts (E, H, W) bool or None: the final region of each
    expert, tinted over the image; grid (S, K, E) float: for step s and block k the fraction of
    the image each expert painted (rows below the image: one row per block, one column per step,
    each cell tinted by its experts, grey where the base prompt painted everything);
    time_row: optional time-expert index per step, drawn as a top strip of the grid.
    Returns (H + strip, W', 3).
    """
    img = image[..., :3].float().clone().cpu()
    H, W, _ = img.shape
    if region_experts is not None and region_experts.numel():
        for e in range(region_experts.shape[0]):
            m = region_experts[e].cpu().bool()
            if m.shape != (H, W):
                m = resize_masks(m.unsqueeze(0), (H, W))[0]
            img[m] = img[m] * (1 - opacity) + expert_colour(e) * opacity
    S, K = int(grid.shape[0]), int(grid.shape[1])
    if time_row:
        S = max(S, len(list(time_row)))
    rows = K + (1 if time_row else 0)
    if S == 0 or rows == 0:
        return img
    gw, gh = max(W, S * cell), rows * cell
    strip = torch.full((gh, gw, 3), 0.15)
    r0 = 0
    if time_row:
        for s, te in enumerate(list(time_row)[:S]):
            strip[0:cell - 1, s * cell:(s + 1) * cell - 1] = expert_colour(int(te) + 5)
        r0 = 1
    grey = torch.tensor([0.5, 0.5, 0.5])
    for s in range(min(S, int(grid.shape[0]))):
        for k in range(K):
            frac = grid[s, k].float().cpu()
            base = (1 - frac.sum()).clamp_min(0)
            col = grey * base
            for e in range(frac.shape[0]):
                col = col + expert_colour(e) * frac[e]
            col = col / (base + frac.sum()).clamp_min(1e-6)
            y = (r0 + k) * cell
            strip[y:y + cell - 1, s * cell:(s + 1) * cell - 1] = col
    if gw > W:
        pad = torch.zeros(H, gw - W, 3)
        img = torch.cat([img, pad], dim=1)
    return torch.cat([img, strip], dim=0)


# ----------------------------------------------------------------------------- one block


class ProjectionCache:
    """Keys and values of fixed contexts (the base prompt's, each expert's) per block, reused across calls.

    ``kv(key, ctx, to_k, to_v, weights)`` returns ``(to_k(ctx), to_v(ctx))`` and recomputes them only when
    ``weights`` (the caller's signature of the block's projection weights) changed or ``ctx`` differs in value
    from the context the entry was made from. A hit returns the bits a recomputation would give. The owner
    clears it at every run start."""

    def __init__(self):
        self.entries: dict = {}

    def clear(self) -> None:
        self.entries.clear()

    def kv(self, key, ctx: torch.Tensor, to_k: Callable, to_v: Callable, weights=None):
        hit = self.entries.get(key)
        if (hit is not None and hit[0] == weights and hit[1].shape == ctx.shape and hit[1].dtype == ctx.dtype
                and hit[1].device == ctx.device and torch.equal(hit[1], ctx)):
            return hit[2], hit[3]
        k, v = to_k(ctx), to_v(ctx)
        self.entries[key] = (weights, ctx, k, v)
        return k, v

    def memo(self, key, make: Callable, weights=None):
        """``make()`` once per key while ``weights`` is unchanged: for what depends only on constant inputs (the
        experts' own prompts) and on the block's weights."""
        hit = self.entries.get(key)
        if hit is not None and hit[0] == weights:
            return hit[1]
        value = make()
        self.entries[key] = (weights, value)
        return value


class RegionPlan:
    """What one resolution's phrase masks mean for a block, computed once per model call and resolution and
    shared by every block there: whether anything is painted, each expert's region (``expert_masks``), the
    experts that paint, their coverage, the mixing weights, and paint-with-words' token maps.

    region_masks (b, P, N) bool or None; route: expert per phrase (-1: none); n_experts: conditioning experts."""

    def __init__(self, region_masks: torch.Tensor | None, route: Sequence[int], n_experts: int):
        self.masks = region_masks
        self.any = region_masks is not None and bool(region_masks.any())
        self.mixing = self.any and n_experts > 0 and any(int(r) >= 0 for r in route)
        self.em = expert_masks(region_masks, route, n_experts) if self.mixing else None  # (E, b, N)
        flags = self.em.flatten(1).any(dim=1).tolist() if self.mixing else []
        self.active = [e for e, f in enumerate(flags) if f]
        self.painted = bool(self.active)
        self.coverage = self.em.float().mean(dim=(1, 2)) if self.painted else None
        self.weights = self.covered = self.count = None
        if self.painted:  # mix_regions' weights and counts (sums of 0/1: exact), once
            self.weights = self.em[self.active].unsqueeze(-1).float()  # (A, b, N, 1)
            cnt = self.weights.sum(dim=0)
            self.covered = cnt > 0
            self.count = cnt.clamp_min(1.0)
        self._tokens: dict = {}

    def tokens(self, key, region_masks: torch.Tensor, groups, T: int, dtype, device) -> torch.Tensor:
        """``pww_tokens`` of these masks, made once per key, context length, dtype and device."""
        k = (key, T, dtype, device)
        A = self._tokens.get(k)
        if A is None:
            A = self._tokens[k] = pww_tokens(region_masks, groups, T, dtype, device)
        return A


def stack_heads(kvs: Sequence[tuple[torch.Tensor, torch.Tensor]], heads: int, dtype=None):
    """A projected contexts (k, v), (b, T, C) each, as two (A*b, heads, T, d) tensors for one batched attention
    call; None when their shapes differ."""
    if len({tuple(k.shape) for k, _ in kvs} | {tuple(v.shape) for _, v in kvs}) != 1:
        return None
    A, (b, T, C) = len(kvs), kvs[0][0].shape
    kk = torch.stack([split_heads(k.to(dtype or k.dtype), heads) for k, _ in kvs]).reshape(A * b, heads, T, C // heads)
    vv = torch.stack([split_heads(v.to(dtype or v.dtype), heads) for _, v in kvs]).reshape(A * b, heads, T, C // heads)
    return kk, vv


def expert_attention(q: torch.Tensor, kvs: Sequence[tuple[torch.Tensor, torch.Tensor]], heads: int,
                     stacked=None) -> torch.Tensor:
    """Softmax attention of q (b, N, C) to each of A projected contexts (k, v), (b, T_a, C) each -> (A, b, N, C)
    in q's dtype; one batched call when the contexts have one shape (``stack_heads``, or ``stacked`` when already
    made; per item the same bits as ``sdpa``)."""
    stacked = stacked if stacked is not None else stack_heads(kvs, heads, q.dtype)
    if stacked is not None:
        kk, vv = stacked
        A, (b, N, _C) = kk.shape[0] // q.shape[0], q.shape
        qh = split_heads(q, heads)
        H, d = qh.shape[1], qh.shape[-1]
        qq = qh.unsqueeze(0).expand(A, -1, -1, -1, -1).reshape(A * b, H, N, d)
        out = F.scaled_dot_product_attention(qq, kk, vv)
        return out.view(A, b, H, N, d).transpose(2, 3).reshape(A, b, N, H * d)
    return torch.stack([sdpa(q, k, v, heads) for k, v in kvs])


def mix_planned(background: torch.Tensor, outs: torch.Tensor, plan: RegionPlan) -> torch.Tensor:
    """``mix_regions`` with the plan's weights: outs (A, b, N, C), one per active expert, in plan order."""
    acc = (outs.float() * plan.weights).sum(dim=0)
    mixed = torch.where(plan.covered, acc / plan.count, background.float())
    return mixed.to(background.dtype)


def block_update(n_out: torch.Tensor, hidden: torch.Tensor, base_ctx: torch.Tensor,
                 to_q: Callable, to_k: Callable, to_v: Callable, to_out: Callable, heads: int,
                 rows: torch.Tensor, groups: Sequence[Sequence[int]], capture: bool,
                 region_masks: torch.Tensor | None, expert_ctx: Sequence[torch.Tensor],
                 route: Sequence[int], pww_weight: float, sigma: torch.Tensor | None,
                 kv: Callable | None = None, plan: RegionPlan | None = None, memo: Callable | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One cross-attention block of the space-expert layer, as a correction of its output.

    n_out (B, N, C): the block's attention output (after to_out, after any other pack's patches);
    hidden (B, N, C'): the normed hidden states the block attended from; base_ctx (B, T, D): the
    base prompt's context; rows: batch rows that carry the positive prompt (cond rows);
    region_masks (b, P, N) bool per phrase (b = len(rows)) or None; expert_ctx: E contexts (1, Te, D);
    route: expert index per phrase (P,), -1 for a phrase no expert here paints (it still gets the
    paint-with-words bias). Returns (new n_out, phrase maps (b, G, N) if captured,
    expert coverage (E,) fractions or None).

    Optional, for speed, same result: ``kv(tag, ctx) -> (to_k(ctx), to_v(ctx))`` (the base prompt's; e.g. a
    ``ProjectionCache.kv`` lookup, so a fixed prompt is projected once per run), ``memo(tag, make) -> make()``
    for what depends only on the experts' constant prompts and the block's weights (their keys/values, stacked
    for the batched call; e.g. ``ProjectionCache.memo``) and ``plan``, the ``RegionPlan`` of region_masks shared
    by the blocks of one resolution.

    The correction is additive: n_out + to_out(mixed) - to_out(base), so whatever other patches
    did to n_out stays. Rows not in ``rows`` are untouched; with nothing to mix or bias the input
    is returned as is. All conditioning experts attend in one batched attention call.
    """
    if plan is None:
        plan = RegionPlan(region_masks, route, len(expert_ctx))
    mixing = plan.mixing
    biasing = plan.any and pww_weight != 0
    if not (capture or mixing or biasing) or rows.numel() == 0:
        return n_out, None, None
    project = kv if kv is not None else (lambda tag, c: (to_k(c), to_v(c)))
    h = hidden[rows]
    q = to_q(h)
    k, v = project("base", base_ctx[rows])
    maps = None
    if capture or biasing:
        logits = attention_logits(q, k, heads)
        probs = logits.softmax(dim=-1)
        if capture:
            maps = phrase_maps(probs, groups)
        base = attend(probs, v, heads).to(q.dtype)
        if biasing:
            A = plan.tokens("base", region_masks, groups, logits.shape[-1], logits.dtype, logits.device)
            biased = pww_bias(logits, region_masks, groups, pww_weight, 0.0 if sigma is None else sigma, tokens=A)
            background = attend(biased.softmax(dim=-1), v, heads).to(q.dtype)
        else:
            background = base
    else:
        base = sdpa(q, k, v, heads)
        background = base
    coverage = None
    target = background
    if mixing:
        if not plan.painted:
            return n_out if target is base else _apply_delta(n_out, rows, to_out, target, base), maps, None
        remember = memo if memo is not None else (lambda tag, make: make())
        b, spec = q.shape[0], (q.dtype, q.device)

        def project_expert(e):  # (to_k, to_v) of expert e's prompt, expanded to the b rows
            ec = expert_ctx[e].to(device=q.device, dtype=q.dtype).expand(b, -1, -1)
            return to_k(ec), to_v(ec)

        def expert_kv(e):
            return remember(("expert", e, b, spec), lambda: project_expert(e))
        if biasing:
            kvs = [expert_kv(e) for e in plan.active]
            # paint-with-words inside the expert's own attention: its region pulls on the expert
            # prompt's tokens (every position after BOS), so the weight acts where experts paint
            outs = []
            for e, (ek, ev) in zip(plan.active, kvs):
                el = attention_logits(q, ek, heads)
                T, region = el.shape[-1], plan.em[e].unsqueeze(1)
                A = plan.tokens(("expert", e), region, [range(1, T)], T, el.dtype, el.device)
                el = pww_bias(el, region, [range(1, T)], pww_weight, 0.0 if sigma is None else sigma, tokens=A)
                outs.append(attend(el.softmax(dim=-1), ev, heads).to(q.dtype))
            outs = torch.stack(outs)
        else:
            stacked = remember(("stacked", tuple(plan.active), b, spec),
                               lambda: stack_heads([project_expert(e) for e in plan.active], heads, q.dtype))
            outs = expert_attention(q, [expert_kv(e) for e in plan.active] if stacked is None else [], heads,
                                    stacked=stacked)
        target = mix_planned(background, outs, plan)
        coverage = plan.coverage
    if target is base:
        return n_out, maps, coverage
    return _apply_delta(n_out, rows, to_out, target, base), maps, coverage


def _apply_delta(n_out, rows, to_out, target, base):
    delta = (to_out(target) - to_out(base)).to(n_out.dtype)
    out = n_out.clone()
    out.index_add_(0, rows, delta)  # out[rows] + delta, in place
    return out
