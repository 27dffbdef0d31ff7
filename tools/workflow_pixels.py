#!/usr/bin/env python3
"""Run every example workflow headless on Atelier Mini with fresh private folders (input, output and the
pack's model folders in a temporary directory, so nothing is reused or written into your ComfyUI) and save
the output images' pixels to an .npz; with --compare, compare two such files image by image.

    python tools/workflow_pixels.py run CHECKOUT OUT.npz     # CHECKOUT: a clone of this repo at some commit
    python tools/workflow_pixels.py compare BEFORE.npz AFTER.npz

This is how a refactor is shown to keep behaviour: run it on the commit before and the commit after, then compare.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def run(root: Path, out: str) -> int:
    sys.path.insert(0, str(root / "tools"))
    import headless
    import numpy as np
    from PIL import Image
    tmp = Path(tempfile.mkdtemp(prefix="atelier_pixels_"))
    (tmp / "input").mkdir()
    h = headless.Headless(pack_path=str(root), output_dir=str(tmp / "output"), input_dir=str(tmp / "input"),
                          user_dir=str(tmp / "user"))
    example = Path(h.comfy_path) / "input" / "example.png"
    if example.is_file():
        shutil.copy(example, tmp / "input" / "example.png")
    fp = h.folder_paths
    for name in [n for n in fp.folder_names_and_paths if n.startswith("atelier_") and n != "atelier_knn_images"]:
        fp.folder_names_and_paths[name] = ([str(tmp / "models" / name)], fp.folder_names_and_paths[name][1])
    arrays, failed = {}, 0
    for wf in sorted((root / "workflows").glob("*.json")):
        try:
            r = h.run_workflow(wf, tiny=True, mini=True)
        except Exception as e:  # noqa: BLE001  reported and counted
            print(f"{wf.name}: FAILED {str(e)[:200]}", flush=True)
            failed += 1
            continue
        saved = sorted(p for p in r["images"] if str(p).startswith(str(tmp / "output")))
        for i, p in enumerate(saved):
            arrays[f"{wf.stem}/{i}"] = np.asarray(Image.open(p))
        print(f"{wf.name}: {len(saved)} images", flush=True)
    np.savez(out, **arrays)
    return 1 if failed else 0


def compare(a_path: str, b_path: str) -> int:
    import numpy as np
    a, b = np.load(a_path), np.load(b_path)
    same = [k for k in a.files if k in b.files and np.array_equal(a[k], b[k])]
    differ = [k for k in a.files if k in b.files and k not in same]
    print(f"identical {len(same)} of {len(a.files)}; differ {differ}; only in the first {sorted(set(a.files) - set(b.files))}; "
          f"only in the second {sorted(set(b.files) - set(a.files))}")
    return 1 if differ or set(a.files) - set(b.files) else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        sys.exit(run(Path(sys.argv[2]).resolve(), sys.argv[3]))
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    print(__doc__)
    sys.exit(2)
