"""The pack's pure ``models/`` package outside ComfyUI: the one loader tests, tools and benches use.

``models/`` is imported by file path as the package ``atelier_models`` (so its relative imports work);
the repo root never goes on sys.path, where its ``nodes/`` package would shadow ComfyUI's ``nodes``
module. Inside a booted ComfyUI, import ``<pack>.models.<name>`` from the loaded pack instead.

    from pure_models import load_models          # tools/ is on sys.path
    world, metrics = load_models("world", "metrics")
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"
PKG = "atelier_models"


def import_package(name: str, folder: Path):
    """The folder's package (its __init__.py) imported by file path as ``name``, once."""
    pkg = sys.modules.get(name)
    if pkg is None:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
    return pkg


def models_package():
    """The package ``atelier_models`` (models/__init__.py), imported once."""
    return import_package(PKG, MODELS)


def load_models(*names: str):
    """``atelier_models.<name>`` for each name; one module for one name, else a list."""
    models_package()
    mods = [importlib.import_module(f"{PKG}.{n}") for n in names]
    return mods[0] if len(mods) == 1 else mods
