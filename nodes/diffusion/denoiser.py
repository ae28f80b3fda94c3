"""The model wrapper the samplers call: D = f(x, σ), with CFG, conditioning weights, inpainting and ControlNet.

Numerics follow ComfyUI (docs/comfyui-reference.md#the-model-call-and-cfg): x stays float32; the UNet gets x/√(σ²+1)
in its own dtype (or the ModelComputeDtype one) and the *integer* timestep nearest to σ; its output is cast back to
float32 and turned into a denoised estimate (eps: x − ε̂σ; v: x/(σ²+1) − v̂σ/√(σ²+1)); CFG runs on the denoised
estimates in float32, and is skipped (no negative evaluation) when cfg ≈ 1. Other schedules and prediction types
(the ModelSampling* nodes) change the input scaling, the timestep and the x0 formula: nodes.diffusion.predictions /
schedules.

ControlNet protocol. A conditioning entry may carry `options["control"]`: any object with

    residuals(x_in, sigma, timestep, context, model, **kwargs)
        -> (down_block_additional_residuals: tuple[Tensor, ...], mid_block_additional_residual: Tensor) | None

called once per UNet call with the batched UNet inputs: `x_in` the c_in-scaled latent [N, C, h, w] (float32),
`sigma` [N] (float32), `timestep` [N] the integer timesteps the UNet receives (as float), `context` [N, T, D]
(float32), `model` the DiffusionModel, and the keyword `batched_number` (how many conditioning chunks share the
batch, for broadcasting a hint batch as ComfyUI does). For SDXL models `added_cond_kwargs={"text_embeds",
"time_ids"}` is also passed as a keyword. The object applies its own strength, σ-range gating (return None when
inactive) and chain of previous ControlNets (summing their residuals). Entries batch together only when they share
the very same control object. The residuals are cast to the UNet's dtype and handed to diffusers' UNet2DConditionModel.
A control object may also have `intrablock_residuals(x_in, sigma, model, batched_number) -> list[Tensor] | None`
(T2I-Adapters: diffusers' down_intrablock_additional_residuals). ControlNets read the entry's
`cross_attn_controlnet` (CLIPTextEncodeControlnet) as their `context` when it has one, the prompt otherwise.

Model patches (nodes.diffusion.patches; ComfyUI's model_options keys and argument dicts): every
`sampler_pre_cfg_function` runs on [cond, uncond] before CFG, `sampler_cfg_function(args) -> noise` replaces the
CFG formula (RescaleCFG & co.), each `sampler_post_cfg_function(args) -> denoised` runs after it,
`disable_cfg1_optimization` keeps the negative evaluated at cfg 1, `model_function_wrapper` wraps each model call,
and attention / block patches in `transformer_options` are installed on the UNet for the calls that carry them;
`denoise_mask_function` reshapes the inpainting mask at each call (InpaintDenoiser).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import compute, dit_calls, unet_hooks
from . import hooks as hook_api
from . import patches as patch_api
from .models import DiffusionModel
from .noise import seeded_randn
from .predictions import prediction_for
from .samplers import Sampler, is_max_denoise
from .sampling_conds import CondEntry, inpaint_concat, ip2p_concat, prepare_conditioning, repeat_to_batch
from .schedules import ModelSampling, schedule_for

# Contexts of different token counts share a UNet call by repetition up to their LCM, if that is ≤ 4× the shorter.
_MAX_CONTEXT_REPEAT = 4


def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


class ModelCall:
    """One UNet evaluation turned into a denoised prediction (ComfyUI's BaseModel.apply_model)."""

    def __init__(self, model: DiffusionModel, unet: torch.nn.Module, schedule: ModelSampling,
                 hooks: hook_api.HookSession | None = None):
        self.model = model
        self.unet = unet
        self.schedule = schedule  # σ ↔ network timestep (ComfyUI's model_sampling)
        self.prediction = prediction_for(model.sampling.prediction, model.sampling.sigma_data)
        self.dtype = compute.compute_dtype(model.options, unet)
        self.network = compute.network_for(unet, model.options)  # the UNet, cast or compiled as the options say
        self.hooks = hooks  # the run's hook weights (None when no conditioning carries hooks)
        self.dit = dit_calls.module_for(model.family)  # a transformer family's call (None: a UNet)

    def use_hooks(self, hooks: hook_api.HookGroup | None, sigma: torch.Tensor) -> None:
        """The UNet with the weights of the hooks of the entries about to run (nodes.diffusion.hooks)."""
        if self.hooks is not None and self.hooks.use(hooks, float(sigma[0])) \
                and isinstance(self.network, compute.CastNetwork):
            self.network = compute.network_for(self.unet, self.model.options)  # re-cast the changed weights

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None, control: Any = None,
                 concat: torch.Tensor | None = None, chunks: int = 1, cond_or_uncond: list[int] | None = None,
                 options: dict[str, Any] | None = None, control_context: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised prediction for one batch; `options` (default: the model's) may carry a
        `model_function_wrapper` and UNet patches. `cond_or_uncond` says, per chunk, 0 = positive, 1 = negative."""
        options = self.model.options if options is None else options
        to = dict(patch_api.transformer_options(options))
        to["cond_or_uncond"] = list(cond_or_uncond if cond_or_uncond is not None else [0] * chunks)
        to["sigmas"] = sigma
        c = {"c_crossattn": context, "added": added, "control": control, "c_concat": concat,
             "batched_number": chunks, "transformer_options": to}
        if control_context is not None:
            c["crossattn_controlnet"] = control_context
        wrapper = options.get(patch_api.FUNCTION_WRAPPER)
        if wrapper is not None:
            return wrapper(self.apply_model, {"input": x, "timestep": sigma, "c": c,
                                              "cond_or_uncond": to["cond_or_uncond"]})
        return self.apply_model(x, sigma, **c)

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: torch.Tensor,
                    added: dict[str, torch.Tensor] | None = None, control: Any = None,
                    c_concat: torch.Tensor | None = None, batched_number: int = 1,
                    transformer_options: dict[str, Any] | None = None,
                    crossattn_controlnet: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """The unwrapped call (ComfyUI's BaseModel.apply_model): x and sigma in, denoised x0 out."""
        context, chunks, concat = c_crossattn, batched_number, c_concat
        prediction = self.prediction
        x_in = prediction.calculate_input(sigma, x)
        timestep = self.schedule.timestep(sigma)
        if self.dit is not None:
            options_ = transformer_options if transformer_options is not None else {}
            dit_control: dict[str, Any] = {}
            if control is not None:  # per-block ControlNet residuals (nodes.diffusion.dit_calls)
                residuals = dit_calls.control_residuals(
                    self.dit, control, self.model, x_in, sigma, timestep,
                    context if crossattn_controlnet is None else crossattn_controlnet, added or {}, chunks)
                if residuals is not None:
                    dit_control["control"] = residuals
            output = self.dit.forward(self.network, x_in.to(self.dtype), timestep, context.to(self.dtype),
                                      added or {}, options_, **dit_control).float()
            return prediction.calculate_denoised(sigma, output, x, timestep)
        kwargs: dict[str, Any] = {}
        if added and "class_labels" in added:  # SD2.1-unCLIP's class embedding input (a UNet argument of its own)
            kwargs["class_labels"] = added["class_labels"].to(self.dtype)
            added = {k: v for k, v in added.items() if k != "class_labels"}
        if added:
            kwargs["added_cond_kwargs"] = added
        if control is not None:
            control_kwargs: dict[str, Any] = {"batched_number": chunks}
            if added:
                control_kwargs["added_cond_kwargs"] = added
            control_text = context if crossattn_controlnet is None else crossattn_controlnet
            residuals = control.residuals(x_in, sigma, timestep, control_text, self.model, **control_kwargs)
            if residuals is not None:
                down, mid = residuals
                kwargs["down_block_additional_residuals"] = tuple(r.to(self.dtype) for r in down)
                kwargs["mid_block_additional_residual"] = mid.to(self.dtype) if mid is not None else None
            # T2I-Adapters (nodes.diffusion.t2i_adapter): features added inside the down blocks. A fresh list per
            # call: diffusers pops from it.
            intrablock = getattr(control, "intrablock_residuals", None)
            features = intrablock(x_in, sigma, self.model, chunks) if intrablock is not None else None
            if features is not None:
                kwargs["down_intrablock_additional_residuals"] = [f.to(self.dtype) for f in features]
        if concat is not None:  # inpainting UNets: mask + masked latent, not c_in-scaled
            x_in = torch.cat([x_in, concat], dim=1)
        hooks: Any = contextlib.nullcontext()
        if transformer_options and patch_api.has_unet_patches({patch_api.TRANSFORMER_OPTIONS: transformer_options}):
            transformer_options["original_shape"] = list(x_in.shape)
            hooks = unet_hooks.installed(self.unet, transformer_options)
        with hooks:
            output = self.network(x_in.to(self.dtype), timestep, encoder_hidden_states=context.to(self.dtype),
                                  return_dict=False, **kwargs)[0].float()
        return prediction.calculate_denoised(sigma, output, x, timestep)


class _Chunk:
    """One conditioning entry's share of a model call: input slice, weights and inputs."""

    def __init__(self, entry: CondEntry, x: torch.Tensor, owner: int):
        self.owner = owner  # 0 = positive, 1 = negative
        self.entry = entry
        area = entry.area
        batch = x.shape[0]
        input_x = x
        if area is not None:
            h = min(x.shape[2] - area[2], area[0])
            w = min(x.shape[3] - area[3], area[1])
            area = (h, w, area[2], area[3])
            input_x = x[:, :, area[2]:area[2] + h, area[3]:area[3] + w]
        self.area = area
        self.input_x = input_x
        if entry.mask is not None:
            mask = entry.mask[:batch]
            if area is not None:
                mask = mask[:, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
            mask = mask * entry.mask_strength
            mask = mask.unsqueeze(1).repeat(batch // mask.shape[0], input_x.shape[1], 1, 1)
        else:
            mask = torch.ones_like(input_x)
        mult = mask * entry.strength
        if entry.mask is None and area is not None:
            _feather_area_edges(mult, area, x.shape)
        self.mult = mult
        self.context = repeat_to_batch(entry.context, batch)
        self.added = {k: repeat_to_batch(v, batch) for k, v in entry.added.items()}
        self.control_context = None if entry.control_context is None \
            else repeat_to_batch(entry.control_context, batch)
        self.concat = entry.concat
        if self.concat is not None and area is not None:
            self.concat = self.concat[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]

    def can_join(self, other: _Chunk, context_repeat: int = _MAX_CONTEXT_REPEAT) -> bool:
        if self.input_x.shape != other.input_x.shape or self.entry.control is not other.entry.control \
                or self.entry.hooks != other.entry.hooks or self.entry.unet_patches is not other.entry.unet_patches:
            return False
        a, b = self.context.shape, other.context.shape
        if a[0] != b[0] or a[2] != b[2]:
            return False
        if math.lcm(a[1], b[1]) // min(a[1], b[1]) > context_repeat:
            return False
        if (self.concat is None) != (other.concat is None):
            return False
        if (self.control_context is None) != (other.control_context is None) or (
                self.control_context is not None and other.control_context is not None
                and self.control_context.shape != other.control_context.shape):
            return False
        return self.added.keys() == other.added.keys() and all(
            self.added[k].shape == other.added[k].shape for k in self.added)


def _feather_area_edges(mult: torch.Tensor, area: tuple[int, int, int, int], full_shape: torch.Size) -> None:
    """Area prompts fade in over 8 latent cells along edges that are inside the image (in place)."""
    ramp = 8
    for dim in range(2):
        size, offset = area[dim], area[2 + dim]
        if offset != 0:
            for t in range(ramp):
                mult.narrow(dim + 2, t, 1).mul_((1.0 / ramp) * (t + 1))
        if size + offset < full_shape[dim + 2]:
            for t in range(ramp):
                mult.narrow(dim + 2, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))


def _concat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


class GuidedDenoiser:
    """ComfyUI's sampling_function: weighted conditioning sums for cond and uncond, then CFG on x0."""

    def __init__(self, call: ModelCall, positive: list[CondEntry], negative: list[CondEntry] | None, cfg: float):
        self.call = call
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.schedule = call.schedule  # samplers that need percent_to_sigma (sa_solver) read it here

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **_: Any):
        options = self.call.model.options
        skip_uncond = (math.isclose(self.cfg, 1.0) and not return_uncond
                       and not options.get(patch_api.DISABLE_CFG1, False))
        negative = None if skip_uncond else self.negative
        conds = [self.positive, negative]
        out = self.weighted_predictions(x, sigma, conds, options)
        hook_model = HookModel(self)
        for pre in options.get(patch_api.PRE_CFG_FUNCTIONS, ()):
            out = pre({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": sigma, "input": x,
                       "sigma": sigma, "model": hook_model, "model_options": options})
        cond, uncond = out
        denoised = self.combine(x, sigma, cond, uncond, options, negative, hook_model)
        return (denoised, uncond) if return_uncond else denoised

    def combine(self, x, sigma, cond, uncond, options, negative=None, hook_model=None) -> torch.Tensor:
        """CFG on x0, or the model's `sampler_cfg_function` hook (which works on noise: x − D), then every
        `sampler_post_cfg_function` hook, with ComfyUI's argument dicts (nodes.diffusion.patches)."""
        model = hook_model if hook_model is not None else HookModel(self)
        hook = options.get(patch_api.CFG_FUNCTION)
        if hook is not None:
            result = x - hook({"cond": x - cond, "uncond": x - uncond, "cond_scale": self.cfg, "timestep": sigma,
                               "input": x, "sigma": sigma, "cond_denoised": cond, "uncond_denoised": uncond,
                               "model": model, "model_options": options, "input_cond": self.positive,
                               "input_uncond": negative})
        else:
            result = uncond + (cond - uncond) * self.cfg
        for post in options.get(patch_api.POST_CFG_FUNCTIONS, ()):
            result = post({"denoised": result, "cond": self.positive, "uncond": negative,
                           "cond_scale": self.cfg, "model": model, "uncond_denoised": uncond,
                           "cond_denoised": cond, "sigma": sigma, "model_options": options, "input": x})
        return result

    def weighted_predictions(self, x: torch.Tensor, sigma: torch.Tensor, groups: list[list[CondEntry] | None],
                             options: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """ComfyUI's calc_cond_batch: per group, the weighted sum of its entries' predictions (0 for None)."""
        totals = [torch.zeros_like(x) for _ in groups]
        weights = [torch.ones_like(x) * 1e-37 for _ in groups]
        sigma_now = float(sigma[0])
        pending = [_Chunk(entry, x, owner) for owner, entries in enumerate(groups) if entries
                   for entry in entries if entry.active_at(sigma_now) and not entry.default]
        if any(entry.default for entries in groups if entries for entry in entries):
            pending += _default_chunks(x, sigma_now, groups, pending)
        # Transformers attend jointly over text and image tokens: repeating a context would change the result.
        context_repeat = 1 if self.call.dit is not None else _MAX_CONTEXT_REPEAT
        while pending:
            first = pending[0]
            # Like ComfyUI, the joinable chunks run in reverse order: [negative..., positive...].
            batch = [c for c in pending if c is first or first.can_join(c, context_repeat)][::-1]
            pending = [c for c in pending if all(c is not b for b in batch)]
            n = batch[0].input_x.shape[0]
            added = {k: torch.cat([c.added[k] for c in batch]) for k in batch[0].added}
            # (can_join keeps chunks with and without concat channels apart)
            concat = torch.cat([c.concat for c in batch if c.concat is not None]) if batch[0].concat is not None \
                else None
            self.call.use_hooks(batch[0].entry.hooks, sigma)
            x_batch = torch.cat([c.input_x for c in batch])
            outputs = self.call(x_batch, sigma[:1].repeat(n * len(batch)),
                                _concat_contexts([c.context for c in batch]), added or None,
                                batch[0].entry.control, concat, len(batch), [c.owner for c in batch],
                                _with_entry_patches(options, batch[0].entry, x_batch, self.call),
                                control_context=_control_contexts(batch)).chunk(len(batch))
            for chunk, output in zip(batch, outputs, strict=False):
                total, weight = totals[chunk.owner], weights[chunk.owner]
                if chunk.area is not None:
                    h, w, y, x0 = chunk.area
                    total = total[:, :, y:y + h, x0:x0 + w]
                    weight = weight[:, :, y:y + h, x0:x0 + w]
                total += output * chunk.mult
                weight += chunk.mult
        return [total / weight for total, weight in zip(totals, weights, strict=False)]


def _with_entry_patches(options: dict[str, Any] | None, entry: CondEntry, x_batch: torch.Tensor,
                        call: ModelCall) -> dict[str, Any] | None:
    """The call's options with the entry's own UNet patches (GLIGEN's boxes) after the model's, as ComfyUI merges
    a cond's patches into transformer_options."""
    if entry.unet_patches is None:
        return options
    merged: Mapping[str, Any] = options if options is not None else call.model.options
    for name, patches in entry.unet_patches.patches_for(x_batch.shape, x_batch.device).items():
        for patch in patches:
            merged = patch_api.with_transformer_patch(merged, name, patch)
    return dict(merged)


def _default_chunks(x: torch.Tensor, sigma: float, groups: list[list[CondEntry] | None],
                    chunks: list[_Chunk]) -> list[_Chunk]:
    """ComfyUI's default conds: per group, its "default" entries weighted by what the other entries leave
    uncovered, relu(1 − Σ weights); none when nothing is left."""
    found = []
    for owner, entries in enumerate(groups):
        defaults = [e for e in entries or () if e.default and e.active_at(sigma)]
        if not defaults:
            continue
        left = torch.ones_like(x)
        for chunk in chunks:
            if chunk.owner == owner:
                covered = left
                if chunk.area is not None:
                    h, w, y, x0 = chunk.area
                    covered = left[:, :, y:y + h, x0:x0 + w]
                covered -= chunk.mult
        left = torch.relu(left)
        if torch.max(left) == 0:
            continue
        for entry in defaults:
            chunk = _Chunk(entry, x, owner)
            chunk.mult = left
            found.append(chunk)
    return found


def _control_contexts(batch: list[_Chunk]) -> torch.Tensor | None:
    """The batch's CLIPTextEncodeControlnet texts (can_join keeps chunks with and without one apart)."""
    if batch[0].control_context is None:
        return None
    return torch.cat([c.control_context for c in batch if c.control_context is not None])


class HookModel:
    """args["model"] for sampler hooks (the parts of ComfyUI's BaseModel that hooks use; patches.HookModel)."""

    def __init__(self, denoiser: GuidedDenoiser):
        self._denoiser = denoiser
        self.diffusion_model = denoiser.call.model
        self.model_sampling = denoiser.call.schedule
        self.model_options = denoiser.call.model.options

    def calc_cond_batch(self, conds: list[list[CondEntry] | None], x: torch.Tensor, sigma: torch.Tensor,
                        model_options: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
        """Weighted predictions of entry lists (args["cond"] / args["uncond"]) with any model options."""
        options = dict(model_options) if model_options is not None else self.model_options
        return self._denoiser.weighted_predictions(x, sigma, conds, options)


def prepare_mask(mask: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A noise_mask of any resolution → bilinear to the latent size, repeated over channels and batch."""
    mask = mask.to(device=device, dtype=torch.float32)
    mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                                           size=(shape[2], shape[3]), mode="bilinear")
    return repeat_to_batch(torch.cat([mask] * shape[1], dim=1), shape[0])


class InpaintDenoiser:
    """ComfyUI's KSamplerX0Inpaint: outside the mask the model sees the original latent noised to σ, and the
    prediction there is replaced by the original latent, so unmasked cells end exactly on the input.

    A model option `denoise_mask_function(sigma, mask, extra_options) -> mask` (Differential Diffusion & co.)
    decides the mask of each call; extra_options is {"model": a view whose `inner_model.model_sampling` is the
    schedule (ComfyUI passes its guider), "sigmas": the sampling's sigmas}."""

    def __init__(self, inner: Callable, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                 sigmas: torch.Tensor | None = None, mask_function: Callable[..., torch.Tensor] | None = None):
        self.inner = inner
        self.schedule = getattr(inner, "schedule", None)
        self.mask = mask
        self.keep = 1.0 - mask
        self.latent = latent
        self.noise = noise
        self.sigmas = sigmas
        self.mask_function = mask_function

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **kwargs: Any):
        mask, keep = self.mask, self.keep
        if self.mask_function is not None:
            view = _GuiderView(_ScheduleView(self.schedule))
            mask = self.mask_function(sigma, self.mask, extra_options={"model": view, "sigmas": self.sigmas})
            keep = 1.0 - mask
        if self.schedule is not None:  # the model's noise_scaling (flow models interpolate: σ·ε + (1 − σ)·x0)
            noised = self.schedule.noise_scaling(sigma, self.noise, self.latent)
        else:
            noised = self.noise * sigma.reshape((-1,) + (1,) * (x.ndim - 1)) + self.latent
        x = x * mask + noised * keep
        result = self.inner(x, sigma, return_uncond=return_uncond, **kwargs)
        denoised, uncond = result if return_uncond else (result, None)
        denoised = denoised * mask + self.latent * keep
        return (denoised, uncond) if return_uncond else denoised


class _ScheduleView:
    """ComfyUI's BaseModel as denoise-mask functions see it: `model_sampling` (sigma_min, timestep(), …)."""

    def __init__(self, schedule: Any):
        self.model_sampling = schedule


class _GuiderView:
    """ComfyUI's guider as denoise-mask functions see it: `inner_model` is the model."""

    def __init__(self, inner_model: _ScheduleView):
        self.inner_model = inner_model


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


# The UNet families ModelCall runs directly; transformer families run through their nodes.diffusion.dit_* module.
UNET_FAMILIES = frozenset({"sd1", "sd2", "sdxl", "sdxl_refiner"})


class UnsupportedModelError(ValueError):
    """A model this engine can load but not sample."""


class Guider:
    """What a GUIDER link carries: model + conditioning + cfg; `sample` runs one whole sampling pass.

    CFGGuider = Guider(model, {"positive": p, "negative": n}, cfg); BasicGuider = Guider(model, {"positive": c}).
    """

    def __init__(self, model: DiffusionModel, conds: dict[str, list | None], cfg: float = 1.0):
        self.model = model
        self.conds = conds
        self.cfg = cfg

    def make_denoiser(self, call: ModelCall, prepared: dict[str, list[CondEntry]]) -> GuidedDenoiser:
        """The D(x, σ) the sampler calls, from the prepared conditioning (guiders with other formulas override
        this: nodes.diffusion.guidance)."""
        return GuidedDenoiser(call, prepared.get("positive", []), prepared.get("negative"), self.cfg)

    def sample(self, noise: torch.Tensor, latent: torch.Tensor, sampler: Sampler, sigmas: torch.Tensor,
               denoise_mask: torch.Tensor | None = None, callback: StepCallback | None = None,
               seed: int | None = None, manager: Any = None) -> torch.Tensor:
        """Returns the sampled latent, unscaled, float32 on CPU (`latent` itself when sigmas is empty)."""
        if self.model.family not in UNET_FAMILIES and dit_calls.module_for(self.model.family) is None:
            raise UnsupportedModelError(
                f"sampling {self.model.family} models is not built yet: their files load, but there is no model "
                f"call for them")
        if sigmas.numel() == 0:
            return latent
        schedule = schedule_for(self.model.sampling)
        fmt = self.model.latent_format
        # (before prepared(): model-as-LoRA hooks read the UNet's own weights)
        hooks = hook_api.HookSession.for_conds(self.conds, self.model.unet, manager, schedule.percent_to_sigma,
                                               sigmas)
        with torch.no_grad(), self.model.prepared(manager) as unet, hook_api.released_at_end(hooks):
            device = unet_device(unet)
            noise = noise.to(device)
            latent = latent.to(device=device, dtype=torch.float32)
            sigmas = sigmas.to(device=device, dtype=torch.float32)
            if torch.count_nonzero(latent) > 0:  # an empty latent stays exactly 0
                latent = fmt.process_in(latent)
            mask = prepare_mask(denoise_mask, noise.shape, device) if denoise_mask is not None else None
            # (A transformer's in_channels count packed patches, not latent channels: no UNet concat inputs.)
            concat_fn = None if dit_calls.is_transformer_family(self.model.family) \
                else self._inpaint_channels(unet, noise.shape, latent, mask)
            prepared = prepare_conditioning(self.conds, noise.shape, schedule, device, unet.config,
                                            self.model.family, concat_fn, seed)
            denoiser: Callable = self.make_denoiser(ModelCall(self.model, unet, schedule, hooks), prepared)
            if mask is not None:  # (there is a mask exactly when a denoise_mask was given)
                inpaint_noise = noise
                if sampler.inpaint_random_noise:
                    inpaint_noise = seeded_randn(noise.shape, (41 if seed is None else seed) + 1).to(device)
                denoiser = InpaintDenoiser(denoiser, mask, latent, inpaint_noise, sigmas,
                                           self.model.options.get(patch_api.DENOISE_MASK_FUNCTION))
            x = schedule.noise_scaling(sigmas[0], noise, latent, is_max_denoise(float(schedule.sigma_max),
                                                                                float(sigmas[0])))
            total = len(sigmas) - 1
            step_callback = None
            if callback is not None:
                def step_callback(i: int, denoised: torch.Tensor, current: torch.Tensor) -> None:
                    callback(i, denoised, current, total)
            samples = sampler(denoiser, x, sigmas, extra_args={"seed": seed}, callback=step_callback)
            samples = schedule.inverse_noise_scaling(sigmas[-1], samples)
            return fmt.process_out(samples.float()).cpu()

    def _inpaint_channels(self, unet: torch.nn.Module, shape: torch.Size, latent: torch.Tensor,
                          mask: torch.Tensor | None) -> Callable | None:
        """For inpainting UNets (2·C + 1 input channels): how each conditioning entry builds its extra channels."""
        in_channels = getattr(unet.config, "in_channels", shape[1])
        if in_channels == shape[1]:
            return None
        if in_channels == shape[1] * 2:  # InstructPix2Pix: the edited image's latent
            return lambda options: ip2p_concat(options, shape, latent.device)
        if in_channels != shape[1] * 2 + 1:
            raise ValueError(f"the model takes {in_channels} input channels for {shape[1]}-channel latents; only "
                             f"inpainting (mask + masked image) and InstructPix2Pix (image) models are supported")
        process_in = self.model.latent_format.process_in
        return lambda options: inpaint_concat(options, shape, latent, mask, process_in)
