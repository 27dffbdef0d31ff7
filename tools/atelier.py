#!/usr/bin/env python3
"""Atelier's command line: set-up, demo, headless workflow runs, tests and benches.

    python tools/atelier.py setup            # install everything, link the pack, run the demo
    python tools/atelier.py demo [--tiny]    # run every example workflow on Atelier Mini (or the tiny models)
    python tools/atelier.py run WF.json [--tiny | --mini] [--out DIR]
    python tools/atelier.py test [-- PYTEST ARGS]
    python tools/atelier.py bench [NAME]
    python tools/atelier.py gallery          # screenshots of every workflow run in the real frontend
    python tools/atelier.py make-workflows   # regenerate workflows/*.json from tools/make_workflows.py

Run it as a script (``python tools/atelier.py``), never with ``python -m`` from the repo root:
the repo's ``nodes/`` package would shadow ComfyUI's ``nodes`` module.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_env  # noqa: E402


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"] + args
    print("[atelier] " + " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def _installed_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def install_requirements(comfy_path: Path | None) -> None:
    """One resolver call for the pack, its dev tools and ComfyUI, with torch held where it is."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-r", str(ROOT / "requirements-dev.txt")]
        if comfy_path is not None:
            reqs = (comfy_path / "requirements.txt").read_text().splitlines()
            # torchaudio from the registry often mismatches torch's CUDA build; ComfyUI runs without it.
            kept = [r for r in reqs if r.strip() and not r.strip().startswith(("torchaudio", "#"))]
            comfy_req = Path(tmp) / "comfyui-requirements.txt"
            comfy_req.write_text("\n".join(kept) + "\n")
            args += ["-r", str(comfy_req)]
        pins = [f"{d}=={v}" for d in ("torch", "torchvision") if (v := _installed_version(d))]
        if pins:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("\n".join(pins) + "\n")
            args += ["-c", str(constraints)]
        _pip(args)


def ensure_chromium() -> None:
    """The browser tests drive Debian's chromium (Playwright's own browser download is not used)."""
    import shutil
    if any(Path(p).is_file() for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")) or shutil.which("chromium"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print("[atelier] installing chromium for the browser tests (apt-get)", flush=True)
        subprocess.check_call([apt, "update", "-qq"], env=env)
        subprocess.check_call([apt, "install", "-y", "-qq", "chromium"], env=env)
    else:
        print("[atelier] chromium not found: the browser tests will be skipped. Install your distribution's "
              "chromium package (Debian/Ubuntu: sudo apt-get install chromium).", file=sys.stderr)


def cmd_setup(ns) -> int:
    try:
        comfy_path = comfy_env.find_comfyui(install=False)
    except comfy_env.ComfyNotFound:
        comfy_path = None
    if not ns.skip_install:
        install_requirements(comfy_path)
    if comfy_path is None:
        comfy_path = comfy_env.find_comfyui(install=True)
        if not ns.skip_install:
            install_requirements(comfy_path)
    comfy_env.link_pack(comfy_path)
    if ns.browser:
        ensure_chromium()
    print(f"[atelier] ready: ComfyUI at {comfy_path}", flush=True)
    if ns.no_demo:
        return 0
    return cmd_demo(ns)


def _headless(out_dir: Path):
    import headless
    logging.basicConfig(level=logging.WARNING)
    root = logging.getLogger()
    if not os.environ.get("ATELIER_VERBOSE"):
        # ComfyUI logs optional core nodes it cannot import (e.g. audio without torchaudio) as
        # warnings; they are not ours and say nothing about Atelier. ATELIER_VERBOSE=1 shows them.
        root.setLevel(logging.ERROR)
    try:
        return headless, headless.Headless(output_dir=str(out_dir))
    finally:
        root.setLevel(logging.WARNING)


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    head = ("workflow", "seconds", "images", "status")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def run_workflows(paths: list[Path], tiny: bool, out_dir: Path, mini: bool = False) -> int:
    headless, h = _headless(out_dir)
    rows, failed = [], 0
    for path in paths:
        t0 = time.perf_counter()
        try:
            result = h.run_workflow(path, tiny=tiny or mini, mini=mini)
            status, n = "ok", len(result["images"])
        except (headless.WorkflowError, ValueError) as e:
            status, n, failed = f"FAILED: {e}", 0, failed + 1
            print(f"[atelier] {path.name}: {e}", file=sys.stderr)
        rows.append((path.name, f"{time.perf_counter() - t0:.2f}", str(n), status.splitlines()[0]))
    print()
    _print_table(rows)
    print(f"\nimages written to {out_dir}")
    return 1 if failed else 0


def cmd_demo(ns) -> int:
    paths = sorted((ROOT / "workflows").glob("*.json"))
    if not paths:
        print("[atelier] no workflows in workflows/", file=sys.stderr)
        return 1
    mini = not getattr(ns, "tiny", False)
    print(f"[atelier] demo: every workflow in workflows/ on {'Atelier Mini' if mini else 'the tiny seeded models'}",
          flush=True)
    return run_workflows(paths, tiny=True, mini=mini, out_dir=Path(ns.out).resolve())


def cmd_run(ns) -> int:
    return run_workflows([Path(p) for p in ns.workflow], tiny=ns.tiny, mini=ns.mini, out_dir=Path(ns.out).resolve())


def cmd_test(ns) -> int:
    env = dict(os.environ, PYTHONSAFEPATH="1")  # keep the repo root off sys.path (Python >= 3.11)
    targets = [] if any(a.startswith("tests") or a.endswith(".py") for a in ns.pytest_args) else [str(ROOT / "tests")]
    cmd = [sys.executable, "-m", "pytest"] + targets + ns.pytest_args
    print("[atelier] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=str(ROOT), env=env)
    if rc == 5:
        print("[atelier] pytest collected no tests: that is a failure here.", file=sys.stderr)
        return 1
    return rc


def cmd_bench(ns) -> int:
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if ns.name:
        scripts = [s for s in scripts if ns.name in s.stem]
    rc = 0
    for s in scripts:
        print(f"[atelier] bench {s.name}", flush=True)
        rc |= subprocess.call([sys.executable, str(s)] + ns.bench_args, cwd=str(ROOT))
    return rc


def cmd_gallery(ns) -> int:
    import browser
    paths = sorted((ROOT / "workflows").glob("*.json"))
    out = ROOT / "docs" / "gallery"
    rows = browser.make_gallery(paths, out, mode="mini")
    _print_table([(r["workflow"], f"{r['seconds']:.2f}", str(r["images"]), "ok" if r["ok"] else "FAILED") for r in rows])
    print(f"\nscreenshots in {out.relative_to(ROOT)}/")
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_make_workflows(ns) -> int:
    spec = importlib.util.spec_from_file_location("make_workflows", HERE / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, h = _headless(Path(tempfile.mkdtemp()))
    for path in mod.write_all(h.node_classes, ROOT / "workflows"):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="atelier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install dependencies, find/install ComfyUI, link the pack, run the demo")
    s.add_argument("--no-demo", action="store_true", help="stop after installing")
    s.add_argument("--skip-install", action="store_true", help="do not run pip")
    s.add_argument("--browser", action="store_true", help="also install chromium (apt) for the browser tests")
    s.add_argument("--out", default=str(ROOT / "out" / "demo"), help="where the demo writes images")
    s.set_defaults(fn=cmd_setup)
    d = sub.add_parser("demo", help="run every example workflow headless on Atelier Mini")
    d.add_argument("--out", default=str(ROOT / "out" / "demo"))
    d.add_argument("--tiny", action="store_true", help="the random tiny models instead of Atelier Mini (plumbing only)")
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", help="run UI-format workflow files headless")
    r.add_argument("workflow", nargs="+")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="replace checkpoint loaders with the tiny seeded models")
    g.add_argument("--mini", action="store_true", help="replace checkpoint loaders with Atelier Mini (trained, shipped)")
    r.add_argument("--out", default=str(ROOT / "out" / "run"))
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("test", help="run the test suite")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_test)
    b = sub.add_parser("bench", help="run bench/bench_*.py")
    b.add_argument("name", nargs="?")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    gl = sub.add_parser("gallery", help="run every workflow in the real frontend (headless Chromium); save screenshots to docs/gallery")
    gl.set_defaults(fn=cmd_gallery)
    m = sub.add_parser("make-workflows", help="regenerate workflows/*.json")
    m.set_defaults(fn=cmd_make_workflows)
    ns = p.parse_args(argv)
    if getattr(ns, "pytest_args", None) and ns.pytest_args[:1] == ["--"]:
        ns.pytest_args = ns.pytest_args[1:]
    try:
        return ns.fn(ns)
    except comfy_env.ComfyNotFound as e:
        print(f"[atelier] {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
