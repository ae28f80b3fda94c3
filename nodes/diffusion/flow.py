"""Small pieces of the flow-matching families: the rectified-flow ancestral samplers ComfyUI switches to for CONST
models, Flux Kontext's preferred resolutions, the T5 tokenizer options, Lumina 2's renormalised CFG and the Chroma
Radiance option wrapper (ComfyUI's numerics).

The σ schedules themselves (SD3's and Flux's shifts) are in nodes.diffusion.schedules, the CONST prediction in
nodes.diffusion.predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .sampler_steps import batch_ones, flow_ancestral_step, report, to_d

# Flux Kontext's training resolutions (width, height), about one megapixel each.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)

# ClipModel.options key: a dict of tokenizer options ("<tokenizer>_min_padding" → int, ...), ComfyUI's
# clip.tokenizer_options, read by the T5-family tokenizers.
TOKENIZER_OPTIONS = "tokenizer_options"
T5_TOKENIZERS = ("t5xxl", "pile_t5xl", "t5base", "mt5xl", "umt5xxl")


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution whose aspect ratio is nearest to width/height (ties: the smaller width)."""
    aspect = width / height
    _, best_width, best_height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return best_width, best_height


def t5_tokenizer_options(min_padding: int, min_length: int) -> dict[str, int]:
    """T5TokenizerOptions' settings, for every T5-family tokenizer."""
    options: dict[str, int] = {}
    for tokenizer in T5_TOKENIZERS:
        options[f"{tokenizer}_min_padding"] = min_padding
        options[f"{tokenizer}_min_length"] = min_length
    return options


def renorm_cfg_function(cfg_trunc: float, renorm_cfg: float, in_channels: int | None) \
        -> Callable[[dict[str, Any]], torch.Tensor]:
    """Lumina 2's CFG (RenormCFG): plain CFG on the first `in_channels` channels while σ < cfg_trunc (the
    positive prediction alone from there on), its norm per image capped at renorm_cfg × the positive's norm when
    renorm_cfg > 0; channels past in_channels keep the positive prediction."""

    def combine(args: dict[str, Any]) -> torch.Tensor:
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        channels = cond.shape[1] if in_channels is None else in_channels
        cond_main, uncond_main, rest = cond[:, :channels], uncond[:, :channels], cond[:, channels:]
        if float(args["timestep"][0]) < cfg_trunc:
            guided = uncond_main + args["cond_scale"] * (cond_main - uncond_main)
            if renorm_cfg > 0.0:
                dims = tuple(range(1, cond_main.ndim))
                max_norm = torch.linalg.vector_norm(cond_main, dim=dims, keepdim=True) * float(renorm_cfg)
                norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
                guided = torch.where(norm >= max_norm, guided * (max_norm / norm), guided)
        else:
            guided = cond_main
        return args["input"] - torch.cat([guided, rest], dim=1)  # the hook returns noise: x − denoised

    return combine


def radiance_options_wrapper(radiance_options: dict[str, Any], start_sigma: float, end_sigma: float,
                             previous: Callable | None) -> Callable[[Callable, dict[str, Any]], torch.Tensor]:
    """A model_function_wrapper that puts `radiance_options` into transformer_options["chroma_radiance_options"]
    for calls with start_sigma ≥ σ ≥ end_sigma, then calls `previous` (the model's earlier wrapper) or the model."""

    def wrapper(apply_model: Callable, args: dict[str, Any]) -> torch.Tensor:
        c = dict(args["c"])
        sigma = float(args["timestep"].max())
        if end_sigma <= sigma <= start_sigma:
            options = dict(c.get("transformer_options") or {})
            options["chroma_radiance_options"] = dict(radiance_options)
            c["transformer_options"] = options
        if previous is None:
            return apply_model(args["input"], args["timestep"], **c)
        return previous(apply_model, {**args, "c": c})

    return wrapper


# --- rectified-flow ancestral samplers (samplers.euler_ancestral / dpmpp_2s_ancestral on CONST models) ---------

def euler_ancestral_flow(model, x, sigmas, extra_args, callback, eta, s_noise, noise):
    """Rectified-flow ancestral Euler: step to σ_down along the straight line to D, rescale, add fresh noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, rescale, renoise = flow_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = rescale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def dpmpp_2s_ancestral_flow(model, x, sigmas, extra_args, callback, eta, s_noise, noise):
    """DPM-Solver++(2S) in rectified-flow form: the midpoint in λ = log((1 − σ)/σ), straight-line moves."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        sigma_down, rescale, renoise = flow_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:  # λ = −∞ there: take the midpoint just below
                sigma_s = 0.9999
            else:
                t_i, t_down = ((1 - sigmas[i]) / sigmas[i]).log(), ((1 - sigma_down) / sigma_down).log()
                sigma_s = ((t_i + (t_down - t_i) / 2).exp() + 1) ** -1
            ratio = sigma_s / sigmas[i]
            denoised_2 = model(ratio * x + (1 - ratio) * denoised, sigma_s * batch_ones(x), **extra_args)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised_2
        if sigmas[i + 1] > 0 and eta > 0:
            x = rescale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x
