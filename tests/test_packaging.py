"""The pack as the Comfy Registry and ComfyUI-Manager see it: pyproject metadata, the checks
`comfy node validate` runs, and the archive `comfy node pack` builds (git-tracked files minus
.comfyignore), through comfy-cli's own code. No ComfyUI needed."""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

from atelier_testlib import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Paths a ComfyUI user's install needs; every git-tracked file under the folders ships.
RUNTIME_FILES = ("__init__.py", "pyproject.toml", "README.md", "requirements.txt")
RUNTIME_DIRS = ("nodes/", "models/", "web/", "weights/", "workflows/")
DEV_DIRS = ("tests/", "bench/", ".ci/", "docs/")
# Commands of tools/atelier.py that are development-only and import a tool that does not ship.
DEV_ONLY_IMPORTS = {"browser"}  # `atelier.py gallery`


def _git_tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: comfy node pack would archive the whole tree")
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> list[str]:
    """The file list of the archive comfy-cli's packer builds from this checkout."""
    file_utils = pytest.importorskip("comfy_cli.file_utils")
    _git_tracked()
    target = tmp_path_factory.mktemp("pack") / "node.zip"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            file_utils.zip_files(str(target), includes=PYPROJECT["tool"]["comfy"].get("includes", []))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(target) as z:
        return sorted(z.namelist())


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    # The Registry's rules for a node id, and its request to leave "ComfyUI" out of it.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", name) and not re.search(r"[._-]{2}", name), name
    assert "comfyui" not in name.lower(), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = comfy["Icon"]
    assert re.fullmatch(r"https://\S+\.(svg|png|jpg|jpeg|gif)", icon), icon
    repo = project["urls"]["Repository"].removeprefix("https://github.com/")
    raw = f"https://raw.githubusercontent.com/{repo}/main/"
    if icon.startswith(raw):  # an icon served from this repository must be in it, and tracked
        assert icon.removeprefix(raw) in _git_tracked(), icon


def test_classifiers_pass_the_registry_checks():
    parser = pytest.importorskip("comfy_cli.registry.config_parser")
    classifiers = PYPROJECT["project"]["classifiers"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        os_values = parser.validate_and_extract_os_classifiers(classifiers)
        parser.validate_and_extract_accelerator_classifiers(classifiers)
        config = parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert "Warning" not in out.getvalue(), out.getvalue()
    assert os_values == ["OS Independent"]
    assert config is not None and config.project.name == PYPROJECT["project"]["name"]
    assert config.project.supported_os == ["OS Independent"]


def test_license_file_named_in_pyproject_exists():
    lic = PYPROJECT["project"]["license"]
    assert "file" not in lic or (ROOT / lic["file"]).is_file()


def test_validate_security_checks_are_clean():
    """What `comfy node validate` runs (ruff S102 exec, S307 eval, E702 two statements on a line),
    on the files the pack tracks."""
    pytest.importorskip("ruff")
    files = [f for f in _git_tracked() if f.endswith(".py")]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--no-cache", "--select", "S102,S307,E702",
                          "--exit-zero", *files], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_packed_archive_holds_what_a_user_needs(packed):
    tracked = set(_git_tracked())
    for f in RUNTIME_FILES:
        assert f in packed, f"{f} missing from the archive"
    for d in RUNTIME_DIRS:
        want = {f for f in tracked if f.startswith(d)}
        assert want and want <= set(packed), f"{d}: missing {sorted(want - set(packed))[:5]}"
    leaked = [f for f in packed if f.startswith(DEV_DIRS)]
    assert not leaked, f"development files in the archive: {leaked[:5]}"


def test_shipped_tools_are_complete(packed):
    """Every tool module a shipped tool imports ships too, and every `tools/<x>.py` an error
    message of nodes/ or models/ tells the user to run ships."""
    tools = {f.removeprefix("tools/").removesuffix(".py") for f in packed if re.fullmatch(r"tools/\w+\.py", f)}
    assert {"atelier", "train_lep", "build_index"} <= tools
    all_tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    for t in sorted(tools):
        tree = ast.parse((ROOT / "tools" / f"{t}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        missing = (imported & all_tools) - tools - DEV_ONLY_IMPORTS
        assert not missing, f"tools/{t}.py imports {sorted(missing)}, which the archive leaves out"
    named = set()
    for f in packed:
        if f.startswith(("nodes/", "models/")) and f.endswith(".py"):
            named |= set(re.findall(r"tools/(\w+)\.py", (ROOT / f).read_text()))
    assert named and named <= tools, f"error messages name tools the archive leaves out: {sorted(named - tools)}"


def test_readme_models_table_names_every_file_a_workflow_names():
    """Every model file an example workflow loads is a row of the README's Models table (file, folder)."""
    import json
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|.*?\| `(ComfyUI/models/[^`]+)` \|",
                                                            section, re.M)}
    named = set()
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(wf.read_text())["nodes"]:
            for v in node.get("widgets_values") or []:
                if isinstance(v, str) and re.fullmatch(r"[\w.+-]+\.(safetensors|ckpt|pt|pth|bin|gguf|sft)", v):
                    named.add(v)
    assert named, "no model file found in workflows/"
    missing = sorted(named - set(rows))
    assert not missing, f"README's Models table lacks {missing}"
