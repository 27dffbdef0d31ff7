"""The kNN database on Milvus: the same build and query semantics as the local faiss index (models/knn.py),
with the vectors in a Milvus collection reached through the official client, ``pymilvus``.

    target = MilvusTarget("models/atelier/knn_index/atelier_milvus.db", "moodboard")   # embedded Milvus Lite
    target = MilvusTarget("http://milvus.studio:19530", "moodboard", token=os.environ["ATELIER_MILVUS_TOKEN"])
    report = build_collection("~/Pictures/moodboard", target, embedder)
    index = MilvusIndex(target)
    hits = index.query_text(embedder, "a red bicycle", k=8)

A URI that is a local path (``*.db``) opens it with Milvus Lite (the ``milvus-lite`` package: a pure-Python
engine that pymilvus serves in-process over a local gRPC port; one process per ``.db`` folder); ``http(s)://``
talks to a Milvus server or cluster with the very same calls.

Layout in the Milvus database:
  <collection>        one row per indexed image: key (primary, sha256 of the file's relative path), path, size,
                      mtime_ns, sha256 (of the bytes, for reuse), norm (of the raw embedding), vector
                      (L2-normalised, so inner product = cosine). Rows live in 16 partitions ``h0``..``hf`` by
                      the key's first hex digit: the file-hash ranges of the sharding design.
  atelier_knn_meta    the manifest of each collection (embedder, dimension, normalisation, folder, index type,
                      count, whether its last build finished) and the files a build skipped; a 2-d dummy vector
                      because Milvus wants one in every collection.

A build upserts each embedded batch keyed by the path hash (idempotent: replaying a batch after a crash can
never duplicate a file) and marks the manifest finished only at its end; a crash or Cancel leaves the upserted
rows, and the next build embeds only what is missing. A rebuild fills ``<collection>__rebuild`` and swaps it
in (drop + rename) once complete; until then the old collection stays what Load Index reads.

The token (``user:password`` or an API key) is passed in by the caller, never stored, logged or put in a
message. No ComfyUI imports.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .knn_common import KNNError

log = logging.getLogger(__name__)

FORMAT = "atelier-knn-milvus/1"
META = "atelier_knn_meta"
STAGING_SUFFIX = "__rebuild"
PARTITIONS = tuple(f"h{d}" for d in "0123456789abcdef")
KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
FLAT_MAX = 100_000            # as for faiss (knn_index.FLAT_MAX)
IVFPQ_MIN = 5_000_000
MAX_PATH = 4096
UPSERT_CHUNK = 2048
TIMEOUT = 10.0                # seconds to reach a server before the error
TOKEN_ENV = "ATELIER_MILVUS_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,191}$")
_MILVUS_INDEX = {"flat": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "hnsw": "HNSW"}


def path_key(rel_path: str) -> str:
    """The primary key of a file's row: sha256 of its relative path (stable across content changes)."""
    return hashlib.sha256(rel_path.encode("utf-8")).hexdigest()


def partition_of(key: str) -> str:
    return "h" + key[0]


def row_id(key: str) -> int:
    """A stable int64 id for Neighbours.ids (the first 60 bits of the key)."""
    return int(key[:15], 16)


def is_server_uri(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("http", "https", "tcp", "grpc", "unix") and "://" in uri


# ----------------------------------------------------------------------------- target and connection

@dataclass(frozen=True)
class MilvusTarget:
    """Where a collection lives. ``token`` is never shown (repr, messages, logs)."""
    uri: str
    collection: str
    token: str = field(default="", repr=False)
    timeout: float = TIMEOUT
    input_name: str = "database"      # the input connection errors name (the URI's)
    name_input: str = "collection"    # the input naming the collection

    @property
    def shown_uri(self) -> str:
        """The URI with any user:password part removed (for messages)."""
        return _strip_userinfo(self.uri)

    @property
    def lite(self) -> bool:
        return not is_server_uri(self.uri)

    def with_collection(self, name: str) -> MilvusTarget:
        return MilvusTarget(self.uri, name, self.token, self.timeout, self.input_name, self.name_input)

    def describe(self) -> str:
        return f"Milvus collection '{self.collection}' at {self.shown_uri}"


def _strip_userinfo(uri: str) -> str:
    if not is_server_uri(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_collection_name(name: str, input_name: str = "index_name") -> str:
    name = (name or "").strip()
    if not _NAME_RE.match(name) or name == META or name.endswith(STAGING_SUFFIX):
        raise KNNError(f"{input_name}: {name!r} is not a valid Milvus collection name; use letters, digits and '_' "
                       "(starting with a letter or '_', at most 192; not ending in '__rebuild', not "
                       f"'{META}')", input_name)
    return name


def check_uri(uri: str, input_name: str = "milvus_uri") -> str:
    uri = (uri or "").strip()
    if not uri:
        raise KNNError(f"{input_name}: no Milvus URI; give a local Milvus Lite file (e.g. knn.db) or a server "
                       "address such as http://localhost:19530", input_name)
    if is_server_uri(uri):
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise KNNError(f"{input_name}: the URI {_strip_userinfo(uri)} carries a user or password; remove it "
                           f"from the URI (workflows are shared) and set the environment variable {TOKEN_ENV} "
                           "(user:password or API key) instead", input_name)
        if not parts.hostname:
            raise KNNError(f"{input_name}: {uri!r} has no host; write it like http://localhost:19530", input_name)
    elif not uri.endswith(".db"):
        raise KNNError(f"{input_name}: {uri!r} is neither a server address (http://host:19530) nor a Milvus Lite "
                       "file name ending in .db; give one of those", input_name)
    return uri


_clients: dict[tuple[str, str], object] = {}
_clients_lock = threading.Lock()


def _scrub(text: str, token: str) -> str:
    if token:
        text = text.replace(token, "***")
        for part in token.split(":"):
            if len(part) >= 4:
                text = text.replace(part, "***")
    return text


def classify(e: BaseException, target: MilvusTarget, doing: str) -> KNNError:
    """A pymilvus/gRPC failure as a KNNError naming the URI and the fix (never the token)."""
    inp = target.input_name
    cause = e.__cause__ or e.__context__
    codes = []
    for x in (e, cause):
        try:
            codes.append(str(x.code()).upper())  # grpc.RpcError
        except Exception:  # noqa: BLE001
            codes.append(str(getattr(x, "code", "")).upper())
    parts = [str(getattr(e, "message", None) or e)]
    try:
        parts.append(f"{cause.code().name}: {cause.details()}")  # grpc.RpcError under a MilvusException
    except Exception:  # noqa: BLE001
        pass
    text = _scrub(" ".join(" ".join(parts).split()), target.token)  # one line
    low = text.lower()
    if any("UNAUTHENTICATED" in c or "PERMISSION_DENIED" in c for c in codes) or "auth" in low \
            or "password" in low or "1800" in codes or "credential" in low:
        err = KNNError(f"{inp}: the Milvus server at {target.shown_uri} refused the credentials while {doing} "
                       f"({text.strip()[:300]}); set the environment variable {TOKEN_ENV} (or the token file "
                       "named in extra_model_paths.yaml) to a valid user:password or API key", inp)
    elif "fail connecting" in low or "unavailable" in low or "deadline" in low or "timed out" in low \
            or any("UNAVAILABLE" in c or "DEADLINE" in c for c in codes):
        err = KNNError(f"{inp}: cannot reach the Milvus server at {target.shown_uri} while {doing} "
                       f"({text.strip()[:300]}); start the server or fix the URI (and the network), or use the "
                       "local faiss backend; nothing was changed and no local index was touched", inp)
    else:
        err = KNNError(f"{inp}: Milvus ({target.shown_uri}) failed while {doing}: {text.strip()[:300]}", inp)
    return err


def _pymilvus():
    try:
        import pymilvus
    except ImportError as e:
        raise KNNError("backend: the Milvus backend needs the pymilvus package (and milvus-lite for local .db "
                       "files); pip install pymilvus milvus-lite, or use the faiss backend", "backend") from e
    return pymilvus


def connect(target: MilvusTarget):
    """A MilvusClient for the target's URI (cached per URI and token; Milvus Lite serves one process per file)."""
    pymilvus = _pymilvus()
    uri = target.uri
    if target.lite:
        uri = str(Path(uri).expanduser().resolve())
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    key = (uri, hashlib.sha256(target.token.encode()).hexdigest())
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            return client
        try:
            kw = {"token": target.token} if target.token else {}
            client = pymilvus.MilvusClient(uri=uri, timeout=target.timeout, **kw)
            client.list_collections(timeout=target.timeout)  # a server that accepts the channel but not the user
        except KNNError:
            raise
        except Exception as e:  # noqa: BLE001  (MilvusException, grpc errors, OSError from Lite)
            raise classify(e, target, "connecting") from None
        _clients[key] = client
        return client


def forget_clients() -> None:
    """Close every cached client (tests; after a server restart)."""
    with _clients_lock:
        for c in _clients.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        _clients.clear()


class _Call:
    """Runs client calls, turning failures into KNNErrors naming the URI."""

    def __init__(self, target: MilvusTarget):
        self.target = target
        self.client = connect(target)

    def __call__(self, doing: str, fn: str, *a, **kw):
        try:
            return getattr(self.client, fn)(*a, **kw)
        except KNNError:
            raise
        except Exception as e:  # noqa: BLE001
            raise classify(e, self.target, doing) from None


# ----------------------------------------------------------------------------- schema, manifest, index

def _ensure_meta(call: _Call) -> None:
    if call("listing collections", "has_collection", META):
        call("loading the manifest collection", "load_collection", META)
        return
    pymilvus = _pymilvus()
    dt = pymilvus.DataType
    s = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("key", dt.VARCHAR, is_primary=True, max_length=512)
    s.add_field("coll", dt.VARCHAR, max_length=256)
    s.add_field("kind", dt.VARCHAR, max_length=16)
    s.add_field("doc", dt.VARCHAR, max_length=65535)
    s.add_field("v", dt.FLOAT_VECTOR, dim=2)
    ip = call.client.prepare_index_params()
    ip.add_index("v", index_type="FLAT", metric_type="L2")
    call("creating the manifest collection", "create_collection", META, schema=s, index_params=ip)
    call("loading the manifest collection", "load_collection", META)


def read_manifest(call: _Call, coll: str) -> dict | None:
    rows = call("reading the manifest", "query", META, filter=f'key == "{coll}"', output_fields=["doc"])
    if not rows:
        return None
    try:
        m = json.loads(rows[0]["doc"])
        int(m["dim"]), dict(m["embedder"])["name"], str(m["root"])
    except (ValueError, KeyError, TypeError) as e:
        raise KNNError(f"{call.target.input_name}: the manifest of {call.target.describe()} is damaged ({e}); "
                       "rebuild it (Build Index with 'rebuild' on)", call.target.input_name) from None
    return m


def write_manifest(call: _Call, coll: str, manifest: dict) -> None:
    doc = json.dumps({**manifest, "format": FORMAT}, sort_keys=True)
    call("writing the manifest", "upsert", META, [{"key": coll, "coll": coll, "kind": "manifest", "doc": doc,
                                                   "v": [0.0, 0.0]}])


def read_bad(call: _Call, coll: str) -> dict[str, dict]:
    rows = _query_all(call, META, f'coll == "{coll}" and kind == "bad"', ["doc"])
    out = {}
    for r in rows:
        b = json.loads(r["doc"])
        out[b["path"]] = b
    return out


def _bad_key(coll: str, path: str) -> str:
    return f"{coll}/bad/{path_key(path)}"


def drop_collection(call: _Call, coll: str) -> None:
    """Drop a collection and its manifest and skipped-file rows."""
    if call("listing collections", "has_collection", coll):
        call("dropping a collection", "drop_collection", coll)
    call("deleting a manifest", "delete", META, filter=f'coll == "{coll}"')


def _query_all(call: _Call, coll: str, flt: str, fields: list[str], batch: int = 4096) -> list[dict]:
    """Every row matching `flt` (paged by primary key: works on Milvus Lite and servers alike)."""
    out, last = [], None
    while True:
        f = flt if last is None else (f'({flt}) and key > "{last}"' if flt else f'key > "{last}"')
        rows = call("reading rows", "query", coll, filter=f or 'key != ""', output_fields=["key", *fields],
                    limit=batch)
        if not rows:
            return out
        rows = sorted(rows, key=lambda r: r["key"])
        out.extend(rows)
        if len(rows) < batch:
            return out
        last = rows[-1]["key"]


def count(call: _Call, coll: str) -> int:
    res = call("counting rows", "query", coll, filter="", output_fields=["count(*)"])
    return int(res[0]["count(*)"])


def choose_kind(n: int, requested: str = "auto", lite: bool = False) -> str:
    if requested not in KINDS:
        raise KNNError(f"index_type: unknown index type {requested!r}; choose one of {', '.join(KINDS)}",
                       "index_type")
    kind = requested if requested != "auto" else ("flat" if n < FLAT_MAX else "ivf" if n < IVFPQ_MIN or lite
                                                  else "ivfpq")
    if kind == "ivfpq" and lite:
        raise KNNError("index_type: Milvus Lite has no product-quantisation index (IVF_PQ); choose ivf or hnsw, or "
                       "use a Milvus server", "index_type")
    return kind


def index_params(kind: str, n: int, dim: int) -> dict:
    """Milvus index and search parameters, the same sizes faiss uses (knn_index.default_params)."""
    if kind == "flat":
        return {"index_type": "FLAT", "params": {}, "search": {}}
    if kind == "hnsw":
        return {"index_type": "HNSW", "params": {"M": 32, "efConstruction": 100}, "search": {"ef": 256}}
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = int(max(1, min(nlist, 65536, n // 39 if n >= 39 else 1)))
    nprobe = int(min(nlist, max(8, nlist // 256)))
    if kind == "ivf":
        return {"index_type": "IVF_FLAT", "params": {"nlist": nlist}, "search": {"nprobe": nprobe}}
    m = next(m for m in (dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
    return {"index_type": "IVF_PQ", "params": {"nlist": nlist, "m": m, "nbits": 8}, "search": {"nprobe": nprobe}}


def _create_collection(call: _Call, coll: str, dim: int) -> None:
    pymilvus = _pymilvus()
    dt = pymilvus.DataType
    s = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("key", dt.VARCHAR, is_primary=True, max_length=64)
    s.add_field("path", dt.VARCHAR, max_length=MAX_PATH)
    s.add_field("size", dt.INT64)
    s.add_field("mtime_ns", dt.INT64)
    s.add_field("sha256", dt.VARCHAR, max_length=64)
    s.add_field("norm", dt.FLOAT)
    s.add_field("vector", dt.FLOAT_VECTOR, dim=int(dim))
    ip = call.client.prepare_index_params()
    ip.add_index("vector", index_type="FLAT", metric_type="IP")
    call("creating the collection", "create_collection", coll, schema=s, index_params=ip)
    for p in PARTITIONS:
        call("creating partitions", "create_partition", coll, p)
    call("loading the collection", "load_collection", coll)


def _set_index(call: _Call, coll: str, spec: dict) -> None:
    """Put the index `spec` on the vector field (replacing another type), and load the collection. Flushes first:
    rows still in the write buffer are searched unindexed (on Milvus Lite, brute force in Python: measured
    ~100x slower per query)."""
    call("flushing the collection", "flush", coll)
    have = None
    try:
        have = call("describing the index", "describe_index", coll, "vector")
    except KNNError:
        pass
    same = have and have.get("index_type") == spec["index_type"] and all(
        str(have.get(k)) == str(v) for k, v in spec["params"].items())
    if not same:
        call("releasing the collection", "release_collection", coll)
        if have:
            call("dropping the old index", "drop_index", coll, "vector")
        ip = call.client.prepare_index_params()
        ip.add_index("vector", index_type=spec["index_type"], metric_type="IP", params=spec["params"])
        # a server builds the index in the background: wait for it. Milvus Lite builds it within the call (and
        # has no AllocTimestamp RPC, which the wait polls with)
        call("building the vector index", "create_index", coll, ip, sync=not call.target.lite)
    call("loading the collection", "load_collection", coll)


def _upsert(call: _Call, coll: str, rows: list[dict]) -> None:
    by_part: dict[str, list[dict]] = {}
    for r in rows:
        by_part.setdefault(partition_of(r["key"]), []).append(r)
    for part, rs in sorted(by_part.items()):
        for s in range(0, len(rs), UPSERT_CHUNK):
            call("writing embeddings", "upsert", coll, rs[s:s + UPSERT_CHUNK], partition_name=part)


def _rows(entries: list[dict], raw: np.ndarray) -> list[dict]:
    raw = np.asarray(raw, np.float32)
    norms = np.linalg.norm(raw, axis=1)
    unit = raw / np.maximum(norms, 1e-12)[:, None]
    out = []
    for e, v, n in zip(entries, unit, norms):
        if len(e["path"].encode("utf-8")) > MAX_PATH:
            raise KNNError(f"folder: the path {e['path'][:80]}… is longer than {MAX_PATH} bytes; shorten it")
        out.append({"key": path_key(e["path"]), "path": e["path"], "size": int(e["size"]),
                    "mtime_ns": int(e["mtime_ns"]), "sha256": e["sha256"], "norm": float(n),
                    "vector": v.tolist()})
    return out


def _fetch_vectors(call: _Call, coll: str, keys: list[str]) -> dict[str, np.ndarray]:
    """Raw embeddings (vector * norm) of the rows with these keys."""
    out = {}
    for s in range(0, len(keys), 512):
        rows = call("reading embeddings", "get", coll, ids=keys[s:s + 512], output_fields=["vector", "norm"])
        for r in rows:
            out[r["key"]] = np.asarray(r["vector"], np.float32) * np.float32(r["norm"])
    return out


# ----------------------------------------------------------------------------- build

def build_collection(folder, target: MilvusTarget, embedder, kind: str = "auto", index_overrides: dict | None = None,
                     batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                     cancel: Callable[[], object] | None = None, rebuild: bool = False,
                     name_input: str = "index_name", switch: str = "rebuild"):
    """models/knn.build_index's semantics on a Milvus collection (see the module doc)."""
    from . import knn  # the shared scan/read/embed helpers (knn imports this module lazily)

    t0 = time.perf_counter()
    folder = knn.check_image_folder(folder)
    coll = check_collection_name(target.collection, name_input)
    meta = knn._embedder_meta(embedder)
    call = _Call(target)
    report = knn.BuildReport(index_dir=target.describe())
    owner = {"root": str(folder), "embedder": meta["name"]}
    _ensure_meta(call)
    manifest = read_manifest(call, coll)
    exists = call("listing collections", "has_collection", coll)
    if exists and manifest is None:
        raise knn.IndexConflict(f"{name_input}: the collection '{coll}' at {target.shown_uri} exists and was not made "
                                f"by Atelier; it was left untouched; pick another {name_input}",
                                Path(coll), ["not an Atelier collection"], name_input)
    work = coll
    if rebuild:
        work = coll + STAGING_SUFFIX
        sm = read_manifest(call, work)
        if sm is not None and {"root": sm["root"], "embedder": sm["embedder"]["name"]} != owner:
            drop_collection(call, work)  # our own unfinished rebuild of something else
        elif sm is None and call("listing collections", "has_collection", work):
            drop_collection(call, work)
    elif manifest is not None:
        _check_same(manifest, folder, meta, target, name_input, switch)
    files, scan_skipped = knn.scan_folder(folder)
    report.files = len(files) + len(scan_skipped)
    if not files:
        raise knn.no_images_error(folder, scan_skipped)
    choose_kind(0, kind, target.lite)  # validate before creating anything
    try:
        _build_into(call, work, coll, folder, files, scan_skipped, embedder, meta, kind, index_overrides, batch_size,
                    progress, cancel, rebuild, name_input, switch, report)
    except BaseException:
        _drop_if_empty(call, work)
        raise
    report.seconds = time.perf_counter() - t0
    log.info("kNN collection %s at %s: %s", coll, target.shown_uri, report.summary())
    return report


def _drop_if_empty(call: _Call, coll: str) -> None:
    """After a failed build: a collection holding no embeddings is dropped (nothing worth keeping; it would only
    clutter the database), as the faiss backend removes such an index folder."""
    try:
        if call("listing collections", "has_collection", coll) and count(call, coll) == 0:
            drop_collection(call, coll)
    except KNNError as e:
        log.warning("Could not tidy %s after a failed build: %s", coll, e)


def _build_into(call, work, coll, folder, files, scan_skipped, embedder, meta, kind, index_overrides, batch_size,
                progress, cancel, rebuild, name_input, switch, report) -> None:
    from . import knn
    target = call.target
    wm = read_manifest(call, work)
    if not call("listing collections", "has_collection", work) or wm is None:
        if call("listing collections", "has_collection", work):
            drop_collection(call, work)
        _create_collection(call, work, meta["dim"])
        wm = {"embedder": meta, "dim": int(meta["dim"]), "normalisation": "l2", "root": str(folder),
              "metric": "cosine (inner product of L2-normalised vectors); raw norm in the 'norm' field",
              "count": 0, "finished": False, "index": {"kind": "flat", "requested": kind},
              "partitions": list(PARTITIONS), "key": "sha256(relative path)"}
        write_manifest(call, work, wm)
    else:
        call("loading the collection", "load_collection", work)
    have = {r["key"]: r for r in _query_all(call, work, "", ["path", "size", "mtime_ns", "sha256"])}
    bad = read_bad(call, work)
    todo, skipped = [], list(scan_skipped)
    for f in files:
        r = have.get(path_key(f.path))
        if r and (int(r["size"]), int(r["mtime_ns"])) == (f.size, f.mtime_ns):
            continue
        b = bad.get(f.path)
        if b and (b["size"], b["mtime_ns"]) == (f.size, f.mtime_ns):
            skipped.append((f.path, b["reason"]))
            continue
        todo.append(f)
    by_hash = {r["sha256"]: r["key"] for r in have.values()}
    resumed = not wm.get("finished")
    _embed(call, work, folder, todo, embedder, by_hash, batch_size, progress, cancel, report, skipped, bad)
    live = {path_key(f.path) for f in files} - {path_key(p) for p, _ in skipped}
    if not live:  # before any delete: an index whose files all became unreadable stays as it was
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise KNNError(f"folder: None of the {len(files)} image files in {folder} could be read ({reasons}); "
                       "replace or remove those files", "folder")
    gone = sorted(k for k in have if k not in live)
    for s in range(0, len(gone), 1024):
        knn._check_cancel(cancel, report.embedded)
        call("deleting removed files", "delete", work, ids=gone[s:s + 1024])
    gone_bad = [p for p in bad if path_key(p) not in {path_key(f.path) for f in files}]
    if gone_bad:
        call("deleting skipped-file records", "delete", META, ids=[_bad_key(work, p) for p in gone_bad])
    report.removed = len(gone) if not rebuild else 0
    report.skipped = skipped
    n = count(call, work)
    report.indexed = n
    if n != len(live):
        raise KNNError(f"{name_input}: {target.describe()} holds {n} rows for {len(live)} images after the build; "
                       f"run the build again (it resumes), or rebuild it with '{switch}'", name_input)
    k = choose_kind(n, kind, target.lite)
    spec = index_params(k, n, int(meta["dim"]))
    for key_, v in (index_overrides or {}).items():
        (spec["search"] if key_ in ("nprobe", "ef") else spec["params"])[key_] = v
    info = {"kind": k, "requested": kind, "milvus_index": spec["index_type"], "params": spec["params"],
            "search": spec["search"], "overrides": dict(index_overrides or {})}
    report.changed = rebuild or bool(todo) or resumed or bool(gone) or wm.get("index") != info or wm.get("count") != n
    report.kind = k
    if report.changed:
        knn._check_cancel(cancel, report.embedded)
        _set_index(call, work, spec)
        wm = {**wm, "count": n, "finished": True, "index": info,
              "skipped_files": [bad[p] for p, _ in sorted(skipped) if p in bad],
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_manifest(call, work, wm)
        if rebuild:
            _swap_in(call, work, coll, wm)


def _check_same(m: dict, folder: Path, meta: dict, target: MilvusTarget, name_input: str, switch: str) -> None:
    from . import knn
    diffs = []
    built = m["embedder"]
    held = int(built.get("dim", m["dim"]))  # read_manifest checked m["dim"]; the embedder record may lack it
    if held != int(meta["dim"]):
        diffs.append(f"Dimension mismatch: it holds {held}-d embeddings from {built.get('name')}, "
                     f"{meta['name']} makes {meta['dim']}-d ones")
    elif built.get("name") != meta["name"]:
        diffs.append(f"it was built with the embedder {built.get('name')}, not {meta['name']}")
    if m["root"] != str(folder):
        diffs.append(f"it was built from the folder {m['root']}, not {folder}")
    if diffs:
        raise knn.IndexConflict(f"{name_input}: {target.describe()} already holds a different index "
                                f"({'; '.join(diffs)}); it was left untouched; pick a new {name_input}, or turn "
                                f"'{switch}' on to replace it", Path(target.collection), diffs, name_input)


def _embed(call: _Call, coll: str, folder: Path, todo, embedder, by_hash: dict, batch_size: int, progress, cancel,
           report, skipped: list, bad: dict) -> None:
    from . import knn
    total = len(todo)
    if progress is not None and total:
        progress(0, total)
    fresh: dict[str, np.ndarray] = {}  # sha256 -> raw vector embedded in this build
    for start in range(0, total, max(1, batch_size)):
        knn._check_cancel(cancel, report.embedded)
        batch = todo[start:start + batch_size]
        reuse, images, img_entries, bad_rows = [], [], [], []
        for f in batch:
            data, img, reason = knn._read_image(folder / f.path, embedder.image_size)
            entry = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
            if data is not None:
                entry["sha256"] = knn.sha256_bytes(data)
                if entry["sha256"] in fresh or entry["sha256"] in by_hash:
                    reuse.append(entry)
                    continue
            if img is None:
                b = {**entry, "reason": reason}
                bad[f.path] = b
                bad_rows.append({"key": _bad_key(coll, f.path), "coll": coll, "kind": "bad",
                                 "doc": json.dumps(b), "v": [0.0, 0.0]})
                skipped.append((f.path, reason))
                continue
            images.append(img)
            img_entries.append(entry)
        entries, vecs = [], []
        if reuse:
            need = [by_hash[e["sha256"]] for e in reuse if e["sha256"] not in fresh]
            got = _fetch_vectors(call, coll, need) if need else {}
            for e in reuse:
                v = fresh.get(e["sha256"])
                if v is None:
                    v = got.get(by_hash[e["sha256"]])
                if v is None:  # the row it was to be copied from is gone: embed the file after all
                    _d, img, _r = knn._read_image(folder / e["path"], embedder.image_size)
                    if img is not None:
                        images.append(img)
                        img_entries.append(e)
                    continue
                entries.append(e)
                vecs.append(v[None])
        if images:
            emb = np.asarray(embedder.embed_images(images), np.float32)
            if emb.shape != (len(images), embedder.dim):
                raise KNNError(f"The embedder returned shape {emb.shape} for {len(images)} images, "
                               f"expected ({len(images)}, {embedder.dim}).")
            for e, v in zip(img_entries, emb):
                fresh.setdefault(e["sha256"], v)
            entries += img_entries
            vecs.append(emb)
        if entries:
            _upsert(call, coll, _rows(entries, np.concatenate(vecs)))
            good_again = [_bad_key(coll, e["path"]) for e in entries if e["path"] in bad]
            if good_again:
                call("clearing skipped-file records", "delete", META, ids=good_again)
                for e in entries:
                    bad.pop(e["path"], None)
        if bad_rows:
            call("recording skipped files", "upsert", META, bad_rows)
        report.embedded += len(images)
        report.reused += len(entries) - len(images)
        if progress is not None:
            progress(min(total, start + len(batch)), total)


def _swap_in(call: _Call, staging: str, coll: str, manifest: dict) -> None:
    """Commit a rebuild: the finished staging collection takes the collection's name."""
    bad = read_bad(call, staging)
    drop_collection(call, coll)
    call("renaming the rebuilt collection", "rename_collection", staging, coll)
    write_manifest(call, coll, manifest)
    if bad:
        call("moving skipped-file records", "upsert", META, [
            {"key": _bad_key(coll, p), "coll": coll, "kind": "bad", "doc": json.dumps(b), "v": [0.0, 0.0]}
            for p, b in bad.items()])
    call("deleting the staging manifest", "delete", META, filter=f'coll == "{staging}"')
    call("loading the collection", "load_collection", coll)


# ----------------------------------------------------------------------------- migration from faiss

def migrate_faiss(index_dir, target: MilvusTarget, replace: bool = False, kind: str = "auto",
                  progress: Callable[[int, int], None] | None = None, chunk: int = 8192) -> dict:
    """Copy a committed faiss index (models/knn.KNNIndex folder) into a collection without re-embedding: the
    stored raw embeddings (normalised vectors times norms) and file entries go over as rows. Refuses a
    collection that holds another index unless `replace`."""
    from . import knn
    src = knn.KNNIndex(index_dir, input_name="--index")
    coll = check_collection_name(target.collection, "--collection")
    call = _Call(target)
    _ensure_meta(call)
    m = read_manifest(call, coll)
    if (m is not None or call("listing collections", "has_collection", coll)) and not replace:
        raise KNNError(f"--collection: {target.describe()} already exists; pick another name or pass --replace",
                       "--collection")
    drop_collection(call, coll)
    dim = src.dim
    _create_collection(call, coll, dim)
    manifest = {"embedder": src.embedder_info, "dim": dim, "normalisation": "l2", "root": src.root,
                "metric": "cosine (inner product of L2-normalised vectors); raw norm in the 'norm' field",
                "count": 0, "finished": False, "index": {"kind": "flat", "requested": kind},
                "partitions": list(PARTITIONS), "key": "sha256(relative path)",
                "migrated_from": str(Path(index_dir).resolve())}
    write_manifest(call, coll, manifest)
    n = len(src)
    for s in range(0, n, chunk):
        vec = np.asarray(src.vectors[s:s + chunk], np.float32)
        nrm = np.asarray(src.norms[s:s + chunk], np.float32)
        rows = [{"key": path_key(e["path"]), "path": e["path"], "size": int(e["size"]),
                 "mtime_ns": int(e["mtime_ns"]), "sha256": e.get("sha256", ""), "norm": float(nv),
                 "vector": v.tolist()} for e, v, nv in zip(src.files[s:s + chunk], vec, nrm)]
        _upsert(call, coll, rows)
        if progress is not None:
            progress(min(n, s + chunk), n)
    got = count(call, coll)
    if got != n:
        raise KNNError(f"--collection: {got} rows in {target.describe()} for {n} entries of the faiss index; run "
                       "the migration again with --replace")
    k = choose_kind(n, kind, target.lite)
    spec = index_params(k, n, dim)
    _set_index(call, coll, spec)
    manifest.update(count=n, finished=True, index={"kind": k, "requested": kind, "milvus_index": spec["index_type"],
                                                   "params": spec["params"], "search": spec["search"],
                                                   "overrides": {}},
                    skipped_files=src.manifest.get("skipped_files", []),
                    updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_manifest(call, coll, manifest)
    return {"count": n, "kind": k, "collection": coll, "uri": target.shown_uri}


# ----------------------------------------------------------------------------- query

def _query_base():
    from . import knn
    return knn.QueryMixin


class MilvusIndex(_query_base()):
    """A finished collection, opened for queries; the same interface as models/knn.KNNIndex."""

    backend = "milvus"
    holder = "collection"

    def __init__(self, target: MilvusTarget):
        inp = target.name_input
        coll = check_collection_name(target.collection, inp)
        self.target, self.name = target, coll
        self._call = _Call(target)
        _ensure_meta(self._call)
        m = read_manifest(self._call, coll)
        if m is None or not self._call("listing collections", "has_collection", coll):
            raise KNNError(f"{inp}: no Atelier kNN collection '{coll}' at {target.shown_uri}; build it first "
                           "(Atelier kNN Build Index with backend milvus, or tools/build_index.py --milvus-uri)", inp)
        if not m.get("finished"):
            raise KNNError(f"{inp}: {target.describe()} holds an unfinished build; run Atelier kNN Build Index on it "
                           "again (it resumes where it stopped)", inp)
        self.manifest = m
        self.dim = int(m["dim"])
        self.root = m["root"]
        self.info = m["index"]
        self.embedder_info = m["embedder"]
        self.dir = target.describe()
        self._call("loading the collection", "load_collection", coll)
        self._count = int(m["count"])
        self._paths: dict[int, str] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def files(self) -> list[dict]:
        """Every row's file entry, sorted by path (a full scan: for tests and tools, not per query)."""
        rows = _query_all(self._call, self.name, "", ["path", "size", "mtime_ns", "sha256"])
        return sorted(({"path": r["path"], "size": int(r["size"]), "mtime_ns": int(r["mtime_ns"]),
                        "sha256": r["sha256"]} for r in rows), key=lambda e: e["path"])

    def live_count(self) -> int:
        return count(self._call, self.name)

    def search(self, query: np.ndarray, k: int, nprobe: int | None = None):
        from . import knn
        q, unit = self._unit_query(query, k)
        params = dict(self.info.get("search", {}))
        if nprobe is not None and "nprobe" in params:
            params["nprobe"] = int(nprobe)
        res = self._call("searching", "search", self.name, data=[unit.tolist()], limit=min(int(k), max(1, len(self))),
                         output_fields=["path", "vector", "norm"], anns_field="vector",
                         search_params={"metric_type": "IP", "params": params})
        hits = list(res[0]) if res else []
        ids = np.array([row_id(h["id"] if "id" in h else h["key"]) for h in hits], np.int64)
        scores = np.array([h["distance"] for h in hits], np.float32)
        paths = [h["entity"]["path"] for h in hits]
        emb = np.array([np.asarray(h["entity"]["vector"], np.float32) * np.float32(h["entity"]["norm"])
                        for h in hits], np.float32).reshape(len(hits), self.dim)
        for i, p in zip(ids, paths):
            self._paths[int(i)] = p
        return knn.Neighbours(ids=ids, scores=scores, paths=paths, embeddings=emb, query=q, root=self.root)

    def load_image(self, row: int):
        from . import knn
        path = self._paths.get(int(row))
        if path is None:
            raise KNNError(f"Unknown neighbour id {row}: query {self.name} first.")
        return knn.open_neighbour(self.root, path)
