"""Composition matrix: every technique × core model patches × order, on the tiny models.

    python bench/bench_compose.py [--steps N]

Prints, per cell, the technique's effect with and without the core patch, the patch's effect with and
without the technique, and whether the technique's no-op setting is bit-identical to the patch alone
(tools/compose_matrix.py says how each is measured). The suite runs a subset of this grid
(tests/test_compose_matrix.py); this is the whole of it. Writes bench/results/compose.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ns = ap.parse_args()
    h = harness.boot()
    fp = h.folder_paths
    tmp = tempfile.mkdtemp(prefix="atelier_compose_")
    for name in [n for n in fp.folder_names_and_paths if n.startswith("atelier_") and n != "atelier_knn_images"]:
        fp.folder_names_and_paths[name] = ([f"{tmp}/{name}"], fp.folder_names_and_paths[name][1])
    import compose_matrix as cm
    m = cm.Matrix(h, steps=2 if harness.quick() else ns.steps)
    rows = []
    for t in cm.TECHNIQUES.values():
        for patch in cm.PATCHES:
            for order in ("after", "before"):
                try:
                    rows.append(m.cell(t, patch, order))
                except Exception as e:  # noqa: BLE001  a cell that cannot run is reported, not fatal
                    rows.append({"technique": t.name, "patch": patch, "order": order, "error": str(e)})
                print(cm.format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(cm.format_table(rows))
    kept = sum(1 for r in rows if r.get("ok"))
    print(f"\n{kept}/{len(rows)} cells keep both effects with an exact no-op")
    out = harness.ROOT / "bench" / "results" / ("quick" if harness.quick() else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compose.json").write_text(json.dumps({"bench": "compose", "device": harness.device_info(),
                                                  "steps": m.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
