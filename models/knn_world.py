"""A folder of generated-world images (coloured shapes with captions) to index: demo databases and a
reproducible test set for retrieval. Pure numpy/PIL + the world generator; no ComfyUI imports.

Files are ``world_<key>_<index>.png`` with the caption in ``world_<key>_<index>.txt``; ``key`` hashes the
seed, size and filters, so the same inputs give byte-identical files. Writing is idempotent (existing files
are kept), atomic (a hidden temporary file renamed into place, which scanners skip), and the folder is kept
in sync: our files from other settings or beyond ``count`` are removed. Other files are never touched.
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
from .knn_common import KNNError

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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_world_folder(folder: str | os.PathLike, seed: int = 0, count: int = 48, size: int = 128,
                       colors: str = "", shapes: str = "",
                       progress: Callable[[int, int], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> tuple[list[Path], list[str], int]:
    """Make `folder` hold exactly `count` world images for these settings. Returns (image paths, captions,
    number of files written now)."""
    if not 1 <= int(count) <= MAX_COUNT:
        raise KNNError(f"count: {count} is out of range; use 1 to {MAX_COUNT}.")
    config = world_config(colors, shapes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder_key(seed, size, config)
    wanted = {f"world_{key}_{i:05d}.{ext}" for i in range(count) for ext in ("png", "txt")}
    for entry in os.listdir(folder):
        if OURS.match(entry) and entry not in wanted:
            (folder / entry).unlink()
    paths, captions, written = [], [], 0
    for i in range(count):
        if cancel is not None and cancel():
            break
        png, txt = folder / f"world_{key}_{i:05d}.png", folder / f"world_{key}_{i:05d}.txt"
        if png.is_file() and txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
        else:
            s = world.sample(int(seed), i, int(size), config)
            caption = s.caption
            buf = BytesIO()
            Image.fromarray(np.ascontiguousarray(s.image)).save(buf, format="PNG")
            _atomic_write(png, buf.getvalue())
            _atomic_write(txt, (caption + "\n").encode("utf-8"))
            written += 1
        paths.append(png)
        captions.append(caption)
        if progress is not None:
            progress(i + 1, count)
    return paths, captions, written
