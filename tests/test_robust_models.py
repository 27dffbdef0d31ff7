"""Issue 14, model pairings and metric prompts: every VAE/model, model/model and model/conditioning
pairing is checked up front (errors naming the input and the fix), metric prompts with words the world
does not know are refused, and values derived from inputs cannot become NaN silently.

All through ComfyUI's real executor on the tiny families and Atelier Mini; no mocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from atelier_testlib import load_models, load_tool, txt2img_prompt


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def err(comfy):
    return load_tool("headless").WorkflowError


def _expect(run_graph, err, prompt, *patterns):
    """Run ``prompt``; it must fail with a message holding every pattern (plain substrings)."""
    with pytest.raises(err) as info:
        run_graph(prompt)
    text = str(info.value)
    for pat in patterns:
        assert pat in text, f"{pat!r} not in the error:\n{text[:2000]}"
    return text


# ------------------------------------------------------------------ graphs


def _base(steps=2):
    """Tiny sd15 (1) with its prompt (2, 3), a 64 px latent (4), tiny sdxl (10) with its prompt (11, 12) and
    the Mini sdxl checkpoint (50), whose VAE is the foreign one."""
    p = txt2img_prompt(family="sd15", size=64, steps=steps)
    for k in ("5", "6", "7"):
        del p[k]
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 5}}
    p["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["10", 1]}}
    p["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}}
    p["50"] = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": "sdxl"}}
    return p


def _coop_inputs(vae_a, positive_b=("11", 0)):
    return {"model_a": ["1", 0], "vae_a": vae_a, "positive_a": ["2", 0], "negative_a": ["3", 0], "cfg_a": 7.0,
            "model_b": ["10", 0], "vae_b": ["10", 2], "positive_b": list(positive_b), "negative_b": ["12", 0],
            "cfg_b": 5.0, "fusion_d": 0.5, "bridge_every": 1, "start_percent": 0.0, "end_percent": 1.0,
            "b_scale": 1.0, "resize_method": "bicubic"}


def _coop_sampler(p, vae_a, positive_b=("11", 0)):
    p["20"] = {"class_type": "AtelierCoopSampler", "inputs": dict(
        _coop_inputs(vae_a, positive_b), latent_image=["4", 0], seed=3, steps=2, sampler_name="euler",
        scheduler="normal", denoise=1.0)}
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    return p


def _coop_guider(p, vae_a):
    p["30"] = {"class_type": "AtelierCoopGuider", "inputs": _coop_inputs(vae_a)}
    p["32"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}}
    p["33"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["34"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                          "denoise": 1.0}}
    p["35"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["32", 0], "guider": ["30", 0],
                                                                 "sampler": ["33", 0], "sigmas": ["34", 0],
                                                                 "latent_image": ["4", 0]}}
    p["36"] = {"class_type": "VAEDecode", "inputs": {"samples": ["35", 0], "vae": ["1", 2]}}
    p["37"] = {"class_type": "PreviewImage", "inputs": {"images": ["36", 0]}}
    return p


def _resolution_bridge(p, vae_low):
    p["20"] = {"class_type": "AtelierResolutionBridgeSampler", "inputs": {
        "model_low": ["1", 0], "vae_low": vae_low, "positive_low": ["2", 0], "negative_low": ["3", 0],
        "model_high": ["10", 0], "vae_high": ["10", 2], "positive_high": ["11", 0], "negative_high": ["12", 0],
        "latent_image": ["4", 0], "seed": 1, "steps": 4, "sampler_name": "euler", "scheduler": "normal",
        "cfg_low": 7.0, "cfg_high": 5.0, "switch_at": 0.5, "scale": 2.0, "resize_method": "bicubic"}}
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["10", 2]}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    return p


def _noise_aware(p, vae):
    ksa = {"model": ["1", 0], "add_noise": "enable", "noise_seed": 4, "steps": 4, "cfg": 7.0,
           "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
           "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}
    p["40"] = {"class_type": "KSamplerAdvanced", "inputs": ksa}
    p["41"] = {"class_type": "AtelierNoiseAwareLatentUpscale", "inputs": {
        "model": ["1", 0], "vae": vae, "positive": ["2", 0], "negative": ["3", 0], "samples": ["40", 0],
        "cfg": 7.0, "steps": 4, "sampler_name": "euler", "scheduler": "normal", "end_at_step": 2,
        "scale": 2.0, "resize_method": "bicubic", "seed": 8}}
    p["43"] = {"class_type": "VAEDecode", "inputs": {"samples": ["41", 0], "vae": ["1", 2]}}
    p["44"] = {"class_type": "PreviewImage", "inputs": {"images": ["43", 0]}}
    return p


def _struct_texture(p, structure_vae=("1", 2), texture_positive=True):
    inputs = {"structure_model": ["1", 0], "structure_positive": ["2", 0], "structure_negative": ["3", 0],
              "texture_model": ["10", 0], "latent_image": ["4", 0], "seed": 1, "steps": 4, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "t_struct": 500, "denoise": 1.0,
              "structure_vae": list(structure_vae), "texture_vae": ["10", 2], "texture_scale": 1.0}
    if texture_positive:
        inputs.update(texture_positive=["11", 0], texture_negative=["12", 0])
    p["20"] = {"class_type": "AtelierStructTextureSampler", "inputs": inputs}
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["10", 2]}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    return p


def _moe(p, vae):
    p["20"] = {"class_type": "AtelierMoESampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
        "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "vae": vae}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 1]}}
    return p


# ------------------------------------------------------------------ 1. foreign-family VAE

MINI_SDXL_VAE = ["50", 2]


@pytest.mark.parametrize("build,vae_input", [
    (_coop_guider, "vae_a"), (_coop_sampler, "vae_a"), (_resolution_bridge, "vae_low"), (_noise_aware, "vae"),
    (lambda p, v: _struct_texture(p, structure_vae=v), "structure_vae"), (_moe, "vae"),
], ids=["coop_guider", "coop_sampler", "resolution_bridge", "noise_aware_upscale", "struct_texture", "moe_sampler"])
def test_foreign_family_vae_is_refused(run_graph, err, build, vae_input):
    """The Atelier Mini SDXL VAE given where the SD1.5 model's VAE belongs: refused by structure (its
    recorded latent scale is SDXL's), the error naming the VAE input, both families and the fix."""
    p = build(_base(), MINI_SDXL_VAE)
    _expect(run_graph, err, p, f"{vae_input}: this is a SDXL VAE but", "is SD1.5", "connect the VAE of")


def test_own_family_vae_still_runs(run_graph):
    """The check is not a blanket refusal: the right VAEs run (and the Mini sdxl VAE fits an sdxl model)."""
    p = _coop_sampler(_base(), ["1", 2])
    r = run_graph(p, want=["20"])
    assert r["values"]["20"][0]["samples"].shape == (1, 4, 8, 8)
    p = _base()
    p["60"] = {"class_type": "AtelierNoiseAwareLatentUpscale", "inputs": {
        "model": ["50", 0], "vae": ["50", 2], "positive": ["61", 0], "negative": ["62", 0], "samples": ["63", 0],
        "cfg": 7.0, "steps": 4, "sampler_name": "euler", "scheduler": "normal", "end_at_step": 2, "scale": 2.0,
        "resize_method": "bicubic", "seed": 8}}
    p["61"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["50", 1]}}
    p["62"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["50", 1]}}
    p["63"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["64"] = {"class_type": "VAEDecode", "inputs": {"samples": ["60", 0], "vae": ["50", 2]}}
    p["65"] = {"class_type": "PreviewImage", "inputs": {"images": ["64", 0]}}
    r = run_graph(p, want=["60"])
    assert r["values"]["60"][0]["samples"].shape == (1, 4, 16, 16)


# ------------------------------------------------------------------ 2. model families and conditioning


def _space_graph(expert_model):
    p = txt2img_prompt(family="sd15", size=64, steps=2, text="a red circle and a blue square")
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 5}}
    p["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a green thing", "clip": ["1", 1]}}
    p["21"] = {"class_type": "AtelierSpaceExpert", "inputs": {"conditioning": ["20", 0], "name": "green",
                                                              "model": expert_model}}
    p["24"] = {"class_type": "AtelierSpaceExperts", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "prompt": "a red circle and a blue square",
        "phrases": "red circle, blue square", "experts": ["21", 0], "alpha": 0.2, "routing": "in order",
        "gate_noise": 0.0, "seed": 0, "mask_start_t": 1000, "capture": "mid-resolution", "pww_weight": 0.0}}
    p["5"]["inputs"].update(model=["24", 0], positive=["24", 1])
    return p


def test_sdxl_model_as_sd15_space_expert_is_refused(run_graph, err):
    _expect(run_graph, err, _space_graph(["10", 0]), "experts: its model family (SDXL) differs from model's (SD1.5)",
            "space expert 'green'", "connect a SD1.5 model to that Atelier Space Expert node")


def test_space_experts_refuse_a_clip_of_another_family(run_graph, err):
    """SDXL model, SD1.5 CLIP: the prompt it encodes lacks SDXL's pooled width."""
    p = _space_graph(None)
    del p["21"]["inputs"]["model"]
    p["24"]["inputs"]["model"] = ["10", 0]
    p["5"]["inputs"]["negative"] = ["12", 0]
    p["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}}
    _expect(run_graph, err, p, "clip: this CLIP does not belong to model", "connect the CLIP of model's own checkpoint")


def test_coop_refuses_a_prompt_encoded_for_the_other_model(run_graph, err):
    """positive_b encoded with model A's (SD1.5) CLIP for the SDXL model B."""
    p = _coop_sampler(_base(), ["1", 2], positive_b=("2", 0))
    _expect(run_graph, err, p, "positive_b: its pooled text embedding (64 wide) does not fit model_b",
            "encode it with model_b's own CLIP")


def test_struct_texture_refuses_the_structure_prompt_for_another_family(run_graph, err):
    """SD1.5 → SDXL handoff with texture_positive left empty: the SD1.5 prompt would reach the SDXL model."""
    p = _struct_texture(_base(), texture_positive=False)
    _expect(run_graph, err, p, "texture_positive: not connected, so the structure model's conditioning is used",
            "connect texture_positive encoded with texture_model's own CLIP")


def test_time_experts_family_error_is_the_glue_one(run_graph, err):
    p = txt2img_prompt("sd15", 0, 64, 2, model_node=["20", 0])
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 1}}
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["10", 0],
                                                              "mode": "timestep", "boundaries": "500"}}
    _expect(run_graph, err, p, "model_2: its model family (SDXL) differs from model_1's (SD1.5)", "Coop bridge")


# ------------------------------------------------------------------ 3. metric prompts


@pytest.fixture(scope="module")
def circle_sample():
    world = load_models("world")
    for i in range(200):
        s = world.sample(3, i, 64)
        if any(o.shape == "circle" for o in s.objects):
            return i, s
    raise AssertionError("no circle in 200 world samples")


def _adherence(index, prompt):
    return {"1": {"class_type": "AtelierWorldSample", "inputs": {"seed": 3, "index": index, "size": 64,
                                                                 "stream": "train"}},
            "2": {"class_type": "AtelierPromptAdherence", "inputs": {"image": ["1", 0], "prompt": prompt}}}


def test_unknown_colour_in_a_metric_prompt_is_not_scored(run_graph, err, circle_sample):
    index, s = circle_sample
    circle = next(o for o in s.objects if o.shape == "circle")
    ok = run_graph(_adherence(index, f"a {circle.color} circle"), want=["2"])["values"]["2"]
    assert ok[0] == 1.0 and ok[1] == 1.0                      # the known words still score as before
    text = _expect(run_graph, err, _adherence(index, "a chartreuse circle"),
                   "prompt: 'chartreuse' (before 'circle') is not a colour the Atelier world knows")
    assert "red, orange, yellow, green, cyan, blue, purple, pink" in text


def test_unknown_shape_in_a_metric_prompt_is_not_scored(run_graph, err, circle_sample):
    index, s = circle_sample
    _expect(run_graph, err, _adherence(index, f"a {s.objects[0].color} hexagon"),
            "prompt: 'hexagon' (after", "is not a shape the Atelier world knows",
            "circle, square, triangle, star, cross, ring")


def test_free_words_outside_colour_and_shape_slots_stay_ignored():
    metrics = load_models("metrics")
    for text in ("a shiny red circle", "something red", "a red circle left of a blue square", "a big cross",
                 "a red circle, a large blue square and a green star on a striped background"):
        assert metrics.unknown_words(text) == [], text


# ------------------------------------------------------------------ 4. values derived from inputs


def _three_experts(boundaries):
    p = txt2img_prompt("sd15", 0, 64, 2, model_node=["20", 0])
    for n, seed in (("10", 1), ("11", 2)):
        p[n] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": seed}}
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["10", 0],
                                                              "model_3": ["11", 0], "mode": "timestep",
                                                              "boundaries": boundaries}}
    return p


@pytest.mark.parametrize("text", ["nan, 500", "700, inf"])
def test_non_finite_boundary_text_is_named(run_graph, err, text):
    bad = text.split(", ")[0] if "nan" in text else "inf"
    _expect(run_graph, err, _three_experts(text), f"boundaries: '{bad}' is not a finite number")


def test_time_router_refuses_non_finite_calibration_latents(run_graph, err):
    """A NaN latent (core LatentMultiply passes NaN through its range check) would give NaN errors for
    every expert and a gate fitted to nothing."""
    p = txt2img_prompt("sd15", 0, 64, 2, model_node=["21", 0])
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}}
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["10", 0],
                                                              "mode": "timestep", "boundaries": "500"}}
    p["30"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["4", 0], "multiplier": float("nan")}}
    p["21"] = {"class_type": "AtelierTimeRouter", "inputs": {"model": ["20", 0], "calibration": "denoising_loss",
                                                             "positive": ["2", 0], "latent": ["30", 0], "levels": 2,
                                                             "gate_noise": 0.0, "seed": 0}}
    _expect(run_graph, err, p, "latent: the calibration latents contain NaN or infinite values")


def test_time_router_calibrates_inside_the_real_executor(run_graph):
    """The gate is fitted with autograd; ComfyUI runs nodes in inference mode (a direct execute() call does
    not), where the fit used to fail with 'Inference tensors cannot be saved for backward'."""
    p = txt2img_prompt("sd15", 0, 64, 2, model_node=["21", 0])
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}}
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1", 0], "model_2": ["10", 0],
                                                              "mode": "timestep", "boundaries": "500"}}
    p["30"] = {"class_type": "AtelierWorldSample", "inputs": {"seed": 0, "index": 0, "size": 64, "stream": "train"}}
    p["31"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}
    p["21"] = {"class_type": "AtelierTimeRouter", "inputs": {"model": ["20", 0], "calibration": "denoising_loss",
                                                             "positive": ["2", 0], "latent": ["31", 0], "levels": 3,
                                                             "gate_noise": 0.0, "seed": 0}}
    r = run_graph(p, want=["21", "5"])
    report = r["values"]["21"][2]
    assert report.startswith("gate accuracy on calibration levels: ")
    assert 0.0 <= float(report.split(": ")[1].split()[0]) <= 1.0
    assert torch.isfinite(r["values"]["5"][0]["samples"]).all()
