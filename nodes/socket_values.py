"""What a value on each socket type must look like: the checks the executor runs on linked inputs before a node's
`run` (registered by create_engine). Each returns None for a good value, else what is wrong with it; the executor
adds "<ClassType> (#id): input '<name>': " in front. Checks that need two inputs (a latent's channel count against
the model's) stay in the node, which raises engine.inputs.InputError."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from latentloom.engine.inputs import ValueCheckers
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    CONTROL_NET,
    GUIDER,
    IMAGE,
    LATENT,
    MASK,
    MODEL,
    NOISE,
    SAMPLER,
    SIGMAS,
    UPSCALE_MODEL,
    VAE,
)

from .diffusion.clip import ClipModel
from .diffusion.controlnet import ControlNet
from .diffusion.denoiser import Guider
from .diffusion.dit_controlnet import TransformerControlNet
from .diffusion.family_clip import FamilyClip
from .diffusion.gemma_text import Lumina2Clip
from .diffusion.hidream_text import HiDreamClip
from .diffusion.latent_operations import LATENT_OPERATION
from .diffusion.models import DiffusionModel
from .diffusion.qwen_text import QwenImageClip
from .diffusion.samplers import Sampler
from .diffusion.t2i_adapter import T2IAdapter
from .diffusion.vae import VAEModel


def _got(value: Any) -> str:
    return f"got {type(value).__name__}"


def latent(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        return f"must be a LATENT (a dict with a 'samples' tensor; {_got(value)})"
    if value["samples"].ndim != 4:
        return f"must be a LATENT whose samples are [batch, channels, height, width] (got {value['samples'].ndim}-D)"
    return None


def image(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        shape = f"a {value.ndim}-D tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        return f"must be an IMAGE [batch, height, width, channels] (got {shape})"
    return None


def mask(value: Any) -> str | None:
    # [batch, 1, height, width] also passes: ComfyUI's mask consumers reshape to (-1, 1, H, W) and some packs emit it.
    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3, 4) or (value.ndim == 4 and value.shape[1] != 1):
        shape = f"a {tuple(value.shape)} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        return f"must be a MASK [height, width], [batch, height, width] or [batch, 1, height, width] (got {shape})"
    return None


def conditioning(value: Any) -> str | None:
    if not isinstance(value, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], torch.Tensor)
            and isinstance(pair[1], dict) for pair in value):
        return f"must be CONDITIONING (a list of [tensor, dict] pairs; {_got(value)})"
    return None


def sigmas(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor) or value.ndim != 1:
        return f"must be SIGMAS (a 1-D tensor; {_got(value)})"
    return None


def noise(value: Any) -> str | None:
    return None if callable(getattr(value, "generate_noise", None)) else f"must be a NOISE ({_got(value)})"


def latent_operation(value: Any) -> str | None:
    # Any callable taking latent= will do: third-party packs hand plain functions to these sockets.
    return None if callable(value) else f"must be a LATENT_OPERATION (a function of a latent; {_got(value)})"


def upscale_model(value: Any) -> str | None:
    # spandrel is imported only when a model is loaded: a descriptor can only exist once it has been.
    spandrel = sys.modules.get("spandrel")
    if spandrel is not None and isinstance(value, spandrel.ImageModelDescriptor):
        return None
    return f"must be an UPSCALE_MODEL (a spandrel single-image model; {_got(value)})"


def instance_of(kind: type | tuple[type, ...], description: str, hint: str = "") -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if isinstance(value, kind) else f"must be {description} ({_got(value)}){hint}"

    return check


def register_value_checks(checks: ValueCheckers) -> None:
    checks.register(LATENT, latent)
    checks.register(IMAGE, image)
    checks.register(MASK, mask)
    checks.register(CONDITIONING, conditioning)
    checks.register(SIGMAS, sigmas)
    checks.register(NOISE, noise)
    checks.register(MODEL, instance_of(DiffusionModel, "a MODEL"))
    checks.register(CLIP, instance_of((ClipModel, FamilyClip, QwenImageClip, Lumina2Clip, HiDreamClip), "a CLIP model",
                                      "; if it comes from a checkpoint loader, that checkpoint has no usable text "
                                      "encoder"))
    checks.register(VAE, instance_of(VAEModel, "a VAE", "; if it comes from a checkpoint loader, that checkpoint "
                                     "has no VAE"))
    checks.register(CONTROL_NET, instance_of((ControlNet, T2IAdapter, TransformerControlNet), "a ControlNet"))
    checks.register(SAMPLER, instance_of(Sampler, "a SAMPLER"))
    checks.register(GUIDER, instance_of(Guider, "a GUIDER"))
    checks.register(LATENT_OPERATION, latent_operation)
    checks.register(UPSCALE_MODEL, upscale_model)


def value_checkers() -> ValueCheckers:
    """A fresh set with the built-in checks (what create_engine registers)."""
    checks = ValueCheckers()
    register_value_checks(checks)
    return checks
