"""`comfy.cli_args`: ComfyUI's command-line settings as packs read them (`args.disable_metadata`, ...). The values
are ComfyUI's defaults for a plain start, except those latentloom decides itself; unknown names read as None, so
a pack probing a newer flag gets "not set" rather than an error."""

from __future__ import annotations

import argparse
import enum
from typing import Any


class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


class PerformanceFeature(enum.Enum):
    Fp16Accumulation = "fp16_accumulation"
    Fp8MatrixMultiplication = "fp8_matrix_mult"
    CublasOps = "cublas_ops"


class _Args(argparse.Namespace):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


args = _Args(
    listen="127.0.0.1", port=8188, base_directory=None, output_directory=None, input_directory=None,
    temp_directory=None, user_directory=None, extra_model_paths_config=None, disable_metadata=False,
    preview_method=LatentPreviewMethod.NoPreviews, preview_size=512, fast=set(), cpu=False, lowvram=False,
    novram=False, highvram=False, gpu_only=False, normalvram=False, disable_smart_memory=False,
    force_fp16=False, force_fp32=False, bf16_unet=False, fp16_unet=False, fp8_e4m3fn_unet=False, fp16_vae=False,
    bf16_vae=False, fp32_vae=False, cpu_vae=False, use_split_cross_attention=False, use_pytorch_cross_attention=False,
    disable_xformers=True, dont_print_server=False, verbose="INFO", multi_user=False, enable_cors_header=None,
    disable_all_custom_nodes=False, deterministic=False, cuda_device=None, directml=None,
)
