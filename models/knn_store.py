"""Crash-safe on-disk store of an index folder.

Layout of ``<index_dir>``::

    atelier_knn.json        manifest, replaced atomically; names the current generation <g>
    gen-<g>/                the committed snapshot: vectors.npy (L2-normalised float32, memory-mappable),
                            norms.npy (their original norms), files.json (one entry per row), index.faiss
    journal-<g>/log.jsonl   append-only commit log of work done on top of generation <g>
    journal-<g>/<id>.npy    raw embeddings of one logged batch
    .rebuild/               a rebuild in progress: a store of its own (journal only) whose result is
                            committed as the next generation of this index; until then the current
                            generation stays what Load Index reads, also after a cancelled rebuild

A batch is durable once its line is in the log: the shard is written under a temporary name, fsynced and
renamed *before* its log line is appended and fsynced. A shard without a log line, a torn last line,
an older generation or a half-written new one are garbage and removed by `open()`. A finished build
writes generation g+1 and flips the manifest (the commit point); entries are keyed by relative path,
so replaying a journal can never duplicate a file. Journal records carry the folder and the embedder
they came from, so work from another folder or model is never merged into an index.

Every file read here that is damaged gives an error naming the file, what is wrong and the fix.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .knn_common import (
    IMAGE_EXTENSIONS,
    KNNError,
    atomic_write_bytes,
    REBUILD_FIX,
    atomic_write_json,
    bad_file,
    fsync_dir,
    safe_join,
)

log = logging.getLogger(__name__)

MANIFEST = "atelier_knn.json"
FORMAT = "atelier-knn/1"
LOCK = ".build.lock"
BASE = "base"
STAGING = ".rebuild"


@dataclass(frozen=True)
class ScannedFile:
    path: str  # relative, POSIX separators
    size: int
    mtime_ns: int


def scan_folder(root: Path, exclude: Path | None = None) -> tuple[list[ScannedFile], list[tuple[str, str]]]:
    """Image files under `root` (recursive, sorted, hidden entries skipped). Symlinks (files or folders)
    that point outside `root` are never followed: they are skipped and reported. Symlinked folders that
    stay inside `root` are not walked either (their files are found under their real path)."""
    root = root.resolve()
    exclude = exclude.resolve() if exclude is not None else None
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or (exclude is not None and (here / d).resolve() == exclude):
                continue
            if (here / d).is_symlink():
                real = (here / d).resolve()
                if real != root and root not in real.parents:
                    skipped.append(((here / d).relative_to(root).as_posix() + "/", "links outside the folder"))
                continue  # os.walk does not follow links; say so for those that leave the folder
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = (here / name).relative_to(root).as_posix()
            try:
                safe_join(root, rel)
                st = (here / name).stat()
            except KNNError:
                skipped.append((rel, "links outside the folder"))
                continue
            except OSError as e:
                skipped.append((rel, f"unreadable: {e.strerror or e}"))
                continue
            files.append(ScannedFile(rel, st.st_size, st.st_mtime_ns))
    return files, skipped


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gen_number(name: str) -> int | None:
    if name.startswith("gen-") and name[4:].isdigit():
        return int(name[4:])
    return None


class IndexStore:
    """One index folder. ``input_name`` is the node input (or CLI option) errors about it start with."""

    def __init__(self, index_dir: str | os.PathLike, input_name: str = "index_name"):
        self.dir = Path(index_dir)
        self.input_name = input_name
        self.owner: dict = {}  # {"root", "embedder"} stamped on the journal records this build writes
        self.manifest: dict | None = None
        self.gen = 0
        self.base_files: list[dict] = []
        self.journal: list[dict] = []  # valid log records, in order
        self._shards: dict[str, np.ndarray] = {}
        self._base_vectors = self._base_norms = None

    # ------------------------------------------------------------------ paths
    def gen_dir(self, g: int | None = None) -> Path:
        return self.dir / f"gen-{self.gen if g is None else g:06d}"

    def journal_dir(self) -> Path:
        return self.dir / f"journal-{self.gen:06d}"

    # ------------------------------------------------------------------ lock
    @contextmanager
    def locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(str(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if not self._lock_is_stale(lock):
                    raise KNNError(f"The index {self.dir.name} is being built by another process (see {lock}). "
                                   "Wait for it to finish; if no build is running, delete that file.")
                lock.unlink(missing_ok=True)
        else:
            raise KNNError(f"Cannot lock {lock}; delete it if no build is running.")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield self
        finally:
            lock.unlink(missing_ok=True)

    @staticmethod
    def _lock_is_stale(lock: Path) -> bool:
        try:
            owner = json.loads(lock.read_text())
        except (OSError, ValueError):
            return True  # torn lock file from a crash
        if owner.get("host") != socket.gethostname() or os.name != "posix":
            return False  # cannot check; the user decides
        try:
            os.kill(int(owner["pid"]), 0)  # signal 0 only probes (POSIX)
        except ProcessLookupError:
            return True
        except (PermissionError, OSError, ValueError, KeyError):
            return False
        return False

    # ------------------------------------------------------------------ open / cleanup
    def read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        what = "kNN index manifest"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise bad_file(path, self.input_name, what, e, REBUILD_FIX) from e
        if not isinstance(m, dict):
            raise bad_file(path, self.input_name, what, f"a JSON {type(m).__name__}, not an object", REBUILD_FIX)
        if m.get("format") != FORMAT:
            raise bad_file(path, self.input_name, what, f"format {m.get('format')!r}, this Atelier reads {FORMAT!r}",
                           REBUILD_FIX)
        try:
            int(m["generation"]), int(m["dim"]), int(m["count"]), str(m["root"])
            dict(m["index"])["kind"], dict(m["embedder"])["name"]
        except (KeyError, TypeError, ValueError) as e:
            raise bad_file(path, self.input_name, what, f"missing or wrong field {e}", REBUILD_FIX) from e
        return m

    def latest_gen(self) -> int:
        """The highest generation folder present (for replacing an index whose manifest is damaged)."""
        nums = [n for n in (_gen_number(p.name) for p in self.dir.iterdir()) if n is not None] \
            if self.dir.is_dir() else []
        return max(nums, default=0)

    def open(self, cleanup: bool = True) -> IndexStore:
        self.manifest = self.read_manifest()
        self.gen = int(self.manifest["generation"]) if self.manifest else 0
        if cleanup:
            self._cleanup_generations()
        self.base_files = self._read_base_files()
        self.journal = self._read_journal(repair=cleanup)
        if cleanup:
            self._cleanup_shards()
        return self

    def open_for_replace(self) -> IndexStore:
        """Open an index a rebuild will replace: only its generation number matters (the committed files are
        neither read nor touched until the new generation is committed). A damaged manifest counts as none;
        the new generation then comes after the highest one present."""
        try:
            self.manifest = self.read_manifest()
        except KNNError as e:
            log.warning("Replacing a damaged index: %s", e)
            self.manifest = None
            self.gen = self.latest_gen()
        else:
            self.gen = int(self.manifest["generation"]) if self.manifest else 0
        self.base_files, self.journal = [], []
        return self

    def staging(self) -> IndexStore:
        """The store a rebuild embeds into (``.rebuild/``), beside the committed index."""
        return IndexStore(self.dir / STAGING, self.input_name)

    def journal_owner(self) -> dict | None:
        """{"root", "embedder"} of the work in the journal (None when it is empty or predates the stamp)."""
        for rec in self.journal:
            if "root" in rec:
                return {"root": rec.get("root"), "embedder": rec.get("embedder")}
        return None

    def holds_work(self) -> bool:
        """Whether the folder holds a committed index or journalled embeddings (work worth keeping)."""
        if (self.dir / MANIFEST).exists():
            return True
        for logf in self.dir.glob("journal-*/log.jsonl"):
            for line in logf.read_bytes().splitlines():
                try:
                    if json.loads(line).get("shard"):
                        return True
                except (ValueError, AttributeError):
                    continue
        return False

    def remove(self) -> None:
        """Delete this store's own entries (gen-*, journal-*, temporaries, manifest, staging; not the lock,
        which its holder removes) and the folder if that leaves it empty. Only for a store holding nothing
        worth keeping, or whose work has been committed elsewhere."""
        if not self.dir.is_dir() or self.dir.is_symlink():
            return
        for p in self.dir.iterdir():
            if p.name in (MANIFEST, STAGING) or p.name.startswith(("gen-", "journal-", ".tmp-")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # the lock, or something that is not ours, is still there: leave it

    def _cleanup_generations(self) -> None:
        keep = {self.gen_dir().name, self.journal_dir().name}  # (.rebuild is not ours to clean here)
        for p in self.dir.iterdir():
            if p.name.startswith(("gen-", "journal-", ".tmp-")) and p.name not in keep:
                log.info("Removing stale %s", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _read_base_files(self) -> list[dict]:
        if not self.manifest:
            return []
        path = self.gen_dir() / "files.json"
        try:
            files = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise bad_file(path, self.input_name, "kNN index file list", e, REBUILD_FIX) from e
        if not isinstance(files, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) and "size" in e and "mtime_ns" in e
                for e in files):
            raise bad_file(path, self.input_name, "kNN index file list",
                           "not a list of {path, size, mtime_ns} entries", REBUILD_FIX)
        return files

    def _read_journal(self, repair: bool) -> list[dict]:
        logf = self.journal_dir() / "log.jsonl"
        if not logf.is_file():
            return []
        raw = logf.read_bytes()
        good_end, records = 0, []
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn tail from a crash mid-append
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if rec.get("shard") and not (self.journal_dir() / rec["shard"]).is_file():
                log.warning("Journal record without its shard %s; ignoring it", rec["shard"])
            else:
                records.append(rec)
            good_end += len(line)
        if repair and good_end < len(raw):
            log.warning("Dropping a torn journal tail (%d bytes) in %s", len(raw) - good_end, logf)
            with open(logf, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
        return records

    def _cleanup_shards(self) -> None:
        jd = self.journal_dir()
        if not jd.is_dir():
            return
        wanted = {r["shard"] for r in self.journal if r.get("shard")} | {"log.jsonl"}
        for p in jd.iterdir():
            if p.name not in wanted:
                log.info("Removing orphan shard %s", p)
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ what is known
    def known(self) -> tuple[dict[str, tuple[dict, tuple]], dict[str, dict]]:
        """({path: (entry, source)} of embedded files, {path: bad entry}); the journal overrides the base."""
        good: dict[str, tuple[dict, tuple]] = {}
        bad: dict[str, dict] = {b["path"]: b for b in (self.manifest or {}).get("skipped_files", [])}
        for row, e in enumerate(self.base_files):
            good[e["path"]] = (e, (BASE, row))
        for rec in self.journal:
            for row, e in enumerate(rec.get("entries", [])):
                good[e["path"]] = (e, (rec["shard"], row))
                bad.pop(e["path"], None)
            for b in rec.get("bad", []):
                bad[b["path"]] = b
                good.pop(b["path"], None)
        return good, bad

    def load_array(self, path: Path, what: str, ndim: int, rows: int | None = None) -> np.ndarray:
        """A memory-mapped float32 .npy of ``ndim`` dimensions (and ``rows`` rows); a damaged one gives an
        error naming the file."""
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # "Array can't be memory-mapped", truncated, missing
            raise bad_file(path, self.input_name, what, e, REBUILD_FIX) from e
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim or \
                (rows is not None and len(a) != rows):
            shape = getattr(a, "shape", "?")
            raise bad_file(path, self.input_name, what, f"holds a {getattr(a, 'dtype', '?')} array of shape {shape}, "
                           f"expected float32 with {ndim} dimensions" + (f" and {rows} rows" if rows is not None
                                                                         else ""), REBUILD_FIX)
        return a

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            rows = next((len(r["entries"]) for r in self.journal if r.get("shard") == name), None)
            self._shards[name] = self.load_array(self.journal_dir() / name, "kNN journal shard", 2, rows)
        return self._shards[name]

    def _base(self):
        if self._base_vectors is None:
            n = len(self.base_files)
            self._base_vectors = self.load_array(self.gen_dir() / "vectors.npy", "kNN vectors", 2, n)
            self._base_norms = self.load_array(self.gen_dir() / "norms.npy", "kNN norms", 1, n)
        return self._base_vectors, self._base_norms

    def raw_vectors(self, sources: list[tuple]) -> np.ndarray:
        """Raw (unnormalised) embeddings for a list of sources, grouped reads per file."""
        groups: dict[str, list[tuple[int, int]]] = {}
        for pos, (src, row) in enumerate(sources):
            groups.setdefault(src, []).append((pos, row))
        out = None
        for src, pairs in groups.items():
            pos = np.fromiter((p for p, _ in pairs), np.int64, len(pairs))
            rows = np.fromiter((r for _, r in pairs), np.int64, len(pairs))
            if src == BASE:
                vec, norms = self._base()
                vals = np.asarray(vec[rows], np.float32) * np.asarray(norms[rows], np.float32)[:, None]
            else:
                vals = np.asarray(self._shard(src)[rows], np.float32)
            if out is None:
                out = np.empty((len(sources), vals.shape[1]), np.float32)
            out[pos] = vals
        return out if out is not None else np.empty((0, 0), np.float32)

    # ------------------------------------------------------------------ append
    def append(self, entries: list[dict], vectors: np.ndarray | None, bad: list[dict]) -> None:
        """Durably log one batch: the shard first (atomic), then its log line (fsynced)."""
        if not entries and not bad:
            return
        jd = self.journal_dir()
        jd.mkdir(parents=True, exist_ok=True)
        rec = {"time": time.time(), "entries": entries, "bad": bad, **self.owner}
        if entries:
            rec["shard"] = f"{uuid.uuid4().hex}.npy"
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32))
            atomic_write_bytes(jd / rec["shard"], buf.getvalue())
        line = (json.dumps(rec, sort_keys=True) + "\n").encode("utf-8")
        with open(jd / "log.jsonl", "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.journal.append(rec)

    # ------------------------------------------------------------------ commit
    def new_generation_dir(self) -> Path:
        tmp = self.dir / f".tmp-gen-{self.gen + 1:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, manifest: dict) -> None:
        """Publish a fully written generation directory: rename it, then flip the manifest."""
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        final = self.gen_dir(self.gen + 1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        manifest = {**manifest, "format": FORMAT, "generation": self.gen + 1}
        atomic_write_json(self.dir / MANIFEST, manifest)  # <- the commit point
        old_gen, old_journal = self.gen_dir(), self.journal_dir()
        self._shards.clear()
        self._base_vectors = self._base_norms = None
        for p in (old_gen, old_journal):
            shutil.rmtree(p, ignore_errors=True)  # a mapped file may stay on Windows; open() retries
        self.manifest, self.gen, self.journal = manifest, self.gen + 1, []
        self.base_files = self._read_base_files()
