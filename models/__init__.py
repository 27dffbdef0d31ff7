"""Atelier's algorithms: pure torch/numpy + stdlib. Nothing here imports ComfyUI."""
