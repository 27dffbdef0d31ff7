"""How the nodes present themselves in ComfyUI's menu and on the canvas (issue 20.11): named outputs, the
pack's name on every node, categories as the README lists them, the test loaders apart from the real ones,
seeds that say whether the frontend adds a control, and a progress bar on the Time Router's calibration."""
from __future__ import annotations

import re

from atelier_testlib import ROOT, load_tool, txt2img_prompt

TESTING = "atelier/testing"


def _schemas(comfy) -> dict:
    return {node_id: comfy.node_classes[node_id].GET_SCHEMA() for node_id in comfy.atelier_node_ids()}


def _readme_sections() -> dict[str, str]:
    """node id -> the category named in the heading of the README section that lists it."""
    out, category = {}, None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        head = re.match(r"^#{2,4} .*\(`(atelier/[a-z_]+)`\)", line)
        if head:
            category = head.group(1)
            continue
        if line.startswith("#"):
            category = None
        if category:
            for node_id in re.findall(r"`(Atelier[A-Za-z0-9]+)`", line):
                out.setdefault(node_id, category)
    return out


def test_outputs_are_named_and_distinct(comfy):
    """V3 shows an output's display_name, else its type: three FLOATs read 'FLOAT', 'FLOAT', 'FLOAT'."""
    bad = []
    for node_id, s in _schemas(comfy).items():
        outs = s.outputs or []
        shown = [o.display_name or str(o.io_type) for o in outs]
        types = [str(o.io_type) for o in outs]
        for o, name in zip(outs, shown):
            if types.count(str(o.io_type)) > 1 and name == str(o.io_type):
                bad.append(f"{node_id}: two {name} outputs shown by their type")
        if len(set(shown)) != len(shown):
            bad.append(f"{node_id}: outputs shown as {shown}")
        for o in outs:  # an output given an id of its own (not V3's automatic _0_TYPE_) shows it
            if o.id and not o.id.startswith("_") and not o.display_name:
                bad.append(f"{node_id}: output {o.id!r} has no display_name (the canvas shows {o.io_type})")
    assert not bad, "\n".join(bad)


def test_display_names_carry_the_pack_name_and_fit_the_title_bar(comfy):
    bad = []
    for node_id, s in _schemas(comfy).items():
        name = s.display_name or ""
        if not name.startswith("Atelier "):
            bad.append(f"{node_id}: display name {name!r} does not start with 'Atelier '")
        if "(" in name and not name.endswith("(test)"):
            bad.append(f"{node_id}: display name {name!r} has a parenthetical (cut off on the canvas; say it in "
                       "the description)")
        if len(name) > 40:
            bad.append(f"{node_id}: display name {name!r} is {len(name)} characters (at most 40)")
    assert not bad, "\n".join(bad)


def test_categories_match_the_readme(comfy):
    sections = _readme_sections()
    listed = set(sections.values()) | {TESTING}
    bad = []
    for node_id, s in _schemas(comfy).items():
        if s.category not in listed:
            bad.append(f"{node_id}: category {s.category!r} is not a README section ({sorted(listed)})")
        if node_id in sections and sections[node_id] != s.category:
            bad.append(f"{node_id}: category {s.category!r}, the README lists it under {sections[node_id]!r}")
    assert not bad, "\n".join(bad)
    assert TESTING in sections.values(), "the README has no section for the test loaders (atelier/testing)"


def test_test_loaders_are_apart_from_real_loaders(comfy):
    """Seeded random-weight stand-ins draw noise: they sit under atelier/testing with '(test)' in the name."""
    tiny = [k for k in comfy.atelier_node_ids() if "Tiny" in k]
    assert tiny
    for node_id, s in _schemas(comfy).items():
        is_test = node_id in tiny
        assert (s.category == TESTING) == is_test, f"{node_id}: category {s.category!r}"
        assert s.display_name.endswith("(test)") == is_test, f"{node_id}: display name {s.display_name!r}"


def test_every_seed_declares_its_control(comfy):
    """The frontend adds a 'control after generate' widget after an INT named seed unless the input says
    control_after_generate=False; every Atelier seed says which (tools/ui_to_api.has_control reads it)."""
    ui = load_tool("ui_to_api")
    seeds = []
    for node_id, s in _schemas(comfy).items():
        for i in s.inputs or []:
            if i.id in ui.SEED_NAMES:
                seeds.append(node_id)
                assert getattr(i, "control_after_generate", None) is not None, \
                    f"{node_id}.{i.id}: control_after_generate not declared"
    assert len(seeds) >= 8, seeds


def test_time_router_calibration_shows_progress(comfy, run_graph):
    p = txt2img_prompt("sd15", 0, 64, 1, model_node=["21", 0])
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}}
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["10", 0],
                                                              "mode": "timestep", "boundaries": "500"}}
    p["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["21"] = {"class_type": "AtelierTimeRouter", "inputs": {"model": ["20", 0], "calibration": "denoising_loss",
                                                             "positive": ["2", 0], "latent": ["30", 0], "levels": 3,
                                                             "gate_noise": 0.0, "seed": 0}}
    events = []
    comfy.listen(lambda kind, data: events.append(data) if kind == "progress" and str(data["node"]) == "21" else None)
    try:
        run_graph(p)
    finally:
        comfy.listen(None)
    assert events, "no progress from the Time Router"
    assert {e["max"] for e in events} == {2 * 3}, events  # 2 experts x 3 calibration levels
    assert [e["value"] for e in events] == list(range(1, 7)), events
