"""Build (or update) an Atelier kNN index from a folder of images, outside ComfyUI.

    python tools/build_index.py ~/Pictures/moodboard --name moodboard \\
        --clip-weights ~/models/open_clip_ViT-H-14.safetensors --clip-arch ViT-H-14
    python tools/build_index.py ~/Pictures/moodboard --index /data/knn/moodboard --clip-weights W --query "a red bicycle"

    # the Milvus backend: a collection in a Milvus Lite file or on a server (token from ATELIER_MILVUS_TOKEN)
    python tools/build_index.py ~/Pictures/moodboard --milvus-uri http://milvus:19530 --collection moodboard \
        --clip-weights W
    # migrate a built faiss index into a collection without re-embedding (no images, no model needed)
    python tools/build_index.py --migrate --index /data/knn/moodboard --milvus-uri knn.db --collection moodboard

`--name` writes to <ComfyUI>/models/atelier/knn_index/<name> (ComfyUI found like the other tools do);
`--index` takes any folder; `--milvus-uri` + `--collection` a Milvus collection. Incremental and resumable: run
it again after adding images, after Ctrl-C or a crash; only what is missing is embedded. Exit status: 0 ok, 2 a
problem to fix (message printed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pure_models import load_models  # noqa: E402  (tools/pure_models.py)


def comfy_index_dir(name: str) -> Path:
    import comfy_env

    comfy = comfy_env.find_comfyui(install=False, verbose=False)
    return Path(comfy) / "models" / "atelier" / "knn_index" / name


def _progress(start: float):
    def report(done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - start)
        print(f"\r  embedded {done}/{total}  ({rate:.1f} images/s)", end="" if done < total else "\n",
              file=sys.stderr, flush=True)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", help="folder of images (searched recursively); not with --migrate")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--name", help="index name under <ComfyUI>/models/atelier/knn_index/")
    where.add_argument("--index", help="index folder (any path); with --migrate, the faiss index to copy")
    ap.add_argument("--milvus-uri", default=None,
                    help="build into (or --migrate to) a Milvus collection: a Milvus Lite file (*.db) or a server "
                         "(http://host:19530); the token comes from $ATELIER_MILVUS_TOKEN, never the command line")
    ap.add_argument("--collection", default=None, help="the Milvus collection (letters, digits, '_')")
    ap.add_argument("--migrate", action="store_true",
                    help="copy the faiss index (--name or --index) into --milvus-uri/--collection without "
                         "re-embedding: vectors, norms and file entries go over as they are")
    ap.add_argument("--replace", action="store_true", help="with --migrate: replace an existing collection")
    ap.add_argument("--clip-weights", default=None, help="open_clip checkpoint (.safetensors); not with --migrate")
    ap.add_argument("--clip-arch", default=None, help="open_clip architecture, e.g. ViT-H-14 (default: from the file)")
    ap.add_argument("--clip-config", default=None, help="open_clip config JSON, for custom architectures")
    ap.add_argument("--kind", default="auto", help="index type: auto, flat, ivf, ivfpq, hnsw")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="torch device for the embedder, e.g. cuda")
    ap.add_argument("--rebuild", action="store_true",
                    help="replace the index: embed everything again; the old index stays usable until the new one "
                         "is complete (needed to change the folder or the model of an existing index)")
    ap.add_argument("--query", default=None, help="after building, print the neighbours of this text")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    knn = load_models("knn")
    try:
        if bool(args.milvus_uri) != bool(args.collection):
            raise knn.KNNError("--milvus-uri and --collection go together; give both (or neither, for faiss)")
        if args.migrate:
            return _migrate(args, knn)
        if not args.folder or not args.clip_weights:
            raise knn.KNNError("a build needs the image folder and --clip-weights")
        if args.milvus_uri:
            index_dir = _milvus_target(args)
        elif args.name or args.index:
            index_dir = comfy_index_dir(knn.check_index_name(args.name)) if args.name else Path(args.index).expanduser()
        else:
            raise knn.KNNError("say where the index goes: --name, --index, or --milvus-uri with --collection")
        embedder = knn.load_open_clip(args.clip_weights, arch=args.clip_arch, config=args.clip_config,
                                      device=args.device, input_name="--clip-weights")
        print(f"embedder {embedder.name} ({embedder.dim}-d) -> {index_dir}", file=sys.stderr)
        # an index of another folder or embedder under this name is refused untouched unless --rebuild
        report = knn.build_index(args.folder, index_dir, embedder, kind=args.kind, batch_size=args.batch_size,
                                 progress=_progress(time.perf_counter()), rebuild=args.rebuild,
                                 name_input="--collection" if args.milvus_uri else "--name" if args.name
                                 else "--index", switch="--rebuild")
        print(report.summary())
        if args.query:
            hits = knn.open_database(index_dir, input_name="--index").query_text(embedder, args.query, args.k)
            for rank, (score, path) in enumerate(zip(hits.scores, hits.paths), 1):
                print(f"{rank:3d}. {score:.4f}  {path}")
    except knn.KNNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the images embedded so far are kept; run the same command again to resume.",
              file=sys.stderr)
        return 130
    return 0


def _milvus_target(args):
    import os
    knn_milvus = load_models("knn_milvus")
    uri = knn_milvus.check_uri(args.milvus_uri, "--milvus-uri")
    return knn_milvus.MilvusTarget(uri, knn_milvus.check_collection_name(args.collection, "--collection"),
                                   token=os.environ.get(knn_milvus.TOKEN_ENV, "").strip(), input_name="--milvus-uri",
                                   name_input="--collection")


def _migrate(args, knn) -> int:
    knn_milvus = load_models("knn_milvus")
    if not args.milvus_uri:
        raise knn.KNNError("--migrate needs --milvus-uri and --collection (where the faiss index goes)")
    if not (args.name or args.index):
        raise knn.KNNError("--migrate needs the faiss index to copy: --name or --index")
    src = comfy_index_dir(knn.check_index_name(args.name)) if args.name else Path(args.index).expanduser()
    target = _milvus_target(args)
    t0 = time.perf_counter()
    info = knn_milvus.migrate_faiss(src, target, replace=args.replace, kind=args.kind,
                                    progress=lambda d, t: print(f"\r  copied {d}/{t}", end="" if d < t else "\n",
                                                                file=sys.stderr, flush=True))
    print(f"{info['count']} vectors of {src} -> {target.describe()} ({info['kind']} index), "
          f"{time.perf_counter() - t0:.1f} s, nothing re-embedded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
