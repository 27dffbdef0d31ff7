"""Shared bench harness: boot ComfyUI headless once, time callables, print JSON and a table.

Every bench reports its technique as a ratio to the core baseline measured in the same run
(machines are noisy; absolute times only mean something on a GPU). Run a bench as a script:
``python bench/bench_<name>.py`` (or ``python tools/atelier.py bench <name>``).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(TOOLS))


#: Benches run against a ComfyUI base directory of their own (models/, input/, user/ ...), as the demo does:
#: the worlds, indexes and predictors they build never land in the user's ComfyUI folders.
#: ATELIER_BENCH_BASE picks another one.
BENCH_BASE = Path(os.environ.get("ATELIER_BENCH_BASE") or ROOT / "out" / "bench_base")


def boot(out_dir: str | None = None):
    """The in-process ComfyUI with the pack loaded (tools/headless.Headless), on the bench's own base dir."""
    import headless
    logging.basicConfig(level=logging.ERROR)
    if headless.Headless.current() is not None:
        return headless.Headless.current()
    out = out_dir or str(ROOT / "out" / "bench")
    BENCH_BASE.mkdir(parents=True, exist_ok=True)
    return headless.Headless(output_dir=out, base_dir=str(BENCH_BASE))


def device_info() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timeit(fn, repeats: int = 3, warmup: int = 1) -> dict:
    """Median/min wall seconds of fn() and the peak memory it reached (CUDA or process RSS)."""
    import torch
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
    out["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mb()
    out["peak_kind"] = "cuda_allocated" if cuda else "process_max_rss"
    return out


def report(name: str, rows: list[dict], extra: dict | None = None, out_dir: Path | None = None) -> dict:
    """Print a short table and the JSON document; also write bench/results/<name>.json
    (bench/results/quick/<name>.json for a smoke run)."""
    doc = {"bench": name, "device": device_info(), "rows": rows, **(extra or {})}
    cols = [c for c in ("case", "median_s", "per_step_s", "ratio", "peak_mb") if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
    print(json.dumps(doc, indent=2, default=str))
    # A smoke run (ATELIER_BENCH_QUICK=1) never overwrites a full run's figures.
    out_dir = out_dir or ROOT / "bench" / "results" / ("quick" if quick() else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str))
    return doc


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def quick() -> bool:
    """ATELIER_BENCH_QUICK=1 shrinks every bench to a smoke run (used by the test suite)."""
    return os.environ.get("ATELIER_BENCH_QUICK", "") not in ("", "0")
