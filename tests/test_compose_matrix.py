"""Issue 15: the composition matrix in the suite — each technique × a handful of core patches × order
(after / before the technique), through the real executor on the tiny models. Every cell must keep both
effects (neither lost nor blown up) and the technique's no-op setting must be bit-identical to the core
patch alone. The full grid is `python bench/bench_compose.py` (tools/compose_matrix.py measures both)."""
from __future__ import annotations

import pytest

from atelier_testlib import load_tool

cm = load_tool("compose_matrix")

# Sized for the suite: the patches users chain most, few steps. The bench runs every patch. (Core PAG has
# almost no effect at the tiny models' 64 px — a 1x1 middle block — so PAG is tested at 128 px by the
# techniques' own tests: tests/test_compose_space.py, tests/test_compose_sketch.py, tests/test_time_experts.py.)
SUITE_PATCHES = ("FreeU", "RescaleCFG", "ToMe", "v-prediction")
CELLS = [(t, p, o) for t in cm.TECHNIQUES for p in SUITE_PATCHES for o in ("after", "before")]


@pytest.fixture(scope="module")
def matrix(comfy):
    return cm.Matrix(comfy, steps=4)


@pytest.mark.parametrize("technique,patch,order", CELLS, ids=[f"{t}|{p}|{o}" for t, p, o in CELLS])
def test_both_effects_survive_and_the_noop_is_exact(matrix, technique, patch, order):
    r = matrix.cell(cm.TECHNIQUES[technique], patch, order)
    assert r["finite"], r
    assert r["noop_exact_alone"], f"{technique}: its no-op setting is not bit-identical even without {patch}"
    assert r["noop_exact"], f"{technique} off + {patch} ({order}) differs from {patch} alone: {r}"
    assert r["t_kept"], f"{technique}'s effect is lost with {patch} ({order}): {r}"
    assert r["p_kept"], f"{patch}'s effect is lost or blown up with {technique} ({order}): {r}"


def test_sampler_level_patch_before_a_non_first_expert_is_reported(run_graph):
    """RescaleCFG (a sampler CFG function) put on expert 2 before Atelier Time Experts cannot act — the
    sampler reads such hooks from the routed MODEL — so the node says so in its summary; after the node it
    acts on every expert (the matrix above)."""
    prompt = {
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}},
        "3": {"class_type": "RescaleCFG", "inputs": {"model": ["2", 0], "multiplier": 0.7}},
        "4": {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["3", 0],
                                                             "mode": "timestep", "boundaries": "500"}},
        "5": {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["2", 0],
                                                             "mode": "timestep", "boundaries": "500"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}},
    }
    out = run_graph(prompt, want=["4", "5"])["values"]
    assert out["4"][2].startswith("WARNING: sampler-level patches on model_2: sampler_cfg_function")
    assert "WARNING" not in out["5"][2]
