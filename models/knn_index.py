"""faiss index choice, build, save/load and search for L2-normalised vectors (cosine = inner product).

Kinds:
  flat   exact IndexFlatIP; the default below FLAT_MAX vectors.
  ivf    IVF-Flat: k-means coarse lists, exact distances inside the probed lists; the default from
         FLAT_MAX to IVFPQ_MIN. On this 2-core CPU it built 1M x 768 in ~5 min (bench_knn.py), where
         HNSW32 needed ~50-70 s per 100k, i.e. well over 10 min, for similar query latency.
  ivfpq  IVF + product quantisation (dim/4 bytes per vector), candidates re-ranked exactly against the
         memory-mapped vectors; the default from IVFPQ_MIN, where the flat codes stop fitting in RAM.
  hnsw   HNSW32-Flat graph; on request (fast queries, slow build, no training).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import faiss
import numpy as np

from .knn_common import REBUILD_FIX, KNNCancelled, KNNError, bad_file

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
FLAT_MAX = 100_000
IVFPQ_MIN = 5_000_000
ADD_CHUNK = 65_536


def choose_kind(n: int, requested: str = "auto") -> str:
    if requested not in KINDS:
        raise KNNError(f"Unknown index type {requested!r}; choose one of {', '.join(KINDS)}.")
    if requested != "auto":
        return requested
    if n < FLAT_MAX:
        return "flat"
    return "ivf" if n < IVFPQ_MIN else "ivfpq"


def default_params(kind: str, n: int, dim: int) -> dict:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 100, "efSearch": 256}
    # ~4 sqrt(n) lists (1M -> 4096), a power of two; never more lists than n / 39 training points each.
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
    # nprobe: 1M x 768 clustered (bench_knn.py): nprobe 8 / 16 / 24 of 4096 lists gave recall@10 0.988 / 0.998 /
    # 0.999 at p50 1.2 / 1.7 / 2.5 ms on 2 loaded cores; 16 keeps the 2 ms goal with margin on recall.
    params = {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 256)), "kmeans_iter": 10}
    if kind == "ivfpq":
        # dim/4 sub-quantisers (4 dims, 1 byte each: 16x smaller than float32); dim/8 lost ~10 points
        # of recall@10 on clustered data even with re-ranking
        m = next(m for m in (dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
        params.update({"m": m, "nbits": 8 if n >= 256 * 40 else 4, "rerank": 10})
    return params


def _train_size(n: int, p: dict) -> int:
    """faiss wants >= 39 training points per k-means centroid: IVF lists, and PQ codebook entries."""
    need = 40 * int(p["nlist"])
    if "nbits" in p:
        need = max(need, 40 * 2 ** int(p["nbits"]))
    return min(n, need)


def _factory(kind: str, dim: int, p: dict) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"], ip)
        index.hnsw.efConstruction = p["efConstruction"]
        return index
    if kind == "ivf":
        return faiss.index_factory(dim, f"IVF{p['nlist']},Flat", ip)
    if kind == "ivfpq":
        # "np": no polysemous training (minutes of annealing, only useful for Hamming filtering)
        return faiss.index_factory(dim, f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}np", ip)
    raise KNNError(f"Unknown index type {kind!r}.")


def build(vectors: np.ndarray, kind: str, params: dict | None = None, seed: int = 0,
          progress: Callable[[int, int], None] | None = None,
          cancel: Callable[[], object] | None = None) -> tuple[faiss.Index, dict]:
    """Index the rows of `vectors` (already L2-normalised, float32; a memmap is fine: it is read in chunks)."""
    n, dim = vectors.shape
    if n == 0:
        raise KNNError("Nothing to index: no embeddings.")
    kind = choose_kind(n, kind)
    p = {**default_params(kind, n, dim), **(params or {})}
    if "nlist" in p and "train_size" not in p:
        p["train_size"] = _train_size(n, p)
    index = _factory(kind, dim, p)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, p["train_size"]), replace=False))
        log.info("Training %s index on %d of %d vectors", kind, len(rows), n)
        train = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed, ivf.cp.niter = seed, int(p.get("kmeans_iter", 10))
        index.train(train)
        del train
    for start in range(0, n, ADD_CHUNK):
        if cancel is not None and cancel():
            raise KNNCancelled("Index build cancelled; the embeddings are kept and the next build resumes.")
        index.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))
        if progress is not None:
            progress(min(n, start + ADD_CHUNK), n)
    return index, {"kind": kind, **p}


def save(index: faiss.Index, path: str) -> None:
    faiss.write_index(index, path)


def load(path: str, mmap: bool = False, input_name: str = "database") -> faiss.Index:
    # IO_FLAG_MMAP_IFC maps the codes of flat, IVF and HNSW indexes alike at full speed (measured);
    # plain IO_FLAG_MMAP only maps IVF lists, and searches them ~4x slower.
    mmap_flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    flags = (mmap_flag | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(path, flags)
    except (RuntimeError, OSError, MemoryError) as e:  # faiss raises RuntimeError for truncated/garbage files
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise bad_file(path, input_name, "faiss index", lines[-1] if lines else type(e).__name__,
                       REBUILD_FIX) from e


def search(index: faiss.Index, info: dict, queries: np.ndarray, k: int,
           vectors: np.ndarray | None = None, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for normalised `queries` (nq, dim); ids are -1 where fewer than k exist.
    For ivfpq, `vectors` (normalised, memmap ok) re-ranks `rerank * k` candidates exactly."""
    kind = info.get("kind", "flat")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(nprobe or info.get("nprobe", 16))
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(ef_search or info.get("efSearch", 256))
    if kind != "ivfpq" or vectors is None:
        return index.search(queries, k)
    cand_k = min(index.ntotal, max(k, k * int(info.get("rerank", 10))))
    _, cand = index.search(queries, cand_k)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for qi, row in enumerate(cand):
        row = row[row >= 0]
        if len(row) == 0:
            continue
        order = np.argsort(row)  # sorted reads from the memmap
        exact = np.asarray(vectors[row[order]], dtype=np.float32) @ queries[qi]
        top = np.argsort(-exact)[:k]
        scores[qi, :len(top)], ids[qi, :len(top)] = exact[top], row[order][top]
    return scores, ids
