"""Time experts: a routed MODEL whose denoising calls go to the expert that owns the current noise level
(RAPHAEL Time-MoE / eDiff-I), a struct→texture handoff sampler (PanGu-Draw), a calibrated time gate,
and the route record drawn as an image. Math in ../models/time_experts.py; this file is glue.

How the routed MODEL works
--------------------------
``AtelierTimeExperts`` returns a clone of expert 1 carrying two keyed wrappers (nothing single-slot):

* ``SAMPLER_SAMPLE`` (once per sampler run): finds the patcher the sampler actually uses (a clone of
  ours if nodes were chained after), builds each other expert's model options once for the run, starts
  a route record, and cleans the experts up afterwards.
* ``CALC_COND_BATCH`` (every denoising call): picks the expert for the call's sigma. Expert 1 continues
  the normal chain (so every other wrapper/patch on the routed model runs as usual). Another expert is
  called as ``comfy.samplers.calc_cond_batch(expert.model, conds, x, sigma, expert_options)``, i.e. the
  same core function the sampler calls, with that expert's OWN model options (its patches, wrappers,
  ``model_function_wrapper``, hooks) plus whatever was added to the routed MODEL after this node (a
  patch put on the routed model applies to every expert; a patch put on one expert before routing stays
  with it). Its weights (LoRA) are that expert's ModelPatcher's, so nothing leaks between experts.

Memory. Experts with their own weights are registered with ``set_additional_models``: the core
``prepare_sampling`` hands them to ``load_models_gpu`` together with the routed model once per run.
When they do not all fit, ``load_models_gpu`` gives each a partial (lowvram) budget and streams the
rest layer by layer. On top of that, at each switch (and only then: at most n-1 times per run for a
monotone schedule) the active expert is requested again with ``load_models_gpu([expert])``; when
memory is short this evicts the idle expert and loads the active one fully, so two large experts take
turns where only one fits. Experts that are clones of one base model (same checkpoint, different LoRA)
cannot be resident together (they share the weight tensors); they are not registered as additional
models and are swapped by ``load_models_gpu`` at the switch, exactly as the core two-KSampler chain
swaps them.
"""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.samplers
import comfy.utils

from ..models import time_experts as te
from .glue import check_conditioning, conditioning_problem
from .glue import check_same_family as check_same_family_glue
from .glue import check_vae, fail, hook_key, reset_run_states

log = logging.getLogger(__name__)

CATEGORY = "atelier/time"
KEY = hook_key("time_experts")
REC_KEY = hook_key("time_experts.record")
MAX_EXPERTS = 4
Routes = io.Custom("ATELIER_ROUTES")


# ------------------------------------------------------------------ helpers
def _flow_sigma_max(ms) -> float | None:
    """sigma_max of a flow (CONST) model_sampling whose own timestep is proportional to sigma (Flux, SD3), else None."""
    import comfy.model_sampling as cms
    if not isinstance(ms, cms.CONST):
        return None
    try:
        top = float(ms.sigma_max)
        probe = [float(ms.timestep(torch.tensor(top * f))) / (top * f) for f in (0.25, 0.5, 1.0)]
    except Exception:  # noqa: BLE001  a model_sampling without these: not one we can map timesteps on
        return None
    if top > 0 and probe[0] > 0 and max(probe) - min(probe) <= 1e-5 * max(probe):
        return top
    return None


def _timesteps(model, name: str = "boundaries"):
    """How timesteps map to sigmas on ``model``'s own (possibly patched) schedule: its discrete sigma table
    (DDPM models: SD1.5, SDXL, PixArt), or, on a flow model (Flux, SD3), t = 1000·sigma (``te.FlowTimesteps``)."""
    import comfy.model_sampling as cms
    ms = model.get_model_object("model_sampling")
    if isinstance(ms, cms.ModelSamplingDiscrete) and getattr(ms, "sigmas", None) is not None:
        return te.TableTimesteps(ms.sigmas.detach().float().cpu())
    top = _flow_sigma_max(ms)
    if top is not None:
        return te.FlowTimesteps(top)
    raise ValueError(f"{name}: this model's schedule ({type(ms).__name__}) has neither a discrete sigma table nor a "
                     "flow timestep, so timesteps cannot be mapped to noise levels; use mode 'sigma'")


def _family_key(model):
    fmt = model.model.latent_format
    return type(fmt).__name__, getattr(fmt, "latent_channels", None)


def _cond_key(model):
    cfg = getattr(model.model, "model_config", None)
    unet = getattr(cfg, "unet_config", {}) or {}
    return unet.get("context_dim"), unet.get("adm_in_channels"), unet.get("in_channels")


_ONE_FAMILY = ("a routed MODEL needs experts of one latent family that take the same conditioning; for a handoff "
               "across families (or to an SDXL refiner) use Atelier Struct→Texture Sampler, which gives each model "
               "its own conditioning and goes through the Coop bridge across latent families")


def check_same_family(experts: list, names: list[str]) -> None:
    """Every expert must be of expert 1's family and take its conditioning (the glue's one check, plus the
    ADM width and input channels a routed call shares)."""
    base = experts[0]
    for m, name in zip(experts[1:], names[1:]):
        check_same_family_glue(base, m, names[0], name, _ONE_FAMILY)
        if _cond_key(m) != _cond_key(base):
            raise fail(name, f"it takes different conditioning than {names[0]} (context/ADM width "
                             f"{_cond_key(m)[:2]} vs {_cond_key(base)[:2]}), e.g. an SDXL refiner",
                       "use Atelier Struct→Texture Sampler, which gives each model its own positive/negative "
                       "conditioning")


def _shape(obj):
    """Lengths/keys structure of nested options, to find what was added later (survives deepcopy)."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return len(obj)
    return None


def _added(obj, shape):
    """The part of ``obj`` that is not in ``shape``: new keys, and items appended to lists."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if shape is None or not isinstance(shape, dict) or k not in shape:
                out[k] = v
            elif isinstance(v, (dict, list)):
                sub = _added(v, shape[k])
                if sub:
                    out[k] = sub
        return out
    if isinstance(obj, list):
        n = shape if isinstance(shape, int) else 0
        return obj[n:]
    return obj


def _strip_own(wrappers: dict) -> dict:
    """Our own keys never go to the other experts (they would recurse)."""
    out = {}
    for wtype, by_key in wrappers.items():
        if not isinstance(by_key, dict):
            continue
        kept = {k: v for k, v in by_key.items() if k not in (KEY, REC_KEY)}
        if kept:
            out[wtype] = kept
    return out


class RouterState:
    """Per routed MODEL: experts, the rule (thresholds or a gate), the route record, per-run state.
    Held in the wrappers' closures and as an attachment (shared by clones: execution is sequential)."""

    def __init__(self, experts, names, thresholds, timesteps, gate=None, gate_noise=0.0, gate_seed=0):
        self.experts = experts            # ModelPatchers as given (index 0 = the routed model's base)
        self.names = names
        self.thresholds = list(thresholds)
        self.timesteps = te.as_timesteps(timesteps)  # t <-> sigma on expert 1's schedule (table or flow)
        self.gate = gate
        self.gate_noise = float(gate_noise)
        self.gate_seed = int(gate_seed)
        self.record = te.new_record(names)
        # an expert sharing its weights with an earlier one cannot be resident at the same time
        self.shared = [any(experts[j].model is experts[i].model for j in range(i)) for i in range(len(experts))]
        self.snapshot = None              # options shape right after this node
        self.run = None
        self.pending = None               # this run's experts with the patches added after this node
        self.derived = (None, None, None)  # (key, experts, objects): the last derived experts, reused while unchanged

    def choose(self, sigma: float) -> tuple[int, float]:
        t = self.timesteps.from_sigma(sigma)
        if self.gate is not None:
            return te.router_choose(self.gate, t, self.gate_noise, self.run.gen if self.run else None), t
        return te.expert_for_sigma(sigma, self.thresholds), t


class _Run:
    pass


def _expert_patchers(state: RouterState, routed) -> list:
    """The patchers for this run: the routed one, the clones ComfyUI loaded as additional models, and
    the shared-base experts (swapped at the switch); with the patches added after this node when the
    outer-sample wrapper derived them for this run."""
    if state.pending is not None:
        return [routed] + list(state.pending[1:])
    extra = iter(routed.get_additional_models_with_key(KEY))
    out = [routed]
    for i in range(1, len(state.experts)):
        out.append(state.experts[i] if state.shared[i] else next(extra, state.experts[i]))
    return out


_MISSING = object()


def _added_model_patches(state: RouterState, routed):
    """What was put on the routed ModelPatcher itself after this node (not in its model_options): weight
    patches (a LoRA: LoraLoaderModelOnly), object patches (ModelSamplingDiscrete, ModelComputeDtype's
    manual_cast_dtype) and forced weight casting. Returns (weight patches {key: [entries]}, object patches
    {name: obj}, force_cast or None)."""
    snap = state.snapshot or {}
    counts, objects = snap.get("patches", {}), snap.get("object_patches", {})
    weights = {k: list(v[counts.get(k, 0):]) for k, v in routed.patches.items() if len(v) > counts.get(k, 0)}
    objs = {k: v for k, v in routed.object_patches.items() if objects.get(k, _MISSING) is not v}
    cast = routed.force_cast_weights if routed.force_cast_weights != snap.get("force_cast", False) else None
    return weights, objs, cast


def _derive_experts(state: RouterState, routed) -> list | None:
    """Each other expert with the weight/object patches added to the routed MODEL after this node, so that
    they act on every expert's steps as they do on expert 1's (a LoRA's keys name layers of the shared
    architecture; an object patch such as model_sampling is set on each expert). None when nothing was
    added. The clones are kept while the added patches stay the same, so ComfyUI does not reload them."""
    weights, objs, cast = _added_model_patches(state, routed)
    if not weights and not objs and cast is None:
        return None
    key = (routed.patches_uuid if weights or cast is not None else None,
           tuple(sorted((k, id(v)) for k, v in objs.items())), cast)
    if state.derived[0] == key:
        return state.derived[1]
    base = _expert_patchers(_Base(state), routed)
    out = [routed]
    for i in range(1, len(base)):
        d = base[i].clone()
        missing = set()
        for k, entries in weights.items():
            for strength_patch, value, strength_model, offset, function in entries:
                name = k if offset is None and function is None else (k, offset, function)
                if not d.add_patches({name: value}, strength_patch, strength_model):
                    missing.add(k)
        for name, obj in objs.items():
            d.add_object_patch(name, obj)
        if cast is not None:
            d.force_cast_weights = cast
        if missing:
            log.warning("Atelier Time Experts: %d weight(s) patched on the routed MODEL (e.g. a LoRA added after "
                        "the node) do not exist in %s and act only on the other experts' steps: %s",
                        len(missing), state.names[i], ", ".join(sorted(missing)[:3]))
        out.append(d)
    state.derived = (key, out, objs)
    return out


class _Base:
    """A RouterState view without this run's derived experts (to derive them from the base ones)."""

    def __init__(self, state):
        self.experts, self.shared, self.pending = state.experts, state.shared, None


def _run_options(expert, added_options: dict, added_wrappers: dict, added_callbacks: dict, sample_sigmas) -> dict:
    opts = comfy.model_patcher.create_model_options_clone(expert.model_options)
    to = opts.setdefault("transformer_options", {})
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), expert.wrappers, copy_dict1=False)
    pe.merge_nested_dicts(to.setdefault("callbacks", {}), expert.callbacks, copy_dict1=False)
    if added_options:
        opts = pe.merge_nested_dicts(opts, added_options, copy_dict1=False)
        to = opts["transformer_options"]
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), added_wrappers, copy_dict1=False)
    pe.merge_nested_dicts(to.setdefault("callbacks", {}), added_callbacks, copy_dict1=False)
    to["sample_sigmas"] = sample_sigmas
    return opts


def _activate(run, idx: int) -> None:
    """Make expert idx the resident, current one (load through model management at the switch only)."""
    p = run.patchers[idx]
    if run.active != idx:
        if run.active is not None:
            mm.load_models_gpu([p])
        run.active = idx
    if idx not in run.pre_ran and idx != 0:
        p.pre_run()
        run.pre_ran.add(idx)
    if hasattr(p.model, "current_patcher"):
        p.model.current_patcher = p


def _changed(obj, base):
    """What the options of one model call hold that the run's options do not (by identity: ComfyUI copies
    option dicts and lists, never their leaves), e.g. PAG's perturbed self-attention: new keys, other
    objects, items appended to lists. None when nothing."""
    if obj is base:
        return None
    if isinstance(obj, dict) and isinstance(base, dict):
        out = {}
        for k, v in obj.items():
            if k not in base:
                out[k] = v
            elif v is not base[k]:
                sub = _changed(v, base[k])
                if sub is not None:
                    out[k] = sub
        return out or None
    if isinstance(obj, list) and isinstance(base, list):
        extra = [v for v in obj if not any(v is b for b in base)]
        return extra or None
    return obj


def _overlay(opts: dict, delta: dict) -> dict:
    """``opts`` with ``delta`` put on top (delta's entries win, its list items are appended); ``opts`` is
    left as it was."""
    out = dict(opts)
    for k, v in delta.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            out[k] = _overlay(cur, v)
        elif isinstance(v, list) and isinstance(cur, list):
            out[k] = cur + v
        else:
            out[k] = v
    return out


def _call_options(run, idx: int, model_options: dict) -> dict:
    """Expert idx's options for one call: the run's, plus what this call changed in the routed model's
    options (a technique that runs an extra, modified pass through ``calc_cond_batch``, such as PAG or SAG,
    must get that pass on every expert, not a plain one)."""
    opts = run.options[idx]
    if model_options is run.base_options:
        return opts
    delta = _changed(model_options, run.base_options)
    if delta:
        to = delta.get("transformer_options")
        if isinstance(to, dict):
            for k in ("wrappers", "callbacks", "sample_sigmas"):
                to.pop(k, None)
        opts = _overlay(opts, delta)
    return opts


def make_wrappers(state: RouterState):
    def outer_sample(executor, *args, **kwargs):
        """Before ComfyUI loads the models: the other experts with the weight/object patches added to the
        routed MODEL after this node, registered in place of the plain ones for this run."""
        routed = executor.class_obj.model_patcher
        derived = _derive_experts(state, routed)
        if derived is None:
            return executor(*args, **kwargs)
        before = routed.additional_models.get(KEY)
        routed.set_additional_models(KEY, [derived[i] for i in range(1, len(derived)) if not state.shared[i]])
        state.pending = derived
        try:
            return executor(*args, **kwargs)
        finally:
            state.pending = None
            if before is None:
                routed.remove_additional_models(KEY)
            else:
                routed.set_additional_models(KEY, before)

    def sampler_sample(executor, guider, sigmas, extra_args, *args, **kwargs):
        routed = guider.model_patcher
        run = _Run()
        run.patchers = _expert_patchers(state, routed)
        run.base_options = extra_args.get("model_options")
        for p in run.patchers[1:]:  # their own outer-sample wrappers never run: reset their per-run state here
            reset_run_states(p.model_options)
        run.active = 0
        run.pre_ran = set()
        run.gen = torch.Generator().manual_seed(state.gate_seed)
        snap = state.snapshot or {}
        added_options = pe.copy_nested_dicts(_added(routed.model_options, snap.get("options")))
        to_added = added_options.get("transformer_options")
        if isinstance(to_added, dict):
            for k in ("wrappers", "callbacks", "sample_sigmas"):
                to_added.pop(k, None)
        opt_wrappers = _added(routed.model_options.get("transformer_options", {}).get("wrappers", {}),
                              (snap.get("options") or {}).get("transformer_options", {}).get("wrappers"))
        opt_callbacks = _added(routed.model_options.get("transformer_options", {}).get("callbacks", {}),
                               (snap.get("options") or {}).get("transformer_options", {}).get("callbacks"))
        added_wrappers = pe.merge_nested_dicts(_strip_own(opt_wrappers),
                                               _strip_own(_added(routed.wrappers, snap.get("wrappers"))))
        added_callbacks = pe.merge_nested_dicts(opt_callbacks, _added(routed.callbacks, snap.get("callbacks")))
        run.options = [None] + [_run_options(p, added_options, added_wrappers, added_callbacks, sigmas)
                                for p in run.patchers[1:]]
        state.run = run
        te.start_run(state.record, [float(s) for s in sigmas.flatten().tolist()])
        try:
            return executor(guider, sigmas, extra_args, *args, **kwargs)
        finally:
            for i in run.pre_ran:
                run.patchers[i].cleanup()
            if run.active not in (0, None) and hasattr(routed.model, "current_patcher"):
                routed.model.current_patcher = routed
            state.run = None

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        sigma = float(timestep.flatten()[0])
        idx, t = state.choose(sigma)
        te.record_call(state.record, sigma, t, idx)
        run = state.run
        if run is None:  # called outside a sampler run (e.g. a preview tool): stay on expert 1
            return executor(model, conds, x_in, timestep, model_options)
        _activate(run, idx)
        if idx == 0:
            return executor(model, conds, x_in, timestep, model_options)
        p = run.patchers[idx]
        return comfy.samplers.calc_cond_batch(p.model, conds, x_in, timestep, _call_options(run, idx, model_options))

    return outer_sample, sampler_sample, calc_cond_batch


# Sampler-level hooks: ComfyUI's sampler reads them from the MODEL it samples (the routed clone of expert 1),
# not from the expert that denoises a step.
SAMPLER_LEVEL = ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function")


def _warn_sampler_level_patches(experts: list, names: list[str]) -> list[str]:
    """Sampler-level patches (CFG functions such as RescaleCFG; post-CFG functions such as PAG, SAG) put on
    expert 2+ *before* this node never run: the sampler takes them from the routed MODEL. Say so, loudly."""
    first = experts[0].model_options
    found = []
    for m, name in zip(experts[1:], names[1:]):
        for key in SAMPLER_LEVEL:
            theirs, ours = m.model_options.get(key), first.get(key)
            if theirs and (not isinstance(theirs, list) or any(f not in (ours or []) for f in theirs)) \
                    and theirs is not ours:
                found.append(f"{name}: {key}")
    if found:
        log.warning("[Atelier] Time Experts: sampler-level patches on %s do not act (the sampler reads them from "
                    "the routed MODEL). Add CFG/post-CFG patches such as PAG, SAG or RescaleCFG after Atelier Time "
                    "Experts instead: there they act on every expert's steps.", ", ".join(found))
    return found


def build_routed(experts: list, names: list[str], thresholds, timesteps, gate=None, gate_noise=0.0, gate_seed=0):
    """Clone of expert 1 that routes by noise level. Returns (routed MODEL, RouterState)."""
    check_same_family(experts, names)
    routed = experts[0].clone()
    state = RouterState(experts, names, thresholds, timesteps, gate, gate_noise, gate_seed)
    own = [experts[i] for i in range(1, len(experts)) if not state.shared[i]]
    routed.set_additional_models(KEY, own)
    routed.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
    routed.remove_wrappers_with_key(pe.WrappersMP.SAMPLER_SAMPLE, KEY)
    routed.remove_wrappers_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY)
    outer, sampler_sample, calc = make_wrappers(state)
    routed.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, outer)
    routed.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, KEY, sampler_sample)
    routed.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, calc)
    routed.set_attachments(KEY, state)
    state.snapshot = {"options": _shape(routed.model_options), "wrappers": _shape(routed.wrappers),
                      "callbacks": _shape(routed.callbacks), "patches": _shape(routed.patches),
                      "object_patches": dict(routed.object_patches), "force_cast": routed.force_cast_weights}
    return routed, state


def _boundary_summary(state: RouterState) -> str:
    parts = []
    for i, th in enumerate(state.thresholds):
        t = te.T_MAX if math.isinf(th) else (0.0 if th <= 0 else state.timesteps.from_sigma(th))
        parts.append(f"{state.names[i]} | {state.names[i + 1]} at sigma {th:.4g} (t≈{t:.1f})")
    return "; ".join(parts)


# ------------------------------------------------------------------ nodes
_MODEL_TIP = ("Expert {i}: a MODEL of the same latent family as model_1. Experts are ordered from high noise to "
              "low noise: expert {i} denoises after expert {p}.")


class AtelierTimeExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTimeExperts",
            display_name="Atelier Time Experts",
            category=CATEGORY,
            description=(
                "Combines 2-4 MODELs of one latent family into one MODEL that sends every denoising call to the "
                "expert owning the current noise level (eDiff-I expert denoisers, RAPHAEL time experts). The switch "
                "is by sigma, never by step, so it stays put when steps, scheduler or denoise change. Works in every "
                "sampler (KSampler, KSamplerAdvanced, SamplerCustomAdvanced). Each expert keeps its own LoRA and "
                "patches; patches added after this node apply to all experts. Experts are loaded by ComfyUI's model "
                "management once per run and take turns when memory is short."
            ),
            inputs=[
                io.Model.Input("model_1", tooltip="Expert 1: denoises the noisiest part (composition, structure). "
                                                  "The sampler's schedule comes from this model."),
                io.Model.Input("model_2", tooltip=_MODEL_TIP.format(i=2, p=1)),
                io.Combo.Input("mode", options=list(te.MODES), default="timestep",
                               tooltip="How to read 'boundaries': timestep (0-1000, 1000 = the noisiest), sigma, or "
                                       "auto (equal split of the log-SNR range, boundaries ignored)."),
                io.String.Input("boundaries", default="500",
                                tooltip="One boundary per pair of neighbouring experts, comma-separated, sorted, e.g. "
                                        "'500' for 2 experts or '750, 500, 250' for 4. Timestep mode: expert 1 takes "
                                        "t ≥ 500; 1000 gives everything to the later experts, 0 everything to the earlier."),
                io.Model.Input("model_3", optional=True, tooltip=_MODEL_TIP.format(i=3, p=2)),
                io.Model.Input("model_4", optional=True, tooltip=_MODEL_TIP.format(i=4, p=3)),
            ],
            outputs=[
                io.Model.Output("routed_model", display_name="routed_model",
                                tooltip="The routed MODEL: connect it to any sampler."),
                Routes.Output("routes", display_name="routes",
                              tooltip="Route record (filled while sampling): connect to Atelier Draw Routes."),
                io.String.Output("summary", display_name="summary", tooltip="The boundaries as sigmas and timesteps."),
            ],
        )

    @classmethod
    def execute(cls, model_1, model_2, mode, boundaries, model_3=None, model_4=None) -> io.NodeOutput:
        experts, names = [model_1, model_2], ["model_1", "model_2"]
        if model_4 is not None and model_3 is None:
            raise ValueError("model_4: connected while model_3 is empty; connect experts in order (model_3 first)")
        for m, n in ((model_3, "model_3"), (model_4, "model_4")):
            if m is not None:
                experts.append(m)
                names.append(n)
        table = _timesteps_or_none(model_1)
        if table is None:
            if mode != "sigma":
                _timesteps(model_1, "mode")  # raises the error that says why and what to do
            table = torch.tensor([1e-3, 1e3])  # only for the timestep shown in the record
        thresholds = te.parse_boundaries(boundaries, mode, len(experts), table)
        routed, state = build_routed(experts, names, thresholds, table)
        summary = _boundary_summary(state)
        unused = _warn_sampler_level_patches(experts, names)
        if unused:
            summary = (f"WARNING: sampler-level patches on {', '.join(unused)} do not act; add PAG/SAG/RescaleCFG-type "
                       f"patches after this node (they then act on every expert)\n{summary}")
        return io.NodeOutput(routed, state.record, summary)


def _timesteps_or_none(model):
    try:
        return _timesteps(model)
    except ValueError:
        return None


class AtelierTimeRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTimeRouter",
            display_name="Atelier Time Router",
            category=CATEGORY,
            description=(
                "RAPHAEL-style time gate: replaces the fixed boundaries of a routed MODEL (from Atelier Time Experts) "
                "by a small router softmax(W·E(t) + b) over a smooth Fourier embedding E(t) of the timestep, "
                "choosing one expert per denoising call. Calibration 'denoising_loss': each expert denoises the given latents "
                "(noised at 'levels' noise levels, fixed seed, conditioned on 'positive') and the gate is fit to "
                "prefer, at each timestep, the expert with the lowest x0 error. 'fit_boundaries' fits the gate to the "
                "routed model's boundaries (same routes as the boundaries, as a starting point)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A routed MODEL from Atelier Time Experts."),
                io.Combo.Input("calibration", options=["denoising_loss", "fit_boundaries"], default="denoising_loss",
                               tooltip="denoising_loss: fit to measured per-expert denoising error; fit_boundaries: "
                                       "reproduce the fixed boundaries."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Conditioning used while measuring the denoising error (needed for "
                                              "denoising_loss), e.g. captions of the calibration images."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Calibration latents (VAE Encode of reference images, e.g. Atelier World "
                                        "samples); needed for denoising_loss."),
                io.Int.Input("levels", default=12, min=2, max=64,
                             tooltip="Number of noise levels (timesteps spread over 0-999) to measure."),
                io.Float.Input("gate_noise", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Std of the noise added to the gate's logits at sampling (RAPHAEL's "
                                       "'+ noise'); 0 = deterministic."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the calibration noise and of the gate noise."),
            ],
            outputs=[
                io.Model.Output("gated_model", display_name="gated_model",
                                tooltip="The routed MODEL with the calibrated gate."),
                Routes.Output("routes", display_name="routes", tooltip="Route record of the new MODEL."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-level denoising error of each expert and the gate's choice."),
            ],
        )

    @classmethod
    def execute(cls, model, calibration, levels, gate_noise, seed, positive=None, latent=None) -> io.NodeOutput:
        state: RouterState | None = model.get_attachment(KEY)
        if state is None:
            raise ValueError("model: not a routed MODEL; connect the MODEL output of Atelier Time Experts")
        ts = torch.linspace(state.timesteps.t_min, 999, levels)
        if calibration == "fit_boundaries":
            tb = [te.T_MAX if math.isinf(th) else (0.0 if th <= 0 else state.timesteps.from_sigma(th))
                  for th in state.thresholds]
            gate = te.router_for_boundaries(tb, seed=seed)
            losses = None
        else:
            if positive is None or latent is None:
                raise ValueError("positive/latent: calibration 'denoising_loss' needs calibration latents and their "
                                 "conditioning; connect both, or choose 'fit_boundaries'")
            check_conditioning(state.experts[0], positive, "model", "positive")
            if not bool(torch.isfinite(latent["samples"]).all()):
                raise fail("latent", "the calibration latents contain NaN or infinite values",
                           "VAE Encode finite reference images (check the nodes before it)")
            sig = [state.timesteps.to_sigma(float(t)) for t in ts]
            pbar = comfy.utils.ProgressBar(len(state.experts) * len(sig))  # one tick per expert call
            losses = torch.stack([measure_denoising_error(e, positive, latent["samples"], sig, seed, pbar)
                                  for e in state.experts], dim=1)
            bad = (~torch.isfinite(losses)).nonzero()
            if bad.numel():
                i, j = (int(v) for v in bad[0])
                raise fail("model", f"expert {state.names[j]} gives a non-finite denoising error at t={float(ts[i]):.0f} "
                                    "(its prediction has NaN/inf), so no gate can be fitted",
                           "check that expert (its weights, LoRA or compute dtype) or use 'fit_boundaries'")
            gate = te.fit_router(ts, losses, seed=seed)
        routed, new_state = build_routed(state.experts, state.names, state.thresholds, state.timesteps,
                                         gate=gate, gate_noise=gate_noise, gate_seed=seed)
        lines = [f"gate accuracy on calibration levels: {gate['accuracy']:.2f}"]
        for i, t in enumerate(ts.tolist()):
            pick = te.router_choose(gate, t)
            err = "" if losses is None else "  err " + " ".join(f"{v:.4g}" for v in losses[i].tolist())
            lines.append(f"t={t:6.1f}  -> {state.names[pick]}{err}")
        return io.NodeOutput(routed, new_state.record, "\n".join(lines))


def measure_denoising_error(expert, positive, latent: torch.Tensor, sigmas: list[float], seed: int,
                            pbar=None) -> torch.Tensor:
    """Mean x0 error of one expert at each sigma, through the core CFGGuider (cfg 1, positive only),
    so the expert's own patches and model management apply. One guider run per expert; ``pbar`` (a
    comfy.utils.ProgressBar) advances once per sigma."""
    import comfy.sample
    errs: list[float] = []
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(latent.shape, generator=gen)

    def calib(model, x, _sigmas, extra_args=None, callback=None, disable=None):
        base = model.inner_model.inner_model
        x0 = base.process_latent_in(latent.to(x.device, x.dtype))
        s_in = x.new_ones([x.shape[0]])
        for s in sigmas:
            mm.throw_exception_if_processing_interrupted()
            # noised in the model's own form: x0 + sigma·eps (DDPM), (1 - sigma)·x0 + sigma·eps (flow)
            xt = base.model_sampling.noise_scaling(torch.tensor(float(s), device=x.device), eps.to(x.device, x.dtype),
                                                   x0)
            den = model(xt, s * s_in, **(extra_args or {}))
            errs.append(float(((den.detach() - x0) ** 2).mean()))
            if pbar is not None:
                pbar.update(1)
        return x

    sampler = comfy.samplers.KSAMPLER(calib)
    dummy = torch.tensor([max(sigmas), 0.0])
    comfy.sample.sample_custom(expert, torch.zeros_like(latent), 1.0, sampler, dummy, positive, [],
                               latent, seed=seed, disable_pbar=True)
    return torch.tensor(errs)


class AtelierStructTextureSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers = comfy.samplers.KSampler.SAMPLERS
        schedulers = comfy.samplers.KSampler.SCHEDULERS
        return io.Schema(
            node_id="AtelierStructTextureSampler",
            display_name="Atelier Struct→Texture Sampler",
            category=CATEGORY,
            description=(
                "PanGu-Draw's structure/texture split as one sampler: the structure model denoises t ∈ [T, "
                "T_struct], the texture model continues below (T_struct = 500 by default). The split is by noise "
                "level on the structure model's schedule, and equals the core two-KSamplerAdvanced chain (leftover "
                "noise handed over). Each model has its own conditioning (SDXL base→refiner works). Models of "
                "different latent families or resolutions need the Coop bridge."
            ),
            inputs=[
                io.Model.Input("structure_model", tooltip="Denoises the high-noise part (composition)."),
                io.Conditioning.Input("structure_positive", tooltip="Positive conditioning for the structure model."),
                io.Conditioning.Input("structure_negative", tooltip="Negative conditioning for the structure model."),
                io.Model.Input("texture_model", tooltip="Denoises the low-noise part (detail, texture)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (Empty Latent Image for text-to-image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (also the seed of ancestral samplers' noise)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Total steps of the schedule."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale for both models."),
                io.Combo.Input("sampler_name", options=samplers, tooltip="Sampler for both stages."),
                io.Combo.Input("scheduler", options=schedulers, tooltip="Scheduler of the shared schedule."),
                io.Int.Input("t_struct", default=500, min=0, max=1000,
                             tooltip="Switch timestep T_struct (0-1000): steps starting at t ≥ T_struct use the "
                                     "structure model. 1000 = texture model only, 0 = structure model only."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise strength, as in KSampler; the switch stays at the same sigma."),
                io.Conditioning.Input("texture_positive", optional=True,
                                      tooltip="Positive conditioning for the texture model (default: structure's)."),
                io.Conditioning.Input("texture_negative", optional=True,
                                      tooltip="Negative conditioning for the texture model (default: structure's)."),
                io.Vae.Input("structure_vae", optional=True,
                             tooltip="Only for a handoff across latent families or resolutions (Coop bridge): the "
                                     "structure model's VAE."),
                io.Vae.Input("texture_vae", optional=True,
                             tooltip="Only for a handoff across latent families or resolutions (Coop bridge): the "
                                     "texture model's VAE."),
                io.Float.Input("texture_scale", default=1.0, min=0.25, max=4.0, step=0.25, optional=True,
                               tooltip="Texture model's pixel resolution relative to the structure model's (2 = "
                                       "SD1.5 at 512 → SDXL at 1024). Not 1, or a different latent family, uses the "
                                       "Coop bridge: decode, resize in pixels, encode, re-noise with fresh noise."),
                io.Float.Input("texture_cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Guidance scale of the texture model; 0 = the same as cfg. Across families the "
                                       "two often differ (Flux dev at cfg 1 with Flux Guidance, SDXL at 5-7)."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The denoised latent (texture model's latent space)."),
                Routes.Output("routes", display_name="routes",
                              tooltip="Which model ran at which call: connect to Atelier Draw Routes."),
            ],
        )

    @classmethod
    def execute(cls, structure_model, structure_positive, structure_negative, texture_model, latent_image, seed,
                steps, cfg, sampler_name, scheduler, t_struct, denoise, texture_positive=None,
                texture_negative=None, structure_vae=None, texture_vae=None, texture_scale=1.0,
                texture_cfg=0.0) -> io.NodeOutput:
        check_conditioning(structure_model, structure_positive, "structure_model", "structure_positive")
        check_conditioning(structure_model, structure_negative, "structure_model", "structure_negative")
        for given, name, fallback in ((texture_positive, "texture_positive", structure_positive),
                                      (texture_negative, "texture_negative", structure_negative)):
            if given is not None:
                check_conditioning(texture_model, given, "texture_model", name)
                continue
            bad = conditioning_problem(texture_model, fallback, "texture_model")
            if bad is not None:
                raise fail(name, f"not connected, so the structure model's conditioning is used, but {bad[0]}",
                           f"connect {name} encoded with texture_model's own CLIP")
        if structure_vae is not None:
            check_vae(structure_model, structure_vae, "structure_model", "structure_vae")
        if texture_vae is not None:
            check_vae(texture_model, texture_vae, "texture_model", "texture_vae")
        latent, record = struct_texture_sample(
            structure_model, structure_positive, structure_negative, texture_model,
            texture_positive if texture_positive is not None else structure_positive,
            texture_negative if texture_negative is not None else structure_negative,
            latent_image, seed, steps, cfg, sampler_name, scheduler, t_struct, denoise,
            structure_vae, texture_vae, texture_scale, texture_cfg=texture_cfg or None)
        return io.NodeOutput(latent, record)


def _recording(model, record, timesteps, expert: int):
    m = model.clone()

    def rec(executor, mdl, conds, x_in, timestep, model_options):
        s = float(timestep.flatten()[0])
        te.record_call(record, s, timesteps.from_sigma(s), expert)
        return executor(mdl, conds, x_in, timestep, model_options)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, REC_KEY, rec)
    return m


def _same_schedule(a, b, steps, sampler_name, scheduler, denoise) -> bool:
    """Whether ``a`` and ``b`` sample on one schedule in one parametrisation (same sigmas, same noise-to-signal
    ratio at each): then the core KSamplerAdvanced chain hands over at the right noise level."""
    from ..models import coop
    sig = []
    for m in (a, b):
        ks = comfy.samplers.KSampler(m, steps=steps, device=m.load_device, sampler=sampler_name, scheduler=scheduler,
                                     denoise=denoise, model_options=m.model_options)
        sig.append(ks.sigmas.detach().cpu())
    if not torch.equal(sig[0], sig[1]):
        return False
    ms_a, ms_b = a.get_model_object("model_sampling"), b.get_model_object("model_sampling")
    return all(coop.noise_to_signal(ms_a, float(v)) == coop.noise_to_signal(ms_b, float(v)) for v in sig[0][:-1])


def _plan_struct_texture(structure, steps, sampler_name, scheduler, denoise, t_struct):
    """The structure model's schedule split at T_struct: (sigma table, sigmas, a fresh route record, segments)."""
    table = _timesteps(structure, "t_struct")
    thresholds = te.parse_boundaries(str(t_struct), "timestep", 2, table, name="t_struct")
    ks = comfy.samplers.KSampler(structure, steps=steps, device=structure.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=structure.model_options)
    sigmas = ks.sigmas.detach().cpu()
    record = te.new_record(["structure", "texture"])
    te.start_run(record, sigmas.tolist())
    return table, sigmas, record, te.split_schedule(sigmas, thresholds)


def struct_texture_sample(structure, s_pos, s_neg, texture, t_pos, t_neg, latent, seed, steps, cfg, sampler_name,
                          scheduler, t_struct, denoise, structure_vae=None, texture_vae=None, texture_scale=1.0,
                          texture_cfg=None):
    """Two stages on one schedule, exactly as the core KSamplerAdvanced chain (start/end step, leftover
    noise), where both models have one latent space and one noise schedule. Otherwise each model samples on
    its own schedule and the handoff matches the noise level through each model's own ``model_sampling``
    (``coop.bridged_two_stage``): across latent spaces or resolutions through the Coop bridge (VAEs), in one
    latent space with another schedule (PixArt-Σ ↔ SDXL) by handing the leftover latent over unchanged at the
    equivalent sigma."""
    import nodes as comfy_nodes  # ComfyUI's top-level nodes module
    if (_family_key(structure) != _family_key(texture) or abs(float(texture_scale) - 1.0) > 1e-9
            or not _same_schedule(structure, texture, steps, sampler_name, scheduler, denoise)):
        return _bridged_sample(structure, s_pos, s_neg, texture, t_pos, t_neg, latent, seed, steps, cfg,
                               sampler_name, scheduler, t_struct, denoise, structure_vae, texture_vae, texture_scale,
                               texture_cfg)
    table, _, record, segs = _plan_struct_texture(structure, steps, sampler_name, scheduler, denoise, t_struct)
    models = [_recording(structure, record, table, 0), _recording(texture, record, table, 1)]
    conds = [(s_pos, s_neg), (t_pos, t_neg)]
    cfgs = [cfg, cfg if texture_cfg is None else texture_cfg]
    out = latent
    for k, (e, start, end) in enumerate(segs):
        first, last = k == 0, k == len(segs) - 1
        out = comfy_nodes.common_ksampler(
            models[e], seed, steps, cfgs[e], sampler_name, scheduler, conds[e][0], conds[e][1], out, denoise=denoise,
            disable_noise=not first, start_step=start, last_step=end, force_full_denoise=last)[0]
    return out, record


def _bridged_sample(structure, s_pos, s_neg, texture, t_pos, t_neg, latent, seed, steps, cfg, sampler_name,
                    scheduler, t_struct, denoise, structure_vae, texture_vae, texture_scale, texture_cfg=None):
    """Structure stage on its own schedule down to T_struct, Coop bridge (x̂0 → decode → resize → encode →
    fresh noise at the equivalent level), texture stage on its own schedule from there: the Coop bridge's
    two-stage sampler (``coop.bridged_two_stage``), with each stage's calls recorded."""
    why = (f"latent family {_family_key(structure)[0]} → {_family_key(texture)[0]}"
           if _family_key(structure) != _family_key(texture) else f"texture_scale {texture_scale:g}")
    try:
        from . import coop as coop_nodes
        two_stage = coop_nodes.bridged_two_stage
    except (ImportError, AttributeError):
        raise ValueError(f"texture_model: this handoff ({why}) needs the Coop bridge, which is not installed in this "
                         "version of Atelier; use two models of one family at one resolution") from None
    needs_vae = not coop_nodes.same_latent_space(structure, texture) or abs(float(texture_scale) - 1.0) > 1e-9
    if needs_vae and (structure_vae is None or texture_vae is None):
        raise ValueError(f"structure_vae/texture_vae: this handoff ({why}) goes through the Coop bridge, which "
                         "decodes and re-encodes: connect both models' VAEs")
    table, sigmas, record, segs = _plan_struct_texture(structure, steps, sampler_name, scheduler, denoise, t_struct)
    split = segs[0][2] if segs and segs[0][0] == 0 else 0
    out, _ = two_stage(
        structure, texture, latent, sigmas, split, vae_first=structure_vae, vae_second=texture_vae, seed=seed,
        steps=steps, sampler_name=sampler_name, scheduler=scheduler, cfg_first=cfg, positive_first=s_pos,
        negative_first=s_neg, cfg_second=cfg if texture_cfg is None else texture_cfg, positive_second=t_pos, negative_second=t_neg,
        scale=float(texture_scale), bridge_seed=seed, second_seed=seed,
        sample_first=_recording(structure, record, table, 0),
        sample_second=_recording(texture, record, _timesteps(texture, "t_struct"), 1),
        names=("structure_model", "structure_vae", "texture_model", "texture_vae"), scale_input="texture_scale")
    return out, record


class AtelierDrawRoutes(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierDrawRoutes",
            display_name="Atelier Draw Routes",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Draws a route record as an image (RAPHAEL's diffusion paths): one column per denoising call, left = "
                "noisiest; the top band's colour is the time expert (white tick at a switch), the thin bar the noise "
                "level, the lower band the space-expert regions when the record has them."
            ),
            inputs=[
                Routes.Input("routes", tooltip="Route record from Atelier Time Experts / Time Router / Struct→Texture."),
                io.Latent.Input("samples", tooltip="The LATENT of the sampler that used the routed model: only makes "
                                                   "this node run after sampling."),
                io.Int.Input("height", default=96, min=16, max=1024, tooltip="Image height in pixels."),
                io.Int.Input("column_width", default=12, min=1, max=128, tooltip="Pixels per denoising call."),
            ],
            outputs=[
                io.Image.Output("image", display_name="image", tooltip="The diffusion path of the latest run."),
                io.String.Output("text", display_name="text", tooltip="One line per call: sigma, timestep, expert."),
            ],
        )

    @classmethod
    def execute(cls, routes, samples, height, column_width) -> io.NodeOutput:
        if not isinstance(routes, dict) or routes.get("format") != te.FORMAT:
            raise ValueError("routes: not an Atelier route record; connect the 'routes' output of a time-experts node")
        img = te.draw_routes(routes, height=height, col_width=column_width)
        names = routes.get("experts", [])
        lines = [f"{i:3d}  sigma {c['sigma']:.4g}  t {c['timestep']:.1f}  {names[c['expert']] if c['expert'] < len(names) else c['expert']}"
                 for i, c in enumerate(te.last_calls(routes))]
        return io.NodeOutput(img, "\n".join(lines), ui=ui.PreviewImage(img, cls=cls))


NODES = [AtelierTimeExperts, AtelierTimeRouter, AtelierStructTextureSampler, AtelierDrawRoutes]
