"""`comfy.samplers`: the sampler and scheduler names of our KSampler (ComfyUI's lists, in its order)."""

from __future__ import annotations

from ...diffusion.samplers import SAMPLER_NAMES as _SAMPLERS
from ...diffusion.schedules import SCHEDULER_NAMES as _SCHEDULERS

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)
KSAMPLER_NAMES = [name for name in SAMPLER_NAMES if name not in ("ddim", "uni_pc", "uni_pc_bh2")]


class KSampler:
    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES
