"""Shared fixtures: one real ComfyUI booted in-process per test session, with the pack loaded
through ComfyUI's own custom-node loader from a folder with an arbitrary name.

No mocks of ComfyUI: graphs run through ``execution.PromptExecutor`` and its validator.
Without ComfyUI, tests that need it are skipped locally and fail under CI=true.
"""
from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from atelier_testlib import IN_CI, ROOT, comfy_env, load_models, load_tool  # noqa: E402,F401


SLOW_ENV = "ATELIER_SLOW"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long training/benchmark-like tests; run with ATELIER_SLOW=1 "
                                       "(python3 tools/atelier.py test --slow)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.slow`` run only with ATELIER_SLOW=1 (the suite stays inside ~10 min on
    2 cores); they are skipped with a reason that says how to run them, and counted in the last line."""
    import os
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow test: run with {SLOW_ENV}=1 (python3 tools/atelier.py test --slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

@pytest.fixture(scope="session")
def comfy_path() -> Path:
    try:
        return comfy_env.find_comfyui(install=False, verbose=False)
    except comfy_env.ComfyNotFound as e:
        if IN_CI:
            pytest.fail(f"CI=true and ComfyUI is missing: {e}")
        pytest.skip(f"ComfyUI not available: {e}")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_session")


@pytest.fixture(scope="session")
def comfy(comfy_path, session_dir):
    """The booted in-process ComfyUI (tools/headless.Headless) with the pack loaded."""
    headless = load_tool("headless")
    existing = headless.Headless.current()
    if existing is not None:
        return existing
    custom_nodes = session_dir / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / f"atelier_pack_{uuid.uuid4().hex[:8]}"  # any folder name must work
    link.symlink_to(ROOT, target_is_directory=True)
    input_dir = session_dir / "input"
    input_dir.mkdir()
    example = comfy_path / "input" / "example.png"
    if example.is_file():
        shutil.copy(example, input_dir / "example.png")
    # A ComfyUI base directory of the session's own (models/, temp/ for previews, ...): the suite writes
    # nothing into the user's ComfyUI folders and reads none of the user's models.
    h = headless.Headless(comfy_path=comfy_path, output_dir=str(session_dir / "output"),
                          input_dir=str(input_dir), user_dir=str(session_dir / "user"),
                          pack_path=str(link), cpu=True, base_dir=str(session_dir / "base"))
    # The pack's model folders (trained LEPs, kNN indexes, open_clip files) are this session's own:
    # the suite never reads, reuses or replaces files of the user's ComfyUI.
    fp = h.folder_paths
    for name in sorted(n for n in fp.folder_names_and_paths if n.startswith("atelier_") and n != "atelier_knn_images"):
        fp.folder_names_and_paths[name] = ([str(session_dir / "models" / name)], fp.folder_names_and_paths[name][1])
    return h


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's package as ComfyUI imported it (pack.nodes, pack.models, ...)."""
    return comfy.pack_module


@pytest.fixture(scope="session")
def tiny(pack):
    """nodes/tiny_family.py as loaded inside ComfyUI."""
    import importlib
    return importlib.import_module(pack.__name__ + ".nodes.tiny_family")


# The pack's modules as ComfyUI imported them, for the modules of tests that use them.
def _pack_module(pack, name: str):
    import importlib
    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="module")
def glue(pack):
    """nodes/glue.py"""
    return _pack_module(pack, "nodes.glue")


@pytest.fixture(scope="module")
def nc(pack):
    """nodes/coop.py"""
    return _pack_module(pack, "nodes.coop")


@pytest.fixture(scope="module")
def sk(pack):
    """nodes/sketch.py"""
    return _pack_module(pack, "nodes.sketch")


@pytest.fixture(scope="module")
def mc():
    """models/coop.py, loaded outside ComfyUI (tools/pure_models.py)."""
    return load_models("coop")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a test module runs, restored after. On the shared 2-core machine two threads per
    process spin against each other (tiny-model steps and small convs ran 20-25x slower). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def run_graph(comfy):
    """Run an API prompt; result["values"][node_id] is that node's outputs (first list item per slot),
    read back from the executor's own output cache."""
    def _run(prompt: dict, want: list[str] | tuple = ()):
        result = comfy.run_prompt(prompt)
        cache = comfy.executor.caches.outputs
        result["values"] = {nid: tuple(slot[0] for slot in cache.get(nid)) for nid in want}
        return result
    return _run
