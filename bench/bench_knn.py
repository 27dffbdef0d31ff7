"""Benchmark of the kNN retriever (SPEC section 5).

Part 1, the index: N synthetic clustered unit vectors (hierarchical clusters with Zipf sizes plus noise,
seeded), the index kinds of models/knn_index.py built over them; build time, peak memory, file size,
single-query latency p50/p99 (one query at a time, `--query-threads` faiss threads) and recall@k
against exact search, over an nprobe sweep; the same on the saved file loaded memory-mapped.
Part 2, embedding: a full `build_index` of a folder of generated images with a tiny open_clip
(seeded random weights saved as safetensors and loaded through the real loader): images/s.

    python bench/bench_knn.py --n 1000000          # the SPEC figure (~10 min on 2 cores)
    python bench/bench_knn.py --n 20000 --queries 200 --embed-images 64   # quick

Part 3, the Milvus backend (models/knn_milvus.py, issue 19): the same vectors (the first --milvus-n of them)
upserted through pymilvus into a collection exactly as Build Index does (16 hash-range partitions, index type by
size), into Milvus Lite (a .db file, the default) or a server (--milvus-uri http://host:19530); insert and index
time, recall@k against exact search over the same subset, single-query p50/p99 over the whole collection and
over one partition (a shard), next to faiss on the same subset. Then an estimate of a 100M-vector deployment
from the measured per-shard figures (see estimate_100m for the assumptions).

    python bench/bench_knn.py --n 1000000 --milvus-n 100000 --embed-images 0   # issue 19's table

Prints a table and one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import harness  # noqa: F401  (puts tools/ on sys.path, keeps the repo root off it)
from pure_models import load_models

BENCH_CLIP = {  # tiny, but with a real 224 px input so decoding/resizing cost is realistic
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def rss() -> dict:
    """Current/peak resident memory in MiB from /proc (Linux); empty elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def clustered(n: int, dim: int, seed: int, noise: float, n_super: int = 200, n_sub: int = 20_000) -> np.ndarray:
    """Unit vectors: a shared direction + a super-cluster + a sub-cluster (Zipf-sized) + noise."""
    rng = np.random.default_rng(seed)

    def unit(m):
        g = rng.standard_normal((m, dim), dtype=np.float32)
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    mu, sup = unit(1), unit(n_super)
    centres = 0.7 * sup[rng.integers(0, n_super, n_sub)] + 0.7 * unit(n_sub)
    w = np.minimum(rng.zipf(1.5, n_sub), 1000).astype(np.float64)
    w /= w.sum()
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        chunk = 0.6 * mu + centres[rng.choice(n_sub, m, p=w)] + noise * unit(m)
        out[s:s + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for s in range(0, len(x), 65_536):
        sc = q @ x[s:s + 65_536].T
        cs = np.concatenate([best_s, sc], 1)
        ci = np.concatenate([best_i, np.arange(s, s + sc.shape[1])[None].repeat(len(q), 0)], 1)
        top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
    return best_i


def time_queries(knn_index, index, info, q, k, vectors, nprobe, gt) -> dict:
    lat, found = [], []
    for i in range(min(20, len(q))):  # warm-up
        knn_index.search(index, info, q[i:i + 1], k, vectors, nprobe)
    for i in range(len(q)):
        t = time.perf_counter()
        _, ids = knn_index.search(index, info, q[i:i + 1], k, vectors, nprobe)
        lat.append(time.perf_counter() - t)
        found.append(len(set(ids[0].tolist()) & set(gt[i].tolist())) / k)
    lat = np.array(lat) * 1e3
    return {"nprobe": nprobe, "recall": round(float(np.mean(found)), 4),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "lat": lat}


def bench_index(args, knn_index, faiss) -> list[dict]:
    t = time.perf_counter()
    data = clustered(args.n + args.queries, args.dim, args.seed, args.noise)
    x, q = data[:args.n], data[args.n:]
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    gt = exact_topk(x, q, args.k)
    gt_s = time.perf_counter() - t
    print(f"data {gen_s:.1f} s, exact ground truth {gt_s:.1f} s, rss {rss()}", file=sys.stderr)
    results = []
    for kind in args.kinds.split(","):
        faiss.omp_set_num_threads(args.build_threads)
        before = rss()
        t = time.perf_counter()
        index, info = knn_index.build(x, kind, seed=args.seed)
        build_s = time.perf_counter() - t
        after = rss()
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            path = os.path.join(tmp, "index.faiss")
            knn_index.save(index, path)
            size_mb = os.path.getsize(path) / 2**20
            faiss.omp_set_num_threads(args.query_threads)
            sweep = [int(p) for p in args.nprobe.split(",")] if info["kind"] in ("ivf", "ivfpq") else [None]
            rows = [time_queries(knn_index, index, info, q, args.k, x, p, gt) for p in sweep]
            del index
            gc.collect()
            r0 = rss()
            mm = knn_index.load(path, mmap=True)
            r1 = rss()
            mm_cold = time_queries(knn_index, mm, info, q, args.k, x, info.get("nprobe"), gt)
            r2 = rss()
            mm_row = time_queries(knn_index, mm, info, q, args.k, x, info.get("nprobe"), gt)
            del mm
        default = next((r for r in rows if r["nprobe"] == info.get("nprobe")), rows[0])
        lat_ms = default["lat"]
        for r in [*rows, mm_cold, mm_row]:
            r.pop("lat", None)
        ok = [r for r in rows if r["recall"] >= args.target_recall]
        res = {
            "kind": info["kind"], "params": info, "n": args.n, "dim": args.dim, "build_s": round(build_s, 1),
            "build_threads": args.build_threads, "query_threads": args.query_threads,
            "rss_mib_before_build": before.get("VmRSS"), "rss_mib_after_build": after.get("VmRSS"),
            "peak_rss_mib": after.get("VmHWM"), "build_rss_increase_mib": round(after["VmRSS"] - before["VmRSS"], 1)
            if "VmRSS" in after else None, "index_file_mib": round(size_mb, 1), "sweep": rows,
            "mmap": {"anon_mib_delta_on_load": round(r1.get("RssAnon", 0) - r0.get("RssAnon", 0), 1),
                     "file_mib_after_queries": r2.get("RssFile"), "first_pass": mm_cold, **mm_row},
            "best_meeting_target": min(ok, key=lambda r: r["p50_ms"]) if ok else None,
        }
        print(f"{info['kind']}: built in {build_s:.1f} s; " + json.dumps(res), file=sys.stderr, flush=True)
        res["lat_ms"] = lat_ms
        results.append(res)
    return results


def _latency(fn, q, k, gt, warm=10) -> dict:
    for i in range(min(warm, len(q))):
        fn(q[i])
    lat, found = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        ids = fn(q[i])
        lat.append(time.perf_counter() - t)
        if gt is not None:
            found.append(len(set(ids) & set(gt[i].tolist())) / k)
    lat = np.array(lat) * 1e3
    return {"recall": round(float(np.mean(found)), 4) if found else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "latencies_ms": lat}


def bench_milvus(args, knn_index, faiss, x, q) -> dict:
    """Both backends on the same vectors x (n_m, dim): faiss in-process, and a Milvus collection."""
    knn_milvus = load_models("knn_milvus")
    n, dim = x.shape
    nq = min(len(q), args.milvus_queries)
    q = q[:nq]
    t = time.perf_counter()
    gt = exact_topk(x, q, args.k)
    print(f"milvus part: {n} vectors, ground truth {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    out = {"n": n, "dim": dim, "queries": nq}
    # faiss on the same subset, as Build Index would index it
    faiss.omp_set_num_threads(args.build_threads)
    t = time.perf_counter()
    index, info = knn_index.build(x, "auto", seed=args.seed)
    fb = time.perf_counter() - t
    faiss.omp_set_num_threads(args.query_threads)
    f = _latency(lambda v: knn_index.search(index, info, v[None], args.k, x)[1][0].tolist(), q, args.k, gt)
    out["faiss"] = {"kind": info["kind"], "nprobe": info.get("nprobe"), "build_s": round(fb, 1),
                    **{k: v for k, v in f.items() if k != "latencies_ms"}}
    del index
    gc.collect()
    tmp = tempfile.mkdtemp(dir=args.tmp)
    uri = args.milvus_uri or os.path.join(tmp, "bench_milvus.db")
    target = knn_milvus.MilvusTarget(uri, "atelier_bench", token=os.environ.get(knn_milvus.TOKEN_ENV, ""))
    call = knn_milvus._Call(target)
    knn_milvus._ensure_meta(call)
    knn_milvus.drop_collection(call, "atelier_bench")
    r0 = rss()
    t = time.perf_counter()
    knn_milvus._create_collection(call, "atelier_bench", dim)
    chunk = 4096
    for s in range(0, n, chunk):
        rows = [{"key": knn_milvus.path_key(str(i)), "path": str(i), "size": 0, "mtime_ns": 0, "sha256": "",
                 "norm": 1.0, "vector": v} for i, v in zip(range(s, min(n, s + chunk)), x[s:s + chunk].tolist())]
        knn_milvus._upsert(call, "atelier_bench", rows)
        if (s // chunk) % 10 == 0:
            print(f"\r  milvus upsert {s + len(rows)}/{n} ({(s + len(rows)) / (time.perf_counter() - t):.0f}/s)",
                  end="", file=sys.stderr, flush=True)
    insert_s = time.perf_counter() - t
    kind = knn_milvus.choose_kind(n, "auto", target.lite)
    spec = knn_milvus.index_params(kind, n, dim)
    t = time.perf_counter()
    knn_milvus._set_index(call, "atelier_bench", spec)
    index_s = time.perf_counter() - t
    r1 = rss()
    assert knn_milvus.count(call, "atelier_bench") == n
    print(f"\n  milvus: upsert {insert_s:.1f} s, index {index_s:.1f} s ({spec})", file=sys.stderr, flush=True)

    def search(v, partitions=None):
        res = call.client.search("atelier_bench", data=[v.tolist()], limit=args.k, output_fields=["path"],
                                 anns_field="vector", partition_names=partitions,
                                 search_params={"metric_type": "IP", "params": spec["search"]})
        return [int(h["entity"]["path"]) for h in res[0]]

    m = _latency(search, q, args.k, gt)
    shard = _latency(lambda v: search(v, ["h0"]), q, args.k, None)
    h0 = int(call.client.query("atelier_bench", filter='key like "0%"', output_fields=["count(*)"])[0]["count(*)"])
    disk = sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file()) if target.lite else None
    out["milvus"] = {"uri": target.shown_uri, "engine": "Milvus Lite " + _version("milvus_lite") if target.lite
                     else "Milvus server", "pymilvus": _version("pymilvus"), "kind": kind, "index": spec,
                     "upsert_s": round(insert_s, 1), "upsert_rows_per_s": round(n / insert_s),
                     "index_s": round(index_s, 1), "build_s": round(insert_s + index_s, 1),
                     "rss_increase_mib": round(r1.get("VmRSS", 0) - r0.get("VmRSS", 0), 1),
                     "disk_mib": round(disk / 2**20, 1) if disk else None,
                     **{k: v for k, v in m.items() if k != "latencies_ms"},
                     "shard": {"partition": "h0", "rows": h0, "p50_ms": shard["p50_ms"], "p99_ms": shard["p99_ms"]}}
    knn_milvus.drop_collection(call, "atelier_bench")
    return out, f["latencies_ms"], shard["latencies_ms"]


def estimate_100m(shard_n: int, dim: int, lat_ms: np.ndarray, shard_bytes: float, k: int, what: str,
                  total: int = 100_000_000) -> dict:
    """A 100M-vector deployment from one measured shard of `shard_n` vectors.

    Assumptions: the vectors are split by file-hash range into S = ceil(total / shard_n) shards of that size, each
    searched at the same time on its own core (the shards spread over query nodes), at the single-thread latency
    distribution measured for one shard; a query waits for the slowest of its S shard searches, so its median is
    the per-shard latency quantile 0.5^(1/S) of the measured distribution (capped at the slowest measured query);
    the S top-k lists are merged on the client (measured here); network round trips are not included (add ~0.2-1
    ms on a LAN). Memory: S times the measured bytes of one shard's index."""
    shards = int(math.ceil(total / shard_n))
    qtl = 0.5 ** (1.0 / shards)
    p50_shard = float(np.quantile(lat_ms, qtl))
    rng = np.random.default_rng(0)
    lists = [(rng.random(k).astype(np.float32), rng.integers(0, total, k)) for _ in range(shards)]
    t = time.perf_counter()
    for _ in range(20):
        sc = np.concatenate([a for a, _ in lists])
        ids = np.concatenate([b for _, b in lists])
        ids[np.argpartition(-sc, k - 1)[:k]]
    merge_ms = (time.perf_counter() - t) / 20 * 1e3
    return {"from": what, "total_vectors": total, "shard_vectors": shard_n, "shards": shards,
            "per_shard_quantile_for_p50": round(qtl, 5), "p50_ms": round(p50_shard + merge_ms, 2),
            # without the measured tail (shards on quiet, dedicated cores): the per-shard median + merge
            "p50_ms_no_tail": round(float(np.median(lat_ms)) + merge_ms, 2),
            "merge_ms": round(merge_ms, 3), "memory_gib": round(shards * shard_bytes / 2**30, 1),
            "memory_gib_per_shard": round(shard_bytes / 2**30, 3), "dim": dim}


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod.replace("_", "-"))
    except Exception:  # noqa: BLE001
        return "?"


def bench_embedding(args, knn) -> dict:
    knn_embed = load_models("knn_embed")
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        weights = knn_embed.save_open_clip(knn_embed.random_open_clip(BENCH_CLIP, seed=args.seed), BENCH_CLIP,
                                           tmp / "bench_clip.safetensors", arch="atelier-bench-tiny")
        embedder = knn.load_open_clip(weights)
        folder = tmp / "images"
        folder.mkdir()
        for i in range(args.embed_images):
            img = Image.new("RGB", (512, 384), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(4):
                x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
                draw.rectangle([x0, y0, x0 + 100, y0 + 80], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            img.save(folder / f"{i:05d}.jpg", quality=90)
        t = time.perf_counter()
        report = knn.build_index(folder, tmp / "index", embedder, batch_size=32)
        build_s = time.perf_counter() - t
        imgs = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())[:64]]
        t = time.perf_counter()
        embedder.embed_images(imgs)
        pure_s = time.perf_counter() - t
        index = knn.KNNIndex(tmp / "index")
        lat = []
        for i in range(100):
            t = time.perf_counter()
            index.search(index.vectors[i % len(index)], 8)
            lat.append(time.perf_counter() - t)
        return {"images": args.embed_images, "source_px": "512x384 jpeg", "model": BENCH_CLIP,
                "build_index_s": round(build_s, 2), "images_per_s": round(args.embed_images / build_s, 1),
                "embed_only_images_per_s": round(len(imgs) / pure_s, 1), "indexed": report.indexed,
                "api_search_p50_ms": round(float(np.percentile(np.array(lat) * 1e3, 50)), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of database vectors")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="auto", help="comma list of index kinds: auto, flat, ivf, ivfpq, hnsw")
    ap.add_argument("--nprobe", default="8,12,16,24,32,48,64", help="nprobe sweep for IVF kinds")
    ap.add_argument("--noise", type=float, default=2.0, help="noise relative to the cluster structure")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--query-threads", type=int, default=1)
    ap.add_argument("--embed-images", type=int, default=256, help="images for the embedding throughput (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--backends", default="faiss,milvus", help="faiss, milvus or both (comma list)")
    ap.add_argument("--milvus-n", type=int, default=None,
                    help="vectors for the Milvus part (the first of the same set; default --n)")
    ap.add_argument("--milvus-uri", default=None, help="a Milvus server (http://host:19530) instead of Milvus Lite")
    ap.add_argument("--milvus-queries", type=int, default=200, help="queries timed on both backends in part 3")
    args = ap.parse_args(argv)

    import faiss

    knn, knn_index = load_models("knn", "knn_index")
    result = {"machine": {"cpus": os.cpu_count(), "faiss": faiss.__version__,
                          "faiss_simd": getattr(faiss, "get_compile_options", lambda: "?")()},
              "index": bench_index(args, knn_index, faiss) if args.n and "faiss" in args.backends else []}
    if "milvus" in args.backends:
        nm = min(args.milvus_n or args.n, args.n)
        data = clustered(args.n + args.queries, args.dim, args.seed, args.noise)  # the same vectors as part 1
        mres, f_lat, _s_lat = bench_milvus(args, knn_index, faiss, np.ascontiguousarray(data[:nm]), data[args.n:])
        del data
        gc.collect()
        result["milvus"] = mres
        est = []
        for r in result["index"]:  # the largest faiss shard measured in this run (part 1)
            if r["kind"] in ("ivf", "ivfpq", "flat") and "lat_ms" in r:
                est.append(estimate_100m(r["n"], r["dim"], r.pop("lat_ms"), r["index_file_mib"] * 2**20, args.k,
                                         f"faiss {r['kind']} shard of {r['n']} (part 1, nprobe {r['params'].get('nprobe')})"))
        est.append(estimate_100m(nm, args.dim, f_lat, nm * args.dim * 4, args.k,
                                 f"faiss {mres['faiss']['kind']} shard of {nm} (part 3)"))
        result["estimate_100m"] = est
    for r in result["index"]:
        r.pop("lat_ms", None)
    if args.embed_images:
        result["embedding"] = bench_embedding(args, knn)

    print(f"\n{'kind':6} {'nprobe':>6} {'recall@' + str(args.k):>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in result["index"]:
        for row in r["sweep"]:
            print(f"{r['kind']:6} {row['nprobe']!s:>6} {row['recall']:9.4f} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f}")
        m = r["mmap"]
        print(f"{r['kind']:6} {m['nprobe']!s:>6} {m['recall']:9.4f} {m['p50_ms']:8.3f} {m['p99_ms']:8.3f}  (mmap, 2nd pass; 1st pass p50 {m['first_pass']['p50_ms']} ms)")
        print(f"  build {r['build_s']} s, RSS +{r['build_rss_increase_mib']} MiB (peak {r['peak_rss_mib']} MiB "
              f"incl. data), file {r['index_file_mib']} MiB, mmap load +{m['anon_mib_delta_on_load']} MiB anon")
    if "milvus" in result:
        m = result["milvus"]
        print(f"\nboth backends on the same {m['n']} x {m['dim']} vectors ({m['queries']} single queries, recall@{args.k} "
              "against exact search):")
        print(f"{'backend':28} {'index':12} {'build s':>8} {'recall':>7} {'p50 ms':>8} {'p99 ms':>8}")
        fa, mv = m["faiss"], m["milvus"]
        print(f"{'faiss (local)':28} {fa['kind'] + (' np' + str(fa['nprobe']) if fa['nprobe'] else ''):12} {fa['build_s']:8.1f} {fa['recall']:7.4f} "
              f"{fa['p50_ms']:8.3f} {fa['p99_ms']:8.3f}")
        print(f"{mv['engine']:28} {mv['index']['index_type']:12} {mv['build_s']:8.1f} {mv['recall']:7.4f} "
              f"{mv['p50_ms']:8.3f} {mv['p99_ms']:8.3f}   (upsert {mv['upsert_rows_per_s']} rows/s, index "
              f"{mv['index_s']} s; one partition of {mv['shard']['rows']}: p50 {mv['shard']['p50_ms']} ms)")
        for e in result.get("estimate_100m", []):
            print(f"100M estimate from {e['from']}: {e['shards']} shards, {e['memory_gib']} GiB, p50 {e['p50_ms']} ms "
                  f"(per-shard quantile {e['per_shard_quantile_for_p50']} + merge {e['merge_ms']} ms; "
                  f"{e['p50_ms_no_tail']} ms without the measured tail)")
    if "embedding" in result:
        e = result["embedding"]
        print(f"embedding: {e['images_per_s']} images/s end-to-end build, {e['embed_only_images_per_s']} images/s embed only")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
