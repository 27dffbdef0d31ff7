"""Tiny / Mini substitution for the DiT and flow workflows (issue 17.3): the example Flux, SD3.5 and PixArt
workflows load their parts with UNETLoader, CLIPLoader / DualCLIPLoader / TripleCLIPLoader, VAELoader or an
SD3 checkpoint; --tiny, --mini and ATELIER_TINY_MODELS turn them into runs on the tiny model of the family the
workflow names (models/tiny_substitution.py), through ComfyUI's own converter, validator and executor.
"""
from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch

from atelier_testlib import ROOT, load_tool

WF = {name: ROOT / "workflows" / f"{name}.json"
      for name in ("flux_dev_txt2img", "flux_schnell_txt2img", "sd35_txt2img", "pixart_sigma_txt2img")}


@pytest.fixture(scope="module")
def sub(pack):
    return importlib.import_module(pack.__name__ + ".models.tiny_substitution")


def _by_class(prompt: dict, class_type: str) -> dict:
    return {nid: n for nid, n in prompt.items() if n["class_type"] == class_type}


def _one(prompt: dict, class_type: str) -> tuple[str, dict]:
    (item,) = _by_class(prompt, class_type).items()
    return item


def _loader_ids(comfy, name: str) -> dict:
    """class_type -> node id of each loader in the workflow as saved (before substitution)."""
    prompt = comfy.to_prompt(comfy.load_workflow(WF[name]))
    return {n["class_type"]: nid for nid, n in prompt.items() if "Loader" in n["class_type"]}


def test_flux_workflow_becomes_one_tiny_flux_model_with_links_on_its_parts(comfy, sub):
    ids = _loader_ids(comfy, "flux_dev_txt2img")
    prompt = comfy.to_prompt(comfy.load_workflow(WF["flux_dev_txt2img"]), tiny=True)
    assert not {"UNETLoader", "DualCLIPLoader", "VAELoader"} & {n["class_type"] for n in prompt.values()}
    seed = sub.tiny_seed_for("flux1-dev.safetensors")
    for cls in ("UNETLoader", "DualCLIPLoader", "VAELoader"):
        node = prompt[ids[cls]]
        # one family, one seed: ComfyUI's cache builds the tiny model once for the three stand-ins
        assert node["class_type"] == "AtelierTinyCheckpointLoader" and node["inputs"] == {"family": "flux", "seed": seed}
    assert "clip_l.safetensors, t5xxl_fp16.safetensors" in prompt[ids["DualCLIPLoader"]]["_meta"]["title"]
    # every link from a replaced loader now reads the stand-in's MODEL (0), CLIP (1) or VAE (2)
    assert _one(prompt, "ModelSamplingFlux")[1]["inputs"]["model"] == [ids["UNETLoader"], 0]
    assert _one(prompt, "CLIPTextEncode")[1]["inputs"]["clip"] == [ids["DualCLIPLoader"], 1]
    assert _one(prompt, "VAEDecode")[1]["inputs"]["vae"] == [ids["VAELoader"], 2]
    # 1024 px -> the tiny flux size (128), in the latent and in ModelSamplingFlux's shift
    for cls in ("EmptySD3LatentImage", "ModelSamplingFlux"):
        inputs = _one(prompt, cls)[1]["inputs"]
        assert (inputs["width"], inputs["height"]) == (128, 128), cls
    assert sub.substitute_tiny(prompt) == prompt  # substituting twice changes nothing


def test_flux_workflow_runs_tiny_in_the_executor(comfy, tiny):
    """The shared Flux dev graph (UNETLoader + DualCLIPLoader + VAELoader, FluxGuidance, SamplerCustomAdvanced)
    runs on tiny flux: a Flux MODEL, a 16-channel latent, a 128 px picture, the same as the tiny model built
    directly; the saved PNG keeps the workflow as shared."""
    ids = _loader_ids(comfy, "flux_dev_txt2img")
    wf = comfy.load_workflow(WF["flux_dev_txt2img"])
    prompt = comfy.to_prompt(wf, tiny=True)
    _one(prompt, "BasicScheduler")[1]["inputs"]["steps"] = 2
    comfy.executor.reset()
    result = comfy.run_prompt(prompt, {"extra_pnginfo": {"workflow": wf}})
    cache = comfy.executor.caches.outputs
    model = cache.get(ids["UNETLoader"])[0][0]
    assert type(model.model).__name__ == "Flux" and model.model.model_config.unet_config["guidance_embed"]
    assert model.model.latent_format.latent_channels == 16
    cond, extra = cache.get(_one(prompt, "FluxGuidance")[0])[0][0][0]
    assert cond.shape == (1, 256, tiny.T5_WIDTH) and extra["pooled_output"].shape == (1, 64)  # T5 + CLIP-L
    assert extra["guidance"] == 3.5
    assert cache.get(_one(prompt, "SamplerCustomAdvanced")[0])[0][0]["samples"].shape == (1, 16, 16, 16)
    image = cache.get(_one(prompt, "VAEDecode")[0])[0][0]
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all() and image.std() > 0.01
    (png,) = comfy.output_files(result["outputs"])
    from PIL import Image
    assert json.loads(Image.open(png).info["workflow"])["nodes"][1]["type"] == "UNETLoader"


def test_flux_workflow_in_mini_mode_says_mini_has_no_flux(comfy, sub, caplog):
    """Mini mode: Mini has no Flux model, so the tiny flux model stands in, and the log and the node titles say so."""
    assert not sub.mini_has("flux")
    ui = load_tool("ui_to_api")
    ui._sub._said.discard("flux")  # the warning is said once per process
    wf = comfy.load_workflow(WF["flux_dev_txt2img"])
    with caplog.at_level(logging.WARNING, logger="atelier.tiny"):
        mini = comfy.to_prompt(wf, tiny=True, mini=True)
    assert any("Atelier Mini has no flux model" in r.getMessage() for r in caplog.records)
    tiny_prompt = comfy.to_prompt(wf, tiny=True)
    assert {k: {**n, "_meta": None} for k, n in mini.items()} == {k: {**n, "_meta": None} for k, n in tiny_prompt.items()}
    titles = [n["_meta"]["title"] for n in mini.values() if n["class_type"] == "AtelierTinyCheckpointLoader"]
    assert len(titles) == 3 and all(t.endswith("(Atelier Mini has no flux model)") for t in titles)


@pytest.mark.parametrize("name,family,size,loaders", [
    ("flux_schnell_txt2img", "flux_schnell", 128, 3), ("sd35_txt2img", "sd3", 128, 2),  # checkpoint + TripleCLIP
    ("pixart_sigma_txt2img", "pixart", 320, 3)])
def test_each_family_is_read_from_its_workflow(comfy, sub, name, family, size, loaders):
    wf = comfy.load_workflow(WF[name])
    prompt = comfy.to_prompt(wf, tiny=True)
    stand_ins = _by_class(prompt, "AtelierTinyCheckpointLoader")
    assert len(stand_ins) == loaders and {n["inputs"]["family"] for n in stand_ins.values()} == {family}
    assert len({n["inputs"]["seed"] for n in stand_ins.values()}) == 1  # text encoders/VAE: the model's seed
    empty = next(n for n in prompt.values() if n["class_type"].startswith("Empty"))
    assert (empty["inputs"]["width"], empty["inputs"]["height"]) == (size, size)
    mini = comfy.to_prompt(wf, tiny=True, mini=True)
    if family == "pixart" and sub.mini_has("pixart"):  # Atelier Mini-DiT, where its weights ship
        assert {n["class_type"] for n in mini.values()} >= {"AtelierMiniCheckpointLoader"}
        empty = next(n for n in mini.values() if n["class_type"] == "EmptyLatentImage")
        assert empty["inputs"]["width"] == sub.DIT_SIZES[("pixart", True)][1]
    else:
        assert not _by_class(mini, "AtelierMiniCheckpointLoader")


def test_family_from_file_names_and_types(sub):
    f = sub.family_from_name
    assert [f(n) for n in ("flux1-dev.safetensors", "flux1-dev-fp8.safetensors", "flux1-schnell.safetensors",
                           "ae.safetensors", "taef1", "sd3.5_large.safetensors", "sd3_medium_incl_clips.safetensors",
                           "PixArt-Sigma-XL-2-1024-MS.safetensors", "sd_xl_base_1.0.safetensors",
                           "v1-5-pruned-emaonly.safetensors", "my_finetune.safetensors")] == [
        "flux", "flux", "flux_schnell", "flux", "flux", "sd3", "sd3", "pixart", "sdxl", None, None]
    assert sub.tiny_family_for("v1-5-pruned-emaonly.safetensors") == "sd15"  # checkpoints: SD1.5 unless named


def test_split_loaders_take_the_workflow_family(sub):
    """A diffusion model named otherwise takes the family its text encoders name; an SD1.5 graph with its own
    VAELoader gets the tiny sd15 VAE; two differently named diffusion models stay two models."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "my_finetune.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp8_e4m3fn.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "other.safetensors", "weight_dtype": "default"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
    }
    out = sub.substitute_tiny(prompt)
    assert {out[k]["inputs"]["family"] for k in "1234"} == {"flux"}
    assert out["1"]["inputs"]["seed"] == out["2"]["inputs"]["seed"] == out["3"]["inputs"]["seed"]
    assert out["4"]["inputs"]["seed"] != out["1"]["inputs"]["seed"]
    assert out["5"]["inputs"]["clip"] == ["2", 1] and out["6"]["inputs"]["vae"] == ["3", 2]
    sd15 = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
            "2": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}}}
    out = sub.substitute_tiny(sd15)
    assert out["2"]["inputs"] == out["1"]["inputs"] == {"family": "sd15", "seed": sub.tiny_seed_for(
        "v1-5-pruned-emaonly.safetensors")}
    assert (out["3"]["inputs"]["width"], out["3"]["inputs"]["height"]) == (64, 96)  # as before: 1/8
    # PixArt at another aspect: the shorter side stays at the tiny model's 320 px (it divides by zero below 264)
    pix = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "PixArt-Sigma-XL-2-1024-MS.safetensors"}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}}}
    assert sub.substitute_tiny(pix)["2"]["inputs"]["height"] == 320


def test_stand_in_sizes_match_the_models(sub, tiny, pack):
    glue = importlib.import_module(pack.__name__ + ".nodes.glue")
    mini = importlib.import_module(pack.__name__ + ".nodes.mini")
    real, tiny_px = sub.DIT_SIZES[("pixart", False)]
    assert real == glue.FAMILIES["pixart"].native_px and tiny_px == tiny.FAMILIES["pixart"]["native_px"]
    if "pixart" in getattr(mini, "FAMILIES", ()):
        assert sub.DIT_SIZES[("pixart", True)][1] == mini.native_px("pixart")
    for fam in ("flux", "flux_schnell", "sd3"):  # the rest: real / TINY_SCALE
        assert tiny.FAMILIES[fam]["native_px"] == glue.FAMILIES[tiny.GLUE_FAMILY[fam]].native_px // sub.TINY_SCALE
    assert sub.MINI_WEIGHTS == mini.WEIGHTS_DIR and sub.mini_has("sd15") == mini.weights_path("sd15").is_file()


def test_missing_text_encoder_is_named(comfy, tmp_path, monkeypatch):
    """Without substitution, a Flux workflow whose T5 file is missing (the model, CLIP-L and VAE present) fails
    validation naming the input and the file, and only that one."""
    headless = load_tool("headless")
    fp = comfy.folder_paths
    for folder, name in (("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                         ("vae", "ae.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")  # validation reads the listing only; nothing is loaded
        monkeypatch.setitem(fp.folder_names_and_paths, folder,
                            ([str(tmp_path / folder)] + fp.folder_names_and_paths[folder][0],
                             fp.folder_names_and_paths[folder][1]))
    prompt = comfy.to_prompt(comfy.load_workflow(WF["flux_dev_txt2img"]))
    with pytest.raises(headless.WorkflowError) as e:
        comfy.validate(prompt)
    msg = str(e.value)
    assert "DualCLIPLoader) input clip_name2" in msg and "t5xxl_fp16.safetensors" in msg
    assert "unet_name" not in msg and "vae_name" not in msg and "input clip_name1" not in msg


def test_text_encoder_of_an_unknown_family_is_not_guessed(comfy, caplog):
    """With substitution no file is needed, but a text encoder the tiny families do not have (DualCLIPLoader type
    hidream) is not replaced by a guess: the run fails naming that loader's inputs and files, and the log says why."""
    headless = load_tool("headless")
    wf = comfy.load_workflow(WF["flux_dev_txt2img"])
    node = next(n for n in wf["nodes"] if n["type"] == "DualCLIPLoader")
    node["widgets_values"][2] = "hidream"
    with caplog.at_level(logging.WARNING, logger="atelier.tiny"):
        with pytest.raises(headless.WorkflowError) as e:
            comfy.run_workflow(wf, tiny=True)
    msg = str(e.value)
    assert "DualCLIPLoader) input clip_name2" in msg and "t5xxl_fp16.safetensors" in msg
    assert "UNETLoader" not in msg and "VAELoader" not in msg  # those were stood in for
    assert any("cannot tell which model family DualCLIPLoader" in r.getMessage() for r in caplog.records)


def test_server_mode_substitutes_dit_loaders(pack, monkeypatch):
    """ATELIER_TINY_MODELS (the server's on-prompt handler, nodes/tiny.py) applies the same substitution."""
    tiny_nodes = importlib.import_module(pack.__name__ + ".nodes.tiny")
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors"}},
              "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 0]}}}
    for mode in ("1", "mini"):
        monkeypatch.setenv("ATELIER_TINY_MODELS", mode)
        out = tiny_nodes._tiny_prompt_handler({"prompt": json.loads(json.dumps(prompt))})["prompt"]
        assert out["1"]["class_type"] == out["2"]["class_type"] == "AtelierTinyCheckpointLoader"
        assert out["2"]["inputs"]["family"] == "flux_schnell" and out["3"]["inputs"]["vae"] == ["2", 2]
