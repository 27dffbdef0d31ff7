"""kNN retriever, pure layer (models/knn*.py): CPU, no ComfyUI, no downloads.

A tiny open_clip architecture with seeded random weights is saved as safetensors and loaded back
through the real loader; images are small generated PNGs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from atelier_testlib import IN_CI, load_models

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_48 = {**TINY, "embed_dim": 48}

knn, knn_index, knn_embed = load_models("knn", "knn_index", "knn_embed")
KNNError = knn.KNNError
try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
    knn_milvus = load_models("knn_milvus")
except ImportError:  # the Milvus variants are skipped (requirements.txt installs both)
    knn_milvus = None


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    return knn_embed.save_open_clip(knn_embed.random_open_clip(TINY, seed=0), TINY, d / "tiny.safetensors", arch="tiny")


@pytest.fixture(scope="module")
def embedder(weights):
    return knn.load_open_clip(weights)


class Counting:
    """Wraps an embedder: counts images embedded, and can fail after `fail_after` images (a crash)."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.count = inner, fail_after, 0
        self.name, self.dim, self.image_size, self.has_text = inner.name, inner.dim, inner.image_size, inner.has_text

    def embed_images(self, images):
        if self.fail_after is not None and self.count + len(images) > self.fail_after:
            raise RuntimeError("simulated crash inside the embedder")
        self.count += len(images)
        return self.inner.embed_images(images)

    def embed_texts(self, texts):
        return self.inner.embed_texts(texts)


class Backend:
    """One database backend under test: ``db(stem)`` is what build_index/open_database take (an index folder for
    faiss, a collection in this module's Milvus Lite file for milvus), with helpers reading back what it holds."""

    def __init__(self, name: str, tmp_path: Path, lite_db: Path | None):
        self.name, self.tmp, self.lite_db = name, tmp_path, lite_db
        self.tag = tmp_path.name.replace("-", "_").replace(".", "_")[-40:]

    def db(self, stem: str = "idx"):
        if self.name == "faiss":
            return self.tmp / stem
        return knn_milvus.MilvusTarget(str(self.lite_db), f"t_{self.tag}_{stem}")

    def open(self, stem: str = "idx"):
        return knn.open_database(self.db(stem))

    def manifest(self, stem: str = "idx") -> dict | None:
        if self.name == "faiss":
            f = self.tmp / stem / "atelier_knn.json"
            return json.loads(f.read_text()) if f.is_file() else None
        call = knn_milvus._Call(self.db(stem))
        return knn_milvus.read_manifest(call, self.db(stem).collection)

    def paths_and_raw(self, index) -> tuple[list[str], np.ndarray]:
        """Every indexed path (sorted) and its raw embedding, read from the database itself."""
        if self.name == "faiss":
            raw = np.asarray(index.vectors) * np.asarray(index.norms)[:, None]
            return [f["path"] for f in index.files], raw
        call = knn_milvus._Call(index.target)
        rows = sorted(knn_milvus._query_all(call, index.name, "", ["path", "vector", "norm"]), key=lambda r: r["path"])
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == knn_milvus.count(call, index.name), "duplicate keys"
        return [r["path"] for r in rows], np.array([np.asarray(r["vector"]) * r["norm"] for r in rows], np.float32)


@pytest.fixture(scope="module")
def lite_db(tmp_path_factory):
    return tmp_path_factory.mktemp("milvus") / "knn_tests.db"


@pytest.fixture(params=["faiss", "milvus"])
def backend(request, tmp_path, lite_db):
    if request.param == "milvus" and knn_milvus is None:
        if IN_CI:
            pytest.fail("CI=true and pymilvus / milvus-lite are missing (pip install -r requirements.txt)")
        pytest.skip("pymilvus / milvus-lite not installed")
    return Backend(request.param, tmp_path, lite_db)


def make_images(folder: Path, n: int, seed: int, shape: str = "ellipse", hue=None, start: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        bg = tuple(int(c) for c in (hue if hue is not None else rng.integers(0, 256, 3)))
        img = Image.new("RGB", (40 + i % 7, 36), bg)
        fg = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, 15)), int(rng.integers(0, 12))
        getattr(ImageDraw.Draw(img), shape)([x0, y0, x0 + 20, y0 + 18], fill=fg)
        sub = folder / ("a" if i % 3 == 0 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(sub / f"img{i:03d}.png")
        img.save(paths[-1])
    return paths


def clustered(n, dim, seed, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(approx_ids, exact_ids):
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx_ids, exact_ids)]))


# ----------------------------------------------------------------------------- index kinds

def test_choose_kind_by_size():
    assert knn_index.choose_kind(99_999) == "flat"
    assert knn_index.choose_kind(100_000) == "ivf"
    assert knn_index.choose_kind(knn_index.IVFPQ_MIN) == "ivfpq"
    assert knn_index.choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(KNNError, match="Unknown index type"):
        knn_index.choose_kind(10, "annoy")


@pytest.mark.parametrize("kind,params", [
    ("ivf", {"nlist": 64, "nprobe": 16}),
    ("ivfpq", {"nlist": 64, "nprobe": 16, "rerank": 10}),
    ("hnsw", {}),
])
def test_recall_at_10_approximate_vs_exact(kind, params):
    x = clustered(20_000, 64, seed=1)
    q = clustered(200, 64, seed=2)
    exact, _ = knn_index.build(x, "flat")
    _, gt = knn_index.search(exact, {"kind": "flat"}, q, 10)
    threads = knn_index.faiss.omp_get_max_threads()
    knn_index.faiss.omp_set_num_threads(1)  # parallel HNSW insertion is not deterministic
    try:
        index, info = knn_index.build(x, kind, params)
    finally:
        knn_index.faiss.omp_set_num_threads(threads)
    assert info["kind"] == kind
    _, ids = knn_index.search(index, info, q, 10, vectors=x)
    r = recall_at(ids, gt)
    assert r >= 0.95, f"{kind} recall@10 {r:.3f}"


# ----------------------------------------------------------------------------- embedders

def test_open_clip_loads_from_safetensors_and_matches_the_model(weights, embedder):
    model = knn_embed.random_open_clip(TINY, seed=0)
    img = torch.rand(1, 32, 32, 3)
    mean, std = torch.tensor(knn_embed.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(knn_embed.OPENAI_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = model.encode_image((img.movedim(-1, 1) - mean) / std).numpy()
    np.testing.assert_allclose(embedder.embed_images([img]), ref, rtol=1e-4, atol=1e-5)
    assert embedder.embed_texts(["a red circle", "a blue square"]).shape == (2, 32)
    assert knn.load_open_clip(weights).name == embedder.name  # stable id across loads
    assert embedder.name.startswith("open_clip:tiny:")


def test_open_clip_refuses_pickle_and_wrong_architecture(tmp_path, weights):
    fake = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, fake)  # a zip pickle with a safetensors name
    with pytest.raises(KNNError, match="pickle"):
        knn.load_open_clip(fake)
    with pytest.raises(KNNError, match="does not match"):
        knn.load_open_clip(weights, config=TINY_48)
    with pytest.raises(KNNError, match="Unknown open_clip architecture"):
        knn.load_open_clip(weights, arch="no-such-arch")
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(KNNError, match="Cannot tell the open_clip architecture"):
        knn.load_open_clip(bare)


def test_callable_embedder_adapter_builds_and_has_no_text(tmp_path):
    model = knn_embed.random_open_clip(TINY, seed=3)

    def image_fn(batch):  # what the node layer does with ComfyUI's ClipVisionModel.encode_image
        with torch.inference_mode():
            return model.encode_image(batch.movedim(-1, 1))

    emb = knn.CallableEmbedder("comfy_clip_vision:test", 32, 32, image_fn)
    make_images(tmp_path / "imgs", 5, seed=0)
    knn.build_index(tmp_path / "imgs", tmp_path / "idx", emb)
    index = knn.KNNIndex(tmp_path / "idx")
    assert len(index.query_image(emb, torch.rand(1, 50, 40, 3), k=3)) == 3
    with pytest.raises(KNNError, match="no text tower"):
        index.query_text(emb, "anything", k=3)


# ----------------------------------------------------------------------------- build / reload

def test_build_reload_round_trip(tmp_path, embedder, backend):
    paths = make_images(tmp_path / "imgs", 12, seed=0)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    report = knn.build_index(tmp_path / "imgs", backend.db(), embedder, batch_size=5)
    assert (report.indexed, report.embedded, report.kind) == (12, 12, "flat")

    manifest = backend.manifest()
    assert manifest["embedder"]["name"] == embedder.name and manifest["dim"] == 32
    assert manifest["normalisation"] == "l2" and manifest["count"] == 12
    index = backend.open()
    rels = sorted(p.relative_to(tmp_path / "imgs").as_posix() for p in paths)
    assert [f["path"] for f in index.files] == rels
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 and f["mtime_ns"] > 0 for f in index.files)

    for mmap in ((False, True) if backend.name == "faiss" else ("auto",)):
        index = knn.open_database(backend.db(), mmap=mmap)
        probe = tmp_path / "imgs" / index.files[4]["path"]
        hits = index.query_image(embedder, Image.open(probe), k=5)
        assert hits.paths[0] == index.files[4]["path"] and hits.scores[0] == pytest.approx(1.0, abs=1e-4)
        assert list(hits.scores) == sorted(hits.scores, reverse=True)
        # raw embeddings come back as the model made them (unnormalised)
        np.testing.assert_allclose(hits.embeddings[0], embedder.embed_images([Image.open(probe)])[0], rtol=1e-4, atol=1e-5)
        assert hits.files()[0] == probe.resolve()
        assert np.asarray(index.load_image(int(hits.ids[0]))).shape == np.asarray(Image.open(probe).convert("RGB")).shape
    text_hits = index.query_text(embedder, "a red circle", k=20)
    assert len(text_hits) == 12 and text_hits.embeddings.shape == (12, 32)


def test_incremental_rebuild_embeds_only_new_and_changed_files(tmp_path, embedder, backend):
    folder = tmp_path / "imgs"
    paths = make_images(folder, 10, seed=0)
    first = Counting(embedder)
    knn.build_index(folder, backend.db(), first, batch_size=4)
    assert first.count == 10

    make_images(folder, 3, seed=9, start=100)                   # 3 new
    paths[0].unlink(), paths[1].unlink()                         # 2 removed
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # touched, same bytes
    Image.new("RGB", (30, 30), (1, 2, 3)).save(paths[3])        # content changed

    again = Counting(embedder)
    report = knn.build_index(folder, backend.db(), again, batch_size=4)
    assert again.count == 4, "only the 3 new files and the 1 changed file are embedded"
    assert (report.reused, report.removed, report.indexed) == (1, 2, 11)
    index = backend.open()
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    got, raw = backend.paths_and_raw(index)
    assert got == on_disk and len(index) == 11, "collection count == image count, no duplicate keys"
    changed = on_disk.index(paths[3].relative_to(folder).as_posix())
    np.testing.assert_allclose(raw[changed], embedder.embed_images([Image.open(paths[3])])[0], rtol=1e-4, atol=1e-5)

    idle = Counting(embedder)
    report = knn.build_index(folder, backend.db(), idle)
    assert idle.count == 0 and not report.changed


@pytest.mark.parametrize("crash_in", ["embedder", "progress"])
def test_crash_mid_build_resumes_without_duplicates_or_loss(tmp_path, embedder, crash_in, backend):
    folder = tmp_path / "imgs"
    make_images(folder, 14, seed=4)
    if crash_in == "embedder":
        crashing, progress = Counting(embedder, fail_after=8), None
    else:
        crashing = Counting(embedder)

        def progress(done, total):
            if done >= 8:
                raise RuntimeError("simulated crash in the progress callback")
    with pytest.raises(RuntimeError, match="simulated crash"):
        knn.build_index(folder, backend.db(), crashing, batch_size=4, progress=progress)
    if backend.name == "faiss":
        assert not (tmp_path / "idx" / "atelier_knn.json").exists()
        assert not (tmp_path / "idx" / ".build.lock").exists()
        # debris a hard kill could leave: an orphan shard and a torn last log line
        journal = next((tmp_path / "idx").glob("journal-*"))
        (journal / "deadbeef.npy").write_bytes(b"partial")
        with open(journal / "log.jsonl", "ab") as f:
            f.write(b'{"entries": [{"path": "a/img000.png"')
    else:
        assert backend.manifest()["finished"] is False
        with pytest.raises(KNNError, match="unfinished build"):
            backend.open()

    resumed = Counting(embedder)
    report = knn.build_index(folder, backend.db(), resumed, batch_size=4)
    assert resumed.count == 14 - 8, "the 8 saved images are not embedded again"
    index = backend.open()
    paths, raw = backend.paths_and_raw(index)
    assert len(paths) == len(set(paths)) == report.indexed == len(index) == 14
    if backend.name == "faiss":
        assert not (journal / "deadbeef.npy").exists()

    clean = tmp_path / "clean"
    knn.build_index(folder, clean, embedder)
    ref = knn.KNNIndex(clean)
    assert [f["path"] for f in ref.files] == paths
    np.testing.assert_allclose(raw, np.asarray(ref.vectors) * np.asarray(ref.norms)[:, None], rtol=1e-5, atol=1e-6)


KILL_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from pure_models import load_models
knn, knn_milvus = load_models("knn", "knn_milvus") if sys.argv[4] == "milvus" else (load_models("knn"), None)
emb = knn.load_open_clip(sys.argv[2])
db = knn_milvus.MilvusTarget(sys.argv[5], "killed") if knn_milvus else sys.argv[5]
def progress(done, total):
    print(done, flush=True)
    if done >= 8:
        time.sleep(60)  # the parent kills us here
knn.build_index(sys.argv[3], db, emb, batch_size=4, progress=progress)
"""


@pytest.mark.parametrize("backend", [pytest.param("faiss", marks=pytest.mark.slow), "milvus"], indirect=True)
def test_kill_mid_build_resumes_without_duplicates_or_loss(tmp_path, weights, embedder, backend):
    """A real SIGKILL of a build process (not an exception): the next build embeds only what was not saved."""
    import signal
    import subprocess
    import sys
    from atelier_testlib import ROOT
    folder = tmp_path / "imgs"
    make_images(folder, 14, seed=12)
    where = str(tmp_path / "own.db") if backend.name == "milvus" else str(tmp_path / "idx")  # Lite: one process/file
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ROOT / "tools"), str(weights), str(folder),
                             backend.name, where], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 8:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    db = knn_milvus.MilvusTarget(where, "killed") if backend.name == "milvus" else Path(where)
    with pytest.raises(KNNError, match="unfinished build|No kNN index"):
        knn.open_database(db)
    resumed = Counting(embedder)
    report = knn.build_index(folder, db, resumed, batch_size=4)
    assert resumed.count == 14 - 8, "the 8 images saved before the kill are not embedded again"
    index = knn.open_database(db)
    paths, _raw = backend.paths_and_raw(index)
    assert paths == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert report.indexed == len(index) == 14


def test_cancel_keeps_work_and_resumes(tmp_path, embedder, backend):
    folder = tmp_path / "imgs"
    make_images(folder, 9, seed=5)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # cancel before the third batch

    first = Counting(embedder)
    with pytest.raises(knn.KNNCancelled, match="resumes"):
        knn.build_index(folder, backend.db(), first, batch_size=3, cancel=cancel)
    assert first.count == 6
    second = Counting(embedder)
    assert knn.build_index(folder, backend.db(), second, batch_size=3).indexed == 9
    assert second.count == 3


def test_corrupt_images_are_skipped_and_reported(tmp_path, embedder, backend):
    folder = tmp_path / "imgs"
    make_images(folder, 4, seed=6)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = Image.new("RGB", (32, 32), (9, 9, 9))
    good.save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:40])
    report = knn.build_index(folder, backend.db(), embedder)
    assert report.indexed == 4
    assert {p for p, _ in report.skipped} == {"broken.jpg", "cut.png"}
    assert {b["path"] for b in backend.manifest()["skipped_files"]} == {"broken.jpg", "cut.png"}
    again = knn.build_index(folder, backend.db(), Counting(embedder))
    assert not again.changed and len(again.skipped) == 2
    good.save(folder / "cut.png")  # repaired: embedded now, no longer listed
    fixed = knn.build_index(folder, backend.db(), embedder)
    assert fixed.indexed == 5 and [p for p, _ in fixed.skipped] == ["broken.jpg"]


# ----------------------------------------------------------------------------- errors

def test_clear_errors(tmp_path, embedder, weights):
    with pytest.raises(KNNError, match="Image folder not found"):
        knn.build_index(tmp_path / "missing", tmp_path / "idx", embedder)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(KNNError, match="No images"):
        knn.build_index(tmp_path / "empty", tmp_path / "idx", embedder)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"nope")
    with pytest.raises(KNNError, match="None of the 1 image files"):
        knn.build_index(tmp_path / "junk", tmp_path / "idx", embedder)
    with pytest.raises(KNNError, match="No kNN index"):
        knn.KNNIndex(tmp_path / "nothing")
    with pytest.raises(KNNError, match="leaves its folder"):
        knn.safe_join(tmp_path, "../etc/passwd")
    with pytest.raises(KNNError, match="relative path"):
        knn.safe_join(tmp_path, "/etc/passwd")


def test_mismatched_embedder_dimension(tmp_path, embedder, backend):
    make_images(tmp_path / "imgs", 4, seed=7)
    knn.build_index(tmp_path / "imgs", backend.db(), embedder)
    other = knn_embed.save_open_clip(knn_embed.random_open_clip(TINY_48, seed=1), TINY_48, tmp_path / "w48.safetensors")
    wide = knn.load_open_clip(other)
    index = backend.open()
    with pytest.raises(KNNError, match="Dimension mismatch.*32-d.*48-d"):
        index.query_text(wide, "a cat", k=2)
    with pytest.raises(KNNError, match="Dimension mismatch"):
        knn.build_index(tmp_path / "imgs", backend.db(), wide)
    holder = {"faiss": "index", "milvus": "collection"}[index.backend]
    with pytest.raises(KNNError, match=f"Dimension mismatch: the query has 48 values, the {holder} {index.name} "
                                       "holds 32-d embeddings"):
        index.search(np.ones(48, np.float32), k=2)
    with pytest.raises(KNNError, match="k must be at least 1"):
        index.search(np.ones(32, np.float32), k=0)
    same_dim = knn.load_open_clip(knn_embed.save_open_clip(knn_embed.random_open_clip(TINY, seed=2), TINY,
                                                           tmp_path / "other32.safetensors"))
    with pytest.raises(KNNError, match="meaningless"):
        index.query_text(same_dim, "a cat", k=2)
    assert len(index.query_text(same_dim, "a cat", k=2, strict=False)) == 2


def test_concurrent_build_is_refused(tmp_path, embedder):
    make_images(tmp_path / "imgs", 2, seed=8)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / ".build.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(KNNError, match="being built by another process"):
        knn.build_index(tmp_path / "imgs", tmp_path / "idx", embedder)


# ----------------------------------------------------------------------------- databases

def test_two_databases_give_different_neighbours(tmp_path, embedder, backend):
    make_images(tmp_path / "warm", 8, seed=10, shape="ellipse", hue=(220, 40, 30))
    make_images(tmp_path / "cool", 8, seed=11, shape="rectangle", hue=(20, 60, 230))
    for name in ("warm", "cool"):
        knn.build_index(tmp_path / name, backend.db(name), embedder)
    warm, cool = backend.open("warm"), backend.open("cool")
    a, b = warm.query_text(embedder, "a red circle", k=4), cool.query_text(embedder, "a red circle", k=4)
    assert {str(p) for p in a.files()}.isdisjoint({str(p) for p in b.files()})
    assert not np.allclose(a.embeddings, b.embeddings)
    probe = Image.open(tmp_path / "warm" / warm.files[0]["path"])
    assert warm.query_image(embedder, probe, k=1).scores[0] > cool.query_image(embedder, probe, k=1).scores[0]


def test_combine_neighbours_for_unclip():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, 16)).astype(np.float32) * 3
    hits = knn.Neighbours(ids=np.arange(4), scores=np.array([0.9, 0.8, 0.5, 0.1], np.float32), paths=list("abcd"),
                          embeddings=emb, query=rng.standard_normal(16).astype(np.float32), root="/")
    np.testing.assert_allclose(knn.neighbour_weights(hits.scores, 0.0), 0.25)
    w = knn.neighbour_weights(hits.scores, 0.05)
    assert w.sum() == pytest.approx(1.0) and list(w) == sorted(w, reverse=True)
    vec, weights = knn.combine_neighbours(hits, temperature=0.05, query_weight=0.2)
    assert len(weights) == 5 and weights.sum() == pytest.approx(1.0) and weights[-1] == pytest.approx(0.2)
    parts = np.vstack([emb, hits.query])
    assert np.linalg.norm(vec) == pytest.approx(float(weights @ np.linalg.norm(parts, axis=1)), rel=1e-4)
    raw, _ = knn.combine_neighbours(hits, temperature=0.0, renormalise=False)
    np.testing.assert_allclose(raw, emb.mean(0), rtol=1e-5)
    with pytest.raises(KNNError):
        knn.combine_neighbours(hits, query_weight=1.5)


# ----------------------------------------------------------------------------- demo databases, tiny mode

knn_world, tiny_substitution = load_models("knn_world", "tiny_substitution")


class Record:
    """The interface of the glue's WrittenFiles record (which needs ComfyUI), in memory: what the node passes
    so that only files it wrote are replaced or removed."""

    def __init__(self, folder):
        self.folder, self.files = Path(folder), {}

    def owns(self, name):
        p = self.folder / name
        return name in self.files and not p.is_symlink() and p.is_file() and p.read_bytes() == self.files[name]

    def write(self, name, data):
        assert self.owns(name) or not (self.folder / name).exists()
        (self.folder / name).write_bytes(data)
        self.files[name] = data

    def remove(self, name):
        if self.owns(name):
            (self.folder / name).unlink()
            return True
        return False

    def save(self):
        pass


def test_world_folder_is_idempotent_filtered_and_in_sync(tmp_path):
    folder = tmp_path / "warm"
    rec = Record(folder)
    paths, captions, written = knn_world.write_world_folder(folder, seed=3, count=6, size=64, colors="red, orange",
                                                            written=rec)
    assert written == 6 and len(paths) == 6 and all(p.is_file() for p in paths)
    assert all(("red" in c or "orange" in c) for c in captions)
    words = " ".join(captions).split()
    assert not {"blue", "cyan", "purple", "green", "yellow", "pink"} & set(words)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "mine.png").write_bytes(b"user file")
    again, captions2, written2 = knn_world.write_world_folder(folder, seed=3, count=6, size=64, colors="red, orange",
                                                                 written=rec)
    assert written2 == 0 and captions2 == captions
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "mine.png"} == before
    fewer, _, _ = knn_world.write_world_folder(folder, seed=3, count=4, size=64, colors="red, orange", written=rec)
    assert sorted(p.name for p in folder.glob("world_*.png")) == sorted(p.name for p in fewer)
    assert (folder / "mine.png").read_bytes() == b"user file"  # only our own files are removed
    other, _, _ = knn_world.write_world_folder(folder, seed=3, count=4, size=64, colors="blue", written=rec)
    assert {p.name for p in folder.glob("world_*.png")} == {p.name for p in other}  # settings changed: replaced
    assert not {p.name for p in other} & {p.name for p in fewer}
    with pytest.raises(KNNError, match="colors: unknown teal"):
        knn_world.write_world_folder(folder, colors="teal")
    with pytest.raises(KNNError, match="count"):
        knn_world.write_world_folder(folder, count=0)


def test_tiny_substitution_maps_knn_loaders_and_keeps_indexes_apart():
    prompt = {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "sd21-unclip-h.ckpt"}},
        "2": {"class_type": "AtelierKNNOpenCLIPLoader", "inputs": {"clip_name": "a.safetensors",
                                                                   "architecture": "ViT-H-14"}},
        "3": {"class_type": "AtelierKNNBuildIndex", "inputs": {"embedder": ["2", 0], "index_name": "photos"}},
        "4": {"class_type": "AtelierKNNIndexLoader", "inputs": {"database": "photos", "memory_map": "auto"}},
        "5": {"class_type": "AtelierKNNBuildIndex", "inputs": {"embedder": ["2", 0], "index_name": ["9", 0]}},
    }
    out = tiny_substitution.substitute_tiny(prompt)
    assert out["1"]["class_type"] == "AtelierTinyUnCLIPCheckpointLoader"
    assert out["1"]["inputs"] == {"seed": tiny_substitution.tiny_seed_for("sd21-unclip-h.ckpt")}
    assert out["2"]["class_type"] == "AtelierKNNTinyOpenCLIPLoader"
    assert out["3"]["inputs"]["index_name"] == "photos_tiny" and out["3"]["inputs"]["embedder"] == ["2", 0]
    assert out["4"]["inputs"]["database"] == "photos_tiny"
    assert out["5"]["inputs"]["index_name"] == ["9", 0]  # links are left alone
    assert prompt["3"]["inputs"]["index_name"] == "photos"  # the input prompt is not modified
    assert tiny_substitution.substitute_tiny(out) == out  # idempotent (the server may see a prompt twice)


def test_random_open_clip_embedder_is_seeded():
    a = knn_embed.random_open_clip_embedder(TINY, seed=1)
    b = knn_embed.random_open_clip_embedder(TINY, seed=1)
    c = knn_embed.random_open_clip_embedder(TINY, seed=2)
    ta, tb, tc = (e.embed_texts(["a red circle"]) for e in (a, b, c))
    assert a.name == b.name != c.name and a.dim == 32
    assert np.array_equal(ta, tb) and not np.allclose(ta, tc)


# ----------------------------------------------------------------------------- Milvus only

def _milvus_or_skip():
    if knn_milvus is None:
        if IN_CI:
            pytest.fail("CI=true and pymilvus / milvus-lite are missing")
        pytest.skip("pymilvus / milvus-lite not installed")


def test_milvus_rows_are_partitioned_by_key_range_and_index_type_follows_size(tmp_path, embedder, lite_db):
    _milvus_or_skip()
    make_images(tmp_path / "imgs", 24, seed=3)
    target = knn_milvus.MilvusTarget(str(lite_db), "partitioned")
    knn.build_index(tmp_path / "imgs", target, embedder, batch_size=8)
    call = knn_milvus._Call(target)
    assert set(call.client.list_partitions("partitioned")) >= set(knn_milvus.PARTITIONS)
    seen = 0
    for part in knn_milvus.PARTITIONS:
        rows = call.client.query("partitioned", filter='key != ""', output_fields=["key", "path"],
                                 partition_names=[part])
        assert all(knn_milvus.partition_of(r["key"]) == part == "h" + knn_milvus.path_key(r["path"])[0] for r in rows)
        seen += len(rows)
    assert seen == 24
    # size decides the type as for faiss; Lite has no PQ
    assert [knn_milvus.choose_kind(n) for n in (99_999, 100_000, knn_milvus.IVFPQ_MIN)] == ["flat", "ivf", "ivfpq"]
    assert knn_milvus.choose_kind(knn_milvus.IVFPQ_MIN, lite=True) == "ivf"
    with pytest.raises(KNNError, match="no product-quantisation"):
        knn_milvus.choose_kind(10, "ivfpq", lite=True)
    assert knn_milvus.index_params("ivf", 1_000_000, 768)["params"]["nlist"] == 4096  # faiss's list count
    # an explicit HNSW replaces the flat index and answers the same top-1 for a stored image
    flat = knn.open_database(target)
    probe = Image.open(tmp_path / "imgs" / flat.files[5]["path"])
    report = knn.build_index(tmp_path / "imgs", target, embedder, kind="hnsw")
    assert report.changed and report.kind == "hnsw" and report.embedded == 0
    assert call.client.describe_index("partitioned", "vector")["index_type"] == "HNSW"
    hnsw = knn.open_database(target)
    assert hnsw.query_image(embedder, probe, k=1).paths == flat.query_image(embedder, probe, k=1).paths


def test_milvus_rebuild_swaps_in_only_when_complete(tmp_path, embedder, lite_db):
    _milvus_or_skip()
    make_images(tmp_path / "a", 6, seed=1)
    make_images(tmp_path / "b", 9, seed=2, shape="rectangle")
    target = knn_milvus.MilvusTarget(str(lite_db), "swapped")
    knn.build_index(tmp_path / "a", target, embedder)
    with pytest.raises(knn.IndexConflict, match="built from the folder"):
        knn.build_index(tmp_path / "b", target, embedder)
    calls = []
    with pytest.raises(knn.KNNCancelled):
        knn.build_index(tmp_path / "b", target, embedder, rebuild=True, batch_size=3,
                        cancel=lambda: calls.append(1) or len(calls) > 2)
    old = knn.open_database(target)
    assert len(old) == 6 and old.root == str((tmp_path / "a").resolve()), "the old collection stays as it was"
    report = knn.build_index(tmp_path / "b", target, embedder, rebuild=True, batch_size=3)
    assert report.embedded == 3, "the cancelled rebuild's batches are reused"
    new = knn.open_database(target)
    assert len(new) == new.live_count() == 9 and new.root == str((tmp_path / "b").resolve())
    assert "swapped__rebuild" not in knn_milvus._Call(target).client.list_collections()


def test_migrate_faiss_index_into_milvus_without_reembedding(tmp_path, embedder, lite_db):
    _milvus_or_skip()
    make_images(tmp_path / "imgs", 10, seed=5)
    knn.build_index(tmp_path / "imgs", tmp_path / "faiss", embedder)
    target = knn_milvus.MilvusTarget(str(lite_db), "migrated")
    info = knn_milvus.migrate_faiss(tmp_path / "faiss", target)
    assert info["count"] == 10
    with pytest.raises(KNNError, match="already exists"):
        knn_milvus.migrate_faiss(tmp_path / "faiss", target)
    a, b = knn.KNNIndex(tmp_path / "faiss"), knn.open_database(target)
    for text in ("a red circle", "a blue square"):
        ha, hb = a.query_text(embedder, text, k=5), b.query_text(embedder, text, k=5)
        assert ha.paths == hb.paths
        np.testing.assert_allclose(ha.scores, hb.scores, atol=1e-5)
        np.testing.assert_allclose(ha.embeddings, hb.embeddings, rtol=1e-5, atol=1e-6)
    idle = Counting(embedder)  # the migrated collection is a normal one: an update embeds nothing
    assert not knn.build_index(tmp_path / "imgs", target, idle).changed and idle.count == 0


def test_milvus_uri_and_name_errors():
    _milvus_or_skip()
    with pytest.raises(KNNError, match="carries a user or password.*ATELIER_MILVUS_TOKEN") as e:
        knn_milvus.check_uri("http://root:Secret123@localhost:19530")
    assert "Secret123" not in str(e.value)
    with pytest.raises(KNNError, match="neither a server address"):
        knn_milvus.check_uri("/tmp/somewhere")
    with pytest.raises(KNNError, match="not a valid Milvus collection name"):
        knn_milvus.check_collection_name("my-images")


def test_milvus_conflict_of_a_manifest_whose_embedder_record_has_no_dim(tmp_path):
    """An older manifest's embedder record may lack "dim" (the manifest's own "dim" is checked on reading): the
    conflict is still reported with the held width, not a KeyError."""
    _milvus_or_skip()
    m = {"dim": 32, "embedder": {"name": "tiny"}, "root": str(tmp_path)}
    target = knn_milvus.MilvusTarget("/tmp/x.db", "mine", input_name="milvus_uri", name_input="index_name")
    with pytest.raises(knn.IndexConflict, match="Dimension mismatch: it holds 32-d embeddings from tiny, big makes 48-d"):
        knn_milvus._check_same(m, tmp_path, {"dim": 48, "name": "big"}, target, "index_name", "rebuild")


@pytest.fixture
def deny_listener():
    """A local gRPC server that answers every call UNAUTHENTICATED, as Milvus does for a wrong user/password."""
    import grpc
    from concurrent import futures

    class Deny(grpc.GenericRpcHandler):
        def service(self, details):
            def handler(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "auth check failure, please check username and password are correct")
            return grpc.unary_unary_rpc_method_handler(handler)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Deny(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop(0)


def test_milvus_unreachable_server_and_wrong_credentials_are_clear(tmp_path, embedder, deny_listener):
    _milvus_or_skip()
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    make_images(tmp_path / "imgs", 2, seed=0)
    secret = "root:VerySecret42"
    for uri, what in ((closed, "cannot reach the Milvus server at " + closed), (deny_listener, "refused the credentials")):
        target = knn_milvus.MilvusTarget(uri, "anything", token=secret, timeout=3)
        for action in (lambda: knn.open_database(target), lambda: knn.build_index(tmp_path / "imgs", target, embedder)):
            with pytest.raises(KNNError, match=what) as e:
                action()
            assert "VerySecret42" not in str(e.value)
            assert ("ATELIER_MILVUS_TOKEN" if "credentials" in what else "no local index was touched") in str(e.value)
    assert "VerySecret42" not in repr(target)


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A real Milvus-protocol server on a TCP port: milvus-lite's own server command, started as a process."""
    if knn_milvus is None:
        _milvus_or_skip()
    import shutil
    import socket
    import subprocess
    import sys
    import time
    data = tmp_path_factory.mktemp("milvus_server") / "server.db"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("milvus-lite")
    cmd = [exe] if exe else [sys.executable, "-m", "milvus_lite.cmdline"]
    proc = subprocess.Popen([*cmd, "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the milvus-lite server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_milvus_server_uri_builds_and_queries_like_lite_and_faiss(tmp_path, embedder, milvus_server, lite_db):
    """http://host:port goes through the very same code as a .db file, and all three give the same neighbours."""
    make_images(tmp_path / "imgs", 8, seed=7)
    server = knn_milvus.MilvusTarget(milvus_server, "served")
    lite = knn_milvus.MilvusTarget(str(lite_db), "served_lite")
    for db in (server, lite, tmp_path / "faiss"):
        assert knn.build_index(tmp_path / "imgs", db, embedder, batch_size=3).indexed == 8
    hits = [knn.open_database(db).query_text(embedder, "a red circle", k=4) for db in (server, lite, tmp_path / "faiss")]
    assert hits[0].paths == hits[1].paths == hits[2].paths
    np.testing.assert_allclose(hits[0].scores, hits[2].scores, atol=1e-5)
    assert knn.open_database(server).live_count() == 8
