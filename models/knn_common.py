"""Shared pieces of the kNN retriever: the error class, safe paths, atomic file writes.

Pure standard library; no ComfyUI imports.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from .errors import AtelierError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class KNNError(AtelierError):
    """A problem the user can fix; the message says what happened and what to do."""


class KNNCancelled(KNNError):
    """The build was cancelled; everything embedded so far is kept and the next build resumes."""


REBUILD_FIX = ("rebuild the index: run Atelier kNN Build Index on it with 'rebuild' on (or tools/build_index.py "
               "--rebuild); the images are embedded again and the damaged files replaced")


def bad_file(path, input_name: str, what: str, e: BaseException | str, fix: str) -> KNNError:
    """``<input>: <file> (<path>) is not a readable <what> file (<reason>); <fix>`` as a KNNError: the shape of
    the glue's corrupt-file errors, for models/, which cannot import the glue."""
    text = str(e).strip()
    reason = text.splitlines()[0] if text else type(e).__name__
    err = KNNError(f"{input_name}: {os.path.basename(str(path))} ({path}) is not a readable {what} file ({reason}); "
                   f"{fix}")
    err.input = input_name
    return err


_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 _.\-]{0,62}[A-Za-z0-9_\-])?$")


def check_index_name(name: str) -> str:
    """An index (database) name: one folder level, letters, digits, spaces, '_', '-', '.'."""
    name = (name or "").strip()
    if not _NAME_RE.match(name):
        raise KNNError(f"index_name: {name!r} is not a valid index name; use letters, digits, spaces, '_', '-' "
                       "or '.' (at most 64, starting with a letter or digit), no slashes.", "index_name")
    return name


def safe_join(root: str | os.PathLike, rel: str) -> Path:
    """`root/rel`, refusing anything (``..``, absolute paths, symlinks) that resolves outside `root`."""
    root_p = Path(root).resolve()
    if not rel or Path(rel).is_absolute() or Path(rel).drive:
        raise KNNError(f"Refusing path {rel!r}: it must be a relative path inside {root_p}.")
    full = (root_p / rel).resolve()
    if full != root_p and root_p not in full.parents:
        raise KNNError(f"Refusing path {rel!r}: it leaves its folder {root_p}.")
    return full


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new."""
    path = Path(path)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}{path.suffix}"
    fd = os.open(str(tmp), os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))
