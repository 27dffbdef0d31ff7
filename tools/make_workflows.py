"""Regenerate the example workflows in workflows/ from their Python sources (tools/wf_*.py).

Each ``tools/wf_<feature>.py`` defines ``WORKFLOWS = {"file.json": build_fn}`` where
``build_fn(g: WorkflowBuilder)`` adds nodes. Real model file names are used (the README lists
them); the headless runner's ``--tiny`` swaps the loaders for the seeded tiny models.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from workflow_builder import WorkflowBuilder

HERE = Path(__file__).resolve().parent


def sources() -> dict:
    found = {}
    for path in sorted(HERE.glob("wf_*.py")):
        spec = importlib.util.spec_from_file_location(f"atelier_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found.update(mod.WORKFLOWS)
    return found


def build(name: str, class_mappings: dict) -> dict:
    g = WorkflowBuilder(class_mappings)
    sources()[name](g)
    return g.to_json()


def write_all(class_mappings: dict, out_dir: Path) -> list[Path]:
    written = []
    for name, fn in sources().items():
        g = WorkflowBuilder(class_mappings)
        fn(g)
        written.append(g.save(Path(out_dir) / name))
    return written
