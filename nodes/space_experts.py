"""Space experts (RAPHAEL Space-MoE, training-free), paint-with-words (eDiff-I) and the MoE sampler.

Glue only; the math is in ../models/space_experts.py. How it hooks into ComfyUI, composably:

* ``attn2_patch`` (a list patch): remembers the block's normed hidden states and base context.
* ``attn2_output_patch`` (a list patch): recomputes q with the block's own ``attn2.to_q`` and, for
  each conditioning expert, k/v of the expert's context with ``to_k``/``to_v``; mixes per region
  and adds ``to_out(mixed) - to_out(base)`` to the block's output. The correction is additive, so
  what other packs' patches did to that output (IPAdapter-style, ...) stays, in either order.
  Cost: one extra cross-attention per conditioning expert at each block, never an extra UNet pass.
* ``DIFFUSION_MODEL`` wrapper (keyed): tells the patches which UNet is running (time-routed models
  swap it), then turns the phrase maps captured during that call into the masks of the next call.
* ``APPLY_MODEL`` wrapper (keyed): only for experts that carry their own MODEL (LoRA, other
  checkpoint): one extra pass per such expert, blended by region on the model output.
* ``OUTER_SAMPLE`` wrapper (keyed): resets the per-run state and starts a route record. The same reset is
  registered with ``glue.register_run_state`` (a router that carries this MODEL as one of its experts calls
  it), and the runtime also resets itself when a call belongs to a new schedule (``sample_sigmas``).
* Extra passes at one noise level (PAG, SAG, a split CFG batch) use the masks of that step's first pass and
  capture nothing; a pass that holds the negative prompt in a cond slot (SAG) is not painted.
* Core ConditioningSetTimestepRange on an expert's prompt: the expert acts only inside that range; masks,
  areas, ControlNets, hooks and combined prompts on it are refused, naming the input.

Keys: ``glue.hook_key("space_experts")`` for every wrapper, attachment, additional model and run state.

The single-slot ``attn2_replace`` is never used.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.patcher_extension
import comfy.samplers

from ..models import space_experts as se
from .glue import SigmaWindow, check_conditioning, check_same_family, check_vae, cond_rows, conditioning_problem
from .glue import fail, family_row, hook_key, register_run_state
from . import space_dit

log = logging.getLogger(__name__)

CATEGORY = "atelier/space"
KEY = hook_key("space_experts")
MAX_SEED = 0xFFFFFFFFFFFFFFFF

SpaceExperts = io.Custom("ATELIER_SPACE_EXPERTS")
Regions = io.Custom("ATELIER_REGIONS")
SpaceConfig = io.Custom("ATELIER_SPACE")


# ----------------------------------------------------------------------------- configuration


@dataclass
class Expert:
    name: str
    cond: torch.Tensor            # (1, T, D) cross-attention context
    pooled: torch.Tensor | None   # (1, D') or None
    model: object | None = None   # ModelPatcher for weight-changing experts
    window: SigmaWindow | None = None  # core ConditioningSetTimestepRange on its prompt: acts only inside it


@dataclass
class SpaceSetup:
    phrases: list[str]
    groups: list[list[int]]               # token positions of each phrase in the base context
    experts: list[Expert]
    route: list[int]                      # expert index per phrase
    scores: list[list[float]]
    alpha: float = se.DEFAULT_ALPHA
    mask_start_sigma: float = math.inf    # attention masks trusted at sigma <= this
    capture: str = "mid"                  # "mid": blocks at 1/2 and 1/4 latent resolution; "all"
    user_masks: torch.Tensor | None = None  # (P, H, W) float in {0, 1}
    pww_weight: float = 0.0
    label: str = "space experts"

    @property
    def attn_experts(self) -> list[int]:
        return [i for i, e in enumerate(self.experts) if e.model is None]

    @property
    def model_experts(self) -> list[int]:
        return [i for i, e in enumerate(self.experts) if e.model is not None]


def _special_ids(clip) -> set[int]:
    tok = clip.tokenize("")
    ids = set()
    for chunks in tok.values():
        for t in chunks[0]:
            ids.add(int(t[0]))
    return ids


def _prompt_chunks(clip, prompt: str) -> list[list[int]]:
    tok = clip.tokenize(prompt)
    key = "l" if "l" in tok else next(iter(tok))
    return [[int(t[0]) for t in chunk] for chunk in tok[key]]


def phrase_groups(clip, prompt: str, phrases: list[str]) -> list[list[int]]:
    """Token positions of every phrase in the tokenised prompt, with the real tokenizer."""
    chunks = _prompt_chunks(clip, prompt)
    special = _special_ids(clip)
    chunk_len = len(chunks[0]) if chunks else 77
    groups = []
    for p in phrases:
        tok = clip.tokenize(p)
        key = "l" if "l" in tok else next(iter(tok))
        ids = se.content_ids([int(t[0]) for chunk in tok[key] for t in chunk], special)
        pos = se.phrase_token_positions(chunks, ids, chunk_len)
        if not pos:
            raise ValueError(f"phrases: {p!r} does not occur in the prompt {prompt!r}; every phrase must be "
                             "words of the prompt (its region comes from the prompt's own tokens)")
        groups.append(pos)
    return groups


def _embedding(cond: torch.Tensor, pooled: torch.Tensor | None, use_pooled: bool) -> torch.Tensor:
    if use_pooled and pooled is not None:
        return pooled.reshape(-1).float().cpu()
    return cond[0].float().mean(dim=0).cpu()


def build_setup(clip, prompt: str, phrases: list[str], experts: list[Expert], routing: str, gate_noise: float,
                seed: int, alpha: float, mask_start_sigma: float, capture: str,
                user_masks: torch.Tensor | None, pww_weight: float, model=None) -> SpaceSetup:
    if not phrases:
        raise ValueError("phrases: name at least one phrase of the prompt, e.g. 'red circle, blue square'")
    if model is not None and space_dit.is_dit(model):  # the tokens of every stream the DiT/MMDiT reads
        groups = space_dit.phrase_groups(clip, prompt, phrases, space_dit.text_streams(model))
        space_dit.check_experts(model, experts)
    else:
        groups = phrase_groups(clip, prompt, phrases)
    if user_masks is not None and user_masks.shape[0] != len(phrases):
        raise ValueError(f"regions: {user_masks.shape[0]} masks for {len(phrases)} phrases")
    route: list[int] = []
    scores: list[list[float]] = []
    if experts:
        if model is not None:
            check_expert_models(model, experts)
            dim = _context_dim(model)
            for e in experts:
                if dim is not None and e.cond.shape[-1] != dim:
                    raise ValueError(f"experts: {e.name!r} has a {e.cond.shape[-1]}-wide conditioning but the "
                                     f"model attends to {dim}-wide text; encode the expert prompt with this "
                                     "model's CLIP")
        if routing == "in order":
            route = [i % len(experts) for i in range(len(phrases))]
        else:
            use_pooled = all(e.pooled is not None for e in experts)
            pe = []
            for p in phrases:
                c, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
                pe.append(_embedding(c, pooled, use_pooled))
            ee = torch.stack([_embedding(e.cond, e.pooled, use_pooled) for e in experts])
            r, s = se.text_gate(torch.stack(pe), ee, noise=gate_noise, seed=seed)
            route, scores = [int(x) for x in r], s.tolist()
    return SpaceSetup(phrases=phrases, groups=groups, experts=experts, route=route, scores=scores, alpha=alpha,
                      mask_start_sigma=mask_start_sigma, capture=capture, user_masks=user_masks,
                      pww_weight=pww_weight)


def check_expert_models(model, experts: list[Expert], model_input: str = "model",
                        experts_input: str = "experts") -> None:
    """An expert's own MODEL must be of the base model's family and take its conditioning (the glue's
    one check), so a mix-up is refused here, naming the input, not deep inside the UNet."""
    row = family_row(model)
    label = row.label if row else "the same"
    for e in experts:
        if e.model is None:
            continue
        if not hasattr(e.model, "model"):
            raise fail(experts_input, f"space expert {e.name!r} carries something that is not a MODEL",
                       "connect a model loader's MODEL to that Atelier Space Expert node")
        check_same_family(model, e.model, model_input, experts_input,
                          f"space expert {e.name!r} carries a model of another family than {model_input}; connect "
                          f"a {label} model to that Atelier Space Expert node's model input, or leave it empty")


def _context_dim(model) -> int | None:
    dm = model.model.diffusion_model
    for m in dm.modules():
        if type(m).__name__ == "CrossAttention" and hasattr(m, "to_k") and m.to_k.in_features != m.to_q.in_features:
            return int(m.to_k.in_features)
    return None


def mask_window(mask_start_t: int) -> SigmaWindow:
    """The noise-level window in which attention masks are trusted: from timestep ``mask_start_t`` (0–999 of the
    model's own schedule; 1000 = from the first step) down to the end."""
    return SigmaWindow(min(1.0, max(0.0, 1.0 - mask_start_t / 999.0)), 1.0, start_input="mask_start_t")


def _t_to_sigma(model, t: int) -> float:
    """The sigma at which masks start being trusted (the window's noisy end)."""
    return mask_window(t).sigmas(model.get_model_object("model_sampling"))[0]


# ----------------------------------------------------------------------------- runtime


class SpaceRuntime:
    """Per-model state shared by the patches (held in closures and as a model attachment).

    Per run: ``record`` (one entry per step) and the phrase maps. Reset at each run start by the OUTER_SAMPLE
    wrapper, by whatever carries the model (``glue.reset_run_states``, e.g. a time-expert router) and, on its
    own, when a call belongs to a new schedule (``transformer_options["sample_sigmas"]``).

    Per step (one noise level): the masks are those of the step's first pass, and only that pass captures
    maps. Extra passes another node adds at the same noise level (PAG's perturbed pass, SAG's blurred
    uncond, a split CFG batch) see the same masks; a pass that carries the negative prompt in a "cond" slot
    (SAG) is left alone, recognised by the conditioning uuids the sampler gives every prompt."""

    def __init__(self, setup: SpaceSetup, unet, model_sampling=None):
        self.setup = setup
        self.default_unet = unet
        self.unet = unet
        self.model_sampling = model_sampling
        self.modules: dict = {}
        self.stash = None
        self.active_maps: torch.Tensor | None = None   # (b, P, h, w): the latest maps captured
        self.agg: se.MapAggregator | None = None
        self.call: dict | None = None
        self.record: list[dict] = []                   # one entry per step
        self.block_keys: list = []
        self.in_expert_pass = False
        self.run_sigmas = None                         # the schedule of the current run (by identity)
        self.step_sigma: float | None = None
        self.step_maps: torch.Tensor | None = None     # the maps this step's masks come from
        self.step_captured = False
        self.uncond_uuids: set = set()
        self.kv_cache = se.ProjectionCache()           # keys/values of the fixed prompts per block, per run
        self.fixed_plans: dict = {}                    # painted regions' plans (the same at every call), per run
        self._attn2_lists: dict = {}                   # every cross-attention module, per UNet

    def on_model_patcher_clone(self):
        return self  # clones share the runtime (ComfyUI calls this; execution is sequential)

    # -- lookups
    def attn2(self, block, block_index):
        unet = self.unet
        key = (id(unet), block[0], block[1], block_index)
        mod = self.modules.get(key)
        if mod is None:
            if block[0] == "input":
                container = unet.input_blocks[block[1]]
            elif block[0] == "middle":
                container = unet.middle_block
            else:
                container = unet.output_blocks[block[1]]
            sts = [m for m in container if hasattr(m, "transformer_blocks")]
            if not sts:
                raise RuntimeError(f"space experts: no transformer at block {block}")
            mod = sts[0].transformer_blocks[block_index].attn2
            self.modules[key] = mod
        return mod

    # -- per run / per step / per call
    def start_run(self):
        self.active_maps = None
        self.record = []
        self.run_sigmas = None
        self.step_sigma = None
        self.step_maps = None
        self.step_captured = False
        self.uncond_uuids = set()
        self.kv_cache.clear()
        self.fixed_plans = {}

    def _check_new_run(self, sigma: float, transformer_options) -> None:
        ss = transformer_options.get("sample_sigmas")
        if ss is None:
            return
        first = float(ss.flatten()[0]) if isinstance(ss, torch.Tensor) and ss.numel() else None
        if ss is not self.run_sigmas or (sigma == first and self.step_sigma is not None and self.step_sigma != first):
            self.start_run()
            self.run_sigmas = ss

    def begin_call(self, unet, x, transformer_options):
        self.unet = unet if unet is not None else self.default_unet
        sig = transformer_options.get("sigmas")
        sigma = float(sig.max()) if isinstance(sig, torch.Tensor) and sig.numel() else math.inf
        self._check_new_run(sigma, transformer_options)
        cou, uuids = transformer_options.get("cond_or_uncond") or [], transformer_options.get("uuids") or []
        self.uncond_uuids.update(u for k, u in zip(cou, uuids) if k == 1)
        if sigma != self.step_sigma:  # a new step; any later pass at this noise level belongs to it
            self.step_sigma, self.step_maps, self.step_captured = sigma, self.active_maps, False
            self.record.append({"sigma": sigma, "active": self._masks_active(sigma), "coverage": {}})
        capture = self.setup.user_masks is None and not self.step_captured
        self.agg = se.MapAggregator() if capture else None
        self.call = {"sigma": sigma, "latent_hw": tuple(x.shape[-2:]), "coverage": self.record[-1]["coverage"],
                     "mask_cache": {}, "active": self.record[-1]["active"], "rows": {}, "plans": {}, "wsig": None}

    def end_call(self):
        if self.call is None:
            return
        if self.agg is not None:
            res = self.agg.result()
            if res is not None:
                self.active_maps = res
                self.step_captured = True
        self.call = None
        self.agg = None

    def note_coverage(self, key, values: list[float]) -> None:
        self.call["coverage"].setdefault(key, values)
        if key not in self.block_keys:
            self.block_keys.append(key)

    def _masks_active(self, sigma: float) -> bool:
        s = self.setup
        if s.user_masks is not None:
            return True
        return sigma <= s.mask_start_sigma

    def expert_acts(self, e: int, sigma: float) -> bool:
        """Whether expert ``e`` acts at ``sigma`` (its prompt's timestep range, if any)."""
        w = self.setup.experts[e].window
        return w is None or self.model_sampling is None or w.contains(self.model_sampling, sigma)

    def rows(self, transformer_options, batch: int) -> torch.Tensor:
        """Rows of the positive prompt in this batch: the cond chunks, less any chunk whose prompt this run
        already saw as the negative (SAG runs the negative prompt alone, in the cond slot)."""
        cache = self.call.get("rows") if self.call is not None else None  # one answer per model call
        if cache is not None and batch in cache:
            return cache[batch]
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        uuids = transformer_options.get("uuids") or []
        cou = [1 if j < len(uuids) and uuids[j] in self.uncond_uuids else k for j, k in enumerate(cou)]
        rows = torch.tensor(cond_rows(cou, batch), dtype=torch.long)
        if cache is not None:
            cache[batch] = rows
        return rows

    def region_plan(self, hw, b: int, device, route, n_experts: int) -> se.RegionPlan:
        """The ``RegionPlan`` of this call's masks at resolution hw, shared by every block there."""
        key = (tuple(hw), b, str(device), tuple(route))
        plans = self.fixed_plans if self.setup.user_masks is not None else self.call["plans"]
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = se.RegionPlan(self.phrase_masks(hw, b, device), route, n_experts)
        return plan

    def weights_signature(self) -> tuple:
        """``_projection_signature`` of the running UNet's cross-attention blocks, once per call."""
        sig = self.call.get("wsig")
        if sig is None:
            mods = self._attn2_lists.get(id(self.unet))
            if mods is None:
                mods = self._attn2_lists[id(self.unet)] = [
                    m.attn2 for m in self.unet.modules() if getattr(m, "attn2", None) is not None]
            sig = self.call["wsig"] = _projection_signature(mods)
        return sig

    def phrase_masks(self, hw, b: int, device, maps: torch.Tensor | None = None) -> torch.Tensor | None:
        """(b, P, h*w) bool masks for this call at resolution hw (from this step's maps, or ``maps``), or None
        when not active yet."""
        call = self.call
        if call is None or not call["active"]:
            return None
        cache = call["mask_cache"]
        key = (tuple(hw), b)
        if key in cache:
            return cache[key]
        s = self.setup
        maps = self.step_maps if maps is None else maps
        if s.user_masks is not None:
            m = se.resize_masks(s.user_masks.to(device), hw)  # (P, h, w)
            m = m.reshape(1, m.shape[0], -1).expand(b, -1, -1)
        elif maps is None:
            m = None
        else:
            maps = maps.to(device)
            if maps.shape[0] != b:
                maps = maps.mean(dim=0, keepdim=True).expand(b, -1, -1, -1)
            maps = se.resize_maps(maps, hw)
            m = se.masks_from_maps(maps, s.alpha).reshape(b, maps.shape[1], -1)
        cache[key] = m
        return m

    def capture_here(self, latent_hw, hw) -> bool:
        if self.setup.user_masks is not None or self.agg is None:
            return False
        if self.setup.capture == "all":
            return True
        return se.downscale_of(latent_hw, hw) in (2, 4)


def _projection_signature(attns) -> tuple:
    """What the cached keys/values of the prompts depend on besides the prompts: the to_k/to_v weights of the
    cross-attention modules ``attns`` (storage, in-place version where torch tracks one, and norm: one batched
    call, so a weight hook's keyframe that patches them mid-run is seen) and the weight functions ComfyUI applies
    when it casts them (lowvram LoRA patches)."""
    tensors, meta = [], []
    for attn in attns:
        for lin in (attn.to_k, attn.to_v):
            for w in (getattr(lin, "weight", None), getattr(lin, "bias", None)):
                if w is None:
                    continue
                try:
                    version = w._version
                except RuntimeError:  # inference tensors (loaders' weights) track no version
                    version = None
                tensors.append(w.detach())
                meta.append((w.data_ptr(), w.dtype, str(w.device), version))
            meta.append(tuple(id(f) for f in (getattr(lin, "weight_function", None) or ())))
            meta.append(tuple(id(f) for f in (getattr(lin, "bias_function", None) or ())))
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if tensors else []
    except (TypeError, RuntimeError):  # an older torch: one call per tensor
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return tuple(meta), tuple(float(n) for n in norms)


def apply_space(model, setup: SpaceSetup):
    """A clone of ``model`` with the space-expert patches; the input model is untouched."""
    m = model.clone()
    rt = SpaceRuntime(setup, m.model.diffusion_model, m.get_model_object("model_sampling"))
    attn_idx = setup.attn_experts
    attn_pos = {e: i for i, e in enumerate(attn_idx)}
    attn_ctx = [setup.experts[e].cond for e in attn_idx]
    attn_route = [attn_pos.get(r, -1) for r in setup.route]  # -1: a weight expert's phrase
    windowed = any(setup.experts[e].window is not None for e in attn_idx)

    def attn2_patch(n, context, value, extra_options):
        if not rt.in_expert_pass and rt.call is not None:
            rt.stash = (extra_options.get("block"), extra_options.get("block_index", 0), n, context)
        return n, context, value

    def attn2_output_patch(n, extra_options):
        stash, rt.stash = rt.stash, None
        if rt.in_expert_pass or rt.call is None or stash is None:
            return n
        block, block_index, hidden, context = stash
        if block is None or block != extra_options.get("block") or block_index != extra_options.get("block_index", 0):
            return n
        latent_hw = rt.call["latent_hw"]
        try:
            hw = se.block_hw(latent_hw, hidden.shape[1])
        except ValueError:
            return n  # not an image-shaped sequence (e.g. video); leave it alone
        rows = rt.rows(extra_options, hidden.shape[0]).to(hidden.device)
        if rows.numel() == 0:
            return n
        capture = rt.capture_here(latent_hw, hw)
        route = rt.call.get("route")
        if route is None:
            route = attn_route
            if windowed:  # experts outside their prompt's timestep range paint nothing at this step
                route = [r if r >= 0 and rt.expert_acts(attn_idx[r], rt.call["sigma"]) else -1 for r in attn_route]
            rt.call["route"] = route
        # masks, expert regions, mixing weights: once per call and resolution, shared by the blocks there
        plan = rt.region_plan(hw, rows.numel(), hidden.device, route, len(attn_ctx))
        if not plan.any and not capture:
            return n
        attn = rt.attn2(block, block_index)
        sig = extra_options.get("sigmas")
        sigma = sig[rows.to(sig.device)] if isinstance(sig, torch.Tensor) and sig.shape[0] == hidden.shape[0] else sig
        wsig = rt.weights_signature()
        bkey = (id(rt.unet), block[0], block[1], block_index)

        def kv(tag, ctx):  # the base prompt's keys/values: projected again only when the prompt or weights change
            return rt.kv_cache.kv((bkey, tag), ctx, attn.to_k, attn.to_v, wsig)

        def memo(tag, make):  # the experts' keys/values (their prompts are constant): once per run and block
            return rt.kv_cache.memo((bkey, tag), make, wsig)
        out, maps, cov = se.block_update(
            n, hidden, context, attn.to_q, attn.to_k, attn.to_v, attn.to_out, extra_options["n_heads"], rows,
            setup.groups, capture, plan.masks if plan.any else None, attn_ctx, route, setup.pww_weight, sigma,
            kv=kv, plan=plan, memo=memo)
        if maps is not None and rt.agg is not None:
            rt.agg.add(maps.reshape(maps.shape[0], maps.shape[1], *hw))
        if cov is not None:
            full = getattr(plan, "full_coverage", None)
            if full is None:
                full = torch.zeros(len(setup.experts))
                for i, e in enumerate(attn_idx):
                    full[e] = float(cov[i])
                full = plan.full_coverage = full.tolist()
            rt.note_coverage((block[0], int(block[1]), int(block_index)), full)
        return out

    def diffusion_model_wrapper(executor, *args, **kwargs):
        if rt.in_expert_pass:
            return executor(*args, **kwargs)
        x = args[0]
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        rt.begin_call(getattr(executor, "class_obj", None), x, to)
        try:
            return executor(*args, **kwargs)
        finally:
            rt.end_call()

    def outer_sample_wrapper(executor, *args, **kwargs):
        rt.start_run()
        return executor(*args, **kwargs)

    def reset():  # a closure, not a bound method: ModelPatcher.clone deep-copies model_options
        rt.start_run()

    WMP = comfy.patcher_extension.WrappersMP
    if space_dit.is_dit(m):  # DiT cross-attention / MMDiT joint attention: the family's adapter (nodes/space_dit.py)
        space_dit.install(m, rt)
    else:
        m.set_model_attn2_patch(attn2_patch)
        m.set_model_attn2_output_patch(attn2_output_patch)
        m.add_wrapper_with_key(WMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    m.add_wrapper_with_key(WMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    register_run_state(m, KEY, reset)
    if setup.model_experts:
        _add_model_experts(m, rt)
    m.set_attachments(KEY, rt)
    return m, rt


def _add_model_experts(m, rt: SpaceRuntime):
    """Experts with their own weights: one extra pass each, blended by region on the model output."""
    setup = rt.setup
    idx = setup.model_experts
    m.set_additional_models(KEY, [setup.experts[e].model for e in idx])

    def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if rt.in_expert_pass:
            return out
        last = rt.record[-1] if rt.record else None
        sigma = float(t.max())
        if not rt._masks_active(sigma):
            return out
        # masks of the phrases routed to weight experts, at latent resolution, from this step's captured maps
        saved_call = rt.call
        rt.call = {"active": True, "mask_cache": {}, "sigma": sigma}
        rows = rt.rows(transformer_options, x.shape[0]).to(x.device)
        pm = rt.phrase_masks(tuple(x.shape[-2:]), rows.numel(), x.device, maps=rt.active_maps)
        rt.call = saved_call
        if pm is None or rows.numel() == 0:
            return out
        masks, outs = [], []
        for e in idx:
            sel = [p for p, r in enumerate(setup.route) if r == e]
            if not sel or not rt.expert_acts(e, sigma):
                continue
            mk = pm[:, sel].any(dim=1)  # (b, N)
            if not bool(mk.any()):
                continue
            expert = setup.experts[e]
            ctx = c_crossattn.clone()
            ec = expert.cond.to(device=ctx.device, dtype=ctx.dtype)
            if ec.shape[1] != ctx.shape[1]:
                L = math.lcm(ec.shape[1], ctx.shape[1])
                ctx = ctx.repeat(1, L // ctx.shape[1], 1)
                ec = ec.repeat(1, L // ec.shape[1], 1)
            ctx[rows] = ec.expand(rows.numel(), -1, -1)
            rt.in_expert_pass = True
            try:
                eo = expert.model.model.apply_model(x, t, c_concat=c_concat, c_crossattn=ctx, control=control,
                                                    transformer_options=transformer_options, **kwargs)
            finally:
                rt.in_expert_pass = False
            masks.append(mk)
            outs.append(eo[rows].flatten(2).transpose(1, 2))
        if not outs:
            return out
        bg = out[rows].flatten(2).transpose(1, 2)
        mixed = se.mix_regions(bg, outs, torch.stack(masks))
        res = out.clone()
        res[rows] = mixed.transpose(1, 2).reshape(out[rows].shape)
        if last is not None:
            last.setdefault("model_experts", [e for e in idx])
        return res

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, apply_model_wrapper)


def route_grid(rt: SpaceRuntime) -> torch.Tensor:
    """(calls, blocks, experts) coverage fractions from the last run."""
    keys = rt.block_keys
    E = len(rt.setup.experts)
    if not rt.record or not keys:
        return torch.zeros(0, 0, max(E, 1))
    g = torch.zeros(len(rt.record), len(keys), max(E, 1))
    for s, rec in enumerate(rt.record):
        for k, key in enumerate(keys):
            if key in rec["coverage"]:
                g[s, k, :E] = torch.tensor(rec["coverage"][key])
    return g


def final_region_masks(rt: SpaceRuntime, hw) -> torch.Tensor | None:
    """(E, H, W) each expert's region at the end of the run (phrase masks united per expert)."""
    s = rt.setup
    if not s.experts:
        return None
    if s.user_masks is not None:
        pm = se.resize_masks(s.user_masks, hw).reshape(1, s.user_masks.shape[0], -1)
    elif rt.active_maps is not None:
        maps = se.resize_maps(rt.active_maps.mean(0, keepdim=True).cpu(), hw)
        pm = se.masks_from_maps(maps, s.alpha).reshape(1, maps.shape[1], -1)
    else:
        return None
    return se.expert_masks(pm, s.route, len(s.experts))[:, 0].reshape(len(s.experts), *hw)


# ----------------------------------------------------------------------------- inputs


def _collect_experts(experts) -> list[Expert]:
    if experts is None:
        return []
    if not isinstance(experts, list) or not all(isinstance(e, Expert) for e in experts):
        raise ValueError("experts: connect the output of an Atelier Space Expert node")
    return list(experts)


def _regions(regions):
    if regions is None:
        return None, None
    phrases, masks = regions["phrases"], regions["masks"]
    return phrases, masks


def _common_inputs():
    return [
        io.Float.Input("alpha", default=se.DEFAULT_ALPHA, min=0.0, max=2.0, step=0.01,
                       tooltip="Mask threshold: a pixel belongs to a phrase when its attention to it is at least "
                               "alpha × that phrase's maximum (RAPHAEL: 0.2). Above 1 every mask is empty (no-op)."),
        io.Combo.Input("routing", options=["gate", "in order"], default="gate",
                       tooltip="gate: each phrase goes to the expert whose text embedding is closest (RAPHAEL's "
                               "text gate, training-free); in order: phrase i → expert i."),
        io.Float.Input("gate_noise", default=0.0, min=0.0, max=10.0, step=0.01,
                       tooltip="Seeded noise added to the gate's cosine scores before argmax (0 = deterministic)."),
        io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                     tooltip="Seed of the gate noise."),
    ]


class AtelierSpaceExpert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSpaceExpert",
            display_name="Atelier Space Expert",
            category=CATEGORY,
            description=("One space expert for the Atelier Space Experts / Paint-with-Words nodes: a conditioning "
                         "(its own prompt), optionally with its own MODEL (e.g. with a LoRA). Chain several to build "
                         "a bank. Conditioning experts are mixed inside cross-attention in the same UNet pass; an "
                         "expert with its own MODEL costs one extra UNet pass and is blended by region."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The expert's prompt, encoded with the base model's CLIP."),
                io.String.Input("name", default="expert", tooltip="A label for the routes picture and logs."),
                SpaceExperts.Input("experts", optional=True, tooltip="Experts so far; this one is appended."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional weights of its own (same latent family): then the expert runs its "
                                       "own UNet pass on its region."),
            ],
            outputs=[SpaceExperts.Output("bank", display_name="experts",
                                         tooltip="The bank of experts, this one last.")],
        )

    @classmethod
    def execute(cls, conditioning, name="expert", experts=None, model=None) -> io.NodeOutput:
        bank = _collect_experts(experts)
        cond, extras, window = expert_conditioning(conditioning)
        bank.append(Expert(name=name or f"expert {len(bank) + 1}", cond=cond, pooled=extras.get("pooled_output"),
                           model=model, window=window))
        return io.NodeOutput(bank)


#: what core conditioning nodes add to a prompt that a space expert cannot honour, and which node adds it
_REFUSED_EXTRAS = {
    "mask": "a mask (core ConditioningSetMask)",
    "area": "an area (core ConditioningSetArea)",
    "control": "a ControlNet (core Apply ControlNet)",
    "gligen": "GLIGEN boxes (core GLIGENTextBoxApply)",
    "hooks": "conditioning hooks (core Set CLIP Hooks / Cond Set Props)",
    "concat_latent_image": "an inpainting latent (core InpaintModelConditioning)",
    "unclip_conditioning": "an unCLIP image (core unCLIPConditioning)",
}


def expert_conditioning(conditioning, input_name: str = "conditioning"):
    """(cond, extras, window) of an expert's prompt. What core conditioning nodes put on it is honoured where a
    space expert can honour it — a timestep range (ConditioningSetTimestepRange): the expert acts only inside
    it — and refused otherwise, naming the input (it was silently dropped before)."""
    if not conditioning:
        raise fail(input_name, "empty", "connect a CLIP Text Encode output")
    if len(conditioning) > 1:
        raise fail(input_name, f"it holds {len(conditioning)} prompts (core ConditioningCombine?) but an expert "
                               "paints its region with one prompt",
                   "chain one Atelier Space Expert per prompt (ConditioningConcat or ConditioningAverage of the "
                   "prompts is fine)")
    cond, extras = conditioning[0][0], conditioning[0][1]
    for key, what in _REFUSED_EXTRAS.items():
        if extras.get(key) is not None:
            raise fail(input_name, f"it carries {what}, which a space expert cannot honour: its region comes from "
                                   "its phrase's attention or from painted regions",
                       "connect the expert's prompt straight from CLIP Text Encode; for a painted region use Atelier "
                       "Regions from Masks into the Space Experts' regions input or Atelier Paint-with-Words")
    if float(extras.get("strength", 1.0)) != 1.0:
        raise fail(input_name, f"it carries a strength of {extras['strength']} (core ConditioningSetAreaStrength), "
                               "which a space expert cannot honour", "leave the expert's prompt at strength 1")
    window = None
    if "start_percent" in extras or "end_percent" in extras:
        start, end = float(extras.get("start_percent", 0.0)), float(extras.get("end_percent", 1.0))
        if end < start:
            raise fail(input_name, f"its timestep range (core ConditioningSetTimestepRange) ends at {end} before it "
                                   f"starts at {start}: the expert would never act", "make end at least start")
        if (start, end) != (0.0, 1.0):
            window = SigmaWindow(start, end, start_input=input_name, end_input=input_name)
    return cond, extras, window


class AtelierRegionsFromColorMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierRegionsFromColorMap",
            display_name="Atelier Regions from Color Map",
            category=CATEGORY,
            description=("Paint-with-words regions from a painted colour map: each listed colour becomes the mask "
                         "of its phrase ('red: a red circle; blue: a blue square'). Feed it to Atelier "
                         "Paint-with-Words or Atelier Space Experts."),
            inputs=[
                io.Image.Input("color_map", tooltip="The painted map (first image of the batch is used)."),
                io.String.Input("mapping", multiline=True, default="red: red circle; blue: blue square",
                                tooltip="colour: phrase pairs separated by ';' or new lines. Colours: names "
                                        "(red, green, blue, yellow, cyan, magenta, white, black, orange, purple, "
                                        "gray), #rrggbb or r,g,b. Phrases must be words of the prompt."),
                io.Float.Input("tolerance", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Largest per-channel difference (0–1) for a pixel to count as that colour."),
                Regions.Input("regions", optional=True, tooltip="Regions so far; these are appended."),
            ],
            outputs=[Regions.Output("regions_out", display_name="regions", tooltip="Phrases and their masks."),
                     io.Mask.Output("region_masks", display_name="masks",
                                    tooltip="The masks, one per phrase, for a preview.")],
        )

    @classmethod
    def execute(cls, color_map, mapping, tolerance=0.1, regions=None) -> io.NodeOutput:
        if not isinstance(color_map, torch.Tensor) or color_map.ndim != 4:
            raise ValueError("color_map: expected an IMAGE (batch, height, width, 3)")
        pairs = se.parse_colour_phrases(mapping)
        masks = se.colour_map_masks(color_map[0], [c for c, _ in pairs], tolerance)
        for (c, p), mk in zip(pairs, masks):
            if not bool(mk.any()):
                raise ValueError(f"mapping: colour {c} for {p!r} does not occur in color_map (empty region); "
                                 "check the colour or raise tolerance")
        out = _merge_regions(regions, [p for _, p in pairs], masks)
        return io.NodeOutput(out, out["masks"])


class AtelierRegionsFromMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierRegionsFromMasks",
            display_name="Atelier Regions from Masks",
            category=CATEGORY,
            description="Regions from MASK inputs: mask i (of a batch) belongs to phrase i.",
            inputs=[
                io.Mask.Input("masks", tooltip="One mask per phrase (a batch), all the same size."),
                io.String.Input("phrases", default="red circle, blue square",
                                tooltip="Phrases of the prompt, one per mask, separated by ',' or new lines."),
                Regions.Input("regions", optional=True, tooltip="Regions so far; these are appended."),
            ],
            outputs=[Regions.Output("regions_out", display_name="regions", tooltip="Phrases and their masks.")],
        )

    @classmethod
    def execute(cls, masks, phrases, regions=None) -> io.NodeOutput:
        names = se.split_phrases(phrases)
        m = masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])
        if m.shape[0] != len(names):
            raise ValueError(f"phrases: {len(names)} phrases for a batch of {m.shape[0]} masks; give one phrase per mask")
        for i, p in enumerate(names):
            if not bool((m[i] > 0.5).any()):
                raise ValueError(f"masks: the mask of {p!r} (index {i}) is empty; paint the region or remove the phrase")
        return io.NodeOutput(_merge_regions(regions, names, (m > 0.5).float()))


def _merge_regions(regions, phrases, masks):
    masks = masks.float().cpu()
    if regions is not None:
        old = regions["masks"]
        if tuple(old.shape[-2:]) != tuple(masks.shape[-2:]):
            raise ValueError(f"regions: masks of size {tuple(masks.shape[-2:])} cannot join regions of size "
                             f"{tuple(old.shape[-2:])}; make every mask/colour map the same size")
        return {"phrases": list(regions["phrases"]) + list(phrases), "masks": torch.cat([old, masks])}
    return {"phrases": list(phrases), "masks": masks}


def _check_region_aspect(masks: torch.Tensor, latent_hw=None):
    if latent_hw is None:
        return
    mh, mw = masks.shape[-2:]
    lh, lw = latent_hw
    if abs(mh / mw - lh / lw) > 0.02:
        raise ValueError(f"regions: masks of {mh}x{mw} do not match the latent's aspect ({lh * 8}x{lw * 8} px); "
                         "paint the map at the image's size")


def _encode(clip, prompt):
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


class AtelierSpaceExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSpaceExperts",
            display_name="Atelier Space Experts",
            category=CATEGORY,
            description=("RAPHAEL's Space-MoE without training: each named phrase of the prompt gets the image "
                         "region where the model's own cross-attention puts it (mask = attention ≥ alpha × max, "
                         "averaged over heads and mid-resolution blocks, refreshed every step once the noise is "
                         "below the start level), and that region is painted by the expert the text gate picks. "
                         "Conditioning experts mix inside attention in the same UNet pass; composes with other "
                         "attention patches (IPAdapter-style). Outputs the patched MODEL for any sampler, the "
                         "encoded prompt, and the configuration for the Atelier MoE Sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is patched; may be time-routed)."),
                io.Clip.Input("clip", tooltip="The model's CLIP: tokenises the prompt and the phrases, encodes the prompt."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square",
                                tooltip="The base prompt (used as positive conditioning; also the background)."),
                io.String.Input("phrases", default="red circle, blue square",
                                tooltip="Phrases of the prompt that get regions, separated by ','. Multi-token "
                                        "words are matched with the real tokenizer."),
                SpaceExperts.Input("experts", optional=True,
                                   tooltip="Bank of experts (Atelier Space Expert). Without experts the node only "
                                           "captures masks (output unchanged)."),
                *_common_inputs(),
                io.Int.Input("mask_start_t", default=500, min=0, max=1000,
                             tooltip="Masks are trusted from this timestep down (0–999; RAPHAEL stops at 500: "
                                     "attention is blurry at high noise). 1000 = from the first step."),
                io.Combo.Input("capture", options=["mid-resolution", "all"], default="mid-resolution",
                               tooltip="Blocks whose attention makes the masks: mid-resolution = blocks at 1/2 and "
                                       "1/4 of the latent size (SD1.5 at 512 px: input 4,5,7,8 / output 3–8); on "
                                       "DiT families the family's map blocks (PixArt: the middle half; Flux: the "
                                       "double-stream and first half of the single-stream blocks; SD3: the first "
                                       "three quarters of the joint blocks)."),
                Regions.Input("regions", optional=True,
                              tooltip="Painted regions instead of attention (then 'phrases' is taken from them)."),
                io.Float.Input("pww_weight", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="eDiff-I paint-with-words bias w·log(1+σ)·max(QKᵀ) on each region's tokens "
                                       "(0 = off)."),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model", tooltip="The patched model."),
                     io.Conditioning.Output("positive", display_name="positive", tooltip="The prompt, encoded."),
                     SpaceConfig.Output("space", display_name="space",
                                        tooltip="The configuration, for the Atelier MoE Sampler.")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, phrases, experts=None, alpha=se.DEFAULT_ALPHA, routing="gate",
                gate_noise=0.0, seed=0, mask_start_t=500, capture="mid-resolution", regions=None,
                pww_weight=0.0) -> io.NodeOutput:
        bank = _collect_experts(experts)
        rphr, rmasks = _regions(regions)
        names = rphr if rphr is not None else se.split_phrases(phrases)
        setup = build_setup(clip, prompt, names, bank, routing, gate_noise, seed, alpha,
                            _t_to_sigma(model, mask_start_t), "all" if capture == "all" else "mid", rmasks,
                            pww_weight, model=model)
        positive = _encode(clip, prompt)
        bad = conditioning_problem(model, positive, "model")
        if bad is not None:
            raise fail("clip", f"this CLIP does not belong to model (the prompt it encodes: {bad[0]})",
                       "connect the CLIP of model's own checkpoint")
        if not bank and setup.pww_weight == 0:
            # nothing can change the output: return the model unpatched (bit-identical by construction)
            return io.NodeOutput(model.clone(), positive, setup)
        m, _ = apply_space(model, setup)
        _log_routes(setup)
        return io.NodeOutput(m, positive, setup)


class AtelierPaintWithWords(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierPaintWithWords",
            display_name="Atelier Paint-with-Words",
            category=CATEGORY,
            description=("eDiff-I paint-with-words: painted regions (a colour map or masks, via Atelier Regions "
                         "nodes) pull their phrase's tokens with the attention bias w·log(1+σ)·max(QKᵀ), strongest "
                         "at high noise; optionally each region is also painted by a space expert. Composable list "
                         "patches only; one UNet pass."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is patched)."),
                io.Clip.Input("clip", tooltip="The model's CLIP."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square",
                                tooltip="The prompt; every region's phrase must occur in it."),
                Regions.Input("regions", tooltip="Regions (Atelier Regions from Color Map / from Masks)."),
                io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="w of the bias (eDiff-I uses about 0.1–1; 0 = no bias)."),
                SpaceExperts.Input("experts", optional=True, tooltip="Optional experts painting the regions."),
                *_common_inputs(),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model", tooltip="The patched model."),
                     io.Conditioning.Output("positive", display_name="positive", tooltip="The prompt, encoded."),
                     SpaceConfig.Output("space", display_name="space",
                                        tooltip="The configuration, for the Atelier MoE Sampler.")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, regions, weight=1.0, experts=None, alpha=se.DEFAULT_ALPHA,
                routing="gate", gate_noise=0.0, seed=0) -> io.NodeOutput:
        return AtelierSpaceExperts.execute(model, clip, prompt, "", experts=experts, alpha=alpha, routing=routing,
                                           gate_noise=gate_noise, seed=seed, mask_start_t=1000, regions=regions,
                                           pww_weight=weight)


def _log_routes(setup: SpaceSetup):
    if setup.experts:
        log.info("[Atelier] space experts: %s", ", ".join(
            f"{p!r}→{setup.experts[r].name}" for p, r in zip(setup.phrases, setup.route)))


# ----------------------------------------------------------------------------- MoE sampler


def _time_record(model):
    """The time-experts route record carried by a time-routed MODEL, if any (duck-typed)."""
    for k, v in getattr(model, "attachments", {}).items():
        if k == KEY:
            continue
        rec = v if isinstance(v, dict) else getattr(v, "record", None)
        if isinstance(rec, dict) and str(rec.get("format", "")).startswith("atelier.routes"):
            return rec
    return None


class AtelierMoESampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierMoESampler",
            display_name="Atelier MoE Sampler",
            category=CATEGORY,
            description=("A KSampler for mixtures of experts: takes a MODEL (time-routed by Atelier Time Experts or "
                         "not) and a space-expert configuration, samples, and draws the routes taken — which expert "
                         "painted which region at each block and step, and which time expert denoised each step — "
                         "over the decoded output (RAPHAEL's diffusion paths)."),
            inputs=[
                io.Model.Input("model", tooltip="The model (may already be time-routed or space-patched)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (e.g. the Space Experts output)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Scheduler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Denoise strength."),
                SpaceConfig.Input("space", optional=True,
                                  tooltip="Space-expert configuration (Atelier Space Experts / Paint-with-Words). "
                                          "Applied to the model unless the model already carries it."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the result under the routes picture."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The denoised latent."),
                     io.Image.Output("routes", display_name="routes",
                                     tooltip="The routes taken, drawn over the output.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise=1.0, space=None, vae=None) -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's top-level nodes module
        check_conditioning(model, positive, "model", "positive")
        check_conditioning(model, negative, "model", "negative")
        if vae is not None:
            check_vae(model, vae, "model", "vae")
        rt = model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
        m = model
        if space is not None:
            if not isinstance(space, SpaceSetup):
                raise ValueError("space: connect the 'space' output of Atelier Space Experts or Paint-with-Words")
            check_expert_models(model, space.experts, "model", "space")
            if space.user_masks is not None:
                _check_region_aspect(space.user_masks, tuple(latent_image["samples"].shape[-2:]))
            if rt is None or rt.setup is not space:
                if space.experts or space.pww_weight != 0:
                    m, rt = apply_space(model, space)
        elif rt is not None and rt.setup.user_masks is not None:
            _check_region_aspect(rt.setup.user_masks, tuple(latent_image["samples"].shape[-2:]))
        out = comfy_nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise=denoise)[0]
        samples = out["samples"]
        H, W = samples.shape[-2] * 8, samples.shape[-1] * 8
        if vae is not None:
            image = vae.decode(samples[:1])[0]
            H, W = image.shape[0], image.shape[1]
        else:
            image = torch.full((H, W, 3), 0.2)
        time_rec = _time_record(m)
        time_row = None
        if time_rec is not None and time_rec.get("runs"):
            time_row = [c.get("expert", 0) for c in time_rec["runs"][-1]["calls"]]
        if rt is not None:
            grid = route_grid(rt)
            regions = final_region_masks(rt, (H, W))
        else:
            grid, regions = torch.zeros(0, 0, 1), None
        if grid.numel() == 0 and time_row:
            grid = torch.zeros(len(time_row), 0, 1)
        pic = se.draw_routes(image, regions, grid, time_row=time_row, cell=max(4, W // 64))
        return io.NodeOutput(out, pic.unsqueeze(0))


NODES = [AtelierSpaceExpert, AtelierRegionsFromColorMap, AtelierRegionsFromMasks, AtelierSpaceExperts,
         AtelierPaintWithWords, AtelierMoESampler]
