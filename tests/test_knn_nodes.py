"""kNN retriever nodes in a real ComfyUI graph: build two databases from the input folder, retrieve by text,
condition a tiny unCLIP model through the core KSampler, and swap the database.

The tiny unCLIP model (SD2.1-unCLIP topology at 32 channels, reading 32-d image embeddings, with a tiny CLIP
vision model: nodes/tiny_family.build_unclip_family) is what tiny mode puts in place of unCLIPCheckpointLoader;
the embedder is a tiny open_clip saved as safetensors and loaded by the real loader node.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from atelier_testlib import load_tool
from PIL import Image, ImageDraw

TEST_NODE = "AtelierTinyUnCLIPCheckpointLoader"  # MODEL, CLIP, VAE, CLIP_VISION; reads 32-d image embeddings


def _images(folder, n, seed, shape, hue):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", (48, 40), hue)
        x0, y0 = int(rng.integers(0, 20)), int(rng.integers(0, 16))
        fg = tuple(int(c) for c in rng.integers(0, 256, 3))
        getattr(ImageDraw.Draw(img), shape)([x0, y0, x0 + 24, y0 + 20], fill=fg)
        img.save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def knn_env(comfy, pack, tmp_path_factory):
    knn_nodes = importlib.import_module(pack.__name__ + ".nodes.knn")
    knn_embed = importlib.import_module(pack.__name__ + ".models.knn_embed")
    for cls in knn_nodes.NODES:  # until nodes/__init__.py lists the feature, register it like ComfyUI does
        node_id = cls.GET_SCHEMA().node_id
        if node_id not in comfy.node_classes:
            cls.RELATIVE_PYTHON_MODULE = knn_nodes.__name__
            comfy.node_classes[node_id] = cls
    tiny_family = importlib.import_module(pack.__name__ + ".nodes.tiny_family")
    root = tmp_path_factory.mktemp("knn_nodes")

    fp = comfy.folder_paths
    (root / "open_clip").mkdir()
    knn_embed.save_open_clip(knn_embed.random_open_clip(tiny_family.TINY_OPEN_CLIP, seed=0), tiny_family.TINY_OPEN_CLIP,
                             root / "open_clip" / "tiny_knn.safetensors", arch="tiny")
    fp.add_model_folder_path(knn_nodes.FOLDER_OPEN_CLIP, str(root / "open_clip"), is_default=True)
    fp.add_model_folder_path(knn_nodes.FOLDER_INDEX, str(root / "indexes"), is_default=True)
    input_dir = Path(fp.get_input_directory())  # images live where a user's would
    _images(input_dir / "knn_warm", 6, 1, "ellipse", (220, 40, 30))
    _images(input_dir / "knn_cool", 6, 2, "rectangle", (20, 60, 230))
    return knn_nodes


def _build(name, folder):
    return {
        "10": {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": "tiny_knn.safetensors",
                                                                    "architecture": "from file"}},
        "11": {"class_type": "AtelierKNNBuildIndex", "inputs": {
            "embedder": ["10", 0], "folder": folder, "index_name": name, "index_type": "auto",
            "rebuild": False, "batch_size": 4}},
    }


def _generate(database, strength=1.0, model_node="20", text="a red circle"):
    return {
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": "tiny_knn.safetensors",
                                                                    "architecture": "from file"}},
        "11": {"class_type": "AtelierKNNIndexLoader", "inputs": {"database": database, "memory_map": "auto"}},
        "12": {"class_type": "AtelierKNNRetrieve", "inputs": {
            "index": ["11", 0], "embedder": ["10", 0], "text": text, "k": 3, "combine": "weighted mean",
            "temperature": 0.05, "image_size": 64}},
        "13": {"class_type": "AtelierKNNConditioning", "inputs": {
            "conditioning": ["2", 0], "neighbours": ["12", 2], "strength": strength, "temperature": 0.05,
            "query_weight": 0.0, "mode": "weighted mean", "noise_augmentation": 0.0, "model": [model_node, 0]}},
        "20": {"class_type": TEST_NODE, "inputs": {"seed": 0}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["20", 0], "positive": ["13", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def test_build_retrieve_condition_and_swap_database(knn_env, run_graph):
    for name, folder in (("warm", "knn_warm"), ("cool", "knn_cool")):
        r = run_graph(_build(name, folder), want=["11"])
        index, report = r["values"]["11"]
        assert len(index) == 6 and "6 images indexed" in report
    assert {"warm", "cool"} <= set(knn_env.index_names())

    warm = run_graph(_generate("warm"), want=["6", "12", "13"])
    images, vision, hits, report, _scores = warm["values"]["12"]
    assert images.shape == (3, 64, 64, 3) and vision.image_embeds.shape == (1, 32)
    assert all(p.endswith(".png") for p in hits.paths) and report.count("\n") == 2
    cond = warm["values"]["13"][0]
    assert len(cond[0][1]["unclip_conditioning"]) == 1

    cool = run_graph(_generate("cool"), want=["6", "12"])
    assert set(hits.paths) != set(cool["values"]["12"][2].paths) or hits.root != cool["values"]["12"][2].root
    warm_img, cool_img = warm["values"]["6"][0], cool["values"]["6"][0]
    assert torch.isfinite(warm_img).all()
    assert (warm_img - cool_img).abs().max() > 1e-4, "swapping the database must change the picture"

    again = run_graph(_generate("warm"), want=["6"])
    assert torch.equal(again["values"]["6"][0], warm_img)
    off = run_graph(_generate("warm", strength=0.0), want=["6"])
    assert (off["values"]["6"][0] - warm_img).abs().max() > 1e-4


def test_conditioning_refuses_a_model_without_unclip_input(knn_env, run_graph):
    headless = load_tool("headless")
    prompt = _generate("warm", model_node="1")
    with pytest.raises(headless.WorkflowError, match="takes no CLIP image embedding"):
        run_graph(prompt)


def test_widget_paths_stay_in_their_folders(knn_env, run_graph):
    headless = load_tool("headless")
    with pytest.raises(headless.WorkflowError, match="outside the folders"):
        run_graph(_build("escape", "../../etc"))
    with pytest.raises(headless.WorkflowError, match="no slashes"):
        run_graph(_build("../escape", "knn_warm"))
    with pytest.raises(headless.WorkflowError, match="No index named"):
        run_graph(_generate("does-not-exist"))


def test_clip_vision_index_image_query_feeds_core_unclip(knn_env, run_graph):
    """A ComfyUI CLIP_VISION model as the embedder; its re-encoded CLIP_VISION_OUTPUT into core unCLIPConditioning."""
    prompt = {
        "30": {"class_type": TEST_NODE, "inputs": {"seed": 0}},
        "31": {"class_type": "AtelierKNNCLIPVisionEmbedder", "inputs": {"clip_vision": ["30", 3]}},
        "32": {"class_type": "AtelierKNNBuildIndex", "inputs": {
            "embedder": ["31", 0], "folder": "knn_warm", "index_name": "warm_cv", "index_type": "flat",
            "rebuild": False, "batch_size": 4}},
        "33": {"class_type": "LoadImage", "inputs": {"image": "knn_warm/02.png"}},
        "34": {"class_type": "AtelierKNNRetrieve", "inputs": {
            "index": ["32", 0], "embedder": ["31", 0], "text": "", "k": 2, "combine": "weighted mean",
            "temperature": 0.05, "image_size": 64, "image": ["33", 0]}},
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "35": {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": ["2", 0], "clip_vision_output": ["34", 1], "strength": 1.0, "noise_augmentation": 0.0}},
        "20": {"class_type": TEST_NODE, "inputs": {"seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["20", 0], "positive": ["35", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    r = run_graph(prompt, want=["34", "6"])
    _images_out, vision, hits, _report, _scores = r["values"]["34"]
    assert hits.paths[0] == "02.png" and hits.scores[0] == pytest.approx(1.0, abs=1e-3)
    assert vision.image_embeds.shape == (1, 32) and vision.last_hidden_state.shape[0] == 1  # re-encoded, pooled
    assert torch.isfinite(r["values"]["6"][0]).all()

    headless = load_tool("headless")
    prompt["34"]["inputs"].pop("image")
    prompt["34"]["inputs"]["text"] = "a red circle"
    with pytest.raises(headless.WorkflowError, match="no text tower"):
        run_graph(prompt)


def test_two_databases_workflow_retrieves_from_each(knn_env, comfy, run_graph):
    """workflows/knn_two_databases.json in tiny mode (fewer images and steps): each Retrieve returns images of
    its own database only, and the two pictures differ."""
    from atelier_testlib import ROOT

    prompt = comfy.to_prompt(json.loads((ROOT / "workflows" / "knn_two_databases.json").read_text()), tiny=True)
    worlds = {nid: n for nid, n in prompt.items() if n["class_type"] == "AtelierWorldFolder"}
    retrieves = sorted(nid for nid, n in prompt.items() if n["class_type"] == "AtelierKNNRetrieve")
    decodes = sorted(nid for nid, n in prompt.items() if n["class_type"] == "VAEDecode")
    assert len(worlds) == 2 and len(retrieves) == 2 and len(decodes) == 2
    assert {n["class_type"] for n in prompt.values()} >= {"AtelierTinyUnCLIPCheckpointLoader",
                                                          "AtelierKNNTinyOpenCLIPLoader"}
    for n in worlds.values():
        n["inputs"].update(count=8, size=64, folder="test_" + n["inputs"]["folder"])
    for n in prompt.values():
        if n["class_type"] == "KSampler":
            n["inputs"]["steps"] = 2
        if n["class_type"] == "AtelierKNNBuildIndex":
            assert n["inputs"]["index_name"].endswith("_tiny")
            n["inputs"]["index_name"] = "test_" + n["inputs"]["index_name"]
    builds = sorted(nid for nid, n in prompt.items() if n["class_type"] == "AtelierKNNBuildIndex")
    r = run_graph(prompt, want=retrieves + decodes + list(worlds) + builds)
    colours = {}
    for nid in retrieves:
        hits = r["values"][nid][2]
        assert len(hits.paths) == 4
        words = set()
        for p in hits.paths:
            words |= set((Path(hits.root) / p).with_suffix(".txt").read_text().split())
        colours[nid] = words & {"red", "orange", "yellow", "blue", "cyan", "purple"}
    a, b = (colours[nid] for nid in retrieves)
    assert a and b and not a & b, f"each database must give its own images: {a} vs {b}"
    img_a, img_b = (r["values"][nid][0] for nid in decodes)
    assert (img_a - img_b).abs().max() > 1e-4

    # database B is a Milvus collection (embedded Milvus Lite); on faiss the same images give the same neighbours
    builds = {nid: prompt[nid] for nid in builds}
    backends = {n["inputs"].get("backend") for n in builds.values()}
    assert backends == {"faiss", "milvus"}
    by_backend = {n["inputs"]["backend"]: nid for nid, n in builds.items()}
    milvus_retrieve = next(nid for nid in retrieves if prompt[nid]["inputs"]["index"][0] == by_backend["milvus"])
    on_milvus = r["values"][milvus_retrieve][2]
    assert type(r["values"][by_backend["milvus"]][0]).__name__ == "MilvusIndex"
    prompt[by_backend["milvus"]]["inputs"].update(backend="faiss", index_name="test_b_on_faiss")
    on_faiss = run_graph(prompt, want=[milvus_retrieve])["values"][milvus_retrieve][2]
    assert on_faiss.paths == on_milvus.paths and on_faiss.root == on_milvus.root
    np.testing.assert_allclose(on_faiss.scores, on_milvus.scores, atol=1e-5)
    np.testing.assert_allclose(on_faiss.embeddings, on_milvus.embeddings, rtol=1e-5, atol=1e-6)


def _workflow(comfy, name):
    from atelier_testlib import ROOT
    return comfy.to_prompt(json.loads((ROOT / "workflows" / name).read_text()), tiny=True)


def test_build_index_workflow_gives_the_same_neighbours_on_both_backends(knn_env, comfy, run_graph, monkeypatch,
                                                                        caplog):
    """workflows/knn_build_index.json on faiss and on Milvus Lite: the same neighbours; a token set in the
    environment reaches the client but never the workflow, the prompt, the outputs or a log line."""
    import logging
    secret = "root:NeverShowThis77"
    monkeypatch.setenv("ATELIER_MILVUS_TOKEN", secret)
    hits = {}
    for backend in ("faiss", "milvus"):
        prompt = _workflow(comfy, "knn_build_index.json")
        for n in prompt.values():
            if n["class_type"] == "AtelierWorldFolder":
                n["inputs"].update(count=8, size=64, folder="test_same_neighbours")
            if n["class_type"] == "AtelierKNNBuildIndex":
                n["inputs"].update(backend=backend, index_name=f"test_same_{backend}")
        retrieve = next(nid for nid, n in prompt.items() if n["class_type"] == "AtelierKNNRetrieve")
        with caplog.at_level(logging.DEBUG):
            r = run_graph(prompt, want=[retrieve])
        hits[backend] = r["values"][retrieve][2]
        assert secret not in json.dumps(prompt) and "NeverShowThis77" not in r["values"][retrieve][3]
    assert hits["faiss"].paths == hits["milvus"].paths and len(hits["faiss"].paths) == 4
    np.testing.assert_allclose(hits["faiss"].scores, hits["milvus"].scores, atol=1e-5)
    from atelier_testlib import ROOT
    for wf in ROOT.glob("workflows/knn_*.json"):
        assert "ATELIER_MILVUS_TOKEN" not in wf.read_text() or "NeverShowThis77" not in wf.read_text()
    assert caplog.records and not [r_ for r_ in caplog.records if "NeverShowThis77" in r_.getMessage()]
    assert "NeverShowThis77" not in caplog.text


def _snapshot(folder: Path, skip: str) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and skip not in p.parts}


def _milvus_load(uri, collection="test_anything"):
    return {"40": {"class_type": "AtelierKNNIndexLoader", "inputs": {
        "database": "warm", "memory_map": "auto", "backend": "milvus", "milvus_uri": uri, "collection": collection}},
        "41": {"class_type": "PreviewAny", "inputs": {"source": ["40", 1]}}}


def test_unreachable_milvus_and_wrong_credentials_are_clear_and_touch_nothing(knn_env, comfy, run_graph,
                                                                             monkeypatch):
    import socket
    from concurrent import futures

    import grpc
    headless = load_tool("headless")
    monkeypatch.setenv("ATELIER_MILVUS_TOKEN", "root:NeverShowThis77")
    run_graph(_build("warm", "knn_warm"), want=["11"])
    indexes = Path(comfy.folder_paths.get_folder_paths(knn_env.FOLDER_INDEX)[0])
    before = _snapshot(indexes, knn_env.MILVUS_LITE_FILE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(headless.WorkflowError, match="milvus_uri: cannot reach the Milvus server at "
                                                     + closed.replace(".", r"\.")) as e:
        run_graph(_milvus_load(closed))
    assert "NeverShowThis77" not in str(e.value)

    class Deny(grpc.GenericRpcHandler):  # a listener answering like Milvus to a wrong user/password
        def service(self, details):
            def handler(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "auth check failure, please check username and "
                                                               "password are correct")
            return grpc.unary_unary_rpc_method_handler(handler)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Deny(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(headless.WorkflowError, match="refused the credentials.*ATELIER_MILVUS_TOKEN") as e:
            run_graph(_milvus_load(f"http://127.0.0.1:{port}"))
        assert "NeverShowThis77" not in str(e.value)
        with pytest.raises(headless.WorkflowError, match="carries a user or password"):
            run_graph(_milvus_load(f"http://root:pw@127.0.0.1:{port}"))
    finally:
        server.stop(0)
    with pytest.raises(headless.WorkflowError, match="no Atelier kNN collection 'test_missing'"):
        run_graph(_milvus_load("", "test_missing"))
    assert _snapshot(indexes, knn_env.MILVUS_LITE_FILE) == before, "no local index was touched"
    r = run_graph(_generate("warm"), want=["12"])  # the server keeps running: the local index still answers
    assert len(r["values"]["12"][2].paths) == 3


def test_milvus_token_comes_from_the_environment_or_a_token_file_never_an_input(knn_env, comfy, monkeypatch,
                                                                               tmp_path):
    fp = comfy.folder_paths
    monkeypatch.delenv("ATELIER_MILVUS_TOKEN", raising=False)
    assert knn_env.milvus_token() == ""
    token_file = tmp_path / "milvus_token"
    token_file.write_text("user:FromTheFile9\n")
    monkeypatch.setitem(fp.folder_names_and_paths, knn_env.FOLDER_MILVUS_TOKEN, ([str(token_file)], set()))
    assert knn_env.milvus_token() == "user:FromTheFile9"
    monkeypatch.setenv("ATELIER_MILVUS_TOKEN", "user:FromTheEnv8")
    target = knn_env.milvus_target("http://milvus.example:19530", "c", "collection")
    assert target.token == "user:FromTheEnv8" and "FromTheEnv8" not in repr(target)
    for node in (knn_env.AtelierKNNBuildIndex, knn_env.AtelierKNNIndexLoader):
        names = [i.id for i in node.GET_SCHEMA().inputs]
        assert not [n for n in names if "token" in n or "password" in n], names
