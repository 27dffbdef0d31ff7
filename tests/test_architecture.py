"""The house rules of ARCHITECTURE.md, checked on the code (no ComfyUI needed): every feature has its
tests and an example-workflow source, production nodes lean on no test stand-in, models/ imports no
ComfyUI, and the glue's facts live only in the glue."""
from __future__ import annotations

import ast
import json
import re

import pytest

from atelier_testlib import ROOT

NODES = ROOT / "nodes"
MODELS = ROOT / "models"
TESTS = ROOT / "tests"
TOOLS = ROOT / "tools"
WORKFLOWS = ROOT / "workflows"

# Features whose nodes serve the others: the tiny loaders stand in for CheckpointLoaderSimple in every
# example workflow (tools/atelier.py run --tiny), so their "workflow" is each of them.
SERVES_EVERY_WORKFLOW = {"tiny"}
# The only production modules allowed to import the stand-in families: their own loaders.
STAND_INS = {"tiny_family", "mini"}
STAND_IN_LOADERS = {"tiny.py", "mini.py", "tiny_family.py"}


def _features() -> list[str]:
    tree = ast.parse((NODES / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FEATURES" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    raise AssertionError("nodes/__init__.py defines no FEATURES")


def _node_ids(feature: str) -> set[str]:
    return set(re.findall(r'node_id="(Atelier\w+)"', (NODES / f"{feature}.py").read_text(encoding="utf-8")))


def _workflow_types() -> dict[str, set[str]]:
    out = {}
    for p in sorted(WORKFLOWS.glob("*.json")):
        wf = json.loads(p.read_text(encoding="utf-8"))
        out[p.name] = {n["type"] for n in wf.get("nodes", [])}
    return out


def _wf_sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(TOOLS.glob("wf_*.py")))


def _test_sources() -> dict[str, str]:
    skip = {"test_architecture.py", "test_node_ids.py", "test_robust_inputs.py"}  # they iterate every node
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(TESTS.glob("test_*.py")) if p.name not in skip}


@pytest.mark.parametrize("feature", _features())
def test_every_feature_has_tests_and_a_workflow(feature):
    ids = _node_ids(feature)
    assert ids, f"nodes/{feature}.py registers no node id"
    tests = [name for name, src in _test_sources().items() if any(i in src for i in ids)]
    assert tests, f"no test file names any node of {feature} ({sorted(ids)})"
    if feature in SERVES_EVERY_WORKFLOW:
        return
    used = {wf for wf, types in _workflow_types().items() if types & ids}
    assert used, f"no example workflow in workflows/ uses a node of {feature}; add one in tools/wf_*.py"
    src = _wf_sources()
    assert any(i in src for i in ids), f"the workflows using {feature} have no source in tools/wf_*.py"


def test_every_example_workflow_has_its_source():
    names = set(re.findall(r'"(\w+\.json)"\s*:', _wf_sources()))
    on_disk = {p.name for p in WORKFLOWS.glob("*.json")}
    assert on_disk <= names, f"workflows without a tools/wf_*.py source: {sorted(on_disk - names)}"


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" if mod else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_production_nodes_do_not_lean_on_the_test_stand_ins():
    bad = []
    for p in sorted(NODES.glob("*.py")):
        if p.name in STAND_IN_LOADERS or p.name == "__init__.py":
            continue
        for imp in _imports(p):
            if any(imp.split(".")[-1] == s or imp.endswith(f".{s}") or imp == s for s in STAND_INS):
                bad.append(f"nodes/{p.name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_models_import_no_comfyui_and_no_nodes():
    bad = []
    for p in sorted(MODELS.glob("*.py")):
        for imp in _imports(p):
            top = imp.lstrip(".").split(".")[0]
            if top in {"comfy", "comfy_api", "comfy_execution", "folder_paths", "nodes", "execution", "node_helpers",
                       "latent_preview"} or imp.startswith("..nodes") or imp.startswith("..") and "nodes" in imp:
                bad.append(f"models/{p.name} imports {imp}")
    assert not bad, "\n".join(bad)


# What must live only in the glue: (pattern, what it is).
GLUE_ONLY = [
    (r"percent_to_sigma\(", "sigma windows (glue.SigmaWindow)"),
    (r"folder_names_and_paths\[[^\]]+\]\s*=", "model-folder registration (glue.register_model_folder)"),
    (r"os\.path\.abspath\(folder_paths\.get_input_directory", "input-folder resolution (glue.resolve_user_folder)"),
    (r"for c, kind in enumerate\(cou\)|for j, c in enumerate\(cou\)", "cond-row selection (glue.cond_rows)"),
]


@pytest.mark.parametrize("pattern,what", GLUE_ONLY, ids=[w for _, w in GLUE_ONLY])
def test_glue_facts_live_only_in_the_glue(pattern, what):
    hits = [f"nodes/{p.name}" for p in sorted(NODES.glob("*.py"))
            if p.name != "glue.py" and re.search(pattern, p.read_text(encoding="utf-8"))]
    assert not hits, f"{what} written outside nodes/glue.py: {hits}"


def test_one_hook_key_convention():
    """Every wrapper / additional-models key is glue.hook_key(...) ("atelier.<technique>")."""
    bad = []
    for p in sorted(NODES.glob("*.py")):
        for m in re.finditer(r'["\'](atelier_[a-z_]+)["\']', p.read_text(encoding="utf-8")):
            if m.group(1).startswith(("atelier_lep", "atelier_knn", "atelier_open_clip", "atelier_world",
                                      "atelier_mini", "atelier_tiny", "atelier_pack", "atelier_native_px")):
                continue  # folder names and file prefixes, not hook keys
            bad.append(f"nodes/{p.name}: {m.group(1)!r}")
    assert not bad, "hook keys outside glue.hook_key: " + ", ".join(bad)
