"""Node ids and input names are forever: saved workflows (UI format maps widget values by position) and
API prompts (by name) reference them. tests/node_ids.json freezes every registered Atelier node; a
rename, a removal, a reordered or a new required input fails here. A replaced node stays registered
through ``glue.deprecated`` and keeps running old workflows."""
from __future__ import annotations

import json
import os

import pytest

from atelier_testlib import ROOT

FROZEN = ROOT / "tests" / "node_ids.json"
FIX = "ATELIER_FREEZE_IDS=1 python tools/atelier.py test -- tests/test_node_ids.py"


def _current(comfy) -> dict:
    out = {}
    for node_id in comfy.atelier_node_ids():
        s = comfy.node_classes[node_id].GET_SCHEMA()
        out[node_id] = {"inputs": [i.id for i in s.inputs or []], "outputs": [str(o.io_type) for o in s.outputs or []],
                        "optional": [i.id for i in s.inputs or [] if getattr(i, "optional", False)]}
    return out


def _frozen() -> dict:
    return json.loads(FROZEN.read_text(encoding="utf-8"))


def check_compatible(frozen: dict, current: dict) -> list[str]:
    """What in ``current`` breaks a workflow saved against ``frozen`` (empty: nothing)."""
    bad = []
    for node_id, old in frozen.items():
        new = current.get(node_id)
        if new is None:
            bad.append(f"{node_id}: no longer registered (keep it, marked with glue.deprecated)")
            continue
        missing = [n for n in old["inputs"] if n not in new["inputs"]]
        if missing:
            bad.append(f"{node_id}: inputs {missing} are gone (renamed?)")
            continue
        if new["inputs"][:len(old["inputs"])] != old["inputs"]:
            bad.append(f"{node_id}: inputs reordered or an input inserted before the old ones "
                       f"({old['inputs']} -> {new['inputs']}); new inputs go last")
        added_required = [n for n in new["inputs"][len(old["inputs"]):] if n not in new["optional"]]
        if added_required:
            bad.append(f"{node_id}: new inputs {added_required} are required; old API prompts lack them — make them "
                       "optional (with a default that keeps the old behaviour)")
        if new["outputs"][:len(old["outputs"])] != old["outputs"]:
            bad.append(f"{node_id}: outputs changed ({old['outputs']} -> {new['outputs']}); links in saved workflows "
                       "connect by slot")
    return bad


def test_registered_nodes_keep_their_ids_inputs_and_outputs(comfy):
    current = _current(comfy)
    doc = _frozen()
    if os.environ.get("ATELIER_FREEZE_IDS") == "1":
        # Add what is new; never forget what was frozen (a deprecated node stays listed).
        for node_id, now in current.items():
            old = doc["nodes"].get(node_id)
            if old is None or not check_compatible({node_id: old}, {node_id: now}):
                doc["nodes"][node_id] = {"inputs": now["inputs"], "outputs": now["outputs"]}
        FROZEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    bad = check_compatible(doc["nodes"], current)
    assert not bad, "\n".join(bad)
    new = sorted(set(current) - set(doc["nodes"]))
    assert not new, f"new nodes {new} are not frozen yet; run {FIX}"
    grown = sorted(n for n in current if current[n]["inputs"] != doc["nodes"][n]["inputs"])
    assert not grown, f"nodes {grown} have new inputs not frozen yet; run {FIX}"


def test_the_freeze_check_catches_each_kind_of_break():
    old = {"N": {"inputs": ["a", "b"], "outputs": ["MODEL"]}}
    ok = {"N": {"inputs": ["a", "b", "c"], "outputs": ["MODEL", "STRING"], "optional": ["c"]}}
    assert check_compatible(old, ok) == []
    breaks = {
        "removed": {},
        "renamed input": {"N": {"inputs": ["a", "bb"], "outputs": ["MODEL"], "optional": []}},
        "reordered": {"N": {"inputs": ["b", "a"], "outputs": ["MODEL"], "optional": []}},
        "inserted": {"N": {"inputs": ["a", "x", "b"], "outputs": ["MODEL"], "optional": ["x"]}},
        "new required": {"N": {"inputs": ["a", "b", "c"], "outputs": ["MODEL"], "optional": []}},
        "output changed": {"N": {"inputs": ["a", "b"], "outputs": ["LATENT"], "optional": []}},
    }
    for what, cur in breaks.items():
        assert check_compatible(old, cur), what


def test_a_deprecated_node_stays_registered_hidden_and_runs_old_workflows(comfy, pack, run_graph):
    """glue.deprecated on a copy of a real node: registered, flagged deprecated in /object_info (which
    the frontend uses to hide it from search), and a graph saved with it still runs."""
    import importlib
    glue = importlib.import_module(pack.__name__ + ".nodes.glue")
    base = comfy.node_classes["AtelierTinyCheckpointLoader"]
    old_schema = base.define_schema

    @glue.deprecated(use_instead="Atelier Tiny Checkpoint Loader", since="0.2")
    class AtelierOldTinyLoader(base):
        @classmethod
        def define_schema(cls):
            s = old_schema()
            s.node_id = "AtelierOldTinyLoader"
            return s

    AtelierOldTinyLoader = glue.guard_node(AtelierOldTinyLoader)
    comfy.node_classes["AtelierOldTinyLoader"] = AtelierOldTinyLoader
    try:
        info = AtelierOldTinyLoader.GET_NODE_INFO_V1()
        assert info["deprecated"] is True and "use Atelier Tiny Checkpoint Loader" in info["description"]
        assert base.GET_NODE_INFO_V1()["deprecated"] is False  # the replacement is untouched
        prompt = {
            "1": {"class_type": "AtelierOldTinyLoader", "inputs": {"family": "sd15", "seed": 0}},
            "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        }
        result = run_graph(prompt, want=["2"])
        assert tuple(result["values"]["2"][0].shape) == (1, 64, 64, 3)
    finally:
        comfy.node_classes.pop("AtelierOldTinyLoader", None)
