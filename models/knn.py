"""KNN-Diffusion retriever: a local CLIP index of a folder of images, queried by text or image.

    embedder = load_open_clip("ViT-L-14.safetensors", arch="ViT-L-14")
    report = build_index("~/Pictures/moodboard", "models/atelier/knn_index/moodboard", embedder)
    index = KNNIndex("models/atelier/knn_index/moodboard")
    hits = index.query_text(embedder, "a red bicycle", k=8)   # hits.paths, hits.scores, hits.embeddings

Pure torch/numpy/faiss/open_clip; the ComfyUI glue is in ``nodes/knn.py``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import knn_index
from .knn_common import (
    IMAGE_EXTENSIONS,
    REBUILD_FIX,
    KNNCancelled,
    KNNError,
    bad_file,
    check_index_name,
    safe_join,
)
from .knn_embed import (
    CallableEmbedder,
    Embedder,
    OpenClipEmbedder,
    describe,
    file_fingerprint,
    load_open_clip,
    to_square_batch,
)
from .knn_store import IndexStore, ScannedFile, scan_folder, sha256_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildReport",
    "CallableEmbedder",
    "Embedder",
    "KNNCancelled",
    "KNNError",
    "KNNIndex",
    "IndexConflict",
    "Neighbours",
    "OpenClipEmbedder",
    "build_index",
    "check_index_name",
    "combine_neighbours",
    "describe",
    "file_fingerprint",
    "knn_index",
    "load_open_clip",
    "open_database",
    "neighbour_weights",
    "safe_join",
    "scan_folder",
    "to_square_batch",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Cancel = Callable[[], object]


@dataclass
class BuildReport:
    index_dir: str
    files: int = 0            # image files found
    indexed: int = 0          # entries in the index now
    embedded: int = 0         # images run through the embedder in this build
    reused: int = 0           # new/changed files whose content was already embedded (same sha256)
    removed: int = 0          # entries dropped because their file is gone or changed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    kind: str = ""
    changed: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        s = (f"{self.indexed} images indexed ({self.kind}) from {self.files} files: {self.embedded} embedded, "
             f"{self.reused} reused, {self.removed} removed, {len(self.skipped)} skipped, {self.seconds:.1f} s")
        if self.skipped:
            s += "\nskipped: " + "; ".join(f"{p} ({r})" for p, r in self.skipped[:10])
            if len(self.skipped) > 10:
                s += f"; … {len(self.skipped) - 10} more"
        return s


class IndexConflict(KNNError):
    """The index name holds an index built from another folder or with another embedder (or an unfinished
    build of one): nothing was changed. ``differences`` lists what differs, for the caller's wording."""

    def __init__(self, message: str, path: Path, differences: list[str], input: str | None = None):  # noqa: A002
        super().__init__(message, input)
        self.path, self.differences = path, differences


def _check_same_index(store: IndexStore, folder: Path, meta: dict, name_input: str, switch: str) -> None:
    """An incremental build may only add to an index of the same folder and embedder; anything else would
    replace or mix it. Refuses (touching nothing) with the choices: another name, or the rebuild switch."""
    m = store.manifest
    if m:
        built = m.get("embedder", {})
        root, what = m.get("root"), "a different index"
    else:
        owner = store.journal_owner()
        if owner is None:
            return
        built, root, what = {"name": owner["embedder"]}, owner["root"], "an unfinished build of a different index"
    diffs = [] if m else ["no finished index yet, only the embeddings of an interrupted build"]
    if "dim" in built and int(built["dim"]) != int(meta["dim"]):
        diffs.append(f"Dimension mismatch: it holds {built['dim']}-d embeddings from {built.get('name')}, "
                     f"{meta['name']} makes {meta['dim']}-d ones")
    elif built.get("name") != meta["name"]:
        diffs.append(f"it was built with the embedder {built.get('name')}, not {meta['name']}")
    if root != str(folder):
        diffs.append(f"it was built from the folder {root}, not {folder}")
    if len(diffs) > (0 if m else 1):
        raise IndexConflict(f"{name_input}: {store.dir} already holds {what} ({'; '.join(diffs)}); it was left "
                            f"untouched; pick a new {name_input}, or turn '{switch}' on to replace it",
                            store.dir, diffs, name_input)


def _check_cancel(cancel: Cancel | None, done: int) -> None:
    if cancel is not None and cancel():
        raise KNNCancelled(f"Index build cancelled after {done} new images; they are saved, "
                           "and running the build again resumes from there.")


def _read_image(path: Path, size: int) -> tuple[bytes | None, Image.Image | None, str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, None, f"unreadable: {e.strerror or e}"
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, never below `size`
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.load()
        return data, img, ""
    except UnidentifiedImageError:
        return data, None, "not an image, or a format Pillow cannot read"
    except Exception as e:  # noqa: BLE001  (PIL raises many types for truncated or broken files)
        return data, None, f"broken image ({type(e).__name__}: {e})"


def _is_milvus(target) -> bool:
    return type(target).__name__ == "MilvusTarget"


def check_image_folder(folder: str | os.PathLike) -> Path:
    """The resolved image folder of a build, or the error naming the `folder` input."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise KNNError(f"folder: Image folder not found: {folder}; check the name (relative to ComfyUI's input "
                       "folder)", "folder")
    if not folder.is_dir():
        raise KNNError(f"folder: Not a folder: {folder}; give the folder that holds the images", "folder")
    return folder.resolve()


def no_images_error(folder: Path, scan_skipped: list) -> KNNError:
    extra = f" ({len(scan_skipped)} skipped: " + "; ".join(f"{p} ({r})" for p, r in scan_skipped[:5]) + ")" \
        if scan_skipped else ""
    return KNNError(f"folder: No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {folder} or its "
                    f"subfolders{extra}; put the images there, or pick the folder that holds them", "folder")


def open_database(target, mmap: bool | str = "auto", input_name: str = "database"):
    """A committed database for queries: a faiss index folder (KNNIndex) or a Milvus collection
    (knn_milvus.MilvusTarget -> knn_milvus.MilvusIndex); both have the same query interface."""
    if _is_milvus(target):
        from . import knn_milvus
        return knn_milvus.MilvusIndex(target)
    return KNNIndex(target, mmap=mmap, input_name=input_name)


def build_index(folder: str | os.PathLike, index_dir: str | os.PathLike, embedder: Embedder,
                kind: str = "auto", index_params: dict | None = None, batch_size: int = 16,
                progress: Progress | None = None, cancel: Cancel | None = None,
                rebuild: bool = False, name_input: str = "index_name", switch: str = "rebuild") -> BuildReport:
    """Embed the images under `folder` (recursive) into the index at `index_dir`.

    Incremental: files whose size and mtime are unchanged are not read again; changed files whose
    content hash is already known reuse their embedding; files that are gone are dropped. Only an index
    of the same folder and embedder is updated: any other is refused untouched (`IndexConflict`) unless
    `rebuild` replaces it.
    Resumable: every batch is journalled durably, so after a crash or a cancel the next call embeds
    only what is missing. `progress(done, total)` is called per batch; `cancel()` is polled per batch
    and may return True or raise (the node layer's interrupt check raises).
    A rebuild embeds beside the committed index (``.rebuild/``) and replaces it only at its commit: until
    then, and after a failed or cancelled rebuild, the old index stays loadable as it was.
    A build that fails leaving nothing worth keeping leaves no index folder behind.
    `name_input` / `switch` name the index input and the rebuild switch in messages (node or CLI)."""
    if _is_milvus(index_dir):  # the same build on a Milvus collection (models/knn_milvus.py)
        from . import knn_milvus
        return knn_milvus.build_collection(folder, index_dir, embedder, kind=kind, index_overrides=index_params,
                                           batch_size=batch_size, progress=progress, cancel=cancel, rebuild=rebuild,
                                           name_input=name_input, switch=switch)
    t0 = time.perf_counter()
    folder = check_image_folder(folder)
    knn_index.choose_kind(0, kind)  # validate early
    meta = _embedder_meta(embedder)
    main = IndexStore(Path(index_dir).expanduser(), name_input)
    report = BuildReport(index_dir=str(main.dir))
    owner = {"root": str(folder), "embedder": meta["name"]}
    discard = False
    try:
        with main.locked():
            try:
                _build_locked(main, folder, embedder, meta, owner, kind, index_params, batch_size, progress,
                              cancel, rebuild, name_input, switch, report)
            except BaseException:
                discard = _drop_empty_work(main)
                raise
    finally:
        if discard:  # after the lock is gone: the folder itself, if nothing else is in it
            try:
                main.dir.rmdir()
            except OSError:
                pass
    report.seconds = time.perf_counter() - t0
    log.info("kNN index %s: %s", main.dir.name, report.summary())
    return report


def _drop_empty_work(main: IndexStore) -> bool:
    """After a failed build: remove a staging area, or a whole index folder, that holds no committed index and
    no journalled embeddings (so failed builds leave nothing in the database list or on disk). Returns
    whether the index folder itself should go."""
    try:
        staging = main.staging()
        if staging.dir.is_dir() and not staging.holds_work():
            staging.remove()
        if not main.holds_work() and not staging.dir.exists():
            main.remove()
            return True
    except OSError as e:
        log.warning("Could not tidy %s after a failed build: %s", main.dir, e)
    return False


def _build_locked(main: IndexStore, folder: Path, embedder: Embedder, meta: dict, owner: dict, kind: str,
                  index_params: dict | None, batch_size: int, progress: Progress | None, cancel: Cancel | None,
                  rebuild: bool, name_input: str, switch: str, report: BuildReport) -> None:
    if rebuild:
        main.open_for_replace()  # the committed index is neither read nor touched until the commit
        store = main.staging()
        store.dir.mkdir(exist_ok=True)
        store.open()
        if store.journal and store.journal_owner() != owner:  # our own unfinished rebuild of something else
            store.remove()
            store.dir.mkdir(exist_ok=True)
            store.open()
    else:
        main.open()
        _check_same_index(main, folder, meta, name_input, switch)
        store = main
    store.owner = owner
    files, scan_skipped = scan_folder(folder, exclude=main.dir)
    report.files = len(files) + len(scan_skipped)
    if not files:
        raise no_images_error(folder, scan_skipped)
    resumed = bool(store.journal)
    good, bad = store.known()
    todo, skipped = [], list(scan_skipped)
    for f in files:
        g = good.get(f.path)
        if g and (g[0]["size"], g[0]["mtime_ns"]) == (f.size, f.mtime_ns):
            continue
        b = bad.get(f.path)
        if b and (b["size"], b["mtime_ns"]) == (f.size, f.mtime_ns):
            skipped.append((f.path, b["reason"]))
            continue
        todo.append(f)
    by_hash = {e["sha256"]: src for e, src in good.values()}
    _embed_todo(store, folder, todo, embedder, by_hash, batch_size, progress, cancel, report, skipped)
    good, bad = store.known()
    live = [good[f.path] for f in files
            if f.path in good and (good[f.path][0]["size"], good[f.path][0]["mtime_ns"]) == (f.size, f.mtime_ns)]
    live_paths = {e["path"] for e, _ in live}
    report.removed = sum(1 for e in main.base_files if e["path"] not in live_paths)
    report.skipped = skipped
    if not live:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise KNNError(f"folder: None of the {len(files)} image files in {folder} could be read ({reasons}); "
                       "replace or remove those files", "folder")
    params = dict(index_params or {})
    m = main.manifest or {}
    same_index = m.get("index", {}).get("requested") == kind and m.get("index", {}).get("overrides") == params
    report.changed = rebuild or bool(todo) or resumed or report.removed > 0 or not main.manifest \
        or not same_index or m.get("root") != str(folder) or len(live) != m.get("count")
    if report.changed:
        _check_cancel(cancel, report.embedded)
        info = _write_generation(main, store, live, meta, folder, kind, params, skipped, bad, cancel)
        report.kind = info["kind"]
        if rebuild:
            store.remove()  # committed: the staging area has done its work
    else:
        report.kind = m["index"]["kind"]
    report.indexed = len(live)


def _embedder_meta(embedder: Embedder) -> dict:
    if not isinstance(embedder, Embedder):
        raise KNNError(f"{type(embedder).__name__} is not an embedder (needs name, dim, image_size, has_text, "
                       "embed_images, embed_texts).")
    return describe(embedder)


def _check_compatible(manifest: dict, meta: dict, index_name: str, building: bool, strict: bool = True) -> None:
    built = manifest.get("embedder", {})
    fix = ("choose another index name or rebuild this one from scratch" if building
           else "select the model the index was built with, or build a new index with this model")
    if int(built.get("dim", -1)) != int(meta["dim"]):
        raise KNNError(f"Dimension mismatch: the index '{index_name}' holds {built.get('dim')}-d embeddings from "
                       f"{built.get('name')}, but {meta['name']} makes {meta['dim']}-d embeddings; {fix}.")
    if built.get("name") != meta["name"]:
        msg = (f"The index '{index_name}' was built with {built.get('name')}, not {meta['name']}: the two models "
               f"embed images differently, so neighbours would be meaningless; {fix}.")
        if strict:
            raise KNNError(msg)
        log.warning(msg)


def _embed_todo(store: IndexStore, folder: Path, todo: list[ScannedFile], embedder: Embedder, by_hash: dict,
                batch_size: int, progress: Progress | None, cancel: Cancel | None, report: BuildReport,
                skipped: list) -> None:
    total = len(todo)
    if progress is not None and total:
        progress(0, total)
    for start in range(0, total, max(1, batch_size)):
        _check_cancel(cancel, report.embedded)
        batch = todo[start:start + batch_size]
        entries, reuse_src, images, img_entries, bad = [], [], [], [], []
        for f in batch:
            data, img, reason = _read_image(folder / f.path, embedder.image_size)
            entry = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
            if data is not None:
                entry["sha256"] = sha256_bytes(data)
                if entry["sha256"] in by_hash:  # touched or duplicated file: same content, same embedding
                    entries.append(entry)
                    reuse_src.append(by_hash[entry["sha256"]])
                    continue
            if img is None:
                bad.append({**entry, "reason": reason})
                skipped.append((f.path, reason))
                continue
            images.append(img)
            img_entries.append(entry)
        vecs = [store.raw_vectors(reuse_src)] if reuse_src else []
        if images:
            emb = embedder.embed_images(images)
            if emb.shape != (len(images), embedder.dim):
                raise KNNError(f"The embedder returned shape {emb.shape} for {len(images)} images, "
                               f"expected ({len(images)}, {embedder.dim}).")
            vecs.append(emb)
        all_entries = entries + img_entries
        store.append(all_entries, np.concatenate(vecs) if vecs else None, bad)
        report.embedded += len(images)
        report.reused += len(entries)
        if all_entries:  # later duplicates of these contents reuse the vectors just journalled
            shard = store.journal[-1]["shard"]
            for row, e in enumerate(all_entries):
                by_hash.setdefault(e["sha256"], (shard, row))
        if progress is not None:
            progress(min(total, start + len(batch)), total)


def _write_generation(store: IndexStore, source: IndexStore, live: list, meta: dict, folder: Path, kind: str,
                      params: dict, skipped: list, bad: dict, cancel: Cancel | None) -> dict:
    """Write the next generation of `store` from the vectors `source` holds (the store itself, or the staging
    area of a rebuild) and commit it."""
    n, dim = len(live), int(meta["dim"])
    tmp = store.new_generation_dir()
    try:
        return _fill_generation(store, source, tmp, live, meta, folder, kind, params, skipped, bad, cancel, n, dim)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill_generation(store, source, tmp, live, meta, folder, kind, params, skipped, bad, cancel, n, dim) -> dict:
    vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    norms = np.lib.format.open_memmap(tmp / "norms.npy", mode="w+", dtype=np.float32, shape=(n,))
    chunk = 65_536
    for s in range(0, n, chunk):
        if cancel is not None and cancel():
            raise KNNCancelled("Index build cancelled while writing the index; the embeddings are kept and the "
                               "next build resumes.")
        raw = source.raw_vectors([src for _, src in live[s:s + chunk]])
        nrm = np.linalg.norm(raw, axis=1)
        vectors[s:s + len(raw)] = raw / np.maximum(nrm, 1e-12)[:, None]
        norms[s:s + len(raw)] = nrm
    vectors.flush()
    norms.flush()
    index, info = knn_index.build(vectors, kind, params, cancel=cancel)
    del vectors, norms
    knn_index.save(index, str(tmp / "index.faiss"))
    (tmp / "files.json").write_text(json.dumps([e for e, _ in live]), encoding="utf-8")
    skipped_paths = {p for p, _ in skipped}
    manifest = {
        "embedder": meta,
        "dim": dim,
        "normalisation": "l2",
        "metric": "cosine (inner product of L2-normalised vectors); raw norms kept in norms.npy",
        "root": str(folder),
        "count": n,
        "index": {**info, "requested": kind, "overrides": params},
        "skipped_files": [b for p, b in sorted(bad.items()) if p in skipped_paths],
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.commit(tmp, manifest)
    return info


# ============================================================================= querying

@dataclass
class Neighbours:
    """The k nearest images of one query, best first."""
    ids: np.ndarray            # (k,) int64 rows in the index
    scores: np.ndarray         # (k,) cosine similarity
    paths: list[str]           # (k,) paths relative to `root`
    embeddings: np.ndarray     # (k, dim) raw embeddings, as the model produced them
    query: np.ndarray          # (dim,) raw query embedding
    root: str

    def __len__(self) -> int:
        return len(self.ids)

    def files(self) -> list[Path]:
        return [safe_join(self.root, p) for p in self.paths]


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class QueryMixin:
    """What both backends' opened databases share: the embedder check and text/image queries on top of their
    own ``search(query, k, nprobe)``, ``load_image(row)``, ``manifest``, ``name``."""

    backend = "faiss"
    #: what the database is called in errors ("the index <name>", "the collection <name>")
    holder = "index"

    def _unit_query(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw query as a float32 (dim,) vector and its unit-length copy; a wrong width or k < 1 refused."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise KNNError(f"Dimension mismatch: the query has {q.shape[0]} values, the {self.holder} {self.name} "
                           f"holds {self.dim}-d embeddings from {self.embedder_info.get('name')}.")
        if k < 1:
            raise KNNError("k must be at least 1.")
        return q, q / max(float(np.linalg.norm(q)), 1e-12)

    def check_embedder(self, embedder: Embedder, strict: bool = True) -> None:
        _check_compatible(self.manifest, _embedder_meta(embedder), self.name, building=False, strict=strict)

    def query_text(self, embedder: Embedder, text: str, k: int, strict: bool = True, **kw) -> Neighbours:
        self.check_embedder(embedder, strict)
        if not text.strip():
            raise KNNError("The text query is empty.")
        return self.search(embedder.embed_texts([text])[0], k, **kw)

    def query_image(self, embedder: Embedder, image, k: int, strict: bool = True, **kw) -> Neighbours:
        """`image`: a PIL image, an (H, W, C) array/tensor, or a (1, H, W, C) ComfyUI IMAGE."""
        self.check_embedder(embedder, strict)
        return self.search(embedder.embed_images([image])[0], k, **kw)


def open_neighbour(root: str, rel: str) -> Image.Image:
    path = safe_join(root, rel)
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise KNNError(f"Cannot open neighbour image {path} ({e}); it moved or changed since the index was "
                       "built. Rebuild the index (unchanged files are not re-embedded).") from e


class KNNIndex(QueryMixin):
    """A committed index, opened read-only. `mmap`: True, False or "auto" (memory-map the faiss index
    when it is larger than half the physical RAM; the embeddings are always memory-mapped)."""

    def __init__(self, index_dir: str | os.PathLike, mmap: bool | str = "auto", input_name: str = "database"):
        store = IndexStore(Path(index_dir).expanduser(), input_name)
        if not (store.dir / "atelier_knn.json").is_file():
            raise KNNError(f"{input_name}: No kNN index at {store.dir}; build it first (Atelier kNN Build Index or "
                           "tools/build_index.py)", input_name)
        store.open(cleanup=False)
        self.dir, self.manifest = store.dir, store.manifest
        self.name = store.dir.name
        self.root = self.manifest["root"]
        self.dim = int(self.manifest["dim"])
        self.info = self.manifest["index"]
        self.embedder_info = self.manifest["embedder"]
        gen = store.gen_dir()
        self.files = store.base_files
        n = len(self.files)
        self.vectors = store.load_array(gen / "vectors.npy", "kNN vectors", 2, n)
        self.norms = store.load_array(gen / "norms.npy", "kNN norms", 1, n)
        if self.vectors.shape[1] != self.dim:
            raise bad_file(gen / "vectors.npy", input_name, "kNN vectors",
                           f"{self.vectors.shape[1]}-d rows, the manifest says {self.dim}", REBUILD_FIX)
        path = gen / "index.faiss"
        try:
            if mmap == "auto":
                mem = _physical_memory()
                mmap = bool(mem) and path.stat().st_size > mem // 2
        except OSError as e:
            raise bad_file(path, input_name, "faiss index", e, REBUILD_FIX) from e
        self.mmap = bool(mmap)
        self.index = knn_index.load(str(path), mmap=self.mmap, input_name=input_name)
        if not (self.index.ntotal == n == self.manifest["count"]) or self.index.d != self.dim:
            raise bad_file(path, input_name, "faiss index", f"{self.index.ntotal} vectors of {self.index.d} "
                           f"dimensions for {n} files of {self.dim}-d embeddings", REBUILD_FIX)

    def __len__(self) -> int:
        return len(self.files)

    def search(self, query: np.ndarray, k: int, nprobe: int | None = None) -> Neighbours:
        """Nearest neighbours of one raw query embedding (dim,)."""
        q, unit = self._unit_query(query, k)
        scores, ids = knn_index.search(self.index, self.info, unit[None], min(k, len(self)), self.vectors, nprobe)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        rows = np.sort(ids)
        order = np.searchsorted(rows, ids)
        raw = (np.asarray(self.vectors[rows]) * np.asarray(self.norms[rows])[:, None])[order]
        return Neighbours(ids=ids, scores=scores.astype(np.float32), paths=[self.files[i]["path"] for i in ids],
                          embeddings=raw.astype(np.float32), query=q, root=self.root)

    def load_image(self, row: int) -> Image.Image:
        return open_neighbour(self.root, self.files[row]["path"])


def neighbour_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of cosine scores at `temperature` (0: equal weights); sums to 1."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        raise KNNError("No neighbours to weight.")
    if temperature <= 0:
        return np.full(len(s), 1.0 / len(s))
    w = np.exp((s - s.max()) / temperature)
    return w / w.sum()


def combine_neighbours(hits: Neighbours, temperature: float = 0.05, query_weight: float = 0.0,
                       renormalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One conditioning vector from the neighbours (KNN-Diffusion's retrieved set, pooled for models that take
    a single image embedding, such as unCLIP): the score-softmax-weighted mean of their raw embeddings, with
    the query embedding mixed in at `query_weight` (0..1). With `renormalise` the result gets the weighted
    mean norm of its parts, since averaging directions shrinks the vector. Returns (vector (dim,), weights)."""
    if not 0.0 <= query_weight <= 1.0:
        raise KNNError("query_weight must be between 0 and 1.")
    w = neighbour_weights(hits.scores, temperature) * (1.0 - query_weight)
    parts = np.asarray(hits.embeddings, dtype=np.float64)
    if query_weight > 0:
        w = np.append(w, query_weight)
        parts = np.vstack([parts, np.asarray(hits.query, dtype=np.float64)[None]])
    out = w @ parts
    if renormalise:
        target = float(w @ np.linalg.norm(parts, axis=1))
        out *= target / max(float(np.linalg.norm(out)), 1e-12)
    return out.astype(np.float32), w.astype(np.float32)
