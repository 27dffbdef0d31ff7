"""Issue 15 for sketch guidance, through ComfyUI's real executor with the real core nodes on the tiny sd15 family:

* beta 0 is a bit-exact no-op next to any other model patch (core ToMe, FreeU, PAG), in both forms, with the
  patch before or after the guidance node;
* in img2img (core KSampler, denoise < 1) the default 0-50 % window is the first half of *that run's*
  denoising, so guidance acts; a window that holds none of a run's steps is reported (log warning), not silent.
"""
from __future__ import annotations

import copy
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from atelier_testlib import load_models, txt2img_prompt  # noqa: E402

world = load_models("world")


# sk (nodes/sketch.py), one_thread: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lep_name(sk, tiny, comfy):
    """A small LEP for the tiny sd15 family, trained by the pack's trainer into the session's LEP folder."""
    import folder_paths
    from PIL import Image
    d = Path(folder_paths.get_input_directory()) / "compose_sketch_world"
    d.mkdir(parents=True, exist_ok=True)
    for s in world.iter_samples(3, 0, 4, size=64):
        Image.fromarray(s.image).save(d / f"w{s.index:03d}.png")
        (d / f"w{s.index:03d}.txt").write_text(s.caption)
    name = f"compose_sketch_{uuid.uuid4().hex[:8]}"
    with torch.inference_mode():
        model, clip, vae = tiny.build_family("sd15", 0)
        _, rep = sk.train_lep(model, clip, vae, d.name, name, steps=3, batch_size=2, learning_rate=1e-3,
                              resolution=64, seed=0, save_every=0)
    yield Path(rep["path"]).name
    Path(rep["path"]).unlink(missing_ok=True)


def _canvas():
    import json
    return json.dumps({"version": 1, "width": 64, "height": 64, "background": "",
                       "strokes": [{"mode": "draw", "size": 4, "points": [[16, 16], [48, 16], [48, 48], [16, 48],
                                                                          [16, 16]]}]})


PATCHES = {
    "ToMe": {"class_type": "TomePatchModel", "inputs": {"ratio": 0.5}},
    "FreeU": {"class_type": "FreeU", "inputs": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
    "PAG": {"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 3.0}},
}


def _graph(lep_name, patch=None, order="before", guidance=None, denoise=1.0, steps=4, image=False):
    """tiny sd15 -> [patch] -> [sketch guidance] -> [patch] -> core KSampler; ``guidance``: its inputs or None
    (no guidance node); ``image``: start from the VAE encoding of a world image (img2img)."""
    p = txt2img_prompt("sd15", seed=0, steps=steps, denoise=denoise, sampler="euler_ancestral")
    src = ["1", 0]
    if patch and order == "before":
        p["p"] = {"class_type": PATCHES[patch]["class_type"], "inputs": {**PATCHES[patch]["inputs"], "model": src}}
        src = ["p", 0]
    if guidance is not None:
        p["20"] = {"class_type": "AtelierSketchCanvas", "inputs": {"width": 64, "height": 64, "sketch": _canvas()}}
        p["21"] = {"class_type": "AtelierLEPLoader", "inputs": {"lep_name": lep_name}}
        p["22"] = {"class_type": "AtelierSketchGuidance", "inputs": {
            "model": src, "lep": ["21", 0], "vae": ["1", 2], "sketch": ["20", 0], "beta": 1.6,
            "start_percent": 0.0, "end_percent": 0.5, "grad_every": 1, "form": "paper", **guidance}}
        src = ["22", 0]
    if patch and order == "after":
        p["p"] = {"class_type": PATCHES[patch]["class_type"], "inputs": {**PATCHES[patch]["inputs"], "model": src}}
        src = ["p", 0]
    p["5"]["inputs"]["model"] = src
    if image:
        p["30"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                           "color": 0x3366CC}}
        p["31"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}
        p["5"]["inputs"]["latent_image"] = ["31", 0]
    return p


def _latent(run_graph, prompt):
    out = run_graph(prompt, want=["5"])
    assert not out.get("error"), out
    return out["values"]["5"][0]["samples"]


CASES = [(p, f, o) for p in PATCHES for f in ("paper", "fast") for o in ("before", "after")]


@pytest.mark.parametrize("patch,form,order", CASES, ids=[f"{p}-{f}-{o}" for p, f, o in CASES])
def test_beta_zero_is_bit_identical_next_to_core_patches(run_graph, lep_name, patch, form, order):
    """euler_ancestral and ToMe draw from the global RNG during sampling: guidance must not move it (building its
    predictor copies did, giving ToMe other merges: relative difference 0.14)."""
    alone = _latent(run_graph, _graph(lep_name, patch, order))
    noop = _latent(run_graph, _graph(lep_name, patch, order, guidance={"beta": 0.0, "end_percent": 1.0,
                                                                       "form": form}))
    assert torch.isfinite(alone).all()
    assert torch.equal(alone, noop), float((alone - noop).abs().max())
    guided = _latent(run_graph, _graph(lep_name, patch, order, guidance={"beta": 1.6, "end_percent": 1.0,
                                                                         "form": form}))
    assert not torch.equal(alone, guided)          # and at beta > 0 it still guides


@pytest.mark.parametrize("form", ["paper", "fast"])
def test_img2img_default_window_guides_the_first_half_of_the_run(run_graph, lep_name, sk, form):
    """Core KSampler at denoise 0.5: the run starts at half the model's noise; the 0-50 % window (measured on
    the full schedule) would lie outside it and guidance would silently do nothing. It is measured on the run's
    own noise range: the first half of its steps are guided."""
    plain = _latent(run_graph, _graph(lep_name, denoise=0.5, steps=6, image=True))
    guided = _latent(run_graph, _graph(lep_name, guidance={"form": form}, denoise=0.5, steps=6, image=True))
    assert not torch.equal(plain, guided)
    rel = float((guided - plain).norm() / plain.norm())
    assert rel > 1e-3, rel


def test_run_window_maps_the_percents_onto_the_runs_noise_range(sk, tiny, comfy):
    import comfy.samplers
    model, _, _ = tiny.build_family("sd15", 0)
    ms = model.model.model_sampling
    full = comfy.samplers.calculate_sigmas(ms, "normal", 12)
    half = full[-7:]                                   # what KSampler runs at denoise 0.5, 6 steps
    w = sk.glue.SigmaWindow(0.0, 0.5, 1)
    assert sk.run_window(w, ms, full) is w             # a full run keeps the window as given
    assert w.steps(ms, half) == []                     # the full-schedule window misses the img2img run
    assert sorted(sk.run_window(w, ms, half).chosen_steps(ms, half)) == [0, 1, 2]
    assert sorted(sk.run_window(sk.glue.SigmaWindow(0.5, 1.0, 2), ms, half).chosen_steps(ms, half)) == [3, 5]


def test_a_window_that_holds_no_step_is_reported(run_graph, lep_name, caplog):
    plain = _latent(run_graph, _graph(lep_name, steps=4))
    with caplog.at_level(logging.WARNING):
        same = _latent(run_graph, _graph(lep_name, guidance={"start_percent": 0.9, "end_percent": 0.92}, steps=4))
    assert torch.equal(plain, same)
    text = caplog.text
    assert "Sketch guidance did nothing in this run: none of its 4 steps lies in the window start_percent 0.9 - " \
           "end_percent 0.92" in text, text
    assert "widen the window" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _latent(run_graph, _graph(lep_name, guidance={}, steps=4))
    assert "did nothing" not in caplog.text
