"""Issue 14 for the kNN retriever and the world image folder, through ComfyUI's real executor:
nothing a user made is lost, nothing leaves its folder, Cancel acts, corrupt files are named.

Every name these tests write (folders in input/, index names, open_clip files) carries a unique suffix, and
indexes and open_clip files go to this module's own tmp folders (registered first, like the user's).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from atelier_testlib import load_tool
from PIL import Image, ImageDraw

SUFFIX = uuid.uuid4().hex[:8]


def _name(stem: str) -> str:
    return f"{stem}_{SUFFIX}"


def _images(folder: Path, n: int, seed: int, hue=(200, 40, 30), start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        img = Image.new("RGB", (40, 36), hue)
        x0, y0 = int(rng.integers(0, 16)), int(rng.integers(0, 12))
        ImageDraw.Draw(img).ellipse([x0, y0, x0 + 20, y0 + 18], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:02d}.png")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links not followed) -> its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(folder).as_posix()] = b"<link>" if p.is_symlink() else p.read_bytes()
    return out


@pytest.fixture(scope="module")
def env(comfy, pack, tmp_path_factory):
    knn_nodes = importlib.import_module(pack.__name__ + ".nodes.knn")
    knn_embed = importlib.import_module(pack.__name__ + ".models.knn_embed")
    tiny_family = importlib.import_module(pack.__name__ + ".nodes.tiny_family")
    for cls in knn_nodes.NODES:  # registered by the pack already; like test_knn_nodes, make sure
        node_id = cls.GET_SCHEMA().node_id
        if node_id not in comfy.node_classes:
            cls.RELATIVE_PYTHON_MODULE = knn_nodes.__name__
            comfy.node_classes[node_id] = cls
    root = tmp_path_factory.mktemp("robust_knn")
    fp = comfy.folder_paths
    (root / "open_clip").mkdir()
    clip = _name("tiny_knn") + ".safetensors"
    knn_embed.save_open_clip(knn_embed.random_open_clip(tiny_family.TINY_OPEN_CLIP, seed=0),
                             tiny_family.TINY_OPEN_CLIP, root / "open_clip" / clip, arch="tiny")
    fp.add_model_folder_path(knn_nodes.FOLDER_OPEN_CLIP, str(root / "open_clip"), is_default=True)
    fp.add_model_folder_path(knn_nodes.FOLDER_INDEX, str(root / "indexes"), is_default=True)
    input_dir = Path(fp.get_input_directory())
    made: list[Path] = []

    class Env:
        nodes = knn_nodes
        indexes = root / "indexes"
        open_clip = root / "open_clip"
        outside = root / "outside"  # a folder outside every ComfyUI folder
        clip_name = clip
        inp = input_dir

        @staticmethod
        def folder(stem: str, n: int = 0, seed: int = 0, hue=(200, 40, 30)) -> str:
            name = _name(stem)
            made.append(input_dir / name)
            if n:
                _images(input_dir / name, n, seed, hue)
            else:
                (input_dir / name).mkdir(parents=True, exist_ok=True)
            return name

    Env.outside.mkdir()
    yield Env
    for p in made:
        if p.is_symlink():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)


def _build(env, name: str, folder: str, rebuild: bool = False, batch_size: int = 2, embedder=None) -> dict:
    p = {
        "10": {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": env.clip_name,
                                                                    "architecture": "from file"}},
        "11": {"class_type": "AtelierKNNBuildIndex", "inputs": {
            "embedder": ["10", 0], "folder": folder, "index_name": name, "index_type": "auto",
            "rebuild": rebuild, "batch_size": batch_size}},
    }
    if embedder is not None:
        p["12"] = embedder
        p["11"]["inputs"]["embedder"] = ["12", 0]
    return p


def _load(name: str) -> dict:
    return {"20": {"class_type": "AtelierKNNIndexLoader", "inputs": {"database": name, "memory_map": "off"}},
            "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}}}


def _world(folder: str, count: int, seed: int = 0) -> dict:
    return {"1": {"class_type": "AtelierWorldFolder", "inputs": {"folder": folder, "colors": "red, blue", "shapes": "",
                                                                 "count": count, "size": 32, "seed": seed}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


def _error():
    return load_tool("headless").WorkflowError


@contextlib.contextmanager
def cancel_at(done: int):
    """Press Cancel (ComfyUI's own interrupt) as soon as a node's progress bar reaches `done`."""
    import comfy.model_management
    import comfy.utils
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value >= done:
            comfy.model_management.interrupt_current_processing()
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        comfy.model_management.interrupt_current_processing(False)


def _indexed_paths(run_graph, name: str) -> list[str]:
    index = run_graph(_load(name), want=["20"])["values"]["20"][0]
    return [f["path"] for f in index.files]


# ============================================================================ 1. data loss

def test_build_into_a_name_from_another_folder_or_embedder_is_refused_untouched(env, run_graph):
    a, b = env.folder("src_a", 3, seed=1), env.folder("src_b", 4, seed=2, hue=(20, 60, 220))
    name = _name("mine")
    run_graph(_build(env, name, a))
    idx = env.indexes / name
    before = _snapshot(idx)
    assert "atelier_knn.json" in before

    with pytest.raises(_error()) as e:
        run_graph(_build(env, name, b))
    msg = str(e.value)
    assert f"index_name: {idx} already holds a different" in msg and "left untouched" in msg
    assert str(env.inp / b) in msg and str(env.inp / a) in msg and "'rebuild'" in msg
    assert _snapshot(idx) == before

    other = {"class_type": "AtelierKNNTinyOpenCLIPLoader", "inputs": {"seed": 5}}  # same width, other model
    with pytest.raises(_error(), match="built with the embedder open_clip:tiny") as e:
        run_graph(_build(env, name, a, embedder=other))
    assert str(idx) in str(e.value) and "seed5" in str(e.value)
    assert _snapshot(idx) == before
    assert _indexed_paths(run_graph, name) == ["00.png", "01.png", "02.png"]

    r = run_graph(_build(env, name, b, rebuild=True), want=["11"])  # the explicit switch replaces it
    assert r["values"]["11"][0].root == str(env.inp / b) and len(r["values"]["11"][0]) == 4
    assert not (idx / ".rebuild").exists()


def test_unfinished_build_is_not_merged_with_another_folder(env, run_graph):
    a, b = env.folder("half_a", 6, seed=3), env.folder("half_b", 2, seed=4)
    name = _name("half")
    with cancel_at(2), pytest.raises(_error(), match="interrupted"):
        run_graph(_build(env, name, a))
    idx = env.indexes / name
    before = _snapshot(idx)
    assert any(k.endswith(".npy") for k in before), "the cancelled build keeps its first batch"
    with pytest.raises(_error(), match="interrupted build") as e:
        run_graph(_build(env, name, b))
    assert str(env.inp / a) in str(e.value)
    assert _snapshot(idx) == before
    run_graph(_build(env, name, a))  # the same folder resumes it
    assert _indexed_paths(run_graph, name) == [f"{i:02d}.png" for i in range(6)]


# ============================================================================ 2. folders and links

def test_world_folder_through_a_symlink_out_of_input_is_refused(env, run_graph):
    target = env.outside / _name("system")
    target.mkdir()
    (target / "world_0123abcd_00000.png").write_bytes(b"decoy named like ours")
    (target / "world_0123abcd_00000.txt").write_bytes(b"decoy caption")
    (target / "keep.cfg").write_bytes(b"system file")
    before = _snapshot(target)
    link = env.folder("world_link")
    os.rmdir(env.inp / link)
    (env.inp / link).symlink_to(target, target_is_directory=True)
    for folder in (link, f"{link}/sub"):
        with pytest.raises(_error(), match="folder: .*outside the folders") as e:
            run_graph(_world(folder, 3))
        assert str(target) in str(e.value)
        assert _snapshot(target) == before and sorted(os.listdir(target)) == sorted(before)


def test_world_folder_never_deletes_or_overwrites_a_file_it_did_not_write(env, run_graph):
    folder = env.folder("world_own")
    d = env.inp / folder
    run_graph(_world(folder, 4))
    ours = sorted(p.name for p in d.glob("world_*.png"))
    assert len(ours) == 4
    user = d / "world_deadbeef_00007.png"  # a user's file that merely matches the pattern
    user.write_bytes(b"my drawing")
    edited = d / ours[3].replace(".png", ".txt")
    edited.write_text("my own caption\n")  # one of ours, changed by the user since
    run_graph(_world(folder, 2))  # fewer: our unchanged extras go, the user's files stay
    assert user.read_bytes() == b"my drawing" and edited.read_text() == "my own caption\n"
    assert sorted(p.name for p in d.glob("world_*.png")) == sorted([*ours[:2], user.name])

    # a different file under the very name the node would write: refused, named, untouched
    other = env.folder("world_clash")
    run_graph(_world(other, 2, seed=1))
    first = sorted((env.inp / other).glob("world_*.png"))[0]
    shutil.rmtree(env.inp / other)
    (env.inp / other).mkdir()
    first.write_bytes(b"user picture")
    with pytest.raises(_error(), match="was not written by it") as e:
        run_graph(_world(other, 2, seed=1))
    assert str(first) in str(e.value) and first.read_bytes() == b"user picture"

    # a cancelled run records what it wrote: the next run finishes without refusing its own files
    resumed = env.folder("world_cancel")
    with cancel_at(2), pytest.raises(_error(), match="interrupted"):
        run_graph(_world(resumed, 5))
    assert 1 <= len(list((env.inp / resumed).glob("world_*.png"))) < 5
    run_graph(_world(resumed, 5))
    assert len(list((env.inp / resumed).glob("world_*.png"))) == 5


def test_build_skips_and_lists_links_leading_out_of_its_folder(env, run_graph):
    folder = env.folder("linked", 3, seed=5)
    elsewhere = env.outside / _name("elsewhere")
    _images(elsewhere, 2, seed=6)
    (env.inp / folder / "outside_dir").symlink_to(elsewhere, target_is_directory=True)
    (env.inp / folder / "outside.png").symlink_to(elsewhere / "00.png")
    name = _name("linked")
    r = run_graph(_build(env, name, folder), want=["11"])
    index, report = r["values"]["11"]
    assert [f["path"] for f in index.files] == ["00.png", "01.png", "02.png"]
    assert "outside_dir/ (links outside the folder)" in report and "outside.png (links outside the folder)" in report

    link = env.folder("link_to_outside")  # the folder itself a link in input/ pointing out: refused
    os.rmdir(env.inp / link)
    (env.inp / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(_error(), match="folder: .*outside the folders.*atelier_knn_images"):
        run_graph(_build(env, _name("via_link"), link))
    assert not (env.indexes / _name("via_link")).exists()


# ============================================================================ 3. cancel

def test_cancelled_rebuild_leaves_the_old_index_loadable(env, run_graph):
    folder = env.folder("rebuild", 6, seed=7)
    name = _name("rebuild")
    run_graph(_build(env, name, folder))
    idx = env.indexes / name
    old = run_graph(_load(name), want=["20"])["values"]["20"][0]
    old_files, old_vectors = list(old.files), np.array(old.vectors)
    committed = _snapshot(idx)

    with cancel_at(2), pytest.raises(_error(), match="interrupted at node 11"):
        run_graph(_build(env, name, folder, rebuild=True))
    assert {k: v for k, v in _snapshot(idx).items() if not k.startswith(".rebuild/")} == committed
    os.utime(idx / "atelier_knn.json")  # make Load Index read it again
    again = run_graph(_load(name), want=["20"])["values"]["20"][0]
    assert again.files == old_files and np.array_equal(np.asarray(again.vectors), old_vectors)
    assert name in env.nodes.index_names()

    r = run_graph(_build(env, name, folder, rebuild=True), want=["11"])  # resumes the rebuild, then swaps
    assert "4 embedded" in r["values"]["11"][1] and len(r["values"]["11"][0]) == 6
    assert not (idx / ".rebuild").exists() and len(list(idx.glob("gen-*"))) == 1


def test_cancel_acts_inside_the_embedding_forward(env, run_graph):
    import comfy.model_management
    folder = env.folder("forward", 2, seed=8)
    embedder = run_graph(_build(env, _name("fwd_warmup"), folder), want=["10"])["values"]["10"][0]
    visual = embedder.model.visual
    after = []
    h1 = visual.transformer.resblocks[0].register_forward_hook(
        lambda *a: comfy.model_management.interrupt_current_processing())
    h2 = visual.ln_post.register_forward_hook(lambda *a: after.append(1))
    name = _name("fwd")
    try:
        with pytest.raises(_error(), match="interrupted at node 11"):
            run_graph(_build(env, name, folder))  # the loader's embedder is reused from the cache
    finally:
        h1.remove(), h2.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert after == [], "the forward went on past the block where Cancel was pressed"
    assert not (env.indexes / name).exists()  # nothing was embedded, so nothing is left behind


# ============================================================================ 5. failed builds

def test_failed_build_leaves_no_folder_and_nothing_in_the_list(env, run_graph):
    empty = env.folder("empty")
    (env.inp / empty / "readme.txt").write_text("no images here")
    junk = env.folder("junk")
    (env.inp / junk / "a.png").write_bytes(b"not a png")
    listed = set(env.nodes.index_names())
    for folder, why in ((empty, "No images"), (junk, "None of the 1 image files")):
        name = _name("failed_" + folder[:5])
        with pytest.raises(_error(), match=why):
            run_graph(_build(env, name, folder))
        assert not (env.indexes / name).exists()
    assert set(env.nodes.index_names()) == listed

    good = env.folder("good", 2, seed=9)  # a failed rebuild: the old index stays, no staging left
    name = _name("keep")
    run_graph(_build(env, name, good))
    before = _snapshot(env.indexes / name)
    with pytest.raises(_error(), match="No images"):
        run_graph(_build(env, name, empty, rebuild=True))
    assert _snapshot(env.indexes / name) == before and not (env.indexes / name / ".rebuild").exists()


# ============================================================================ 4. corrupt files

@pytest.mark.parametrize("victim", ["vectors.npy", "norms.npy", "files.json", "index.faiss", "atelier_knn.json"])
def test_corrupt_index_file_is_named(env, run_graph, victim):
    folder = env.folder("corrupt", 3, seed=10)
    name = _name("corrupt_" + victim.split(".")[0])
    run_graph(_build(env, name, folder))
    idx = env.indexes / name
    path = idx / victim if victim == "atelier_knn.json" else next(idx.glob("gen-*")) / victim
    path.write_bytes(path.read_bytes()[: min(40, path.stat().st_size // 2)])  # truncated
    os.utime(idx / "atelier_knn.json")
    with pytest.raises(_error()) as e:
        run_graph(_load(name))
    msg = str(e.value)
    assert f"database: {victim} ({path}) is not a readable" in msg and "'rebuild' on" in msg


def test_corrupt_journal_shard_is_named(env, run_graph):
    folder = env.folder("shard", 6, seed=11)
    name = _name("shard")
    with cancel_at(2), pytest.raises(_error(), match="interrupted"):
        run_graph(_build(env, name, folder))
    shard = next((env.indexes / name).glob("journal-*/*.npy"))
    shard.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(_error()) as e:
        run_graph(_build(env, name, folder))
    assert f"index_name: {shard.name} ({shard}) is not a readable kNN journal shard file" in str(e.value)


def test_corrupt_open_clip_file_is_named(env, run_graph):
    good = (env.open_clip / env.clip_name).read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    cases = {_name("truncated") + ".safetensors": good[: header + 100],
             _name("badheader") + ".safetensors": len(b"{nonsense").to_bytes(8, "little") + b"{nonsense"}
    for fname, data in cases.items():
        (env.open_clip / fname).write_bytes(data)
    try:
        for fname in cases:
            prompt = _build(env, _name("clip_" + fname[:5]), env.folder("clip", 1, seed=12))
            prompt["10"]["inputs"]["clip_name"] = fname
            with pytest.raises(_error()) as e:
                run_graph(prompt)
            msg = str(e.value)
            assert f"clip_name: {fname} ({env.open_clip / fname}) is not a readable open_clip safetensors file" in msg
            assert "replace the file" in msg
    finally:
        for fname in cases:
            (env.open_clip / fname).unlink()


# ============================================================================ 6. the Milvus backend (embedded Milvus Lite)

def _milvus_build(env, name: str, folder: str, rebuild: bool = False, embedder=None) -> dict:
    p = _build(env, name, folder, rebuild=rebuild, embedder=embedder)
    p["11"]["inputs"].update(backend="milvus", milvus_uri="")
    return p


def _milvus_rows(env, name: str) -> list[tuple]:
    """Every row of the collection (path, key, size, mtime, sha256, norm), read from Milvus itself."""
    km = importlib.import_module(env.nodes.__name__.rsplit(".", 2)[0] + ".models.knn_milvus")
    target = env.nodes.milvus_target("", name, "index_name")
    call = km._Call(target)
    if not call.client.has_collection(name):
        return []
    rows = km._query_all(call, name, "", ["path", "size", "mtime_ns", "sha256", "norm"])
    assert len({r["key"] for r in rows}) == len(rows) == km.count(call, name), "duplicate keys"
    return sorted((r["path"], r["key"], r["size"], r["mtime_ns"], r["sha256"], round(r["norm"], 5)) for r in rows)


def test_milvus_collection_of_another_folder_is_refused_untouched_and_a_cancelled_rebuild_keeps_it(env, run_graph):
    a, b = env.folder("mv_a", 3, seed=11), env.folder("mv_b", 6, seed=12, hue=(20, 60, 220))
    name = _name("mv_mine")
    r = run_graph(_milvus_build(env, name, a), want=["11"])
    assert type(r["values"]["11"][0]).__name__ == "MilvusIndex" and "Milvus collection" in r["values"]["11"][1]
    before = _milvus_rows(env, name)
    assert [row[0] for row in before] == ["00.png", "01.png", "02.png"]
    with pytest.raises(_error(), match=f"index_name: Milvus collection '{name}' .* already holds a different index"
                                       ".*left untouched.*'rebuild'"):
        run_graph(_milvus_build(env, name, b))
    assert _milvus_rows(env, name) == before

    with cancel_at(2), pytest.raises(_error(), match="interrupted at node 11"):
        run_graph(_milvus_build(env, name, b, rebuild=True))
    assert _milvus_rows(env, name) == before, "the old collection is what Load Index reads until the swap"
    load = {"20": {"class_type": "AtelierKNNIndexLoader", "inputs": {
        "database": "unused", "memory_map": "off", "backend": "milvus", "milvus_uri": "", "collection": name}},
        "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}}}
    assert len(run_graph(load, want=["20"])["values"]["20"][0]) == 3
    r = run_graph(_milvus_build(env, name, b, rebuild=True), want=["11"])  # resumes the rebuild, then swaps
    assert "4 embedded" in r["values"]["11"][1] and len(r["values"]["11"][0]) == 6
    assert [row[0] for row in _milvus_rows(env, name)] == [f"{i:02d}.png" for i in range(6)]
    client = env.nodes.knn_milvus._Call(env.nodes.milvus_target("", name, "index_name")).client
    assert name + "__rebuild" not in client.list_collections()


def test_milvus_failed_build_leaves_no_collection(env, run_graph):
    empty = env.folder("mv_empty")
    (env.inp / empty / "readme.txt").write_text("no images here")
    junk = env.folder("mv_junk")
    (env.inp / junk / "a.png").write_bytes(b"not a png")
    for folder, why in ((empty, "No images"), (junk, "None of the 1 image files")):
        name = _name("mv_failed_" + folder[3:6])
        with pytest.raises(_error(), match=why):
            run_graph(_milvus_build(env, name, folder))
        client = env.nodes.knn_milvus._Call(env.nodes.milvus_target("", name, "index_name")).client
        assert name not in client.list_collections()
