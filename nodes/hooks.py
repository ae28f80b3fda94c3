"""Hook nodes with ComfyUI's names and signatures (comfy_extras/nodes_hooks.py): create LoRA / model-as-LoRA hooks,
schedule them with keyframes, combine them, attach them to conditionings (with masks, timestep ranges and
"default" conds) or to a CLIP. The values and the sampler's part are in nodes.diffusion.hooks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, MASK, Boolean, Combo, Float, Int, Output, Socket

from .diffusion import checkpoint
from .diffusion import hooks as hook_api
from .diffusion import lora as lora_math
from .diffusion.hooks import HookGroup, HookKeyframe, HookKeyframes
from .lora import load_lora
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

HOOKS = "HOOKS"
HOOK_KEYFRAMES = "HOOK_KEYFRAMES"
TIMESTEPS_RANGE = "TIMESTEPS_RANGE"
FLOATS = "FLOATS"

HOOK_STRENGTH = Float(min=-20.0, max=20.0, step=0.01)
PERCENT = Float(min=0.0, max=1.0, step=0.001)
COND_STRENGTH = Float(min=0.0, max=10.0, step=0.01)
COND_AREA = Combo(("default", "mask bounds"))

Conditioning = list[list[Any]]
log = logging.getLogger(__name__)


def _hooks(value: Any, name: str) -> HookGroup | None:
    if value is not None and not isinstance(value, HookGroup):
        raise InputError(name, f"expected a HOOKS value, got {type(value).__name__}")
    return value


def _keyframes(value: Any, name: str) -> HookKeyframes:
    if value is None:
        return HookKeyframes()
    if not isinstance(value, HookKeyframes):
        raise InputError(name, f"expected a HOOK_KEYFRAMES value, got {type(value).__name__}")
    return value


def _timesteps(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InputError("timesteps", "expected a TIMESTEPS_RANGE (start_percent, end_percent)")
    return float(value[0]), float(value[1])


# ---------------------------------------------------------------------------------------------------------------
# Conditioning with hooks, masks and timestep ranges (comfy/hooks.py's set_conds_props & co.)


def _with_values(conditioning: Conditioning, values: dict[str, Any]) -> Conditioning:
    return [[cond, {**options, **values}] for cond, options in conditioning]


def _with_hooks(conditioning: Conditioning, hooks: HookGroup | None,
                combined: dict[tuple[int, int], HookGroup]) -> Conditioning:
    """Hooks added to those each entry has (one combined group per pair of groups, shared by all entries)."""
    if hooks is None:
        return conditioning
    result = []
    for cond, options in conditioning:
        present = options.get("hooks")
        if present is None:
            group = hooks
        else:
            key = (id(present), id(hooks))
            if key not in combined:
                combined[key] = present.combined(hooks)
            group = combined[key]
        result.append([cond, {**options, "hooks": group}])
    return result


def _with_properties(conditioning: Conditioning, strength: float, set_cond_area: str, mask: Any,
                     hooks: HookGroup | None, timesteps: tuple[float, float] | None,
                     combined: dict[tuple[int, int], HookGroup]) -> Conditioning:
    conditioning = _with_hooks(conditioning, hooks, combined)
    if mask is not None:
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        conditioning = _with_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                                   "mask_strength": strength})
    if timesteps is not None:
        conditioning = _with_values(conditioning, {"start_percent": timesteps[0], "end_percent": timesteps[1]})
    return conditioning


class _PropertiesNode(Node):
    """Shared inputs of the Cond (Pair) Set Props nodes."""

    def _mask(self) -> Any:
        mask = getattr(self, "mask", None)
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise InputError("mask", f"expected a MASK, got {type(mask).__name__}")
        return mask

    def _set(self, conds: list[Conditioning], new: list[Conditioning] | None = None) -> tuple:
        """new (or conds) with the properties; appended to conds when new is given."""
        combined: dict[tuple[int, int], HookGroup] = {}
        hooks, mask = _hooks(getattr(self, "hooks", None), "hooks"), self._mask()
        timesteps = _timesteps(getattr(self, "timesteps", None))
        targets = new if new is not None else conds
        changed = [_with_properties(c, getattr(self, "strength", 1.0), getattr(self, "set_cond_area", "default"),
                                    mask, hooks, timesteps, combined) for c in targets]
        if new is None:
            return tuple(changed)
        return tuple(old + extra for old, extra in zip(conds, changed, strict=True))


class ConditioningSetProperties(_PropertiesNode):
    display_name = "Cond Set Props"
    category = "advanced/hooks/cond single"
    experimental = True
    outputs = (Output(CONDITIONING),)
    cond_NEW: Annotated[Any, Socket(CONDITIONING)]
    strength: Annotated[float, COND_STRENGTH] = 1.0
    set_cond_area: Annotated[str, COND_AREA] = "default"
    mask: Annotated[Any, Socket(MASK, optional=True)] = None
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None
    timesteps: Annotated[Any, Socket(TIMESTEPS_RANGE, optional=True)] = None

    def run(self, ctx: RunContext):
        return self._set([self.cond_NEW])


class ConditioningSetPropertiesAndCombine(_PropertiesNode):
    display_name = "Cond Set Props Combine"
    category = "advanced/hooks/cond single"
    experimental = True
    outputs = (Output(CONDITIONING),)
    cond: Annotated[Any, Socket(CONDITIONING)]
    cond_NEW: Annotated[Any, Socket(CONDITIONING)]
    strength: Annotated[float, COND_STRENGTH] = 1.0
    set_cond_area: Annotated[str, COND_AREA] = "default"
    mask: Annotated[Any, Socket(MASK, optional=True)] = None
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None
    timesteps: Annotated[Any, Socket(TIMESTEPS_RANGE, optional=True)] = None

    def run(self, ctx: RunContext):
        return self._set([self.cond], [self.cond_NEW])


class PairConditioningSetProperties(_PropertiesNode):
    display_name = "Cond Pair Set Props"
    category = "advanced/hooks/cond pair"
    experimental = True
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"))
    positive_NEW: Annotated[Any, Socket(CONDITIONING)]
    negative_NEW: Annotated[Any, Socket(CONDITIONING)]
    strength: Annotated[float, COND_STRENGTH] = 1.0
    set_cond_area: Annotated[str, COND_AREA] = "default"
    mask: Annotated[Any, Socket(MASK, optional=True)] = None
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None
    timesteps: Annotated[Any, Socket(TIMESTEPS_RANGE, optional=True)] = None

    def run(self, ctx: RunContext):
        return self._set([self.positive_NEW, self.negative_NEW])


class PairConditioningSetPropertiesAndCombine(_PropertiesNode):
    display_name = "Cond Pair Set Props Combine"
    category = "advanced/hooks/cond pair"
    experimental = True
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    positive_NEW: Annotated[Any, Socket(CONDITIONING)]
    negative_NEW: Annotated[Any, Socket(CONDITIONING)]
    strength: Annotated[float, COND_STRENGTH] = 1.0
    set_cond_area: Annotated[str, COND_AREA] = "default"
    mask: Annotated[Any, Socket(MASK, optional=True)] = None
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None
    timesteps: Annotated[Any, Socket(TIMESTEPS_RANGE, optional=True)] = None

    def run(self, ctx: RunContext):
        return self._set([self.positive, self.negative], [self.positive_NEW, self.negative_NEW])


class PairConditioningCombine(_PropertiesNode):
    display_name = "Cond Pair Combine"
    category = "advanced/hooks/cond pair"
    experimental = True
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"))
    positive_A: Annotated[Any, Socket(CONDITIONING)]
    negative_A: Annotated[Any, Socket(CONDITIONING)]
    positive_B: Annotated[Any, Socket(CONDITIONING)]
    negative_B: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        return self._set([self.positive_A, self.negative_A], [self.positive_B, self.negative_B])


def _default_and_combine(conds: list[Conditioning], defaults: list[Conditioning], hooks: HookGroup | None) -> tuple:
    """Each default conditioning marked "default" (used where the others leave room) and appended."""
    combined: dict[tuple[int, int], HookGroup] = {}
    return tuple(old + _with_values(_with_hooks(new, hooks, combined), {"default": True})
                 for old, new in zip(conds, defaults, strict=True))


class ConditioningSetDefaultCombine(Node):
    display_name = "Cond Set Default Combine"
    category = "advanced/hooks/cond single"
    experimental = True
    outputs = (Output(CONDITIONING),)
    cond: Annotated[Any, Socket(CONDITIONING)]
    cond_DEFAULT: Annotated[Any, Socket(CONDITIONING)]
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    def run(self, ctx: RunContext):
        return _default_and_combine([self.cond], [self.cond_DEFAULT], _hooks(self.hooks, "hooks"))


class PairConditioningSetDefaultCombine(Node):
    display_name = "Cond Pair Set Default Combine"
    category = "advanced/hooks/cond pair"
    experimental = True
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    positive_DEFAULT: Annotated[Any, Socket(CONDITIONING)]
    negative_DEFAULT: Annotated[Any, Socket(CONDITIONING)]
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    def run(self, ctx: RunContext):
        return _default_and_combine([self.positive, self.negative], [self.positive_DEFAULT, self.negative_DEFAULT],
                                    _hooks(self.hooks, "hooks"))


class ConditioningTimestepsRange(Node):
    display_name = "Timesteps Range"
    category = "advanced/hooks"
    experimental = True
    outputs = (Output(TIMESTEPS_RANGE, name="TIMESTEPS_RANGE"), Output(TIMESTEPS_RANGE, name="BEFORE_RANGE"),
               Output(TIMESTEPS_RANGE, name="AFTER_RANGE"))
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0

    def run(self, ctx: RunContext):
        return ((self.start_percent, self.end_percent), (0.0, self.start_percent), (self.end_percent, 1.0))


class SetClipHooks(Node):
    """The CLIP encodes with the hooks' clip weights at strength_clip. With schedule_clip, a prompt is encoded once
    per range of the hooks' keyframe strengths and each encoding is used only within its range; without it,
    keyframes are ignored (ComfyUI). With apply_to_conds the conditionings also carry the hooks."""

    display_name = "Set CLIP Hooks"
    category = "advanced/hooks/clip"
    experimental = True
    outputs = (Output(CLIP),)
    clip: Annotated[Any, Socket(CLIP)]
    apply_to_conds: Annotated[bool, Boolean()] = True
    schedule_clip: Annotated[bool, Boolean()] = False
    hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    def run(self, ctx: RunContext):
        hooks = _hooks(self.hooks, "hooks")
        if hooks is None:
            return (self.clip,)
        # Outside an encode the encoders carry their own weights (ClipModel.prepared restores them).
        clip, options = self.clip, dict(self.clip.options)
        if self.schedule_clip:
            options[hook_api.CLIP_SCHEDULE] = hook_api.scheduled_clip_patches(hooks, clip.encoders, clip.family)
        else:
            patches = hook_api.clip_hook_patches(hooks, clip.encoders, clip.family)
            clip = clip.with_patches(*patches) if patches else clip
        if self.apply_to_conds:
            options[hook_api.CONDITIONING_HOOKS] = hooks
        return (dataclasses.replace(clip, options=options),)


# ---------------------------------------------------------------------------------------------------------------
# Creating hooks


def _lora_hook(ctx: RunContext, lora_name: str, strength_model: float, strength_clip: float,
               prev_hooks: Any) -> HookGroup:
    previous = _hooks(prev_hooks, "prev_hooks") or HookGroup()
    if strength_model == 0 and strength_clip == 0:
        return previous
    lora = load_lora(ctx, lora_name)
    if not any(lora_math.split_key(key) for key in lora.names):
        raise InputError("lora_name", f"{lora_name}: holds no LoRA tensors")
    hook = hook_api.WeightHook(hook_api.HookRef(), strength_model, strength_clip, lora=lora)
    return previous.combined(HookGroup((hook,)))


class CreateHookLora(Node):
    display_name = "Create Hook LoRA"
    category = "advanced/hooks/create"
    experimental = True
    outputs = (Output(HOOKS),)
    lora_name: Annotated[str, Combo(model_choices("loras"))]
    strength_model: Annotated[float, HOOK_STRENGTH] = 1.0
    strength_clip: Annotated[float, HOOK_STRENGTH] = 1.0
    prev_hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "loras", constants.get("lora_name"), "lora")

    def run(self, ctx: RunContext):
        return (_lora_hook(ctx, self.lora_name, self.strength_model, self.strength_clip, self.prev_hooks),)


class CreateHookLoraModelOnly(Node):
    display_name = "Create Hook LoRA (MO)"
    category = "advanced/hooks/create"
    experimental = True
    outputs = (Output(HOOKS),)
    lora_name: Annotated[str, Combo(model_choices("loras"))]
    strength_model: Annotated[float, HOOK_STRENGTH] = 1.0
    prev_hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "loras", constants.get("lora_name"), "lora")

    def run(self, ctx: RunContext):
        return (_lora_hook(ctx, self.lora_name, self.strength_model, 0.0, self.prev_hooks),)


def _model_as_lora_hook(ctx: RunContext, ckpt_name: str, strength_model: float, strength_clip: float,
                        prev_hooks: Any) -> HookGroup:
    previous = _hooks(prev_hooks, "prev_hooks") or HookGroup()
    path = locate_model(ctx, "ckpt_name", "checkpoints", ckpt_name)
    manager = ctx.models
    loaded = load_model(ctx, "ckpt_name", ckpt_name, model_key("checkpoint", file_identity(path)),
                        lambda: checkpoint.load_checkpoint(path, manager))
    clip_weights = loaded.clip.encoders if loaded.clip is not None else None
    hook = hook_api.WeightHook(hook_api.HookRef(), strength_model, strength_clip,
                               model_weights=loaded.model.unet, clip_weights=clip_weights)
    return previous.combined(HookGroup((hook,)))


class CreateHookModelAsLora(Node):
    display_name = "Create Hook Model as LoRA"
    category = "advanced/hooks/create"
    experimental = True
    outputs = (Output(HOOKS),)
    ckpt_name: Annotated[str, Combo(model_choices("checkpoints"))]
    strength_model: Annotated[float, HOOK_STRENGTH] = 1.0
    strength_clip: Annotated[float, HOOK_STRENGTH] = 1.0
    prev_hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "checkpoints", constants.get("ckpt_name"), "checkpoint")

    def run(self, ctx: RunContext):
        return (_model_as_lora_hook(ctx, self.ckpt_name, self.strength_model, self.strength_clip, self.prev_hooks),)


class CreateHookModelAsLoraModelOnly(Node):
    display_name = "Create Hook Model as LoRA (MO)"
    category = "advanced/hooks/create"
    experimental = True
    outputs = (Output(HOOKS),)
    ckpt_name: Annotated[str, Combo(model_choices("checkpoints"))]
    strength_model: Annotated[float, HOOK_STRENGTH] = 1.0
    prev_hooks: Annotated[Any, Socket(HOOKS, optional=True)] = None

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "checkpoints", constants.get("ckpt_name"), "checkpoint")

    def run(self, ctx: RunContext):
        return (_model_as_lora_hook(ctx, self.ckpt_name, self.strength_model, 0.0, self.prev_hooks),)


# ---------------------------------------------------------------------------------------------------------------
# Scheduling


class SetHookKeyframes(Node):
    display_name = "Set Hook Keyframes"
    category = "advanced/hooks/scheduling"
    experimental = True
    outputs = (Output(HOOKS),)
    hooks: Annotated[Any, Socket(HOOKS)]
    hook_kf: Annotated[Any, Socket(HOOK_KEYFRAMES, optional=True)] = None

    def run(self, ctx: RunContext):
        hooks = _hooks(self.hooks, "hooks")
        if self.hook_kf is None:
            return (hooks,)
        return (hooks.with_keyframes(_keyframes(self.hook_kf, "hook_kf")) if hooks is not None else None,)


class CreateHookKeyframe(Node):
    display_name = "Create Hook Keyframe"
    category = "advanced/hooks/scheduling"
    experimental = True
    outputs = (Output(HOOK_KEYFRAMES, name="HOOK_KF"),)
    strength_mult: Annotated[float, HOOK_STRENGTH] = 1.0
    start_percent: Annotated[float, PERCENT] = 0.0
    prev_hook_kf: Annotated[Any, Socket(HOOK_KEYFRAMES, optional=True)] = None

    def run(self, ctx: RunContext):
        previous = _keyframes(self.prev_hook_kf, "prev_hook_kf")
        return (previous.with_keyframe(HookKeyframe(self.strength_mult, self.start_percent)),)


def _log_keyframes(keyframes: Iterable[tuple[float, float]]) -> None:
    for percent, strength in keyframes:
        log.info("Hook Keyframe - start_percent:%s = %s", percent, strength)


class CreateHookKeyframesInterpolated(Node):
    display_name = "Create Hook Keyframes Interp."
    category = "advanced/hooks/scheduling"
    experimental = True
    outputs = (Output(HOOK_KEYFRAMES, name="HOOK_KF"),)
    strength_start: Annotated[float, Float(min=0.0, max=10.0, step=0.001)] = 1.0
    strength_end: Annotated[float, Float(min=0.0, max=10.0, step=0.001)] = 1.0
    interpolation: Annotated[str, Combo(hook_api.INTERPOLATIONS)] = "linear"
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0
    keyframes_count: Annotated[int, Int(min=2, max=100, step=1)] = 5
    print_keyframes: Annotated[bool, Boolean()] = False
    prev_hook_kf: Annotated[Any, Socket(HOOK_KEYFRAMES, optional=True)] = None

    def run(self, ctx: RunContext):
        previous = _keyframes(self.prev_hook_kf, "prev_hook_kf")
        strengths = hook_api.interpolated(self.strength_start, self.strength_end, self.keyframes_count,
                                          self.interpolation)
        result = hook_api.keyframes_over(strengths, self.start_percent, self.end_percent, previous)
        if self.print_keyframes:
            added = [k for k in result.keyframes if k not in previous.keyframes]
            _log_keyframes((k.start_percent, k.strength) for k in added)
        return (result,)


class CreateHookKeyframesFromFloats(Node):
    display_name = "Create Hook Keyframes From Floats"
    category = "advanced/hooks/scheduling"
    experimental = True
    outputs = (Output(HOOK_KEYFRAMES, name="HOOK_KF"),)
    floats_strength: Annotated[Any, Socket(FLOATS, default=-1, min=-1, step=0.001, forceInput=True)]
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0
    print_keyframes: Annotated[bool, Boolean()] = False
    prev_hook_kf: Annotated[Any, Socket(HOOK_KEYFRAMES, optional=True)] = None

    def run(self, ctx: RunContext):
        previous = _keyframes(self.prev_hook_kf, "prev_hook_kf")
        values = self.floats_strength
        if isinstance(values, torch.Tensor):
            values = values.flatten().tolist()
        elif isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [float(values)]
        if not isinstance(values, (list, tuple)) or not values or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise InputError("floats_strength", "expected a float or a non-empty list of floats")
        result = hook_api.keyframes_over(values, self.start_percent, self.end_percent, previous)
        if self.print_keyframes:
            added = [k for k in result.keyframes if k not in previous.keyframes]
            _log_keyframes((k.start_percent, k.strength) for k in added)
        return (result,)


# ---------------------------------------------------------------------------------------------------------------
# Combining


class CombineHooks2(Node):
    display_name = "Combine Hooks [2]"
    category = "advanced/hooks/combine"
    experimental = True
    outputs = (Output(HOOKS),)
    hooks_A: Annotated[Any, Socket(HOOKS, optional=True)] = None
    hooks_B: Annotated[Any, Socket(HOOKS, optional=True)] = None

    def run(self, ctx: RunContext):
        names = [name for name in type(self).input_specs() if name.startswith("hooks_")]
        return (hook_api.combine_all(_hooks(getattr(self, name), name) for name in names),)


class CombineHooks4(CombineHooks2):
    display_name = "Combine Hooks [4]"
    hooks_C: Annotated[Any, Socket(HOOKS, optional=True)] = None
    hooks_D: Annotated[Any, Socket(HOOKS, optional=True)] = None


class CombineHooks8(CombineHooks4):
    display_name = "Combine Hooks [8]"
    hooks_E: Annotated[Any, Socket(HOOKS, optional=True)] = None
    hooks_F: Annotated[Any, Socket(HOOKS, optional=True)] = None
    hooks_G: Annotated[Any, Socket(HOOKS, optional=True)] = None
    hooks_H: Annotated[Any, Socket(HOOKS, optional=True)] = None


NODES = [
    CreateHookLora, CreateHookLoraModelOnly, CreateHookModelAsLora, CreateHookModelAsLoraModelOnly,
    SetHookKeyframes, CreateHookKeyframe, CreateHookKeyframesInterpolated, CreateHookKeyframesFromFloats,
    CombineHooks2, CombineHooks4, CombineHooks8,
    ConditioningSetProperties, ConditioningSetPropertiesAndCombine, PairConditioningSetProperties,
    PairConditioningSetPropertiesAndCombine, ConditioningSetDefaultCombine, PairConditioningSetDefaultCombine,
    PairConditioningCombine, SetClipHooks, ConditioningTimestepsRange,
]
