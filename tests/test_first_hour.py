"""A newcomer's first hour (issue 20): the demo runs on a scratch ComfyUI base directory of its own and
writes nothing into the user's ComfyUI; its table counts the files written; it says what runs; the test
command ends with a loud line when tests did not run (and fails under CI); test tools stay out of the
environment ComfyUI runs in."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

from atelier_testlib import ROOT, load_tool

# Runs tools/atelier.py in this interpreter with an audit hook that records every path opened for writing,
# created, renamed, copied, linked or removed (Python-level; PYTHONDONTWRITEBYTECODE keeps .pyc out).
_AUDIT = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    log, argv = sys.argv[1], sys.argv[2:]
    seen = []
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def path(p):
        return os.path.abspath(os.fsdecode(p)) if isinstance(p, (str, bytes, os.PathLike)) else None
    def hook(event, args):
        if event == "open":
            p, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & W):
                seen.append((event, path(p)))
        elif event in ("os.rename", "shutil.copyfile", "os.symlink", "os.link"):
            seen.append((event, path(args[1])))
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "shutil.rmtree"):
            seen.append((event, path(args[0])))
    def dump():
        with open(log, "w") as f:
            json.dump([s for s in seen if s[1]], f)
    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = [argv[0]] + argv[1:]
    runpy.run_path(argv[0], run_name="__main__")
""")


def _inside(p: str, root) -> bool:
    r = os.path.realpath(str(root))
    q = os.path.realpath(p)
    return q == r or q.startswith(r + os.sep)


def test_demo_writes_only_into_its_scratch_base_and_counts_files(comfy_path, tmp_path):
    base, out, log = tmp_path / "base", tmp_path / "out", tmp_path / "writes.json"
    script = tmp_path / "audit.py"
    script.write_text(_AUDIT)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", COMFYUI_PATH=str(comfy_path))
    env.pop("PYTHONSAFEPATH", None)
    # One short workflow that writes into all three kinds of folder: World Image Folder (input/), Build
    # Index (models/), Save/Preview Image (output/, temp/); the tiny models keep it to a second.
    cmd = [sys.executable, str(script), str(log), str(ROOT / "tools" / "atelier.py"), "demo",
           "knn_build_index.json", "--tiny", "--base-directory", str(base), "--out", str(out)]
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    writes = json.loads(log.read_text())
    # Nothing under the user's ComfyUI (models/, input/, output/, temp/, user/ or its code), nor in the pack.
    into_comfy = sorted({p for _, p in writes if _inside(p, comfy_path)})
    assert into_comfy == [], f"the demo wrote into the user's ComfyUI: {into_comfy[:10]}"
    into_pack = sorted({p for _, p in writes if _inside(p, ROOT)})
    assert into_pack == [], f"the demo wrote into the pack's checkout: {into_pack[:10]}"
    # ...and what it did write went to the scratch base: the world images into its input/, the index into
    # its models/ (so the check above watched real writes).
    assert any(_inside(p, base / "input" / "atelier_world") for _, p in writes)
    assert any(_inside(p, base / "models") for _, p in writes)
    # Each workflow is named when it starts; the table's columns count the files actually written.
    assert "(1/1) knn_build_index.json" in r.stdout
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^(\S+\.json)\s+[\d.]+\s+(\d+)\s+(\d+)\s+ok\s*$", r.stdout, re.M)}
    assert set(rows) == {"knn_build_index.json"}, r.stdout
    saved = sorted(p.name for p in out.rglob("*") if p.is_file())
    previews = sorted(p.name for p in (base / "temp").rglob("*") if p.is_file())
    assert rows["knn_build_index.json"] == (len(saved), len(previews)) and len(saved) >= 1, (rows, saved, previews)
    assert all(n.endswith(".png") for n in saved)


_SKIPPING = textwrap.dedent("""
    import pytest

    def test_runs():
        assert True

    def test_needs_chromium():
        pytest.skip("Chromium not installed: browser tests skipped")

    @pytest.mark.skip(reason="slow test: run with ATELIER_SLOW=1 (python3 tools/atelier.py test --slow)")
    def test_slow():
        pass
""")


def test_test_command_ends_loudly_when_tests_did_not_run(tmp_path):
    f = tmp_path / "test_skipping.py"
    f.write_text(_SKIPPING)
    cmd = [sys.executable, str(ROOT / "tools" / "atelier.py"), "test", "--no-install", "--", str(f), "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    local = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    last = local.stdout.strip().splitlines()[-1]
    assert local.returncode == 0, local.stdout + local.stderr
    assert "2 of 3 tests did NOT run" in last, last
    assert "1 the browser tests: python3 tools/atelier.py setup --browser" in last, last
    assert "1 slow tests: python3 tools/atelier.py test --slow" in last, last
    ci = subprocess.run(cmd, cwd=str(tmp_path), env=dict(env, CI="true"), capture_output=True, text=True, timeout=600)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "CI=true" in ci.stdout.strip().splitlines()[-1]


def test_no_line_when_everything_ran():
    atelier = load_tool("atelier")
    assert atelier.skip_summary(5, []) is None
    line = atelier.skip_summary(7, ["something odd"])
    assert line.startswith("[atelier] WARNING: 1 of 7 tests did NOT run") and "pytest -rs" in line


def test_test_command_runs_one_worker_per_core_unless_told_otherwise():
    """`test` runs pytest-xdist with a worker per core (capped), a module's tests on one worker; what the user
    passes wins, and runs that need one process (output shown, a debugger) get one."""
    atelier = load_tool("atelier")
    assert atelier.DEV_MODULES["xdist"] == "pytest-xdist"  # installed into .tools/ under its module's name
    two = ["-n", "2", "--dist", "loadfile"]
    assert atelier.xdist_args([], True, cores=2) == two
    assert atelier.xdist_args(["-k", "tiny", "-x", "--durations=20"], True, cores=2) == two
    assert atelier.xdist_args([], True, cores=64) == ["-n", str(atelier.MAX_WORKERS), "--dist", "loadfile"]
    assert atelier.xdist_args([], True, cores=1) == []
    assert atelier.xdist_args([], False, cores=2) == []
    for told in (["-n", "0"], ["-n3"], ["--numprocesses=3"], ["-p", "no:xdist"], ["--dist", "load"], ["-s"],
                 ["--capture=no"], ["--pdb"], ["-x", "--trace"]):
        assert atelier.xdist_args(told, True, cores=2) == [], told


def test_tools_dir_keeps_only_what_the_environment_lacks(tmp_path, monkeypatch):
    """Test tools go to .tools/ (pip --target); a dependency the environment already has (here: pytest
    itself, standing for e.g. packaging) is removed there, so it never shadows ComfyUI's copy."""
    atelier = load_tool("atelier")
    tools = tmp_path / ".tools"
    for dist, files in (("pytest-0.0.1", ["pytest_shadow/__init__.py"]), ("atelier_only_tool-1.0", ["only/x.py"])):
        info = tools / f"{dist}.dist-info"
        info.mkdir(parents=True)
        for rel in files:
            (tools / rel).parent.mkdir(parents=True, exist_ok=True)
            (tools / rel).write_text("")
        (info / "RECORD").write_text("".join(f"{rel},," + "\n" for rel in files + [f"{info.name}/RECORD"]))
    monkeypatch.setattr(atelier, "TOOLS_DIR", tools)
    atelier._prune_tools_dir(keep=set())
    left = sorted(str(p.relative_to(tools)) for p in tools.rglob("*"))
    assert left == ["atelier_only_tool-1.0.dist-info", "atelier_only_tool-1.0.dist-info/RECORD", "only", "only/x.py"]


def test_requirements_leave_torch_to_comfyui_and_tests_tools_apart():
    runtime = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    dev = [ln.strip() for ln in (ROOT / "requirements-dev.txt").read_text().splitlines()
           if ln.strip() and not ln.startswith("#")]
    assert not {"torch", "torchvision", "torchaudio"} & set(runtime)
    assert not any(d.startswith("-r") for d in dev), "dev tools must not drag the run-time requirements along"
    assert {"pytest", "playwright"} <= set(dev)
