"""Pure modules of the pack for benches, imported by path (never by putting the repo root on sys.path)."""
import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, _ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


seeded_init_ = _load("models/seeded_init.py", "atelier_seeded_init").seeded_init_
