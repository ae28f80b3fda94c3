"""`comfy.model_patcher`: ModelPatcher is our MODEL view (model_objects.py); packs use it for isinstance checks
and type hints. Other names of ComfyUI's module are stand-ins (internals.py)."""

from __future__ import annotations

from typing import Any

from ..model_objects import ModelPatcher

__all__ = ["ModelPatcher"]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    from ..internals import placeholder

    return placeholder(f"comfy.model_patcher.{name}")
