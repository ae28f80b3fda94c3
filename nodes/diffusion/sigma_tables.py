"""Schedules from published, optimised sigma tables: Align Your Steps (NVIDIA, arXiv 2404.14507), GITS (arXiv
2405.11326) and OptimalSteps (arXiv 2503.23307). The tables live in data/step_schedules.json (provenance in
data/LICENSE.md); other step counts are log-linear interpolations of them, as ComfyUI computes them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import numpy as np
import torch

ALIGN_YOUR_STEPS_MODELS: tuple[str, ...] = ("SD1", "SDXL", "SVD")
OPTIMAL_STEPS_MODELS: tuple[str, ...] = ("FLUX", "Wan", "Chroma")


@functools.cache
def _tables() -> dict[str, Any]:
    text = resources.files("latentloom.nodes.diffusion.data").joinpath("step_schedules.json").read_text()
    return json.loads(text)


def gits_coefficients() -> tuple[str, ...]:
    """The GITS coefficients with a table, as "0.80" ... "1.50"."""
    return tuple(_tables()["gits"])


def loglinear_interp(levels: list[float] | np.ndarray, count: int) -> np.ndarray:
    """`count` decreasing values whose logarithm interpolates the decreasing `levels` linearly (float64)."""
    ascending_log = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    resampled = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(ascending_log)), ascending_log)
    return np.exp(resampled)[::-1].copy()


def _finish(levels: list[float] | np.ndarray, steps: int, denoise: float) -> torch.Tensor:
    """The last round(steps · denoise) steps of a table of steps + 1 levels, ending on 0 instead of its last."""
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    kept_steps = round(steps * denoise) if denoise < 1.0 else steps
    kept = np.array(levels[-(kept_steps + 1):], dtype=np.float64)
    kept[-1] = 0.0
    return torch.tensor(kept, dtype=torch.float32)


def _table_schedule(levels: list[float], steps: int, denoise: float) -> torch.Tensor:
    if steps + 1 != len(levels):
        return _finish(loglinear_interp(levels, steps + 1), steps, denoise)
    return _finish(levels, steps, denoise)


def align_your_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """AlignYourStepsScheduler: NVIDIA's 10-step schedule for SD1 / SDXL / SVD, resampled to `steps`."""
    return _table_schedule(_tables()["align_your_steps"][model_type], steps, denoise)


def optimal_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """OptimalStepsScheduler: the searched schedule for FLUX / Wan / Chroma (flow models: σ in [0, 1])."""
    return _table_schedule(_tables()["optimal_steps"][model_type], steps, denoise)


def gits_key(coeff: float) -> str | None:
    """The table name for a GITS coefficient (rounded to 2 decimals), or None when there is none."""
    key = f"{round(coeff, 2):.2f}"
    return key if key in _tables()["gits"] else None


def gits_sigmas(coeff: float, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """GITSScheduler: the SD1 schedule searched for coefficient `coeff`; tables exist for 2..20 steps, longer
    schedules interpolate the 20-step one."""
    key = gits_key(coeff)
    if key is None:
        raise ValueError(f"no GITS table for coeff {coeff} (there are: {', '.join(gits_coefficients())})")
    if steps < 2:
        raise ValueError("GITS schedules have at least 2 steps")
    rows = _tables()["gits"][key]
    if steps <= len(rows) + 1:
        return _finish(rows[steps - 2], steps, denoise)
    return _finish(loglinear_interp(rows[-1], steps + 1), steps, denoise)
