"""The model-patch API: how nodes change what a MODEL does without touching anyone else's MODEL.

A `DiffusionModel` (nodes.diffusion.models) carries three kinds of patch, all copied on `clone()` and none ever
written into the shared network for longer than a call that asked for them:

* weight patches (`model.patches`): reversible changes to the UNet's weights (LoRA, `add_patches` diffs and
  scales). The memory manager keeps the last applied set on the module and swaps only when a call asks for a
  different one (engine.memory.ModelManager.use), so a warm LoRA graph costs what the plain graph costs.
* function hooks (`model.options`, a dict laid out as ComfyUI's `model_options`): CFG functions, the UNet function
  wrapper, attention and block patches under `options["transformer_options"]`. They are plain Python callables
  with ComfyUI's argument conventions, so a ComfyUI custom node's hook runs unchanged.
* sampling overrides (`model.sampling`): the noise schedule / prediction type (ModelSamplingDiscrete & co.).

Every method returns a NEW model (the receiver is never changed), and option dicts are copied level by level on
write, so two branches cloned from one model in one graph are independent:

    patched = model.set_sampler_cfg_function(rescale)                    # CFG formula on noise: x − D
    patched = patched.add_sampler_post_cfg_function(lambda a: a["denoised"] * 1.0)
    patched = patched.set_model_attn1_patch(my_patch)                  # (n, context, value, extra) -> same
    patched = patched.add_patches({"conv_in.weight": diff}, strength_patch=0.5)

The hook argument dicts are ComfyUI's (comfy/samplers.py `cfg_function` / `sampling_function`):

    sampler_cfg_function(args) -> noise prediction (x − denoised):
        "cond", "uncond" (noise predictions x − D), "cond_scale", "timestep" (= sigma), "input" (x), "sigma",
        "cond_denoised", "uncond_denoised", "model", "model_options", "input_cond", "input_uncond"
    sampler_pre_cfg_function(args) -> [cond_denoised, uncond_denoised]:
        "conds" ([positive, negative] entry lists), "conds_out", "cond_scale", "timestep", "input", "sigma",
        "model", "model_options"
    sampler_post_cfg_function(args) -> denoised:
        "denoised", "cond", "uncond" (entry lists), "cond_scale", "model", "uncond_denoised", "cond_denoised",
        "sigma", "model_options", "input"
    model_function_wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"}) -> denoised, where
        apply_model(input, timestep, **c) is the unwrapped call (timestep is sigma, as in ComfyUI)

`args["model"]` is a `HookModel`: `calc_cond_batch(conds, x, sigma, model_options)` evaluates entry lists with
any options (PAG / SAG re-run the UNet with an extra attention replace), `model_sampling` is the schedule,
`diffusion_model` the DiffusionModel. Attention and block patches follow ComfyUI's transformer_options layout and
block numbering (LDM input/middle/output block ids) and are realised on the diffusers UNet by nodes.diffusion
.unet_hooks (attention processors and module forward hooks, installed for one UNet call at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

# model_options keys (ComfyUI's spelling).
CFG_FUNCTION = "sampler_cfg_function"
PRE_CFG_FUNCTIONS = "sampler_pre_cfg_function"
POST_CFG_FUNCTIONS = "sampler_post_cfg_function"
DISABLE_CFG1 = "disable_cfg1_optimization"
FUNCTION_WRAPPER = "model_function_wrapper"
DENOISE_MASK_FUNCTION = "denoise_mask_function"
TRANSFORMER_OPTIONS = "transformer_options"

# transformer_options["patches"] lists and transformer_options["patches_replace"] tables that the UNet honours.
LIST_PATCHES = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch", "input_block_patch",
                "input_block_patch_after_skip", "output_block_patch", "middle_patch")
REPLACE_PATCHES = ("attn1", "attn2")


class HookModel(Protocol):
    """What hooks receive as args["model"] (ComfyUI passes its BaseModel; these are the parts hooks use)."""

    diffusion_model: Any
    model_sampling: Any
    model_options: dict[str, Any]

    def calc_cond_batch(self, conds: list[Any], x: torch.Tensor, sigma: torch.Tensor,
                        model_options: Mapping[str, Any] | None = None) -> list[torch.Tensor]: ...


def copy_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy in which every nested dict and list is new (callables, tensors and other values are shared):
    writing into the copy at any depth never shows in `options`."""
    copied: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            copied[key] = copy_options(value)
        elif isinstance(value, list):
            copied[key] = list(value)
        else:
            copied[key] = value
    return copied


def transformer_options(options: Mapping[str, Any]) -> Mapping[str, Any]:
    return options.get(TRANSFORMER_OPTIONS) or {}


def has_unet_patches(options: Mapping[str, Any]) -> bool:
    """Whether the options ask for anything the plain UNet call does not do (attention / block patches)."""
    to = transformer_options(options)
    return any(to.get("patches", {}).get(name) for name in LIST_PATCHES) or any(
        to.get("patches_replace", {}).get(name) for name in REPLACE_PATCHES)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions on option dicts (each returns a new dict; the argument is left unchanged)


def with_cfg_function(options: Mapping[str, Any], function: Callable[[dict[str, Any]], torch.Tensor],
                      disable_cfg1_optimization: bool = False) -> dict[str, Any]:
    result = copy_options(options)
    result[CFG_FUNCTION] = function
    if disable_cfg1_optimization:
        result[DISABLE_CFG1] = True
    return result


def with_listed_function(options: Mapping[str, Any], key: str, function: Callable[..., Any],
                         disable_cfg1_optimization: bool = False) -> dict[str, Any]:
    """`function` appended to the list under `key` (pre- / post-CFG functions run in the order added)."""
    result = copy_options(options)
    result[key] = [*result.get(key, []), function]
    if disable_cfg1_optimization:
        result[DISABLE_CFG1] = True
    return result


def with_option(options: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    result = copy_options(options)
    result[key] = value
    return result


def with_transformer_patch(options: Mapping[str, Any], name: str, patch: Callable[..., Any]) -> dict[str, Any]:
    """A patch appended to transformer_options["patches"][name] (ComfyUI's set_model_patch)."""
    if name not in LIST_PATCHES:
        raise ValueError(f"unknown UNet patch point {name!r}; known: {', '.join(LIST_PATCHES)}")
    result = copy_options(options)
    to = result.setdefault(TRANSFORMER_OPTIONS, {})
    patches = to.setdefault("patches", {})
    patches[name] = [*patches.get(name, []), patch]
    return result


def with_transformer_replace(options: Mapping[str, Any], name: str, patch: Callable[..., Any], block_name: str,
                             number: int, transformer_index: int | None = None) -> dict[str, Any]:
    """An attention replacement for one block: key (block_name, number[, transformer_index]) as in ComfyUI's
    set_model_patch_replace; block_name is "input" | "middle" | "output", number the LDM block id."""
    if name not in REPLACE_PATCHES:
        raise ValueError(f"unknown attention to replace {name!r}; known: {', '.join(REPLACE_PATCHES)}")
    result = copy_options(options)
    table = result.setdefault(TRANSFORMER_OPTIONS, {}).setdefault("patches_replace", {}).setdefault(name, {})
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    table[key] = patch
    return result


# ---------------------------------------------------------------------------------------------------------------
# Weight patches that are not LoRA: ComfyUI's add_patches with plain diffs / scales


class WeightDiffPatch:
    """W ← strength_model·W + strength_patch·diff per parameter (diff None: scale only), in float32, rounded once
    to the storage dtype; restore copies the backup back (bit-exact)."""

    def __init__(self, entries: tuple[tuple[str, torch.Tensor | None, float, float], ...]):
        self.entries = entries  # (parameter, diff or None, strength_patch, strength_model)

    def parameters(self) -> list[str]:
        return list(dict.fromkeys(name for name, _, _, _ in self.entries))

    def apply(self, module: torch.nn.Module) -> Callable[[], None]:
        backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

        def restore() -> None:
            with torch.no_grad():
                for parameter, original in reversed(backups):
                    parameter.copy_(original)

        try:
            with torch.no_grad():
                for name, diff, strength_patch, strength_model in self.entries:
                    parameter = module.get_parameter(name)
                    backups.append((parameter, parameter.detach().to("cpu", copy=True)))
                    patched = parameter.detach().to(torch.float32, copy=True)
                    if strength_model != 1.0:
                        patched *= strength_model
                    if diff is not None and strength_patch != 0.0:
                        patched += strength_patch * diff.to(device=patched.device, dtype=torch.float32).reshape(
                            patched.shape)
                    parameter.copy_(patched.to(parameter.dtype))
        except BaseException:
            restore()
            raise
        return restore
