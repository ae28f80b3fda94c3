"""`comfy.model_management`: devices, cache emptying and interrupts, over the engine's ModelManager and the
running node's interrupt token. Models move through the ModelManager on their own, so loading calls are no-ops."""

from __future__ import annotations

from typing import Any

import torch

from latentloom.engine.run_state import Interrupted

from ..context import current_env, current_node

# Raised by an interrupted run; a pack that catches or raises it talks to the engine's own interrupt.
InterruptProcessingException = Interrupted


def get_torch_device() -> torch.device:
    return current_env().models.device


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


text_encoder_offload_device = vae_offload_device = unet_offload_device


def text_encoder_device() -> torch.device:
    return get_torch_device()


vae_device = unet_inital_load_device = text_encoder_device


def vae_dtype(*args: Any, **kwargs: Any) -> torch.dtype:
    return current_env().models.dtype_for("vae")


def unet_dtype(*args: Any, **kwargs: Any) -> torch.dtype:
    return current_env().models.dtype_for("diffusion")


def text_encoder_dtype(*args: Any, **kwargs: Any) -> torch.dtype:
    return current_env().models.dtype_for("text_encoder")


def is_device_cpu(device: Any) -> bool:
    return torch.device(device).type == "cpu"


def is_device_mps(device: Any) -> bool:
    return torch.device(device).type == "mps"


def is_device_cuda(device: Any) -> bool:
    return torch.device(device).type == "cuda"


def get_autocast_device(device: Any) -> str:
    return torch.device(device).type


def xformers_enabled() -> bool:
    return False


def pytorch_attention_enabled() -> bool:
    return True


def should_use_fp16(*args: Any, **kwargs: Any) -> bool:
    return get_torch_device().type == "cuda"


def should_use_bf16(*args: Any, **kwargs: Any) -> bool:
    return False


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    device = torch.device(dev) if dev is not None else get_torch_device()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os

        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return (free, free) if torch_free_too else free


def soft_empty_cache(force: bool = False) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_models_gpu(models: Any, *args: Any, **kwargs: Any) -> None:
    """No-op: the engine's ModelManager moves modules when they are used."""


def load_model_gpu(model: Any) -> None:
    """No-op, as load_models_gpu."""


def unload_all_models() -> None:
    current_env().models.free_all()


def processing_interrupted() -> bool:
    try:
        throw_exception_if_processing_interrupted()
    except Interrupted:
        return True
    return False


def throw_exception_if_processing_interrupted() -> None:
    """Raises InterruptProcessingException when the running prompt was interrupted."""
    ctx = current_node()
    if ctx is not None:
        ctx.check_interrupt()


def intermediate_dtype() -> torch.dtype:
    return torch.float32


def get_torch_device_name(device: Any = None) -> str:
    device = torch.device(device) if device is not None else get_torch_device()
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device.type)


def is_intel_xpu() -> bool:
    return False


def is_directml_enabled() -> bool:
    return False


OOM_EXCEPTION = torch.cuda.OutOfMemoryError


def raise_non_oom(exc: BaseException) -> None:
    """Re-raise anything but an out-of-memory error (packs that retry with smaller tiles)."""
    if not isinstance(exc, torch.cuda.OutOfMemoryError):
        raise exc
