"""Model merging as a lazy weight patch (ComfyUI's ModelMerge* / CLIPMerge* nodes).

ComfyUI merges by patching: every weight of model2 (its stored weight plus model2's own patches, computed in
float32) is added to model1's weight as W1 ← strength_model·W1 + strength_patch·W2. A simple merge at `ratio` is
strength_model = ratio, strength_patch = 1 − ratio; a subtraction at `m` is (m, −m); an addition (1, 1).

`MergePatch` does the same on our patch API (nodes.diffusion.patches): it holds references to the other network
and its patches, never copies of their weights, so a merge node costs nothing until the merged model runs (or is
saved). When applied, it first applies model1's own patches (so a merge of a module with itself, e.g. a
checkpoint and the same checkpoint with a LoRA, reads the other side's pristine weights), computes model2's
effective weights one parameter at a time (in a float32 side table when model2 carries patches), and rounds
each merged weight once to the storage dtype. The restore function copies backups back: bit-exact.

Block-wise ratios (ModelMergeBlocks, ModelMergeSD1/SD2/SDXL) are defined on ComfyUI's LDM parameter names
("input_blocks.4.1.proj_in.weight"); `ldm_names` maps our diffusers UNet parameters to them through the same
writer the checkpoints use (convert.unet_to_ldm), and `prefix_ratio` applies ComfyUI's longest-prefix rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import convert

# Names ComfyUI never merges in text encoders (buffers / the CLIP logit scale).
CLIP_SKIPPED_SUFFIXES = (".position_ids", ".logit_scale")


def ldm_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers UNet parameter name -> ComfyUI's LDM name (without the diffusion_model. prefix)."""
    names = {name: name for name, _ in unet.named_parameters()}
    ldm = convert.unet_to_ldm(names, convert.diffusers_config(unet).layers_per_block)
    return {diffusers_name: ldm_name for ldm_name, diffusers_name in ldm.items()}


def prefix_ratio(name: str, ratios: Sequence[tuple[str, float]]) -> float:
    """ComfyUI's block rule: the ratio of the longest prefix of `name` among `ratios`; the first ratio when
    none matches (ModelMergeBlocks' `input` for time_embed / label_emb, ModelMergeSD1's `time_embed.`)."""
    ratio, matched = ratios[0][1], 0
    for prefix, value in ratios:
        if name.startswith(prefix) and len(prefix) > matched:
            ratio, matched = value, len(prefix)
    return ratio


@dataclass(frozen=True)
class MergePlan:
    """What merging `source` into `target` changes: (parameter, strength_patch, strength_model) entries, and the
    parameters left alone because the other side has no such weight or one of another shape."""

    entries: tuple[tuple[str, float, float], ...]
    shape_mismatch: tuple[str, ...] = ()
    only_in_source: tuple[str, ...] = ()


def plan_merge(target: torch.nn.Module, source: torch.nn.Module,
               strengths: Callable[[str], tuple[float, float]],
               skip: Callable[[str], bool] = lambda name: False) -> MergePlan:
    """The entries of a merge: every parameter both networks have with equal shapes, with the (strength_patch,
    strength_model) pair `strengths(name)` gives."""
    own = dict(target.named_parameters())
    entries: list[tuple[str, float, float]] = []
    mismatch: list[str] = []
    only_source: list[str] = []
    for name, parameter in source.named_parameters():
        if skip(name):
            continue
        mine = own.get(name)
        if mine is None:
            only_source.append(name)
        elif mine.shape != parameter.shape:
            mismatch.append(name)
        else:
            strength_patch, strength_model = strengths(name)
            entries.append((name, float(strength_patch), float(strength_model)))
    return MergePlan(tuple(entries), tuple(mismatch), tuple(only_source))


class _ParameterTable(torch.nn.Module):
    """Float32 copies of some parameters under their dotted names: patches (which address weights through
    `get_parameter`) apply to it as to the network, to compute another model's patched weights aside."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.table = {name: torch.nn.Parameter(value, requires_grad=False) for name, value in values.items()}

    def get_parameter(self, target: str) -> torch.nn.Parameter:
        try:
            return self.table[target]
        except KeyError:
            raise AttributeError(f"no parameter {target!r} in the merge side table") from None


def patched_parameters(patches: Iterable[Any], module: torch.nn.Module) -> list[str]:
    """The parameters a patch sequence changes (every parameter when a patch does not say)."""
    names: list[str] = []
    for patch in patches:
        listed = getattr(patch, "parameters", None)
        if not callable(listed):
            return [name for name, _ in module.named_parameters()]
        names.extend(listed())
    return list(dict.fromkeys(names))


@dataclass(frozen=True, eq=False)
class MergePatch:
    """W ← strength_model·W + strength_patch·W_other per entry, after `base` (model1's own patches).

    `source` is model2's network and `source_patches` its patches: model2's weights are read when the patch is
    applied, never copied before. `manager` (the engine's ModelManager, optional) is asked to return `source` to
    its pristine weights first, because the manager leaves the last patch set of a use applied."""

    base: tuple[Any, ...]
    source: torch.nn.Module
    source_patches: tuple[Any, ...]
    entries: tuple[tuple[str, float, float], ...]
    manager: Any = field(default=None, repr=False)

    def parameters(self) -> list[str]:
        return list(dict.fromkeys([*patched_parameters(self.base, self.source),
                                   *(name for name, _, _ in self.entries)]))

    def apply(self, module: torch.nn.Module) -> Callable[[], None]:
        same_module = module is self.source
        if not same_module and self.manager is not None:
            self.manager.restore(self.source)
        # The other side's pristine weights must be read before `base` changes a shared module (kept on the CPU:
        # a whole-model merge would otherwise hold a second float32 copy of the network in accelerator memory).
        snapshot: dict[str, torch.Tensor] = {}
        if same_module and (self.base or self.source_patches):
            wanted = [name for name, _, _ in self.entries]
            if self.source_patches:
                wanted += patched_parameters(self.source_patches, self.source)
            snapshot = {name: module.get_parameter(name).detach().to("cpu", torch.float32, copy=True)
                        for name in dict.fromkeys(wanted)}
        undo_base: list[Callable[[], None]] = []
        backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

        def restore() -> None:
            with torch.no_grad():
                for parameter, original in reversed(backups):
                    parameter.copy_(original)
            for undo in reversed(undo_base):
                undo()

        try:
            for patch in self.base:
                undo_base.append(patch.apply(module))
            other = self._other_weights(snapshot)
            with torch.no_grad():
                for name, strength_patch, strength_model in self.entries:
                    parameter = module.get_parameter(name)
                    backups.append((parameter, parameter.detach().to("cpu", copy=True)))
                    merged = parameter.detach().to(torch.float32, copy=True)
                    if strength_model != 1.0:
                        merged *= strength_model
                    if strength_patch != 0.0:
                        merged += strength_patch * other(name).to(merged.device, torch.float32)
                    parameter.copy_(merged.to(parameter.dtype))
        except BaseException:
            restore()
            raise
        return restore

    def _other_weights(self, snapshot: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
        """name -> model2's effective weight, wherever it lives (read in place when model2 has no patches; else
        its patches applied in a float32 side table on the device its weights sit on)."""
        def stored(name: str) -> torch.Tensor:
            if name in snapshot:
                return snapshot[name]
            return self.source.get_parameter(name).detach()

        if not self.source_patches:
            return stored
        touched = patched_parameters(self.source_patches, self.source)
        table = _ParameterTable({name: stored(name).to(torch.float32, copy=True) for name in touched})
        for patch in self.source_patches:
            patch.apply(table)  # the table is thrown away: no restore needed
        patched = {name: parameter.detach() for name, parameter in table.table.items()}
        return lambda name: patched[name] if name in patched else stored(name)
