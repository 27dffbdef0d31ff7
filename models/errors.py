"""The one error type of Atelier: a problem the user can fix. Pure Python, no ComfyUI imports.

Every message starts with the node input it is about ("folder: ...", "vae: ...") and says what to do.
The per-technique error classes (LEPError, KNNError, ...) derive from it, so code and tests can catch
``AtelierError`` whatever raised it; it is a ValueError, as ComfyUI expects for bad input.
"""
from __future__ import annotations


class AtelierError(ValueError):
    """Bad input or a bad file; ``input`` names the node input (or file) and the message says the fix."""

    def __init__(self, message: str, input: str | None = None):  # noqa: A002  (the node input's name)
        super().__init__(message)
        self.input = input


def fail(input_name: str, problem: str, fix: str | None = None, cls: type[AtelierError] = AtelierError) -> AtelierError:
    """``input_name: problem; fix`` as an AtelierError (or ``cls``), to raise."""
    msg = f"{input_name}: {problem}" + (f"; {fix}" if fix else "")
    err = cls(msg)
    err.input = input_name
    return err
