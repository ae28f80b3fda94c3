"""`comfy.samplers`: the sampler and scheduler names of our KSampler (ComfyUI's lists, in its order) and
`sampler_object` (our SAMPLER values). ComfyUI's sampling internals (`sampling_function`, `CFGGuider`, `KSAMPLER`,
`calc_cond_batch`, ...) are stand-ins that fail when used (see internals.py), so packs importing them load."""

from __future__ import annotations

from typing import Any

from ...diffusion.samplers import SAMPLER_NAMES as _SAMPLERS
from ...diffusion.samplers import sampler_for_name
from ...diffusion.schedules import SCHEDULER_NAMES as _SCHEDULERS

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)
KSAMPLER_NAMES = [name for name in SAMPLER_NAMES if name not in ("ddim", "uni_pc", "uni_pc_bh2")]


class KSampler:
    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES


def sampler_object(name: str) -> Any:
    """The SAMPLER value KSamplerSelect gives for `name`."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler '{name}' (known: {', '.join(SAMPLER_NAMES)})")
    return sampler_for_name(name)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    from ..internals import placeholder

    return placeholder(f"comfy.samplers.{name}")
