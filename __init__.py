"""Atelier: research text-to-image techniques as ComfyUI nodes.

Guarded entry: registers nodes only when ComfyUI is importable, so tools and tests can import
the pack's pure parts (models/) without it.
"""
WEB_DIRECTORY = "./web/js"

try:
    import comfy_api.latest  # noqa: F401  (only present inside ComfyUI)
    _HAVE_COMFY = True
except ImportError:
    _HAVE_COMFY = False

if _HAVE_COMFY:
    from .nodes import AtelierExtension

    async def comfy_entrypoint() -> AtelierExtension:
        return AtelierExtension()

__all__ = ["WEB_DIRECTORY"]
