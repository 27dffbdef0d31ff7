"""Space experts and paint-with-words on the DiT (PixArt) and MMDiT (Flux, SD3) families: the family attention
adapters. Chosen by the family row's ``attention`` (``glue.FAMILIES``), not by the family's name; the math is
``models/space_experts.py``'s (maps, alpha*max thresholds, eDiff-I bias, region mixing); the runtime (masks per
step, capture, route record) is ``nodes/space_experts.SpaceRuntime``, handed in.

``dit-cross`` (PixArt-Σ): every block cross-attends from the image tokens to the T5 tokens
(``blocks[i].cross_attn``: ``q_linear``, ``kv_linear`` = [k | v], ``proj``). ComfyUI's PixArt passes no
transformer_options to its blocks, so the adapter registers forward hooks on the cross-attention modules for the
duration of one model call (inside a keyed ``APPLY_MODEL`` wrapper) and removes them after it: forward hooks are
list-type (another pack's hooks on the same modules still run, in either order), nothing stays on a shared model.
Each hook corrects the module's output additively, as on the UNet (``se.block_update``): output +
proj(mixed) - proj(base), so whatever else changed that output stays. Experts' prompts pass through the model's
own caption projection (``y_embedder``) once per call.

``mmdit-joint`` (Flux double/single-stream blocks, SD3 joint blocks): text and image tokens attend jointly,
text first ([txt | img], Flux Kontext references after the image). The adapter chains ComfyUI's
``transformer_options["optimized_attention_override"]`` (a single slot): inside the keyed ``APPLY_MODEL`` wrapper
it reads whatever override is there at that call (another pack's, installed before or after this node) and
passes the model a copy of transformer_options whose override is ours, calling that one for the attention
itself. So a second attention patch keeps acting in either order, and the dit ``patches_replace`` slots are never
touched. Per joint attention call (blocks counted in execution order; SD3.5's image-only self-attention is not a
joint call and is passed through):

* maps: the image-query x text-key part of the joint attention probabilities (softmax over the whole joint
  sequence, as the model computes them), averaged over heads, mean over a phrase's tokens, averaged over the
  family's map blocks (``Family.map_blocks``); masks = [map >= alpha * max], from the mask-start level on.
* paint-with-words: eDiff-I's w * log(1 + sigma') * max(QK^T) added to the logits of a region's image queries on
  its phrase's text keys; the output changes by attend(biased) - attend(plain) on those rows (additive, the
  other override's output kept). sigma' is the model's own noise-to-signal ratio s/a at the step's sigma
  (``models/coop.noise_to_signal``): on the VP/EPS families that is sigma itself (the UNet path), on flow models
  (x = (1-t) x0 + t eps, sigma = t in [0, 1]) it is t / (1 - t), so a bias means the same strength at the same
  noise level; pure noise (t = 1, ratio infinite) is capped at SD's sigma_max 14.61 (the UNet's first step).
* experts (one pass, no extra model call): each expert's prompt tokens are appended to the text sequence of
  that call (its context concatenated after the base prompt's) and the joint attention is masked: an expert's
  tokens and its region's image tokens see each other; region image tokens do not see the base prompt's tokens
  (the expert paints its region, as RAPHAEL's mixing replaces the base output there); image tokens outside
  every region, the base prompt's tokens and the other experts' tokens never see an expert's tokens (no leak:
  their attention to them is exactly 0, measured in the tests). Uncond rows see no expert. Flux's pooled vector
  and guidance stay the base prompt's. Cost: the joint sequence grows by each expert's tokens (the bench gives
  per-step ratios). A call where no expert has a region (before the mask-start level, alpha > 1) is plain.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension

from ..models import coop as coop_math
from ..models import space_experts as se
from . import dit_hooks
from .glue import conditioning_problem, fail, family_row, hook_key

log = logging.getLogger(__name__)

KEY = hook_key("space_experts")
#: paint-with-words' sigma at pure noise on flow models (t = 1: infinite noise-to-signal ratio): SD's sigma_max
PWW_SIGMA_CAP = 14.6146


# ----------------------------------------------------------------------------- family facts


def attention_kind(model) -> str | None:
    row = family_row(model)
    return row.attention if row is not None else None


def is_dit(model) -> bool:
    return attention_kind(model) in ADAPTERS


def block_layout(model) -> list[tuple[str, int]]:
    """(kind, count) of the family's blocks in execution order (nodes/dit_hooks' kinds)."""
    row = family_row(model)
    dm = model.model.diffusion_model
    return [(k, len(dit_hooks.blocks(dm, row.name, k))) for k in dit_hooks.kinds(row.name)]


def map_blocks(model, capture: str) -> set[tuple[str, int]]:
    """The blocks whose text attention makes the maps: the family row's windows, or every block ("all")."""
    row = family_row(model)
    out = set()
    for kind, n in block_layout(model):
        for i in range(n):
            pos = (i + 0.5) / n
            if capture == "all" or any(k == kind and lo <= pos <= hi for k, lo, hi in row.map_blocks):
                out.add((kind, i))
    return out


def text_streams(model) -> tuple[str, ...]:
    row = family_row(model)
    return tuple(row.text_streams) if row is not None else ("l",)


def pww_sigma(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """The sigma paint-with-words' log(1 + sigma) reads: the model's noise-to-signal ratio at each row's sigma."""
    vals = []
    for s in sigma.reshape(-1).tolist():
        r = coop_math.noise_to_signal(model_sampling, s) if model_sampling is not None else s
        vals.append(min(PWW_SIGMA_CAP, r) if math.isfinite(r) else PWW_SIGMA_CAP)
    return torch.tensor(vals, dtype=torch.float32)


def check_experts(model, experts, experts_input: str = "experts") -> None:
    """Every conditioning expert's prompt must be one this model reads (its text width), refused up front naming
    the expert, not deep inside the DiT."""
    for e in experts:
        bad = conditioning_problem(model, [[e.cond, {"pooled_output": e.pooled} if e.pooled is not None else {}]],
                                   "model")
        if bad is not None:
            raise fail(experts_input, f"space expert {e.name!r}: {bad[0]}", bad[1])


# ----------------------------------------------------------------------------- phrases -> token positions


def phrase_groups(clip, prompt: str, phrases: list[str], streams: tuple[str, ...]) -> list[list[int]]:
    """Token positions of every phrase in the model's text context, stream by stream (CLIP BPE tokens, T5
    sentencepiece pieces), each stream's positions offset by the tokens of the streams before it. A phrase must
    be found in every stream the model reads; one that a stream's tokenizer splits differently inside the prompt
    (sentencepiece merges a word with its neighbours, a piece of a longer word) is refused, naming the stream."""
    tok = clip.tokenize(prompt)
    empty = clip.tokenize("")
    missing = [s for s in streams if s not in tok]
    if missing:
        raise ValueError(f"clip: this text encoder gives no {', '.join(missing)} tokens, which the model reads; "
                         "connect the CLIP of the model's own checkpoint")
    offsets, off = {}, 0
    for s in streams:
        offsets[s] = off
        off += sum(len(c) for c in tok[s])
    groups = []
    for p in phrases:
        ptok = clip.tokenize(p)
        found, pos = {}, []
        for s in streams:
            special = {int(t[0]) for c in empty[s] for t in c}
            chunks = [[int(t[0]) for t in c] for c in tok[s]]
            ids = se.content_ids([int(t[0]) for c in ptok[s] for t in c], special)
            where = se.phrase_token_positions(chunks, ids, len(chunks[0]) if len(chunks) > 1 else None)
            found[s] = bool(where)
            pos.extend(offsets[s] + i for i in where)
        if not any(found.values()) and p.strip().lower() not in prompt.lower():
            raise ValueError(f"phrases: {p!r} does not occur in the prompt {prompt!r}; every phrase must be "
                             "words of the prompt (its region comes from the prompt's own tokens)")
        split = [s for s in streams if not found[s]]
        if split:
            what = "T5's sentencepiece" if any(s.startswith("t5") for s in split) else "the " + "/".join(split)
            raise ValueError(f"phrases: {p!r} is in the prompt, but {what} tokenizer splits it differently inside "
                             f"the prompt than alone ({', '.join(split)} tokens; T5 is case-sensitive and splits "
                             "words glued to punctuation), so its tokens cannot be found; write the phrase exactly "
                             "as the prompt does (same case, whole words) and keep words apart with spaces")
        groups.append(sorted(set(pos)))
    return groups


# ----------------------------------------------------------------------------- one call


@dataclass
class CallState:
    """What the attention hooks of one model call share."""
    rows: torch.Tensor                       # cond rows of the batch
    hw: tuple[int, int]                      # token grid of the image
    n_img: int
    n_txt: int                               # the base prompt's text tokens
    pmasks: torch.Tensor | None              # (b, P, N) phrase masks of this step, or None
    emasks: torch.Tensor | None              # (E, b, N) attention experts' regions, or None
    route: list[int]
    sigma: torch.Tensor | None               # (b,) paint-with-words sigma per cond row
    capture: set
    spans: list[tuple[int, int]] = field(default_factory=list)  # experts' token spans in the extended text
    order: list[tuple[str, int]] = field(default_factory=list)  # block keys in execution order
    calls: int = 0
    mask_cache: dict = field(default_factory=dict)

    @property
    def n_text(self) -> int:
        return self.n_txt + sum(e - s for s, e in self.spans)

    def next_block(self) -> tuple[str, int] | None:
        k = self.order[self.calls] if self.calls < len(self.order) else None
        self.calls += 1
        return k


def _call_state(rt, model_sampling, x, transformer_options, n_txt: int, hw, layout, capture, attn_route):
    setup = rt.setup
    B = x.shape[0]
    rows = rt.rows(transformer_options, B).to(x.device)
    pm = rt.phrase_masks(hw, rows.numel(), x.device) if rows.numel() else None
    if pm is not None and not bool(pm.any()):
        pm = None
    route = attn_route
    if any(setup.experts[e].window is not None for e in setup.attn_experts):
        idx = setup.attn_experts
        route = [r if r >= 0 and rt.expert_acts(idx[r], rt.call["sigma"]) else -1 for r in attn_route]
    em = None
    if pm is not None and setup.attn_experts and any(r >= 0 for r in route):
        em = se.expert_masks(pm, route, len(setup.attn_experts))
        if not bool(em.any()):
            em = None
    sig = transformer_options.get("sigmas")
    sigma = None
    if setup.pww_weight != 0 and isinstance(sig, torch.Tensor):
        s = sig[rows.to(sig.device)] if sig.shape[0] == B else sig.reshape(-1)[:1].expand(rows.numel())
        sigma = pww_sigma(model_sampling, s).to(x.device)
    order = [(k, i) for k, n in layout for i in range(n)]
    cap = capture if rt.agg is not None else set()
    return CallState(rows=rows, hw=hw, n_img=hw[0] * hw[1], n_txt=n_txt, pmasks=pm, emasks=em, route=route,
                     sigma=sigma, capture=cap, order=order)


def _note(rt, key, st: CallState):
    if st.emasks is None:
        return
    setup = rt.setup
    cov = st.emasks.float().mean(dim=(1, 2))
    full = torch.zeros(len(setup.experts))
    for i, e in enumerate(setup.attn_experts):
        full[e] = float(cov[i])
    rt.note_coverage((key[0], int(key[1]), 0), full.tolist())


# ----------------------------------------------------------------------------- dit-cross (PixArt)


def _install_cross(m, rt):
    setup = rt.setup
    family = family_row(m).name
    layout = block_layout(m)
    attn_idx = setup.attn_experts
    attn_pos = {e: i for i, e in enumerate(attn_idx)}
    attn_route = [attn_pos.get(r, -1) for r in setup.route]
    model_sampling = m.get_model_object("model_sampling")
    map_blocks_set = map_blocks(m, setup.capture if setup.capture == "all" else "family")

    def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                            **kwargs):
        if rt.in_expert_pass:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        rt.begin_call(None, x, transformer_options)
        handles = []
        try:
            dm = rt.default_unet
            hw = dit_hooks.token_shape(x.shape[-2:], dit_hooks.patch_size(dm))
            st = _call_state(rt, model_sampling, x, transformer_options, int(c_crossattn.shape[1]), hw, layout,
                             map_blocks_set, attn_route)
            if st.rows.numel() and (st.capture or st.pmasks is not None):
                ectx = []
                if st.emasks is not None:
                    with torch.no_grad():
                        for e in attn_idx:
                            c = setup.experts[e].cond.to(device=x.device, dtype=c_crossattn.dtype)
                            ectx.append(dm.y_embedder(c.unsqueeze(1), False).reshape(1, c.shape[1], -1))
                for kind, n in layout:
                    for i, mod in enumerate(dit_hooks.blocks(dm, family, kind)):
                        handles.append(mod.cross_attn.register_forward_hook(_cross_hook(rt, st, (kind, i), ectx)))
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()
            rt.end_call()

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, apply_model_wrapper)


def _cross_hook(rt, st: CallState, key, ectx):
    setup = rt.setup

    def hook(mod, inputs, output):
        x, y = inputs[0], inputs[1]
        mask = inputs[2] if len(inputs) > 2 else None
        if mask is not None or x.shape[1] != st.n_img:
            return output  # variable-length captions (an attention mask) or not the image grid: left alone
        B, N, C = x.shape
        ctx = y.reshape(B, -1, C)
        capture = key in st.capture
        if not capture and st.pmasks is None:
            return output
        route = st.route if st.emasks is not None else [-1] * len(st.route)
        out, maps, _cov = se.block_update(
            output, x, ctx, mod.q_linear, lambda c: mod.kv_linear(c)[..., :C], lambda c: mod.kv_linear(c)[..., C:],
            mod.proj, mod.num_heads, st.rows, setup.groups, capture, st.pmasks,
            ectx if st.emasks is not None else [], route, setup.pww_weight, st.sigma)
        if maps is not None and rt.agg is not None:
            rt.agg.add(maps.reshape(maps.shape[0], maps.shape[1], *st.hw))
        _note(rt, key, st)
        return out
    return hook


# ----------------------------------------------------------------------------- mmdit-joint (Flux, SD3)


def _install_joint(m, rt):
    setup = rt.setup
    layout = block_layout(m)
    attn_idx = setup.attn_experts
    attn_pos = {e: i for i, e in enumerate(attn_idx)}
    attn_route = [attn_pos.get(r, -1) for r in setup.route]
    model_sampling = m.get_model_object("model_sampling")
    map_blocks_set = map_blocks(m, setup.capture if setup.capture == "all" else "family")

    def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                            **kwargs):
        if rt.in_expert_pass:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        rt.begin_call(None, x, transformer_options)
        try:
            dm = rt.default_unet
            hw = dit_hooks.token_shape(x.shape[-2:], dit_hooks.patch_size(dm))
            st = _call_state(rt, model_sampling, x, transformer_options, int(c_crossattn.shape[1]), hw, layout,
                             map_blocks_set, attn_route)
            if not st.rows.numel() or (not st.capture and st.pmasks is None):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            if st.emasks is not None:
                if kwargs.get("attention_mask") is not None:
                    raise ValueError("positive: the prompt carries an attention mask (core conditioning mask on "
                                     "Flux), which space experts cannot combine with their own; remove it or use "
                                     "the experts without it")
                parts, pos = [c_crossattn], c_crossattn.shape[1]
                for e in attn_idx:
                    c = setup.experts[e].cond.to(device=c_crossattn.device, dtype=c_crossattn.dtype)
                    parts.append(c.expand(c_crossattn.shape[0], -1, -1))
                    st.spans.append((pos, pos + c.shape[1]))
                    pos += c.shape[1]
                c_crossattn = torch.cat(parts, dim=1)
            to = dict(transformer_options)
            prev = to.get("optimized_attention_override")
            to["optimized_attention_override"] = _joint_override(rt, st, prev)
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        finally:
            rt.end_call()

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, apply_model_wrapper)


def joint_mask(st: CallState, B: int, L: int, device, dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask of the joint sequence [base text | experts' texts | image | refs] (see the
    module docstring); 0 = attend, -inf = blocked."""
    key = (B, L, str(device), dtype)
    if key in st.mask_cache:
        return st.mask_cache[key]
    allow = torch.ones(B, L, L, dtype=torch.bool, device=device)
    T, Tt = st.n_txt, st.n_text
    img = torch.arange(Tt, Tt + st.n_img, device=device)
    for e, (s, t) in enumerate(st.spans):
        allow[:, :, s:t] = False
        allow[:, s:t, :] = False
        allow[:, s:t, s:t] = True
        for j, row in enumerate(st.rows.tolist()):
            px = img[st.emasks[e, j].to(device)]
            if px.numel() == 0:
                continue
            allow[row, px.unsqueeze(1), torch.arange(s, t, device=device).unsqueeze(0)] = True
            allow[row, s:t, :][:, px] = True
            allow[row, px, :T] = False
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    mask.masked_fill_(~allow.unsqueeze(1), float("-inf"))
    st.mask_cache[key] = mask
    return mask


def _joint_override(rt, st: CallState, prev):
    setup = rt.setup

    def override(func, *args, **kwargs):
        def base(*a, **kw):
            return prev(func, *a, **kw) if prev is not None else func(*a, **kw)

        q, k, v = args[0], args[1], args[2]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip = bool(kwargs.get("skip_reshape", False))
        L = q.shape[2] if skip else q.shape[1]
        Tt = st.n_text
        if L != (k.shape[2] if skip else k.shape[1]) or L < Tt + st.n_img:
            return base(*args, **kwargs)  # not a joint text+image attention (SD3.5's image self-attention)
        key = st.next_block()
        if key is None:
            return base(*args, **kwargs)
        B = q.shape[0]
        if st.spans:
            mask = joint_mask(st, B, L, q.device, q.dtype)
            old = kwargs.get("mask")
            if old is not None:
                old = old if old.dtype != torch.bool else torch.zeros_like(old, dtype=q.dtype).masked_fill(~old, float("-inf"))
                mask = mask + (old if old.ndim == 4 else old.reshape(old.shape[0] if old.ndim == 3 else 1, 1, L, L))
            kwargs = dict(kwargs, mask=mask)
        else:
            mask = kwargs.get("mask")
        out = base(*args, **kwargs)
        capture = key in st.capture
        biasing = setup.pww_weight != 0 and st.pmasks is not None
        if not (capture or biasing):
            _note(rt, key, st)
            return out
        rows = st.rows.to(q.device)
        # (B, H, L, d); unreshaped inputs may come as (B, L, C) or (B, L, H, d) (SD3's v)
        qh, kh, vh = (t if skip else se.split_heads(t.reshape(t.shape[0], t.shape[1], -1), heads) for t in (q, k, v))
        qi = qh[rows][:, :, Tt:Tt + st.n_img].float()
        logits = (qi @ kh[rows].float().transpose(-1, -2)) * (qi.shape[-1] ** -0.5)  # (b, H, N, L)
        if mask is not None:
            mk = mask[rows] if mask.shape[0] == B else mask
            logits = logits + mk[..., Tt:Tt + st.n_img, :].float()
        probs = logits.softmax(dim=-1)
        if capture and rt.agg is not None:
            maps = se.phrase_maps(probs[..., :st.n_txt], setup.groups)  # the base prompt's text keys
            rt.agg.add(maps.reshape(maps.shape[0], maps.shape[1], *st.hw))
        if biasing:
            groups, regions = list(setup.groups), [st.pmasks]
            if st.emasks is not None:  # an expert's region also pulls on that expert's own tokens
                groups += [list(range(s, t)) for s, t in st.spans]
                regions.append(st.emasks.permute(1, 0, 2))
            biased = se.pww_bias(logits, torch.cat(regions, dim=1), groups, setup.pww_weight, st.sigma)
            vr = vh[rows].float()
            delta = (biased.softmax(dim=-1) - probs) @ vr  # (b, H, N, d)
            out = out.clone()
            if kwargs.get("skip_output_reshape", False):
                out[rows, :, Tt:Tt + st.n_img] += delta.to(out.dtype)
            else:
                out[rows, Tt:Tt + st.n_img] += se.merge_heads(delta).to(out.dtype)
        _note(rt, key, st)
        return out
    return override


ADAPTERS = {"dit-cross": _install_cross, "mmdit-joint": _install_joint}


def install(m, rt) -> None:
    """Add the family's attention adapter to the cloned MODEL ``m`` (its runtime ``rt``)."""
    ADAPTERS[attention_kind(m)](m, rt)
