"""A folder of generated-world images (coloured shapes with captions) to index: demo databases and a
reproducible test set for retrieval. Pure numpy/PIL + the world generator; no ComfyUI imports.

Files are ``world_<key>_<index>.png`` with the caption in ``world_<key>_<index>.txt``; ``key`` hashes the
seed, size and filters, so the same inputs give byte-identical files. Writing is idempotent (existing files
are kept) and atomic. Which files are ours is never guessed from their names: the caller passes the record
of the files the pack wrote into the folder (the glue's ``WrittenFiles`` manifest), and only files in it and
unchanged since are replaced or removed (our files from other settings or beyond ``count``). A file named
like ours that the pack did not write is never touched: one with exactly the bytes we would write is used
as it is; any other stops the node with its name.
"""
from __future__ import annotations

import hashlib
import os
import re
from io import BytesIO
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import world
from .knn_common import KNNError, atomic_write_bytes

OURS = re.compile(r"^world_([0-9a-f]{8})_(\d{5})\.(png|txt)$")
MAX_COUNT = 99999


def parse_names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """'red, orange' -> ('red', 'orange'); empty -> all of `allowed`."""
    names = tuple(dict.fromkeys(w.strip().lower() for w in re.split(r"[,\s]+", text or "") if w.strip()))
    if not names:
        return tuple(allowed)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise KNNError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)} (comma-separated), "
                       "or leave it empty for all.")
    return names


def world_config(colors: str = "", shapes: str = "") -> world.WorldConfig:
    cols = parse_names(colors, tuple(world.COLORS), "colors")
    shps = parse_names(shapes, world.SHAPES, "shapes")
    return world.WorldConfig(min_objects=1, max_objects=min(3, len(cols)), colors=cols, shapes=shps)


def folder_key(seed: int, size: int, config: world.WorldConfig) -> str:
    text = repr((int(seed), int(size), config.colors, config.shapes, config.min_objects, config.max_objects))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class _NoRecord:
    """No record of written files (direct calls without one): nothing is ever replaced or removed, files are
    only created."""

    def owns(self, name: str) -> bool:
        return False

    def remove(self, name: str) -> bool:
        return False

    def save(self) -> None:
        pass


def _create(folder: Path, name: str, data: bytes) -> None:
    """Create a file that does not exist yet, atomically, never through a link (O_EXCL on a temporary)."""
    atomic_write_bytes(folder / name, data)


def write_world_folder(folder: str | os.PathLike, seed: int = 0, count: int = 48, size: int = 128,
                       colors: str = "", shapes: str = "",
                       progress: Callable[[int, int], None] | None = None,
                       cancel: Callable[[], bool] | None = None,
                       written=None) -> tuple[list[Path], list[str], int]:
    """Make `folder` hold exactly `count` world images for these settings. Returns (image paths, captions,
    number of images written now). `written`: the record of files the pack wrote there (an object with
    ``owns(name)``, ``write(name, bytes)``, ``remove(name)``, ``save()``, e.g. the glue's WrittenFiles); it is
    saved before returning, also when cancelled. Without it nothing is replaced or removed."""
    if not 1 <= int(count) <= MAX_COUNT:
        raise KNNError(f"count: {count} is out of range; use 1 to {MAX_COUNT}.", "count")
    config = world_config(colors, shapes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rec = written if written is not None else _NoRecord()
    key = folder_key(seed, size, config)
    wanted = {f"world_{key}_{i:05d}.{ext}" for i in range(count) for ext in ("png", "txt")}
    paths, captions, done = [], [], 0
    try:
        for entry in sorted(os.listdir(folder)):
            if OURS.match(entry) and entry not in wanted:
                rec.remove(entry)  # only a file the pack wrote and nobody changed since
        for i in range(count):
            if cancel is not None and cancel():
                break
            names = (f"world_{key}_{i:05d}.png", f"world_{key}_{i:05d}.txt")
            png, txt = folder / names[0], folder / names[1]
            if rec.owns(names[0]) and rec.owns(names[1]):
                caption = txt.read_text(encoding="utf-8").strip()
            else:
                s = world.sample(int(seed), i, int(size), config)
                caption = s.caption
                buf = BytesIO()
                Image.fromarray(np.ascontiguousarray(s.image)).save(buf, format="PNG")
                blobs = (buf.getvalue(), (caption + "\n").encode("utf-8"))
                todo = []
                for name, data in zip(names, blobs):
                    p = folder / name
                    if rec.owns(name):
                        continue
                    if p.is_symlink() or p.exists():
                        if not p.is_symlink() and p.is_file() and p.read_bytes() == data:
                            continue  # the very bytes we would write: use it, but it stays not ours
                        raise KNNError(f"folder: {p} is named like this node's files but was not written by it "
                                       "(or was changed since); it was left untouched. Move or rename that file, "
                                       "or pick another folder.", "folder")
                    todo.append((name, data))
                for name, data in todo:
                    if written is not None:
                        written.write(name, data)
                    else:
                        _create(folder, name, data)
                done += bool(todo)
            paths.append(png)
            captions.append(caption)
            if progress is not None:
                progress(i + 1, count)
    finally:
        rec.save()
    return paths, captions, done
