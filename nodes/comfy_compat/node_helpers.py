"""ComfyUI's `node_helpers`: conditioning edits and tolerant PIL loading."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from PIL import ImageFile, UnidentifiedImageError

T = TypeVar("T")


def conditioning_set_values(conditioning: list[Any], values: dict[str, Any] | None = None,
                            append: bool = False) -> list[Any]:
    """A copy of CONDITIONING ([[tensor, options], ...]) with `values` set in each entry's options (added to
    the existing value when `append`)."""
    values = values or {}
    result = []
    for tensor, options in conditioning:
        options = dict(options)
        for key, value in values.items():
            if append and options.get(key) is not None:
                value = options[key] + value
            options[key] = value
        result.append([tensor, options])
    return result


def pillow(fn: Callable[[Any], T], arg: Any) -> T:
    """fn(arg), retried with truncated images allowed when PIL refuses the file."""
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def hasher() -> Callable[..., Any]:
    return hashlib.sha256


def string_to_torch_dtype(name: str) -> torch.dtype | None:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
