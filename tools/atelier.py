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
import shutil
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

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


def _have(dist: str) -> bool:
    return _installed_version(dist) is not None


# torch and torchvision are ComfyUI's: the pack never installs them implicitly (a plain resolver call in a
# bare environment pulls the registry's default build, on Linux the CUDA one with ~4 GB of nvidia/triton
# wheels, whatever the machine has).
TORCH_DISTS = ("torch", "torchvision", "torchaudio")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _has_nvidia_gpu() -> bool:
    import shutil
    return shutil.which("nvidia-smi") is not None


def ensure_torch(choice: str | None) -> bool:
    """torch + torchvision present, or installed as ``choice`` says ("cpu": the CPU-only build from
    download.pytorch.org; "default": the registry's build, CUDA on Linux). Without a choice, a machine with
    an NVIDIA GPU gets the default build; one without is told both commands and nothing is installed."""
    if _have("torch") and _have("torchvision"):
        print(f"[atelier] torch {_installed_version('torch')}, torchvision {_installed_version('torchvision')} "
              f"already in {sys.executable}: kept as they are", flush=True)
        return True
    if choice is None and _has_nvidia_gpu():
        choice = "default"
    if choice == "cpu":
        _pip(["torch", "torchvision", "--index-url", TORCH_CPU_INDEX])
        return True
    if choice == "default":
        _pip(["torch", "torchvision"])
        return True
    me = f"{sys.executable} {Path(sys.argv[0]).as_posix()}" if sys.argv and sys.argv[0].endswith(".py") else \
        "python3 tools/atelier.py"
    print(f"[atelier] torch is not installed in {sys.executable}, and this machine has no NVIDIA GPU. ComfyUI "
          "needs torch and torchvision; choose a build and run setup again with it:\n"
          f"    {me} setup --torch cpu       # the CPU-only build from {TORCH_CPU_INDEX} (no CUDA wheels)\n"
          f"    {me} setup --torch default   # the package index's default build: on Linux the CUDA one "
          "(~4 GB of nvidia/triton wheels; it runs on a CPU too)\n"
          "  or run setup with the Python of an environment that already has torch (ComfyUI's own).",
          file=sys.stderr)
    return False


def install_requirements(comfy_path: Path | None) -> None:
    """The pack's run-time requirements and ComfyUI's (torch, torchvision, torchaudio left out and the installed
    torch/torchvision held where they are) in one resolver call. Test tools are not installed here
    (``test`` brings its own, into .tools/)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-r", str(ROOT / "requirements.txt")]
        if comfy_path is not None:
            reqs = (comfy_path / "requirements.txt").read_text().splitlines()
            # torchaudio from the registry often mismatches torch's CUDA build; ComfyUI runs without it.
            kept = [r for r in reqs if r.strip() and not r.strip().startswith("#")
                    and _req_name(r) not in TORCH_DISTS]
            comfy_req = Path(tmp) / "comfyui-requirements.txt"
            comfy_req.write_text("\n".join(kept) + "\n")
            args += ["-r", str(comfy_req)]
        pins = [f"{d}=={v}" for d in ("torch", "torchvision") if (v := _installed_version(d))]
        if pins:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("\n".join(pins) + "\n")
            args += ["-c", str(constraints)]
        _pip(args)


def _req_name(line: str) -> str:
    import re
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return m.group(1).lower().replace("_", "-") if m else ""


# Development tools (pytest, playwright, comfy-cli, ruff: requirements-dev.txt) live in .tools/<env>/ of this
# checkout, not in the environment ComfyUI runs in; `test` and `setup` (for comfy-cli) install them there
# when the environment lacks them, and put .tools/ on PYTHONPATH for what they start.
# One folder per Python environment (what it holds was chosen and pruned against that environment).
TOOLS_DIR = ROOT / ".tools" / (f"py{sys.version_info[0]}{sys.version_info[1]}-"
                               + __import__("hashlib").sha1(sys.prefix.encode()).hexdigest()[:8])
# A tool whose module is not named like its distribution ('-' -> '_'): its module here.
IMPORT_NAMES = {"pytest-xdist": "xdist"}
DEV_MODULES = {IMPORT_NAMES.get(line.strip(), line.strip().replace("-", "_")): line.strip()
               for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")}


def _missing_modules(modules) -> list[str]:
    added = str(TOOLS_DIR) not in sys.path
    if added:
        sys.path.append(str(TOOLS_DIR))
    try:
        importlib.invalidate_caches()
        return [m for m in modules if importlib.util.find_spec(m) is None]
    finally:
        if added:
            sys.path.remove(str(TOOLS_DIR))


def tools_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    if TOOLS_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(TOOLS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def ensure_dev_tools(modules=tuple(DEV_MODULES)) -> list[str]:
    """Install the missing ones of ``modules`` into .tools/ (pip --target); what the environment already has
    (pytest's or comfy-cli's dependencies ComfyUI also uses) is removed from .tools/ again, so nothing there
    shadows a package ComfyUI runs with. Returns the modules still missing."""
    missing = _missing_modules(modules)
    if not missing:
        return []
    dists = [DEV_MODULES[m] for m in missing]
    print(f"[atelier] test tools {', '.join(dists)} are not in {sys.executable}: installing them into "
          f"{TOOLS_DIR}/ (not into the environment ComfyUI runs in)", flush=True)
    try:
        _pip(["--target", str(TOOLS_DIR), "--upgrade", "--quiet"] + dists)
    except subprocess.CalledProcessError as e:
        print(f"[atelier] could not install {', '.join(dists)} (pip exit {e.returncode})", file=sys.stderr)
    _prune_tools_dir(set(dists))
    return _missing_modules(modules)


def _prune_tools_dir(keep: set[str]) -> None:
    """Remove from .tools/ every distribution the environment itself has (by name), except ``keep``."""
    from importlib import metadata
    keep = {k.lower().replace("_", "-") for k in keep}
    for info in sorted(TOOLS_DIR.glob("*.dist-info")):
        name = info.name[:-len(".dist-info")].rsplit("-", 1)[0].lower().replace("_", "-")
        if name in keep:
            continue
        try:
            there = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Path(str(there.locate_file(""))).resolve() == TOOLS_DIR.resolve():
            continue  # only found in .tools/ itself
        record = info / "RECORD"
        files = [line.split(",")[0] for line in record.read_text().splitlines()] if record.is_file() else []
        for rel in files:
            f = (TOOLS_DIR / rel).resolve()
            if TOOLS_DIR.resolve() in f.parents and f.is_file():
                f.unlink()
        shutil.rmtree(info, ignore_errors=True)
    for d in sorted((p for p in TOOLS_DIR.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()  # empty folders left by the removed distributions
        except OSError:
            pass


CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_found() -> bool:
    import shutil
    env = os.environ.get("ATELIER_CHROMIUM")
    return any(Path(p).is_file() for p in ((env,) if env else ()) + CHROMIUM_PATHS) or bool(shutil.which("chromium"))


def ensure_chromium() -> bool:
    """The browser tests drive Debian's chromium (Playwright's own browser download is not used): installed
    with apt-get when this runs as root on a Debian/Ubuntu system; else the fix is said."""
    import shutil
    if chromium_found():
        return True
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print("[atelier] installing chromium for the browser tests (apt-get)", flush=True)
        try:
            subprocess.check_call([apt, "update", "-qq"], env=env)
            subprocess.check_call([apt, "install", "-y", "-qq", "chromium"], env=env)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"[atelier] apt-get could not install chromium ({e})", file=sys.stderr)
        return chromium_found()
    print("[atelier] chromium not found and not installable from here (needs root and apt-get): the browser "
          "tests will not run. Install your distribution's chromium package (Debian/Ubuntu: sudo apt-get "
          "install chromium).", file=sys.stderr)
    return False


def cmd_setup(ns) -> int:
    try:
        comfy_path = comfy_env.find_comfyui(install=False)
    except comfy_env.ComfyNotFound:
        comfy_path = None
    if not ns.skip_install:
        if not ensure_torch(ns.torch):
            return 2
        install_requirements(comfy_path)
    if comfy_path is None:
        if _missing_modules(["comfy_cli"]) and not shutil.which("comfy"):
            ensure_dev_tools(["comfy_cli"])
        comfy_path = comfy_env.find_comfyui(install=True, env=tools_env())
        if not ns.skip_install:
            install_requirements(comfy_path)
    comfy_env.link_pack(comfy_path)
    if ns.browser:
        ensure_chromium()
    print(f"[atelier] ready: ComfyUI at {comfy_path}, Python {sys.executable}", flush=True)
    if ns.no_demo:
        return 0
    return cmd_demo(ns)


def _headless(out_dir: Path, base_dir: Path | None = None):
    """Boot ComfyUI in this process; ``base_dir``: a ComfyUI base directory of its own (models/, input/,
    temp/, user/ there) instead of the ComfyUI folder's; images go to ``out_dir`` either way."""
    import headless
    logging.basicConfig(level=logging.WARNING)
    root = logging.getLogger()
    if not os.environ.get("ATELIER_VERBOSE"):
        # ComfyUI logs optional core nodes it cannot import (e.g. audio without torchaudio) as
        # warnings; they are not ours and say nothing about Atelier. ATELIER_VERBOSE=1 shows them.
        root.setLevel(logging.ERROR)
    try:
        return headless, headless.Headless(output_dir=str(out_dir), base_dir=str(base_dir) if base_dir else None)
    finally:
        root.setLevel(logging.WARNING)


def _print_table(rows: list[tuple], head=("workflow", "seconds", "images", "status")) -> None:
    widths = [max(len(str(r[i])) for r in list(rows) + [head]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def _files(folder: str | Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its (mtime_ns, size): what a run wrote is the difference."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def _written(before: dict, after: dict) -> int:
    return sum(1 for p, sig in after.items() if before.get(p) != sig)


class Talk:
    """What the CLI says while a workflow runs. A listener for ``Headless.listen``: it follows which node runs
    ("executing") and its progress bar ("progress"); a clock thread prints the running node once it has run
    ``first`` seconds, then every ``every`` seconds: its title, how long it has run, and with a progress
    bar the steps done and the time left at the rate so far. Short workflows print nothing here."""

    def __init__(self, titles: dict, every: float = 10.0, first: float = 3.0, out=None):
        import threading
        self.titles, self.every, self.first = titles, every, first
        self.out = out or sys.stdout
        self.node, self.since, self.bar = None, 0.0, None  # bar: [value, total, t_first, v_first]
        self.said = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._clock, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def __call__(self, event: str, data: dict) -> None:
        if not isinstance(data, dict):
            return
        now = time.perf_counter()
        with self._lock:
            if event == "executing":
                node = data.get("node")
                if node != self.node:
                    self.node, self.since, self.bar, self.said = node, now, None, 0.0
            elif event == "progress":
                value, total = data.get("value") or 0, data.get("max") or 0
                if data.get("node") is not None and data.get("node") != self.node:
                    self.node, self.since, self.bar, self.said = data.get("node"), now, None, 0.0
                if self.bar is None or value < self.bar[0] or total != self.bar[1]:
                    self.bar = [value, total, now, value]  # a new bar (or a second pass on the node)
                else:
                    self.bar[0] = value

    def line(self, now: float) -> str | None:
        """The status line of the running node, or None when nothing runs."""
        if self.node is None:
            return None
        text = f"           {self.titles.get(str(self.node), str(self.node))}: running for {now - self.since:.0f} s"
        if self.bar is not None:
            value, total, t0, v0 = self.bar
            text += f", {value}/{total}"
            if value > v0 and total > value:
                text += f", about {(now - t0) / (value - v0) * (total - value):.0f} s left"
        return text

    def _clock(self) -> None:
        while not self._stop.wait(0.5):
            now = time.perf_counter()
            with self._lock:
                due = self.node is not None and now - self.since >= self.first and \
                    (self.said == 0.0 or now - self.said >= self.every)
                text = self.line(now) if due else None
                if text:
                    self.said = now
            if text:
                print(text, file=self.out, flush=True)


def run_workflows(paths: list[Path], tiny: bool, out_dir: Path, mini: bool = False, base_dir: Path | None = None,
                  edit_prompt=None) -> int:
    headless, h = _headless(out_dir, base_dir)
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)  # ComfyUI's tqdm bars: Talk's lines say it (and log cleanly)
    fp = h.folder_paths
    out_dir, temp_dir = fp.get_output_directory(), fp.get_temp_directory()
    rows, failed = [], 0
    t_all = time.perf_counter()
    for i, path in enumerate(paths, 1):
        print(f"[atelier] ({i}/{len(paths)}) {path.name} ...", flush=True)
        before_out, before_tmp = _files(out_dir), _files(temp_dir)
        t0 = time.perf_counter()
        try:
            workflow = h.load_workflow(path)
            titles = {nid: n.get("_meta", {}).get("title") or n["class_type"]
                      for nid, n in h.to_prompt(workflow, tiny=tiny or mini, mini=mini).items()}
            with Talk(titles) as talk:
                h.listen(talk)
                try:
                    # a client id makes the executor report which node runs ("executing"), as to a browser
                    h.run_workflow(workflow, tiny=tiny or mini, mini=mini, edit_prompt=edit_prompt,
                                   extra_data={"client_id": "atelier-cli"})
                finally:
                    h.listen(None)
            status = "ok"
        except (headless.WorkflowError, ValueError) as e:
            status, failed = f"FAILED: {e}", failed + 1
            print(f"[atelier] {path.name}: {e}", file=sys.stderr)
        seconds = time.perf_counter() - t0
        saved, previews = _written(before_out, _files(out_dir)), _written(before_tmp, _files(temp_dir))
        print(f"           {status.splitlines()[0]}, {seconds:.1f} s, {saved} saved, {previews} previews", flush=True)
        rows.append((path.name, f"{seconds:.2f}", str(saved), str(previews), status.splitlines()[0]))
    print()
    _print_table(rows, head=("workflow", "seconds", "saved", "previews", "status"))
    print(f"\n{len(rows) - failed}/{len(rows)} ok in {time.perf_counter() - t_all:.0f} s; "
          f"{sum(int(r[2]) for r in rows)} images saved in {out_dir}, "
          f"{sum(int(r[3]) for r in rows)} previews in {temp_dir}")
    return 1 if failed else 0


# The demo's own settings: what makes a long example workflow short when the demo runs it. The workflow
# files keep their real settings (what a user who loads one gets); the demo changes only these inputs.
# Train LEP: 30 steps instead of the files' 100 (the LEP workflows train on their first run and load after;
# training was 36 % of the demo's CPU time); the two sketch workflows load the predictor it trained.
DEMO_SETTINGS: dict[str, dict] = {"AtelierTrainLEP": {"steps": 30}}


def demo_prompt(prompt: dict) -> dict:
    out = {}
    for nid, node in prompt.items():
        over = DEMO_SETTINGS.get(node["class_type"])
        out[nid] = {**node, "inputs": {**node["inputs"], **over}} if over else node
    return out


SCRATCH_MARK = ".atelier_demo_base"


def demo_base(ns) -> Path | None:
    """The ComfyUI base directory the demo runs on: None (the ComfyUI folder's own) with --into-comfyui,
    else --base-directory (default out/demo_base/), emptied first when the demo made it (its mark inside)."""
    if getattr(ns, "into_comfyui", False):
        return None
    base = Path(ns.base_directory).resolve()
    if base.exists() and (base / SCRATCH_MARK).is_file():
        shutil.rmtree(base)
    if not base.exists():
        base.mkdir(parents=True)
        (base / SCRATCH_MARK).write_text("made by `python tools/atelier.py demo`; emptied at each demo run\n")
    (base / "input").mkdir(exist_ok=True)
    example = comfy_env.find_comfyui(verbose=False) / "input" / "example.png"
    if example.is_file() and not (base / "input" / "example.png").exists():
        shutil.copy(example, base / "input" / "example.png")  # the image the sketch/LEP workflows load
    return base


def cmd_demo(ns) -> int:
    paths = sorted((ROOT / "workflows").glob("*.json"))
    wanted = getattr(ns, "workflows", None)
    if wanted:
        unknown = [w for w in wanted if not (ROOT / "workflows" / Path(w).name).is_file()]
        if unknown:
            print(f"[atelier] not in workflows/: {', '.join(unknown)}", file=sys.stderr)
            return 2
        paths = [ROOT / "workflows" / Path(w).name for w in wanted]
    if not paths:
        print("[atelier] no workflows in workflows/", file=sys.stderr)
        return 1
    mini = not getattr(ns, "tiny", False)
    base = demo_base(ns)
    where = (f"ComfyUI base directory {base} (models, input, temp; nothing is written into your ComfyUI)"
             if base else "your ComfyUI's own models/, input/ and temp/ folders (--into-comfyui)")
    print(f"[atelier] demo: {len(paths)} workflows in workflows/ on "
          f"{'Atelier Mini' if mini else 'the tiny seeded models'}, with the demo's short settings, on {where}",
          flush=True)
    threads = getattr(ns, "threads", 1)
    if threads:
        # Mini's ops are small: one thread runs them about as fast as two on an idle machine, and many times
        # faster on a loaded one (two threads wait on each other at every op when the other is descheduled).
        import torch
        torch.set_num_threads(threads)
    return run_workflows(paths, tiny=True, mini=mini, out_dir=Path(ns.out).resolve(), base_dir=base,
                         edit_prompt=demo_prompt)


def cmd_run(ns) -> int:
    return run_workflows([Path(p) for p in ns.workflow], tiny=ns.tiny, mini=ns.mini, out_dir=Path(ns.out).resolve())


# Why a test did not run -> the one command that makes it run (first match of the skip reason wins).
SKIP_FIXES = (
    (("chromium", "playwright"), "the browser tests", "python3 tools/atelier.py setup --browser"),
    (("slow test",), "slow tests", "python3 tools/atelier.py test --slow"),
    (("comfyui not available", "comfyui is missing"), "tests that need ComfyUI", "python3 tools/atelier.py setup"),
    (("pymilvus", "milvus-lite", "faiss", "open_clip", "scipy"), "tests of optional run-time packages",
     "python3 -m pip install -r requirements.txt"),
    (("comfy_cli", "ruff", "could not import"), "tests whose tools are missing",
     "python3 tools/atelier.py test (it installs requirements-dev.txt into .tools/; needs the package index)"),
)


def _skips(junit: Path) -> tuple[int, list[str]]:
    """(tests run or skipped, skip reasons) from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET
    try:
        tree = ET.parse(junit)
    except (OSError, ET.ParseError):
        return 0, []
    cases = list(tree.iter("testcase"))
    reasons = [(sk.get("message") or sk.text or "").strip() for c in cases for sk in c.findall("skipped")]
    return len(cases), reasons


def skip_summary(total: int, reasons: list[str]) -> str | None:
    """The last line of `test` when tests did not run: how many, why, and the command that fixes each."""
    if not reasons:
        return None
    groups: dict[tuple[str, str], int] = {}
    for r in reasons:
        low = r.lower()
        for keys, what, fix in SKIP_FIXES:
            if any(k in low for k in keys):
                break
        else:
            what, fix = "other tests", "see the SKIPPED lines above (pytest -rs)"
        groups[(what, fix)] = groups.get((what, fix), 0) + 1
    parts = [f"{n} {what}: {fix}" for (what, fix), n in sorted(groups.items(), key=lambda kv: -kv[1])]
    n = len(reasons)
    return (f"[atelier] WARNING: {n} of {total} test{'s' if total != 1 else ''} did NOT run -- "
            + "; ".join(parts))


MAX_WORKERS = 4  # each pytest-xdist worker boots its own in-process ComfyUI (~1.5 GB with the tiny models)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def xdist_args(args: list[str], have_xdist: bool, cores: int | None = None) -> list[str]:
    """pytest-xdist's arguments for the suite: one worker per core (at most MAX_WORKERS), each test module on
    one worker (``--dist loadfile``: a module's tests share its module fixtures: trained predictors, servers,
    generated files). None when the user chose (``-n``/``--numprocesses``, ``-p no:xdist``, ``--dist``), when
    the run needs one process (``-s``/``--capture=no``: workers do not forward output; ``--pdb``/``--trace``),
    with one core, or without xdist."""
    cores = _cores() if cores is None else cores
    if not have_xdist or cores < 2:
        return []
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if (a.startswith("-n") and not a.startswith("--")) or a.startswith(("--numprocesses", "--dist", "--tx")):
            return []
        if (a == "-p" and nxt in ("no:xdist", "xdist")) or a in ("-pno:xdist", "-p=no:xdist"):
            return []
        if a in ("-s", "--capture=no", "--pdb", "--trace") or (a == "--capture" and nxt == "no"):
            return []
    return ["-n", str(min(cores, MAX_WORKERS)), "--dist", "loadfile"]


def cmd_test(ns) -> int:
    if not ns.no_install:
        still = ensure_dev_tools()
        if "pytest" in still:
            print("[atelier] pytest is missing and could not be installed: python3 -m pip install --target .tools "
                  "-r requirements-dev.txt (needs the package index)", file=sys.stderr)
            return 1
        ensure_chromium()
    env = tools_env(dict(os.environ, PYTHONSAFEPATH="1"))  # keep the repo root off sys.path (Python >= 3.11)
    if ns.slow:
        env["ATELIER_SLOW"] = "1"
    # One torch thread unless told otherwise: the tests' models are tiny, and on a loaded 2-core machine two
    # threads spin-wait on each other at every operation (measured 10-25x the CPU time).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    args = list(ns.pytest_args)
    targets = [] if any(a.startswith("tests") or a.endswith(".py") for a in args) else [str(ROOT / "tests")]
    with tempfile.TemporaryDirectory(prefix="atelier_test_") as tmp:
        junit = Path(tmp) / "junit.xml"
        own_junit = not any(a.startswith("--junit") for a in args)
        extra = [f"--junitxml={junit}", "-o", "junit_family=xunit1"] if own_junit else []
        workers = xdist_args(args, have_xdist=not _missing_modules(["xdist"]))
        if not workers and _missing_modules(["xdist"]):
            print("[atelier] pytest-xdist is missing: the tests run in one process (python3 tools/atelier.py test "
                  "without --no-install installs it into .tools/)", flush=True)
        cmd = [sys.executable, "-m", "pytest"] + targets + workers + args + extra
        print("[atelier] " + " ".join(cmd[:3] + targets + workers + args), flush=True)
        rc = subprocess.call(cmd, cwd=str(ROOT), env=env)
        total, reasons = _skips(junit) if own_junit else (0, [])
    if rc == 5:
        print("[atelier] pytest collected no tests: that is a failure here.", file=sys.stderr)
        return 1
    line = skip_summary(total, reasons)
    if line:
        ci_skips = [r for r in reasons if "slow test" not in r.lower()]
        if IN_CI and ci_skips and rc == 0:
            rc = 1
            line += " (CI=true: only slow tests may be skipped, so this run fails)"
        print(line, flush=True)
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


def _demo_args(p) -> None:
    p.add_argument("--out", default=str(ROOT / "out" / "demo"), help="where the demo saves images (default out/demo/)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the demo (default 1: fastest for Mini's small ops, above all on a busy "
                        "machine; 0 keeps torch's default)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--base-directory", default=str(ROOT / "out" / "demo_base"),
                       help="the ComfyUI base directory the demo runs on: models/, input/, temp/, user/ "
                            "(default out/demo_base/, emptied at each run)")
    where.add_argument("--into-comfyui", action="store_true",
                       help="run on your ComfyUI's own models/, input/ and temp/ folders instead (the demo's LEP, "
                            "kNN indexes and world images are then written there, with _mini/_tiny names)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="atelier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install dependencies, find/install ComfyUI, link the pack, run the demo")
    s.add_argument("--no-demo", action="store_true", help="stop after installing")
    s.add_argument("--skip-install", action="store_true", help="do not run pip")
    s.add_argument("--browser", action="store_true", help="also install chromium (apt) for the browser tests")
    s.add_argument("--torch", choices=("cpu", "default"),
                   help="when torch is missing: install the CPU-only build (cpu) or the registry's default build "
                        "(default; CUDA on Linux). Without it a machine with no NVIDIA GPU is asked to choose")
    _demo_args(s)
    s.set_defaults(fn=cmd_setup)
    d = sub.add_parser("demo", help="run every example workflow headless on Atelier Mini")
    _demo_args(d)
    d.add_argument("workflows", nargs="*", help="file names in workflows/ (default: every one)")
    d.add_argument("--tiny", action="store_true", help="the random tiny models instead of Atelier Mini (plumbing only)")
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", help="run UI-format workflow files headless")
    r.add_argument("workflow", nargs="+")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="replace checkpoint loaders with the tiny seeded models")
    g.add_argument("--mini", action="store_true", help="replace checkpoint loaders with Atelier Mini (trained, shipped)")
    r.add_argument("--out", default=str(ROOT / "out" / "run"))
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("test", help="run the test suite (installs the test tools into .tools/ and chromium when it can)")
    t.add_argument("--slow", action="store_true", help="also run the tests marked slow (ATELIER_SLOW=1)")
    t.add_argument("--no-install", action="store_true", help="install nothing (no test tools, no chromium)")
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
