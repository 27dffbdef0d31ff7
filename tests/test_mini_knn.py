"""Atelier Mini kNN (issue 20.5): the trained open_clip and the unCLIP model that reads its image embeddings.

The shipped file loads through both loader nodes (and fails clearly when damaged), its CLIP vision output is the
open_clip's image tower, mini mode puts it into the kNN workflows, and there the two databases draw different
pictures, each in its own palette.
"""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from atelier_testlib import ROOT, load_tool

WARM, COOL = ("red", "orange", "yellow"), ("blue", "cyan", "purple")


@pytest.fixture(scope="module")
def mini(pack):
    return importlib.import_module(pack.__name__ + ".nodes.mini")


def test_shipped_knn_file_is_small_and_records_its_base(mini):
    path = mini.weights_path(mini.KNN_FAMILY)
    assert path.stat().st_size <= 4 * 1024 * 1024
    parts, meta = mini.read_knn_weights()
    assert set(parts) == {"unet", "open_clip"}
    assert meta["base"] == "atelier_mini_sd15.safetensors" and len(meta["base_sha256"]) == 64
    assert float(meta["text_image_top1"]) > 0.3  # text queries find their own caption's image among 512


def test_loaders_give_core_types_and_matching_embeddings(mini):
    model, clip, vae, clip_vision = mini.load_mini_unclip()
    embedder = mini.load_mini_knn_embedder()
    assert int(model.model.noise_augmentor.data_mean.shape[-1]) == embedder.dim == 32
    assert model.model.model_config.atelier_native_px == 64
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 64, 3, generator=g)
    a = torch.from_numpy(embedder.embed_images([images]))
    b = clip_vision.encode_image(images).image_embeds.detach()
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999  # core CLIP Vision Encode reads the same space
    # image embeddings are scaled to unit RMS (what the unCLIP noise augmentation assumes)
    world = importlib.import_module(mini.__name__.rsplit(".", 2)[0] + ".models.world")
    shots = [torch.from_numpy(world.sample(1, i, 64).image).float() / 255 for i in range(16)]
    rms = float(np.sqrt(np.mean(embedder.embed_images(shots) ** 2)))
    assert 0.7 < rms < 1.4, rms


def test_damaged_or_foreign_files_are_refused_clearly(mini, tmp_path):
    good = mini.weights_path(mini.KNN_FAMILY).read_bytes()
    bad = tmp_path / "atelier_mini_knn.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    for load in (mini.load_mini_unclip, mini.load_mini_knn_embedder):
        with pytest.raises(mini.MiniWeightsError, match="corrupt.*train_mini_knn.py"):
            load(bad)
    with pytest.raises(mini.MiniWeightsError, match="not an Atelier Mini knn file"):
        mini.load_mini_unclip(mini.weights_path("sd15"))
    with pytest.raises(mini.MiniWeightsError, match="not found"):
        mini.load_mini_knn_embedder(tmp_path / "nope.safetensors")
    with pytest.raises(mini.MiniWeightsError, match="trained against another atelier_mini_sd15"):
        mini._check_knn_base({"base_sha256": "0" * 64}, bad)


def test_mini_format_optional_parts(pack):
    fmt = importlib.import_module(pack.__name__ + ".models.mini_format")
    flat = fmt.pack({"unet": {"w": torch.ones(4, 4)}, "open_clip": {"b": torch.ones(3)}})
    parts = fmt.unpack(flat, required=("unet", "open_clip"))
    assert set(parts) == {"unet", "open_clip"}
    with pytest.raises(fmt.MiniFormatError, match="no 'clip.' tensors"):
        fmt.unpack(flat)  # a Mini checkpoint needs its text encoder and VAE


def test_mini_substitution_picks_the_mini_knn_models(pack):
    sub = importlib.import_module(pack.__name__ + ".models.tiny_substitution")
    prompt = {"1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "sd21-unclip-h.ckpt"}},
              "2": {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": "h.safetensors",
                                                                          "architecture": "ViT-H-14"}},
              "3": {"class_type": "AtelierKNNBuildIndex", "inputs": {"index_name": "demo", "embedder": ["2", 0]}}}
    out = sub.substitute_tiny(prompt, mini=True)
    assert [out[k]["class_type"] for k in "12"] == ["AtelierMiniUnCLIPCheckpointLoader", "AtelierMiniKNNOpenCLIPLoader"]
    assert out["1"]["inputs"] == out["2"]["inputs"] == {} and out["3"]["inputs"]["index_name"] == "demo_mini"
    tiny = sub.substitute_tiny(prompt)
    assert [tiny[k]["class_type"] for k in "12"] == ["AtelierTinyUnCLIPCheckpointLoader", "AtelierKNNTinyOpenCLIPLoader"]


def _palette_share(image: np.ndarray, palette) -> float:
    """Share of the picture's saturated pixels nearest to a colour of ``palette`` (of the world's eight)."""
    from colorsys import rgb_to_hsv
    world_colours = {"red": 0.0, "orange": 0.08, "yellow": 0.14, "green": 0.37, "cyan": 0.51, "blue": 0.63,
                     "purple": 0.77, "pink": 0.91}
    px = image.reshape(-1, 3)
    hsv = np.array([rgb_to_hsv(*p) for p in px[:: max(1, len(px) // 2048)]])
    sat = hsv[(hsv[:, 1] > 0.4) & (hsv[:, 2] > 0.3)]
    if not len(sat):
        return 0.0
    names = list(world_colours)
    hues = np.array([world_colours[n] for n in names])
    d = np.abs(sat[:, :1] - hues[None])
    nearest = np.minimum(d, 1 - d).argmin(1)
    return float(np.mean([names[i] in palette for i in nearest]))


def test_two_databases_workflow_on_mini_draws_each_palette(comfy, run_graph):
    """workflows/knn_two_databases.json in mini mode (12 images per database, 64 px, 10 steps): each database's
    picture holds more of its own palette than the other's, and the two pictures differ clearly."""
    prompt = comfy.to_prompt(json.loads((ROOT / "workflows" / "knn_two_databases.json").read_text()),
                             tiny=True, mini=True)
    types = {n["class_type"] for n in prompt.values()}
    assert {"AtelierMiniUnCLIPCheckpointLoader", "AtelierMiniKNNOpenCLIPLoader"} <= types
    assert not types & {"unCLIPCheckpointLoader", "AtelierKNNOpenCLIPLoader", "AtelierTinyUnCLIPCheckpointLoader"}
    for n in prompt.values():
        if n["class_type"] == "AtelierWorldFolder":
            n["inputs"].update(count=12, size=64, folder="test_mini_" + n["inputs"]["folder"])
        elif n["class_type"] == "KSampler":
            n["inputs"]["steps"] = 10
        elif n["class_type"] == "EmptyLatentImage":
            n["inputs"].update(width=64, height=64)
        elif n["class_type"] == "AtelierKNNBuildIndex":
            assert n["inputs"]["index_name"].endswith("_mini")
            n["inputs"]["index_name"] = "test_" + n["inputs"]["index_name"]
    decodes = sorted((n["inputs"]["samples"][0], nid) for nid, n in prompt.items() if n["class_type"] == "VAEDecode")
    titles = {nid: prompt[ks].get("_meta", {}).get("title", "") for ks, nid in decodes}
    a = next(nid for nid, t in titles.items() if t.endswith("A"))
    b = next(nid for nid, t in titles.items() if t.endswith("B"))
    r = run_graph(prompt, want=[a, b])
    warm, cool = (r["values"][nid][0][0].numpy() for nid in (a, b))
    assert np.abs(warm - cool).mean() > 0.03, "swapping the database must visibly change the picture"
    assert _palette_share(warm, WARM) > _palette_share(cool, WARM)
    assert _palette_share(cool, COOL) > _palette_share(warm, COOL)


@pytest.mark.slow
def test_training_runs_and_resumes(comfy, mini, tmp_path):
    tmk = load_tool("train_mini_knn")
    kw = dict(seed=3, clip_batch=16, batch=4, data=32, ckpt_dir=tmp_path / "ckpt", every=2)
    first = tmk.train(clip_steps=2, unet_steps=2, **kw)
    out = tmp_path / "atelier_mini_knn.safetensors"
    again = tmk.train(clip_steps=2, unet_steps=3, out=out, resume=True, **kw)
    assert first["steps"] == 2 and again["steps"] == 3
    model, clip, vae, cv = mini.load_mini_unclip(out)
    assert model.model.diffusion_model.input_blocks[0][0].weight.abs().sum() > 0
    assert mini.load_mini_knn_embedder(out).embed_texts(["a red circle"]).shape == (1, 32)


def test_captions_without_colours_name_the_same_shapes_and_no_colour(pack):
    """world.without_colours (the bench's shape prompts, the trainer's --colour-drop): every colour word goes, the
    shapes, sizes and their order stay, articles follow English."""
    world = importlib.import_module(pack.__name__ + ".models.world")
    assert world.without_colours("an orange ring left of a blue star") == "a ring left of a star"
    for s in world.prompt_set(7, 48):
        text = world.without_colours(s.caption)
        asked = world.parse_caption(text)
        assert [(r.shape, r.size) for r in asked] == [(o.shape, o.size if o.size != "medium" else None)
                                                     for o in s.objects], (s.caption, text)
        assert not any(r.color for r in asked) and " an " not in f" {text} ", text


def test_fine_tune_keeps_the_open_clip_and_reads_captions_without_colours(comfy, mini, tmp_path):
    """tools/train_mini_knn.py --init: the UNet trains on from the shipped file, the open_clip (so every index
    built with it) stays bit-identical, and --colour-drop changes what the UNet is trained on."""
    from safetensors import safe_open
    tmk = load_tool("train_mini_knn")
    shipped = mini.weights_path(mini.KNN_FAMILY)
    kw = dict(seed=3, init=shipped, unet_steps=2, batch=4, data=32, every=2, caption_drop=0.0, lr=1e-3)
    outs = {}
    for drop in (1e-9, 1.0):  # both draw the colour-drop mask (the same random stream); only 1.0 drops words
        outs[drop] = tmp_path / f"ft_{drop}.safetensors"
        s = tmk.train(out=outs[drop], ckpt_dir=tmp_path / f"ckpt_{drop}", colour_drop=drop, **kw)
        assert s["steps"] == 2 and "atelier_mini_knn.safetensors" in s["fine_tuned_from"]

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    base, _ = tensors(shipped)
    (a, meta_a), (b, meta_b) = tensors(outs[1e-9]), tensors(outs[1.0])
    assert set(a) == set(base) == set(b)
    clip_keys = [k for k in base if k.startswith("open_clip.")]
    assert clip_keys and all(torch.equal(base[k], a[k]) and torch.equal(base[k], b[k]) for k in clip_keys)
    unet_keys = [k for k in base if k.startswith("unet.") and k.endswith(".q8")]
    assert any(not torch.equal(base[k], a[k]) for k in unet_keys), "the UNet must train on from the file"
    assert any(not torch.equal(a[k], b[k]) for k in unet_keys), "--colour-drop must change the captions trained on"
    assert (meta_a["colour_drop"], meta_b["colour_drop"]) == ("1e-09", "1.0") and "fine_tuned_from" in meta_b
    assert mini.load_mini_knn_embedder(outs[1.0]).name.startswith("open_clip:atelier-mini-knn:")
    mini.load_mini_unclip(outs[1.0])
