"""The composition matrix: each Atelier technique × core model patches × order (patch after / before the
technique), run through ComfyUI's executor on the tiny models, from the technique's own example workflow.

For every cell it measures (mean absolute pixel differences of the decoded image):
  * technique effect with the patch   |P∘T_on − P∘T_off|  vs without  |T_on − T_off|
  * patch effect with the technique   |P∘T_on − T_on|     vs without  |P − plain|
  * no-op exactness                   P∘T_off == P∘(T bypassed), bit for bit
A cell is "kept" when both effects survive (each at least KEEP× its size alone, and the patch's not blown
up past BLOWUP×) and the no-op is exact. Used by tests/test_compose_matrix.py (a few patches, few steps)
and bench/bench_compose.py (the full grid, printed as a table).
"""
from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field

import numpy as np

KEEP, BLOWUP = 0.1, 20.0

# Core patches: node type and its non-model inputs (strengths where core's default is a no-op).
PATCHES: dict[str, dict] = {
    "FreeU": {"class_type": "FreeU", "inputs": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
    "RescaleCFG": {"class_type": "RescaleCFG", "inputs": {"multiplier": 0.7}},
    "PAG": {"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 3.0}},
    "ToMe": {"class_type": "TomePatchModel", "inputs": {"ratio": 0.5}},
    "v-prediction": {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "v_prediction", "zsnr": False}},
}


@dataclass
class Technique:
    """One technique as it sits in its example workflow: the node that patches the MODEL, the inputs that
    turn it off (its documented no-op), how to bypass it, and inputs to drop for a clean no-op."""
    name: str
    workflow: str
    node: str
    off: dict
    model_input: str = "model"          # where the MODEL comes in (bypassing the node connects this one)
    before: tuple = ()                  # MODEL inputs "before" patches (default: model_input)
    drop: tuple = ()                    # optional inputs removed in every variant
    reencode_positive: bool = False     # the node's output 1 is its own encoding of inputs['prompt']
    on: dict = field(default_factory=dict)


TECHNIQUES = {
    "sketch guidance (fast)": Technique("sketch guidance (fast)", "sketch_from_image.json", "AtelierSketchGuidance",
                                        off={"beta": 0.0}),
    "sketch guidance (paper)": Technique("sketch guidance (paper)", "sketch_from_image.json", "AtelierSketchGuidance",
                                         off={"beta": 0.0}, on={"form": "paper"}),
    "space experts": Technique("space experts", "space_experts_attention.json", "AtelierSpaceExperts",
                               off={"alpha": 1.5}, reencode_positive=True),
    "paint-with-words": Technique("paint-with-words", "paint_with_words_colormap.json", "AtelierPaintWithWords",
                                  off={"weight": 0.0}, drop=("experts",), reencode_positive=True),
    "time experts": Technique("time experts", "time_experts_sd15.json", "AtelierTimeExperts",
                              off={"boundaries": "1000"}, model_input="model_2", before=("model_1", "model_2")),
}


def _find(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"{class_type}: {ids}"
    return ids[0]


def _consumers(prompt: dict, node_id: str, slot: int):
    return [(k, name) for k, v in prompt.items() for name, val in v["inputs"].items()
            if isinstance(val, list) and len(val) == 2 and str(val[0]) == node_id and val[1] == slot]


def _decode_id(prompt: dict) -> str:
    save = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    return str(prompt[save[0]]["inputs"]["images"][0])


class Matrix:
    def __init__(self, headless, steps: int = 6):
        self.h, self.steps = headless, steps
        self._cache: dict[str, np.ndarray] = {}

    def base_prompt(self, t: Technique) -> dict:
        p = self.h.to_prompt(self.h.load_workflow(_workflow_path(t.workflow)), tiny=True)
        for v in p.values():
            if v["class_type"] == "KSampler":
                v["inputs"]["steps"] = self.steps
        node = p[_find(p, t.node)]
        for k in t.drop:
            node["inputs"].pop(k, None)
        node["inputs"].update(t.on)
        # keep only what the decoded image needs
        save = [k for k, v in p.items() if v["class_type"] == "SaveImage"]
        keep, todo = set(), save[:1]
        while todo:
            k = todo.pop()
            if k in keep:
                continue
            keep.add(k)
            todo += [str(v[0]) for v in p[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
        p = {k: v for k, v in p.items() if k in keep}
        self._images_at_sampled_size(p)
        return p

    @staticmethod
    def _images_at_sampled_size(p: dict) -> None:
        """A loaded image (the sketch of sketch_from_image.json, a 768 px file) scaled to the pixel size of the
        latent the graph samples (64 px on the tiny models): at 768 px each sketch cell spent ~90% of its time
        VAE-encoding the sketch, twice, for nothing a cell measures."""
        latents = [v["inputs"] for v in p.values() if v["class_type"] == "EmptyLatentImage"]
        if not latents:
            return
        w, h = latents[0]["width"], latents[0]["height"]
        for k in [k for k, v in p.items() if v["class_type"] == "LoadImage"]:
            sid = f"{k}_scaled"
            for c, name in _consumers(p, k, 0):
                p[c]["inputs"][name] = [sid, 0]
            p[sid] = {"class_type": "ImageScale", "inputs": {"image": [k, 0], "upscale_method": "area",
                                                              "width": w, "height": h, "crop": "center"}}

    def variant(self, t: Technique, mode: str, patch: str | None, order: str = "after") -> dict:
        """mode: 'on', 'off' (the no-op setting), 'bypass' (the node removed)."""
        p = copy.deepcopy(self.base_prompt(t))
        tid = _find(p, t.node)
        if mode == "off":
            p[tid]["inputs"].update(t.off)
        if patch is not None:
            spec = PATCHES[patch]
            pid = "patch"
            if order == "after":
                p[pid] = {"class_type": spec["class_type"], "inputs": {**spec["inputs"], "model": [tid, 0]}}
                for k, name in _consumers(p, tid, 0):
                    if k != pid:
                        p[k]["inputs"][name] = [pid, 0]
            else:  # one patch node per MODEL input of the technique (each expert patched, as a user would)
                for j, inp in enumerate(t.before or (t.model_input,)):
                    src = p[tid]["inputs"][inp]
                    p[f"{pid}{j}"] = {"class_type": spec["class_type"], "inputs": {**spec["inputs"], "model": src}}
                    p[tid]["inputs"][inp] = [f"{pid}{j}", 0]
        if mode == "bypass":
            src = p[tid]["inputs"][t.model_input]
            for k, name in _consumers(p, tid, 0):
                p[k]["inputs"][name] = src
            if t.reencode_positive:
                enc = {"class_type": "CLIPTextEncode", "inputs": {"text": p[tid]["inputs"]["prompt"],
                                                                  "clip": p[tid]["inputs"]["clip"]}}
                p["bypass_positive"] = enc
                for k, name in _consumers(p, tid, 1):
                    p[k]["inputs"][name] = ["bypass_positive", 0]
            del p[tid]
        return p

    def image(self, prompt: dict) -> np.ndarray:
        key = repr(sorted((k, v["class_type"], sorted(v["inputs"].items(), key=str)) for k, v in prompt.items()))
        if key not in self._cache:
            dec = _decode_id(prompt)
            ex = self.h.executor
            ex.execute(prompt, str(uuid.uuid4()), {}, [dec])
            if not ex.success:
                msg = next((d.get("exception_message", "") for e, d in ex.status_messages if e == "execution_error"),
                           "failed")
                raise RuntimeError(msg.strip())
            self._cache[key] = np.asarray(ex.caches.outputs.get(dec)[0][0].float().cpu().numpy(), np.float64)
        return self._cache[key]

    def cell(self, t: Technique, patch: str, order: str) -> dict:
        d = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
        on, off = self.image(self.variant(t, "on", None)), self.image(self.variant(t, "off", None))
        plain, plain_p = self.image(self.variant(t, "bypass", None)), self.image(self.variant(t, "bypass", patch, order))
        on_p, off_p = self.image(self.variant(t, "on", patch, order)), self.image(self.variant(t, "off", patch, order))
        r = {"technique": t.name, "patch": patch, "order": order,
             "t_alone": d(on, off), "t_with_p": d(on_p, off_p), "p_alone": d(plain_p, plain), "p_with_t": d(on_p, on),
             "noop_exact": bool(np.array_equal(off_p, plain_p)), "noop_exact_alone": bool(np.array_equal(off, plain)),
             "finite": bool(np.isfinite(on_p).all())}
        r["t_kept"] = r["t_with_p"] >= KEEP * r["t_alone"] and r["t_alone"] > 0
        r["p_kept"] = KEEP * r["p_alone"] <= r["p_with_t"] <= BLOWUP * max(r["p_alone"], 1e-6) and r["p_alone"] > 0
        r["ok"] = r["t_kept"] and r["p_kept"] and r["noop_exact"] and r["finite"]
        return r


def _workflow_path(name: str):
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "workflows" / name


def format_table(rows: list[dict]) -> str:
    head = f"{'technique':24} {'patch':13} {'order':6} {'T alone':>8} {'T w/ P':>8} {'P alone':>8} {'P w/ T':>8}  no-op   kept"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['technique']:24} {r['patch']:13} {r['order']:6} ERROR: {r['error'][:60]}")
            continue
        lines.append(f"{r['technique']:24} {r['patch']:13} {r['order']:6} {r['t_alone']:8.4f} {r['t_with_p']:8.4f} "
                     f"{r['p_alone']:8.4f} {r['p_with_t']:8.4f}  {'exact' if r['noop_exact'] else 'DIFF ':5}   "
                     f"{'both' if r['t_kept'] and r['p_kept'] else ('T lost' if not r['t_kept'] else 'P lost/blown')}")
    return "\n".join(lines)
