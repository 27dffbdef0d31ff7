"""ComfyUI glue: V3 node classes and thin hook adapters. Algorithms live in ../models."""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

from . import glue

# One module per feature; each exports NODES. A feature whose optional dependency is missing
# logs why and is skipped, so the rest of the pack still loads.
FEATURES = ["tiny", "mini", "metrics", "knn", "sketch", "time_experts", "space_experts", "coop"]


def collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in FEATURES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ImportError as e:
            logging.warning("[Atelier] %s nodes not loaded: %s", name, e)
            continue
        nodes.extend(glue.guard_node(n) for n in mod.NODES)
    return nodes


class AtelierExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()
