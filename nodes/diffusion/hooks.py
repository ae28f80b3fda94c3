"""Hooks: weight changes that only the conditionings carrying them see, with strengths scheduled over sampling.

The values follow ComfyUI's comfy/hooks.py (HOOKS, HOOK_KEYFRAMES links):

* A `WeightHook` holds a LoRA file (`lora`) or another checkpoint's weights used as a LoRA ("model as LoRA":
  ΔW = W_target − W_base), with `strength_model` / `strength_clip` and a keyframe schedule. A `HookGroup` is an
  ordered set of hooks (no two with the same `ref`: copies of one hook share it).
* Keyframes (`HookKeyframes`) scale a hook's strength over the sampling percent. Each keyframe starts at
  `start_percent` (turned into σ by the model's schedule) and holds for at least `guarantee_steps` steps once
  reached (unless it starts before the first σ of the run); without keyframes the multiplier is 1, and before
  the first step the first keyframe is current whatever its start.
* Conditionings carry a group under "hooks". In the sampler, entries batch together only with entries of the same
  group, and a `HookSession` (one per sampling run) makes the UNet carry that group's weights at the strength its
  keyframes give for the current σ (entries without hooks see the model's own weights). The weights set last
  stay applied until another group asks for different ones, and are restored (bit-exact) when the run ends.

CLIP hooks (SetClipHooks) are applied when encoding: `clip_hook_patches` builds the CLIP's weight patches; with
schedule_clip, `clip_encodes` gives one encoding per range of keyframe strengths, marked clip_start_percent /
clip_end_percent, which the sampler uses only within that range (sampling_conds).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from . import lora as lora_math
from .patches import WeightDiffPatch

INTERPOLATIONS = ("linear", "ease_in", "ease_out", "ease_in_out")
# ClipModel.options key: the HookGroup that SetClipHooks(apply_to_conds=True) puts on every conditioning encoded.
CONDITIONING_HOOKS = "hooks_for_conditioning"
# ClipModel.options key: SetClipHooks(schedule_clip=True)'s ranges, each encoded with its own hook strengths.
CLIP_SCHEDULE = "hook_clip_schedule"


class LoraFile(Protocol):
    """A LoRA file's tensors (nodes.lora.LoraTensors)."""

    metadata: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------
# Keyframes


@dataclass(frozen=True)
class HookKeyframe:
    strength: float
    start_percent: float = 0.0
    guarantee_steps: int = 1


@dataclass(frozen=True)
class HookKeyframes:
    """Keyframes in order of start_percent (equal starts keep the order they were added in)."""

    keyframes: tuple[HookKeyframe, ...] = ()

    def with_keyframe(self, keyframe: HookKeyframe) -> HookKeyframes:
        return HookKeyframes(tuple(sorted((*self.keyframes, keyframe), key=lambda k: k.start_percent)))


def interpolated(start: float, end: float, count: int, method: str) -> list[float]:
    """`count` values from `start` to `end`: linear, ease_in (t²), ease_out (1 − (1 − t)²) or ease_in_out
    ((1 − cos πt) / 2) over t evenly spaced in [0, 1], in float32 as ComfyUI computes them."""
    if method == "linear":
        return torch.linspace(start, end, count).tolist()
    t = torch.linspace(0, 1, count)
    if method == "ease_in":
        shape = t ** 2
    elif method == "ease_out":
        shape = 1 - (1 - t) ** 2
    elif method == "ease_in_out":
        shape = (1 - torch.cos(t * math.pi)) / 2
    else:
        raise ValueError(f"unknown interpolation {method!r}; known: {', '.join(INTERPOLATIONS)}")
    return ((end - start) * shape + start).tolist()


def keyframes_over(strengths: Iterable[float], start_percent: float, end_percent: float,
                   previous: HookKeyframes | None = None) -> HookKeyframes:
    """One keyframe per strength, at percents spread evenly from start to end; the first is held one step."""
    values = [float(s) for s in strengths]
    group = previous or HookKeyframes()
    for index, (percent, strength) in enumerate(zip(interpolated(start_percent, end_percent, len(values), "linear"),
                                                    values, strict=True)):
        group = group.with_keyframe(HookKeyframe(strength, percent, guarantee_steps=1 if index == 0 else 0))
    return group


class KeyframeCursor:
    """Which keyframe is current, step by step through one sampling run (ComfyUI's prepare_current_keyframe)."""

    def __init__(self, keyframes: HookKeyframes, percent_to_sigma: Callable[[float], float], max_sigma: float):
        self.keyframes = keyframes.keyframes
        self.starts = [percent_to_sigma(k.start_percent) for k in self.keyframes]
        self.max_sigma = max_sigma
        self.index = 0
        self.used_steps = 0
        self.last_sigma: float | None = None

    def _guarantee(self, index: int) -> int:
        # A keyframe that starts before this run's first σ guarantees nothing.
        return 0 if self.starts[index] > self.max_sigma else self.keyframes[index].guarantee_steps

    def advance(self, sigma: float) -> None:
        """Move to σ (a no-op when called again for the same σ: once per step, however many model calls)."""
        if not self.keyframes or sigma == self.last_sigma:
            return
        if self.used_steps >= self._guarantee(self.index):
            for candidate in range(self.index + 1, len(self.keyframes)):
                if self.starts[candidate] < sigma:
                    break
                self.index, self.used_steps = candidate, 0
                if self._guarantee(candidate) > 0:
                    break
        self.used_steps += 1
        self.last_sigma = sigma

    @property
    def strength(self) -> float:
        return self.keyframes[self.index].strength if self.keyframes else 1.0


# ---------------------------------------------------------------------------------------------------------------
# Hooks and groups


@dataclass(frozen=True, eq=False)
class HookRef:
    """Identity shared by a hook and its copies (compared by identity)."""


@dataclass(frozen=True)
class WeightHook:
    ref: HookRef
    strength_model: float = 1.0
    strength_clip: float = 1.0
    lora: LoraFile | None = None
    model_weights: torch.nn.Module | None = None     # model as LoRA: the other checkpoint's UNet
    clip_weights: torch.nn.Module | None = None      # ... and its text encoders (ClipModel.encoders)
    keyframes: HookKeyframes = field(default_factory=HookKeyframes)


@dataclass(frozen=True)
class HookGroup:
    hooks: tuple[WeightHook, ...] = ()

    def combined(self, other: HookGroup | None) -> HookGroup:
        """This group's hooks, then other's whose ref is not here yet."""
        if other is None:
            return self
        hooks = list(self.hooks)
        for hook in other.hooks:
            if all(hook.ref is not kept.ref for kept in hooks):
                hooks.append(hook)
        return HookGroup(tuple(hooks))

    def with_keyframes(self, keyframes: HookKeyframes | None) -> HookGroup:
        return HookGroup(tuple(replace(h, keyframes=keyframes or HookKeyframes()) for h in self.hooks))

    def cache_nbytes(self) -> int:
        # The LoRA tensors and checkpoint weights are owned (and counted) by the model memory manager.
        return 0


def combine_all(groups: Iterable[HookGroup | None]) -> HookGroup | None:
    """ComfyUI's combine_all_hooks: None when none is given, the group itself when one is."""
    present = [g for g in groups if g is not None]
    if not present:
        return None
    result = present[0]
    for group in present[1:]:
        result = result.combined(group)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Weight patches


def weight_diffs(base: torch.nn.Module, target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model as LoRA: W_target − W_base (float32, CPU) for every parameter both have with the same shape; equal
    weights give no entry."""
    targets = dict(target.named_parameters())
    diffs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, weight in base.named_parameters():
            other = targets.get(name)
            if other is None or other.shape != weight.shape:
                continue
            diff = other.detach().to("cpu", torch.float32) - weight.detach().to("cpu", torch.float32)
            if torch.count_nonzero(diff):
                diffs[name] = diff
    return diffs


def _scaled_diff_patch(diffs: Mapping[str, torch.Tensor], strength: float) -> WeightDiffPatch:
    return WeightDiffPatch(tuple((name, diff, float(strength), 1.0) for name, diff in diffs.items()))


def _lora_entries(lora: LoraFile, key_map: Mapping[str, lora_math.Target], owner: str) \
        -> list[tuple[str, lora_math.Adapter]]:
    # Keys for the other owner (or another architecture) are skipped silently, as ComfyUI's hooks do.
    parsed = lora_math.parse_lora(lora.tensors(), key_map, lora.metadata)
    return [(target.parameter, adapter) for target, adapter in parsed.adapters if target.owner == owner]


def clip_hook_patches(hooks: HookGroup, encoders: torch.nn.ModuleDict, family: str,
                      multipliers: Mapping[HookRef, float] | None = None,
                      diffs_by_hook: dict[HookRef, dict[str, torch.Tensor]] | None = None) -> list[Any]:
    """The weight patches that make a CLIP encode with the hooks' clip weights at strength_clip × the hook's
    multiplier (1 when not given). `encoders` must carry their own weights now (model-as-LoRA diffs are taken from
    them; `diffs_by_hook` keeps them for the next call)."""
    key_map = lora_math.key_map_clip(encoders, family)
    diffs_by_hook = {} if diffs_by_hook is None else diffs_by_hook
    lora_entries: list[tuple[str, lora_math.Adapter, float]] = []
    diff_patches: list[Any] = []
    for hook in hooks.hooks:
        strength = hook.strength_clip * (multipliers or {}).get(hook.ref, 1.0)
        if strength == 0:
            continue
        if hook.lora is not None:
            lora_entries += [(name, adapter, float(strength))
                             for name, adapter in _lora_entries(hook.lora, key_map, "clip")]
        if hook.clip_weights is not None:
            if hook.ref not in diffs_by_hook:
                diffs_by_hook[hook.ref] = weight_diffs(encoders, hook.clip_weights)
            if diffs_by_hook[hook.ref]:
                diff_patches.append(_scaled_diff_patch(diffs_by_hook[hook.ref], strength))
    patches: list[Any] = [lora_math.LoraPatch(tuple(lora_entries))] if lora_entries else []
    return patches + diff_patches


def clip_schedule(hooks: HookGroup) -> list[tuple[tuple[float, float], dict[HookRef, float]]]:
    """ComfyUI's get_hooks_for_clip_schedule: the percent ranges over which no hook's keyframe strength changes,
    each with every hook's multiplier there (1 where a hook has no keyframe covering the range)."""
    per_hook: dict[HookRef, list[tuple[tuple[float, float], HookKeyframe | None]]] = {}
    for hook in hooks.hooks:
        keyframes = hook.keyframes.keyframes
        if not keyframes:
            per_hook[hook.ref] = [((0.0, 1.0), None)]
            continue
        ranges: list[tuple[tuple[float, float], HookKeyframe | None]] = []
        previous = keyframes[0]
        for keyframe in keyframes:
            if keyframe.start_percent > previous.start_percent and \
                    not math.isclose(keyframe.strength, previous.strength):
                ranges.append(((previous.start_percent, keyframe.start_percent), previous))
                previous = keyframe
            elif keyframe.start_percent == previous.start_percent:
                previous = keyframe
        if not math.isclose(previous.start_percent, 1.0):
            ranges.append(((previous.start_percent, 1.0), previous))
        per_hook[hook.ref] = ranges
    bounds = sorted({0.0, *(p for ranges in per_hook.values() for span, _ in ranges for p in span)})
    schedule = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        multipliers = {}
        for ref, ranges in per_hook.items():
            found = next((k for (s, e), k in ranges if s < end and e > start), None)
            multipliers[ref] = found.strength if found is not None else 1.0
        schedule.append(((start, end), multipliers))
    return schedule


def scheduled_clip_patches(hooks: HookGroup, encoders: torch.nn.ModuleDict, family: str) \
        -> tuple[tuple[float, float, tuple[Any, ...]], ...]:
    """SetClipHooks(schedule_clip=True): (start_percent, end_percent, weight patches) per range of clip_schedule."""
    diffs: dict[HookRef, dict[str, torch.Tensor]] = {}
    return tuple((start, end, tuple(clip_hook_patches(hooks, encoders, family, multipliers, diffs)))
                 for (start, end), multipliers in clip_schedule(hooks))


def clip_encodes(clip: Any) -> list[tuple[Any, dict[str, float]]]:
    """The CLIPs to encode a prompt with and what each encoding's conditioning adds: the clip itself, or one
    patched clip per range of a scheduled SetClipHooks (with clip_start_percent / clip_end_percent)."""
    schedule = clip.options.get(CLIP_SCHEDULE)
    if not schedule:
        return [(clip, {})]
    return [(clip.with_patches(*patches), {"clip_start_percent": start, "clip_end_percent": end})
            for start, end, patches in schedule]


class HookSession:
    """The hooks of one sampling run: keyframe positions, and the hook weights the UNet carries now."""

    def __init__(self, unet: torch.nn.Module, percent_to_sigma: Callable[[float], float], max_sigma: float,
                 model_diffs: dict[HookRef, dict[str, torch.Tensor]]):
        self.unet = unet
        self.percent_to_sigma = percent_to_sigma
        self.max_sigma = max_sigma
        self.model_diffs = model_diffs
        self.cursors: dict[tuple[HookRef, HookKeyframes], KeyframeCursor] = {}
        self.lora_entries: dict[HookRef, list[tuple[str, lora_math.Adapter]]] = {}
        self.applied: tuple[tuple[HookRef, float], ...] = ()
        self.restores: list[Callable[[], None]] = []

    @classmethod
    def for_conds(cls, conds: Mapping[str, list | None], unet: torch.nn.Module, manager: Any,
                  percent_to_sigma: Callable[[float], float], sigmas: torch.Tensor) -> HookSession | None:
        """A session when some conditioning entry carries hooks, else None. Call before the UNet is prepared:
        model-as-LoRA hooks read the UNet's own weights (restored to pristine first)."""
        groups = [pair[1]["hooks"] for pairs in conds.values() for pair in pairs or ()
                  if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], dict)
                  and pair[1].get("hooks") is not None]
        if not groups:
            return None
        hooks: dict[HookRef, WeightHook] = {}
        for group in groups:
            if not isinstance(group, HookGroup):
                raise ValueError(f"a conditioning's 'hooks' must be a HOOKS value, not {type(group).__name__}")
            for hook in group.hooks:
                hooks.setdefault(hook.ref, hook)
        model_diffs: dict[HookRef, dict[str, torch.Tensor]] = {}
        for ref, hook in hooks.items():
            if hook.model_weights is not None:
                if manager is not None:  # undo weight patches a previous run left on the modules
                    manager.restore(unet)
                    manager.restore(hook.model_weights)
                model_diffs[ref] = weight_diffs(unet, hook.model_weights)
        return cls(unet, percent_to_sigma, float(sigmas.max()), model_diffs)

    def _strength(self, hook: WeightHook, sigma: float) -> float:
        key = (hook.ref, hook.keyframes)
        cursor = self.cursors.get(key)
        if cursor is None:
            cursor = self.cursors[key] = KeyframeCursor(hook.keyframes, self.percent_to_sigma, self.max_sigma)
        cursor.advance(sigma)
        return cursor.strength

    def use(self, hooks: HookGroup | None, sigma: float) -> bool:
        """Make the UNet carry `hooks`' weights for σ (None: the model's own). True when the weights changed."""
        wanted: list[tuple[WeightHook, float]] = []
        for hook in hooks.hooks if hooks is not None else ():
            wanted.append((hook, hook.strength_model * self._strength(hook, sigma)))
        key = tuple((hook.ref, strength) for hook, strength in wanted)
        if key == self.applied:
            return False
        self.release()
        lora_entries: list[tuple[str, lora_math.Adapter, float]] = []
        patches: list[Any] = []
        for hook, strength in wanted:
            if strength == 0:
                continue
            if hook.lora is not None:
                lora_entries += [(name, adapter, strength) for name, adapter in self._lora(hook)]
            if hook.ref in self.model_diffs:
                patches.append(_scaled_diff_patch(self.model_diffs[hook.ref], strength))
        if lora_entries:
            patches.insert(0, lora_math.LoraPatch(tuple(lora_entries)))
        try:
            for patch in patches:
                self.restores.append(patch.apply(self.unet))
        except BaseException:
            self.release()
            raise
        self.applied = key
        return True

    def _lora(self, hook: WeightHook) -> list[tuple[str, lora_math.Adapter]]:
        found = self.lora_entries.get(hook.ref)
        if found is None:
            assert hook.lora is not None
            found = self.lora_entries[hook.ref] = _lora_entries(hook.lora, lora_math.key_map_unet(self.unet),
                                                                "model")
        return found

    def release(self) -> None:
        """Back to the model's own weights (bit-exact)."""
        while self.restores:
            self.restores.pop()()
        self.applied = ()


@contextlib.contextmanager
def released_at_end(session: HookSession | None) -> Iterator[HookSession | None]:
    """The session for a block, its hook weights taken off the UNet when the block ends."""
    try:
        yield session
    finally:
        if session is not None:
            session.release()
