"""kNN neighbours -> Flux Redux (issue 18.4) in a real ComfyUI graph: the neighbour images re-encoded by a
SigLIP-shaped CLIP vision model feed core StyleModelApply with a tiny Redux (ComfyUI's ReduxImageEncoder,
seeded) on the tiny flux family; a vision model of another space is refused naming the input; a second
database changes the picture. The example workflow (workflows/knn_flux_redux.json) runs in tiny mode.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from atelier_testlib import ROOT, load_tool
from PIL import Image, ImageDraw


def _images(folder: Path, n: int, seed: int, shape: str, hue) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", (40, 32), hue)
        x0, y0 = int(rng.integers(0, 16)), int(rng.integers(0, 12))
        fg = tuple(int(c) for c in rng.integers(0, 256, 3))
        getattr(ImageDraw.Draw(img), shape)([x0, y0, x0 + 20, y0 + 16], fill=fg)
        img.save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def redux_env(comfy, pack, tiny):
    knn_nodes = importlib.import_module(pack.__name__ + ".nodes.knn")
    input_dir = Path(comfy.folder_paths.get_input_directory())
    _images(input_dir / "redux_warm", 4, 1, "ellipse", (220, 40, 30))
    _images(input_dir / "redux_cool", 4, 2, "rectangle", (20, 60, 230))
    return knn_nodes


def _graph(folder: str, index_name: str, vision_kind: str = "siglip", embed_with: str = "siglip",
           strength: float = 1.0, combine: str = "weighted mean") -> dict:
    """Tiny flux text-to-image with the query image's neighbours through core StyleModelApply.
    40: tiny SigLIP (Redux's image encoder); 41: a CLIP vision model of ``vision_kind`` re-encoding the
    neighbours; 42: the embedder of the index (``embed_with``: 'siglip' or 'clip'); 44: Retrieve; 46: Redux."""
    return {
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "flux", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "40": {"class_type": "AtelierTinyCLIPVisionLoader", "inputs": {"kind": "siglip", "seed": 0}},
        "41": {"class_type": "AtelierTinyCLIPVisionLoader", "inputs": {"kind": vision_kind, "seed": 0}},
        "42": {"class_type": "AtelierKNNCLIPVisionEmbedder", "inputs": {
            "clip_vision": ["40" if embed_with == "siglip" else "41", 0]}},
        "43": {"class_type": "AtelierKNNBuildIndex", "inputs": {
            "embedder": ["42", 0], "folder": folder, "index_name": index_name, "index_type": "flat",
            "rebuild": False, "batch_size": 4}},
        "45": {"class_type": "LoadImage", "inputs": {"image": "redux_warm/01.png"}},
        "46": {"class_type": "AtelierTinyReduxLoader", "inputs": {"seed": 0}},
        "44": {"class_type": "AtelierKNNRetrieve", "inputs": {
            "index": ["43", 0], "embedder": ["42", 0], "text": "", "k": 2, "combine": combine,
            "temperature": 0.05, "image_size": 64, "image": ["45", 0], "clip_vision": ["41", 0],
            "style_model": ["46", 0]}},
        "47": {"class_type": "StyleModelApply", "inputs": {
            "conditioning": ["2", 0], "style_model": ["46", 0], "clip_vision_output": ["44", 1],
            "strength": strength, "strength_type": "multiply"}},
        "8": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["47", 0], "guidance": 3.5}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["8", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def test_tiny_redux_is_comfyuis_redux_at_tiny_width(tiny):
    """The stand-in is ComfyUI's ReduxImageEncoder in the published key layout, reading the tiny SigLIP's width and
    writing the tiny flux text width; the tiny SigLIP is a ComfyUI siglip_vision_model (no class token)."""
    import comfy.ldm.flux.redux
    sd = tiny.redux_state_dict(0)
    assert set(sd) == {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    style = tiny.load_style_model(sd)
    assert isinstance(style.model, comfy.ldm.flux.redux.ReduxImageEncoder)
    assert style.model.redux_up.in_features == tiny.TINY_SIGLIP["hidden_size"] == 48
    assert style.model.redux_down.out_features == tiny.T5_WIDTH
    assert torch.equal(tiny.redux_state_dict(0)["redux_up.weight"], sd["redux_up.weight"])  # seeded
    assert not torch.equal(tiny.redux_state_dict(1)["redux_up.weight"], sd["redux_up.weight"])
    siglip = tiny.build_siglip_vision(0)
    out = siglip.encode_image(torch.rand(2, 40, 32, 3))
    assert siglip.model.vision_model.embeddings.class_embedding is None
    assert out.last_hidden_state.shape == (2, 16, 48)  # (32 / 8)^2 patch tokens, as 729 = (384 / 14)^2
    assert style.get_cond(out).shape == (2, 16, tiny.T5_WIDTH)
    with pytest.raises(ValueError, match="not a Redux"):
        tiny.load_style_model({"style_embedding": torch.zeros(1, 8, 1024)})


def test_neighbours_condition_flux_through_core_style_model_apply_and_a_second_database_changes_it(
        redux_env, run_graph):
    warm = run_graph(_graph("redux_warm", "redux_warm"), want=["44", "47", "2", "6"])
    images, vision, hits, _report, _scores = warm["values"]["44"]
    assert hits.paths[0] == "01.png" and hits.scores[0] == pytest.approx(1.0, abs=1e-3)  # the query image itself
    assert vision.last_hidden_state.shape == (1, 16, 48)  # 2 neighbours' token states, score-weighted into one
    text = warm["values"]["2"][0][0][0]
    cond = warm["values"]["47"][0][0][0]
    assert cond.shape == (1, text.shape[1] + 16, text.shape[2])  # 16 Redux tokens after the text tokens
    assert torch.equal(cond[:, :text.shape[1]], text)
    warm_img = warm["values"]["6"][0]
    assert torch.isfinite(warm_img).all()

    # the same query on a second database: other neighbours, other tokens, another picture
    cool = run_graph(_graph("redux_cool", "redux_cool"), want=["44", "47", "6"])
    cool_hits = cool["values"]["44"][2]
    assert cool_hits.root != hits.root
    assert (cool["values"]["47"][0][0][0] - cond).abs().max() > 1e-4
    assert (cool["values"]["6"][0] - warm_img).abs().max() > 1e-3, "swapping the database must change the picture"

    # one row per neighbour: Apply Style Model appends 2 x 16 tokens
    both = run_graph(_graph("redux_warm", "redux_warm", combine="all neighbours"), want=["47"])
    assert both["values"]["47"][0][0][0].shape[1] == text.shape[1] + 2 * 16


def test_a_vision_model_of_another_space_is_refused_naming_the_input(redux_env, run_graph):
    headless = load_tool("headless")
    # the neighbours re-encoded by the tiny unCLIP's CLIP ViT (32 wide): not what Redux reads
    with pytest.raises(headless.WorkflowError, match=r"clip_vision: this CLIP vision model makes 32-wide clip hidden "
                                                     r"states, but Flux Redux reads 48-wide siglip ones"):
        run_graph(_graph("redux_warm", "redux_warm", vision_kind="clip"))
    # no clip_vision input: the embedder's own CLIP vision model encodes the neighbours, and the error names it
    prompt = _graph("redux_warm", "redux_warm_clip", vision_kind="clip", embed_with="clip")
    prompt["44"]["inputs"].pop("clip_vision")
    with pytest.raises(headless.WorkflowError, match=r"embedder: this CLIP vision model makes 32-wide clip"):
        run_graph(prompt)


def test_an_open_clip_index_needs_a_vision_model_for_redux(redux_env, comfy, run_graph, tiny, pack):
    """Text queries go through an open_clip index (its text tower); Redux then needs the SigLIP to re-encode the
    neighbours: without one the error says which input to connect."""
    knn_embed = importlib.import_module(pack.__name__ + ".models.knn_embed")
    folder = Path(comfy.folder_paths.get_folder_paths(redux_env.FOLDER_OPEN_CLIP)[0])
    folder.mkdir(parents=True, exist_ok=True)
    knn_embed.save_open_clip(knn_embed.random_open_clip(tiny.TINY_OPEN_CLIP, seed=0), tiny.TINY_OPEN_CLIP,
                             folder / "tiny_redux_text.safetensors", arch="tiny")
    prompt = _graph("redux_warm", "redux_warm_text")
    prompt["42"] = {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": "tiny_redux_text.safetensors",
                                                                          "architecture": "from file"}}
    prompt["44"]["inputs"].pop("image")
    prompt["44"]["inputs"]["text"] = "a red circle"
    r = run_graph(prompt, want=["44", "47"])
    assert r["values"]["44"][1].last_hidden_state.shape == (1, 16, 48)  # found by text, re-encoded by SigLIP
    assert r["values"]["47"][0][0][0].shape[1] == 256 + 16
    prompt["44"]["inputs"].pop("clip_vision")
    headless = load_tool("headless")
    with pytest.raises(headless.WorkflowError, match=r"clip_vision: Flux Redux reads the hidden states of a siglip"):
        run_graph(prompt)


def test_redux_workflow_runs_in_tiny_mode(comfy, run_graph):
    """workflows/knn_flux_redux.json as shared (UNETLoader/DualCLIPLoader/VAELoader, Load CLIP Vision, Load Style
    Model, open_clip) becomes the tiny flux, SigLIP, Redux and open_clip; fewer images and steps here."""
    wf = comfy.load_workflow(ROOT / "workflows" / "knn_flux_redux.json")
    prompt = comfy.to_prompt(wf, tiny=True)
    kinds = {n["class_type"]: n for n in prompt.values()}
    assert {"AtelierTinyReduxLoader", "AtelierTinyCLIPVisionLoader", "AtelierTinyCheckpointLoader",
            "AtelierKNNTinyOpenCLIPLoader", "StyleModelApply"} <= set(kinds)
    assert not {"StyleModelLoader", "CLIPVisionLoader", "UNETLoader"} & set(kinds)
    assert kinds["AtelierTinyCLIPVisionLoader"]["inputs"]["kind"] == "siglip"
    mini = comfy.to_prompt(wf, tiny=True, mini=True)  # Mini has no Redux / SigLIP / Flux: tiny ones, said in titles
    titles = [n["_meta"]["title"] for n in mini.values()
              if n["class_type"] in ("AtelierTinyReduxLoader", "AtelierTinyCLIPVisionLoader")]
    assert len(titles) == 2 and all(t.endswith("(Atelier Mini has none)") for t in titles)
    assert any(n["class_type"] == "AtelierMiniKNNOpenCLIPLoader" for n in mini.values())
    for node in prompt.values():
        if node["class_type"] == "AtelierWorldFolder":
            node["inputs"].update(count=4, size=64)
        if node["class_type"] == "BasicScheduler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=64)
    apply_id = next(k for k, n in prompt.items() if n["class_type"] == "StyleModelApply")
    out_id = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    r = run_graph(prompt, want=[apply_id, out_id])
    assert r["values"][apply_id][0][0][0].shape[1] == 256 + 16
    assert torch.isfinite(r["values"][out_id][0]).all()


# ----------------------------------------------------------------------------- SDXL revision (unCLIP conditioning)

def _revision_graph(folder: str, index_name: str, path: str = "core", strength: float = 1.0) -> dict:
    """An SDXL revision workflow as users build it (an SDXL checkpoint, Load CLIP Vision clip_vision_g), the
    index built with that CLIP vision model, the query image's neighbours into core unCLIP Conditioning
    (``path`` 'core') or Atelier kNN Conditioning ('atelier', which checks the model). Run after substitute_tiny."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "41": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_g.safetensors"}},
        "42": {"class_type": "AtelierKNNCLIPVisionEmbedder", "inputs": {"clip_vision": ["41", 0]}},
        "43": {"class_type": "AtelierKNNBuildIndex", "inputs": {
            "embedder": ["42", 0], "folder": folder, "index_name": index_name, "index_type": "flat",
            "rebuild": False, "batch_size": 4}},
        "45": {"class_type": "LoadImage", "inputs": {"image": "redux_warm/01.png"}},
        "44": {"class_type": "AtelierKNNRetrieve", "inputs": {
            "index": ["43", 0], "embedder": ["42", 0], "text": "", "k": 2, "combine": "weighted mean",
            "temperature": 0.05, "image_size": 64, "image": ["45", 0]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["35", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if path == "core":
        p["35"] = {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": ["2", 0], "clip_vision_output": ["44", 1], "strength": strength, "noise_augmentation": 0.0}}
    else:
        p["35"] = {"class_type": "AtelierKNNConditioning", "inputs": {
            "conditioning": ["2", 0], "neighbours": ["44", 2], "strength": strength, "temperature": 0.05,
            "query_weight": 0.0, "mode": "weighted mean", "noise_augmentation": 0.0, "model": ["1", 0]}}
    return p


def test_sdxl_revision_workflow_becomes_tiny_revision_and_a_second_database_changes_it(redux_env, run_graph, pack):
    sub = importlib.import_module(pack.__name__ + ".models.tiny_substitution")
    prompt = sub.substitute_tiny(_revision_graph("redux_warm", "rev_warm"))
    assert prompt["1"]["class_type"] == "AtelierTinyUnCLIPCheckpointLoader" and prompt["1"]["inputs"]["family"] == "sdxl"
    assert prompt["41"]["class_type"] == "AtelierTinyCLIPVisionLoader" and prompt["41"]["inputs"]["kind"] == "clip_g"
    assert prompt["4"]["inputs"]["width"] == 64
    plain = sub.substitute_tiny({k: v for k, v in _revision_graph("redux_warm", "rev_warm").items() if k in "1234567"
                                 } | {"35": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}}})
    assert plain["1"]["class_type"] == "AtelierTinyCheckpointLoader"  # no image embeddings read: the plain tiny sdxl

    warm = run_graph(prompt, want=["44", "6", "1"])
    vision = warm["values"]["44"][1]
    assert vision.image_embeds.shape == (1, 1280)  # clip_vision_g-shaped, what SDXL's noise augmentor reads
    model = warm["values"]["1"][0]
    assert int(model.model.noise_augmentor.data_mean.shape[-1]) == 1280
    cool = run_graph(sub.substitute_tiny(_revision_graph("redux_cool", "rev_cool")), want=["6"])
    warm_img = warm["values"]["6"][0]
    assert torch.isfinite(warm_img).all()
    assert (cool["values"]["6"][0] - warm_img).abs().max() > 1e-3, "swapping the database must change the picture"

    # Atelier kNN Conditioning on the same neighbours: accepted by the model check, one 1280-d unCLIP entry
    ours = run_graph(sub.substitute_tiny(_revision_graph("redux_warm", "rev_warm", path="atelier")), want=["35", "6"])
    (entry,) = ours["values"]["35"][0][0][1]["unclip_conditioning"]
    assert entry["clip_vision_output"].image_embeds.shape == (1, 1280)
    assert torch.isfinite(ours["values"]["6"][0]).all()


def test_sdxl_revision_refuses_an_index_of_another_space_naming_the_input(redux_env, run_graph, pack):
    sub = importlib.import_module(pack.__name__ + ".models.tiny_substitution")
    prompt = _revision_graph("redux_warm", "rev_warm_h", path="atelier")
    prompt["41"]["inputs"]["clip_name"] = "clip_vision_h.safetensors"  # SD2.1 unCLIP-h's encoder: 32-d when tiny
    headless = load_tool("headless")
    with pytest.raises(headless.WorkflowError, match=r"neighbours: Dimension mismatch: the model reads 1280-d CLIP "
                                                     r"image embeddings, the index holds 32-d ones"):
        run_graph(sub.substitute_tiny(prompt))
