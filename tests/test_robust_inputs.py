"""Issue 14, the classes that cut across every node, checked by iterating the *registered* schemas
(nothing listed by hand): NaN in any FLOAT input is refused naming the input, and a VAE of another
model family is refused by every node that takes a VAE. Each node runs in a real context graph
through ComfyUI's executor: the example workflow that uses it (tiny models), else a graph built from
its schema with core nodes feeding the core input types."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from atelier_testlib import ROOT

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# Core nodes that make a value of each core type for a graph built from a schema (tiny sd15 models).
LOADER = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}}
PROVIDERS = {
    "MODEL": ("ctx_loader", 0), "CLIP": ("ctx_loader", 1), "VAE": ("ctx_loader", 2),
    "CONDITIONING": ("ctx_cond", 0), "LATENT": ("ctx_latent", 0), "IMAGE": ("ctx_image", 0), "MASK": ("ctx_mask", 0),
}
PROVIDER_NODES = {
    "ctx_loader": LOADER,
    # inputs named *_b (a second model, e.g. the Coop guider's) get a second checkpoint
    "ctx_loader_b": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}},
    "ctx_cond": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["ctx_loader", 1]}},
    "ctx_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "ctx_image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}},
    "ctx_mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
}


def _schema(comfy, class_type):
    return comfy.node_classes[class_type].GET_SCHEMA()


def _inputs_of(comfy, class_type, io_type):
    return [i.id for i in (_schema(comfy, class_type).inputs or []) if str(i.io_type) == io_type]


def _default(inp):
    if getattr(inp, "default", None) is not None:
        return inp.default
    opts = getattr(inp, "options", None)
    return opts[0] if opts else None


def _schema_graph(comfy, class_type):
    """A prompt running ``class_type`` with its widget defaults and core nodes feeding the rest; None
    when an input type has no core provider (such nodes must appear in an example workflow)."""
    prompt = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in PROVIDER_NODES.items()}
    node = {"class_type": class_type, "inputs": {}}
    for inp in _schema(comfy, class_type).inputs or []:
        t = str(inp.io_type)
        if t in PROVIDERS:
            src, slot = PROVIDERS[t]
            if src == "ctx_loader" and inp.id.endswith("_b"):
                src = "ctx_loader_b"
            node["inputs"][inp.id] = [src, slot]
        elif t in ("FLOAT", "INT", "STRING", "BOOLEAN", "COMBO"):
            value = _default(inp)
            if value is None and not getattr(inp, "optional", False):
                return None
            if value is not None:
                node["inputs"][inp.id] = value
        elif not getattr(inp, "optional", False):
            return None
    prompt["target"] = node
    return prompt, "target"


def _routed_context():
    """AtelierTimeRouter calibrates a routed MODEL: two tiny experts through AtelierTimeExperts."""
    prompt = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in PROVIDER_NODES.items()}
    prompt["routed"] = {"class_type": "AtelierTimeExperts", "inputs": {
        "model_1": ["ctx_loader", 0], "model_2": ["ctx_loader_b", 0], "mode": "timestep", "boundaries": "500"}}
    prompt["target"] = {"class_type": "AtelierTimeRouter", "inputs": {
        "model": ["routed", 0], "calibration": "fit_boundaries", "levels": 4, "gate_noise": 0.0, "seed": 0}}
    return prompt, "target"


# Nodes whose inputs need a particular upstream node (not just a value of the right type).
HAND_BUILT = {"AtelierTimeRouter": _routed_context}


def _all_contexts(comfy) -> dict:
    """{class_type: [(prompt, node_id), ...]}: every example workflow using it, in file order."""
    out: dict = {}
    for path in WORKFLOWS:
        prompt = comfy.to_prompt(comfy.load_workflow(path), tiny=True)
        for nid, node in prompt.items():
            out.setdefault(node["class_type"], []).append((prompt, nid))
    return out


@pytest.fixture(scope="module")
def all_contexts(comfy):
    return _all_contexts(comfy)


@pytest.fixture(scope="module")
def contexts(comfy, all_contexts):
    """{class_type: (prompt, node_id)}: the first example workflow using it, else a hand-built or
    schema-built graph."""
    out = {ct: found[0] for ct, found in all_contexts.items()}
    for ct in comfy.atelier_node_ids():
        if ct not in out:
            built = HAND_BUILT[ct]() if ct in HAND_BUILT else _schema_graph(comfy, ct)
            if built is not None:
                out[ct] = built
    return out


def _run_node(comfy, prompt, node_id):
    """Execute ``prompt`` up to ``node_id`` (ComfyUI runs exactly the nodes that one needs); the
    executor's error message, or None on success."""
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    comfy.executor.execute(prompt, str(uuid.uuid4()), {}, [node_id])
    if comfy.executor.success:
        return None
    for event, data in comfy.executor.status_messages:
        if event == "execution_error":
            return data["node_id"], data["exception_type"], data["exception_message"]
    return "?", "?", "no error recorded"


def _float_cases(comfy):
    return [(ct, name) for ct in comfy.atelier_node_ids() for name in _inputs_of(comfy, ct, "FLOAT")]


def test_every_node_with_float_inputs_has_a_context(comfy, contexts):
    missing = sorted({ct for ct, _ in _float_cases(comfy)} - set(contexts))
    assert not missing, f"no example workflow or schema-built graph runs these nodes: {missing}"


def test_nan_is_refused_in_every_float_input_of_every_node(comfy, contexts):
    cases = _float_cases(comfy)
    assert len(cases) >= 30  # the registered schemas, not a hand-written list
    bad = []
    for ct, name in cases:
        prompt, nid = contexts[ct]
        for value in (float("nan"), float("inf")):
            p = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
            p[nid]["inputs"][name] = value
            err = _run_node(comfy, p, nid)
            if err is None:
                bad.append(f"{ct}.{name}={value}: ran")
            elif err[0] != nid or not err[2].startswith(f"{name}: ") or "not a finite number" not in err[2]:
                bad.append(f"{ct}.{name}={value}: {err}")
    assert not bad, "\n".join(bad)


def test_the_context_graphs_run_without_nan(comfy, contexts):
    """The NaN test above means something only if the same graphs run when the value is finite."""
    for ct in sorted({ct for ct, _ in _float_cases(comfy)}):
        prompt, nid = contexts[ct]
        assert _run_node(comfy, prompt, nid) is None, ct


# ---------------------------------------------------------------------------- foreign VAEs

def _loader_family(prompt, link):
    node = prompt.get(str(link[0])) if isinstance(link, list) else None
    if node and node["class_type"] in ("AtelierTinyCheckpointLoader", "AtelierMiniCheckpointLoader"):
        return node["inputs"]["family"]
    return None


def test_every_node_taking_a_vae_refuses_a_foreign_family_vae(comfy, contexts, all_contexts):
    """The Atelier Mini VAE of the other family in place of each VAE input, one at a time (in the first
    context graph where that input is connected: optional VAE inputs are tested too)."""
    cases = [(ct, name) for ct in comfy.atelier_node_ids() for name in _inputs_of(comfy, ct, "VAE")]
    assert len(cases) >= 8
    bad = []
    for ct, name in cases:
        assert ct in contexts, f"{ct}: no context graph"
        linked = [c for c in all_contexts.get(ct, []) + [contexts[ct]] if isinstance(c[0][c[1]]["inputs"].get(name), list)]
        assert linked, f"{ct}.{name}: no context graph connects this VAE input"
        prompt, nid = linked[0]
        fam = _loader_family(prompt, prompt[nid]["inputs"].get(name))
        assert fam is not None, f"{ct}.{name}: the context's VAE does not come from a tiny/Mini loader"
        other = "sdxl" if fam == "sd15" else "sd15"
        p = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
        p["foreign_vae"] = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": other}}
        p[nid]["inputs"][name] = ["foreign_vae", 2]
        err = _run_node(comfy, p, nid)
        if err is None:
            bad.append(f"{ct}.{name}: a {other} VAE for a {fam} model ran")
        elif err[0] != nid or not err[2].startswith(f"{name}: "):
            bad.append(f"{ct}.{name}: {err}")
    assert not bad, "\n".join(bad)
