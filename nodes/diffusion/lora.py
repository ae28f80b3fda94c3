"""LoRA-family weight adapters (LoRA/LoCon, LoHa, LoKr, DoRA magnitudes, full diffs) as reversible weight patches.

A LoRA file is a flat dictionary of tensors `<module key><suffix>`. The module key names a layer of the UNet or
of a text encoder in one of several spellings (kohya `lora_unet_…` with LDM or diffusers module paths,
`lora_te_` / `lora_te1_` / `lora_te2_`, diffusers/peft `unet.…` / `text_encoder.…`, ComfyUI's generic
`diffusion_model.…`); the suffix says which factor of which adapter it is
(docs/comfyui-reference.md#controlnet-and-lora).

`key_map_*` build, from the live modules, every spelling → the parameter name inside the module the patch is
applied to (the diffusers UNet, or ClipModel's `encoders` ModuleDict). `parse_lora` groups a file's tensors into
adapters and resolves them against such a map. A `LoraPatch` holds (parameter, adapter, strength) triples in the
order they were added and implements the WeightPatch contract of nodes.diffusion.models: `apply(module)` adds
every adapter's ΔW to the float32 copy of the stored weight, rounds once to the storage dtype, and returns a
function that copies the backed-up original back (bit-exact; no unfuse arithmetic).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import convert
from .clip import text_transformer

# Longest suffixes first, so that e.g. "_lora.up.weight" is not read as ".up.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(sorted((
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "lokr_t2"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"), (".diff", "diff"), (".diff_b", "diff_b"),
), key=lambda item: -len(item[0])))

# Where a diffusers/peft file keeps each part's alpha: metadata prefixes (diffusers' save_lora_weights).
_PEFT_PARTS = ("unet", "text_encoder", "text_encoder_2")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be applied to the given model (wrong architecture, malformed adapter)."""


@dataclass(frozen=True)
class Target:
    """One weight an adapter changes: which object ("model" or "clip") and the parameter name inside it."""

    owner: str
    parameter: str


# ---------------------------------------------------------------------------------------------------------------
# Key maps: every spelling of a module in LoRA files -> the parameter it changes


def key_map_unet(unet: torch.nn.Module) -> dict[str, Target]:
    """Spellings of the diffusers UNet's layers: diffusers and LDM module paths, kohya/lycoris/peft/ComfyUI forms."""
    weights = [name for name, _ in unet.named_parameters() if name.endswith(".weight")]
    mapping: dict[str, Target] = {}
    # LDM (openaimodel) names through the same writer the checkpoints use; values are carried through untouched.
    ldm_names = convert.unet_to_ldm({name: name for name in weights}, convert.diffusers_config(unet).layers_per_block)
    for ldm, diffusers_name in ldm_names.items():
        target = Target("model", diffusers_name)
        module = ldm[: -len(".weight")]
        mapping["lora_unet_" + module.replace(".", "_")] = target
        mapping["diffusion_model." + module] = target
    for name in weights:
        target = Target("model", name)
        module = name[: -len(".weight")]
        flat = module.replace(".", "_")
        for key in ("lora_unet_" + flat, "lycoris_" + flat, "unet." + module, module):
            mapping[key] = target
        # Old diffusers attention-processor files: attn1.processor.to_q / to_out (for to_out.0).
        match = re.fullmatch(r"(.*\.attn\d)\.(to_q|to_k|to_v|to_out\.0)", module)
        if match:
            short = match.group(2).removesuffix(".0")
            for prefix in ("unet.", ""):
                mapping[f"{prefix}{match.group(1)}.processor.{short}"] = target
    return mapping


def _clip_prefixes(family: str, slot: str) -> tuple[tuple[str, str], ...]:
    """(kohya prefix, diffusers prefix) pairs naming one encoder of a family in LoRA files."""
    if slot == "g" and family == "sdxl":
        return (("lora_te2_", "text_encoder_2."),)
    return (("lora_te_", "text_encoder."), ("lora_te1_", "text_encoder."))


def key_map_clip(encoders: torch.nn.ModuleDict, family: str) -> dict[str, Target]:
    """Spellings of the text encoders' layers, relative to ClipModel.encoders ("l.encoder.layers.0...").

    Only the transformer layers' linears: the pooled-output projection is stored transposed in some layouts, and
    a square ΔW in the wrong orientation would pass every shape check, so its keys stay unmatched (warned)."""
    mapping: dict[str, Target] = {}
    for slot, module in encoders.items():
        inner = text_transformer(module)
        inner_path = next(name for name, candidate in module.named_modules() if candidate is inner)
        base = f"{slot}.{inner_path}." if inner_path else f"{slot}."
        for name, _ in inner.named_parameters():
            if not (name.startswith("encoder.layers.") and name.endswith(".weight")):
                continue
            target = Target("clip", base + name)
            hf_module = "text_model." + name[: -len(".weight")]
            for kohya, diffusers_prefix in _clip_prefixes(family, slot):
                mapping[kohya + hf_module.replace(".", "_")] = target
                mapping[diffusers_prefix + hf_module] = target
                # peft through transformers >= 5 (flat CLIPTextModel) drops the text_model. level.
                mapping[diffusers_prefix + hf_module[len("text_model."):]] = target
            mapping[f"text_encoders.clip_{slot}.transformer.{hf_module}"] = target
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# Adapters


@dataclass(frozen=True, eq=False)
class Adapter:
    """One module's adapter from a file: its kind, factors and alpha. `delta(shape)` is (ΔW in float32, α/rank)."""

    key: str
    kind: str                                # "lora" | "loha" | "lokr" | "diff"
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, float]:
        t = {name: value.to(device=device, dtype=torch.float32) for name, value in self.tensors.items()}
        if self.kind == "lora":
            down = t["down"]
            if "mid" in t:  # Tucker (LoCon with a mid kernel): fold the mid conv into the down factor
                down = torch.einsum("bi,abhw->aihw", down.flatten(1), t["mid"])
            change = torch.mm(t["up"].flatten(1), down.flatten(1))
            scale = self.alpha / t["down"].shape[0] if self.alpha is not None else 1.0
        elif self.kind == "loha":
            change = self._loha_factor(t, "1") * self._loha_factor(t, "2")
            scale = self.alpha / t["hada_w1_b"].shape[0] if self.alpha is not None else 1.0
        elif self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
            if w2.ndim == 4 and w1.ndim == 2:
                w1 = w1[:, :, None, None]
            change = torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs
            dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else (
                t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None)
            scale = self.alpha / dim if self.alpha is not None and dim else 1.0
        else:
            change, scale = t["diff"], 1.0
        if change.numel() != shape.numel():
            raise LoraFormatError(f"'{self.key}': the adapter makes a change of {change.numel()} values "
                                  f"({tuple(change.shape)}) for a weight of shape {tuple(shape)}")
        return change.reshape(shape), scale

    def change_numel(self) -> int:
        """How many values ΔW has, from the factor shapes alone (no arithmetic): to check a file cheaply."""
        t = self.tensors

        def numel(*sizes: int) -> int:
            total = 1
            for size in sizes:
                total *= int(size)
            return total

        if self.kind == "lora":
            rest = (t["down"].shape[1], *t["mid"].shape[2:]) if "mid" in t else tuple(t["down"].shape[1:])
            return numel(t["up"].shape[0], *rest)
        if self.kind == "loha":
            if "hada_t1" in t:
                return numel(t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
            return numel(t["hada_w1_a"].shape[0], t["hada_w1_b"].flatten(1).shape[1])
        if self.kind == "lokr":
            w1 = numel(*t["lokr_w1"].shape) if "lokr_w1" in t else numel(t["lokr_w1_a"].shape[0],
                                                                           t["lokr_w1_b"].shape[1])
            if "lokr_w2" in t:
                w2 = numel(*t["lokr_w2"].shape)
            elif "lokr_t2" in t:
                w2 = numel(t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
            else:
                w2 = numel(t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
            return w1 * w2
        return t["diff"].numel()

    @staticmethod
    def _loha_factor(t: dict[str, torch.Tensor], n: str) -> torch.Tensor:
        if f"hada_t{n}" in t:
            return torch.einsum("ijkl,jr,ip->prkl", t[f"hada_t{n}"], t[f"hada_w{n}_b"], t[f"hada_w{n}_a"])
        return torch.mm(t[f"hada_w{n}_a"], t[f"hada_w{n}_b"].flatten(1) if t[f"hada_w{n}_b"].ndim > 2
                        else t[f"hada_w{n}_b"])


def _kind(parts: Mapping[str, torch.Tensor]) -> str | None:
    if "up" in parts and "down" in parts:
        return "lora"
    if all(f"hada_w{n}_{s}" in parts for n in "12" for s in "ab"):
        return "loha"
    has_w1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has_w2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    if has_w1 and has_w2:
        return "lokr"
    if "diff" in parts:
        return "diff"
    return None


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, component) of a tensor name in a LoRA file, or None when the suffix is not an adapter's."""
    for suffix, component in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], component
    return None


def _peft_alpha(module_key: str, metadata: Mapping[str, Any]) -> float | None:
    """alpha of a diffusers/peft module from the file's `lora_adapter_metadata` (lora_alpha / alpha_pattern)."""
    part = next((p for p in _PEFT_PARTS if module_key.startswith(p + ".")), None)
    if part is None:
        return None
    module = module_key[len(part) + 1:]
    for pattern, value in (metadata.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return float(value)
    alpha = metadata.get(f"{part}.lora_alpha")
    return float(alpha) if alpha is not None else None


def read_adapter_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """The peft adapter config that diffusers writes into a safetensors header (empty when absent)."""
    text = (raw or {}).get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class ParsedLora:
    """The adapters of one file resolved against key maps."""

    adapters: list[tuple[Target, Adapter]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)      # module keys naming no known layer
    unusable: list[str] = field(default_factory=list)       # tensors that are no adapter part we understand
    ignored: list[str] = field(default_factory=list)        # matched an owner that is absent (e.g. no CLIP)


def parse_lora(tensors: Mapping[str, torch.Tensor], key_map: Mapping[str, Target],
               metadata: Mapping[str, Any] | None = None, absent_owner_prefixes: Iterable[str] = ()) \
        -> ParsedLora:
    """Group tensors into adapters and match them to parameters. Module keys starting with one of
    `absent_owner_prefixes` (e.g. text-encoder keys for a model-only load) are listed as ignored, not unmatched."""
    metadata = metadata or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    parsed = ParsedLora()
    for key, value in tensors.items():
        split = split_key(key)
        if split is None:
            parsed.unusable.append(key)
            continue
        module, component = split
        groups.setdefault(module, {})[component] = value
    skip = tuple(absent_owner_prefixes)
    for module, parts in groups.items():
        kind = _kind(parts)
        if kind is None and "diff_b" not in parts:
            if set(parts) - {"alpha", "dora_scale"}:
                parsed.unusable.extend(f"{module}.{c}" for c in parts)
            continue
        target = key_map.get(module)
        if target is None:
            (parsed.ignored if skip and module.startswith(skip) else parsed.unmatched).append(module)
            continue
        if "diff_b" in parts:  # a bias offset (ComfyUI's LoraSave with bias_diff), added to <module>.bias
            bias = Target(target.owner, target.parameter.removesuffix(".weight") + ".bias")
            parsed.adapters.append((bias, Adapter(f"{module}.diff_b", "diff", {"diff": parts["diff_b"]})))
        if kind is None:
            continue
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise LoraFormatError(f"'{module}.alpha' holds {parts['alpha'].numel()} values; an alpha is one number")
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else _peft_alpha(module, metadata)
        factors = {name: value for name, value in parts.items() if name not in ("alpha", "diff_b")}
        if kind == "diff":
            factors.pop("dora_scale", None)
        parsed.adapters.append((target, Adapter(module, kind, factors, alpha)))
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# The patch


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """Adapters with strengths, applied in order per weight (several LoRAs stack into one patch)."""

    entries: tuple[tuple[str, Adapter, float], ...]   # (parameter name, adapter, strength)

    def merged(self, other: LoraPatch) -> LoraPatch:
        return LoraPatch(self.entries + other.entries)

    def parameters(self) -> list[str]:
        return list(dict.fromkeys(name for name, _, _ in self.entries))

    def check(self, module: torch.nn.Module) -> None:
        """Raise LoraFormatError when an adapter does not fit its weight (a LoRA for another architecture)."""
        for name, adapter, _ in self.entries:
            shape = module.get_parameter(name).shape
            if adapter.change_numel() != shape.numel():
                raise LoraFormatError(f"'{adapter.key}': the adapter's factors make a change of "
                                      f"{adapter.change_numel()} values for a weight of shape {tuple(shape)}")

    def apply(self, module: torch.nn.Module) -> Callable[[], None]:
        by_parameter: dict[str, list[tuple[Adapter, float]]] = {}
        for name, adapter, strength in self.entries:
            by_parameter.setdefault(name, []).append((adapter, strength))
        backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

        def restore() -> None:
            with torch.no_grad():
                for parameter, original in reversed(backups):
                    parameter.copy_(original)

        try:
            with torch.no_grad():
                for name, adapters in by_parameter.items():
                    parameter = module.get_parameter(name)
                    # The backup lives off the accelerator: VRAM holds only the patched weights.
                    backup = parameter.detach().to("cpu", copy=True)
                    backups.append((parameter, backup))
                    # float32 weights accumulate in place (same arithmetic, one copy less); others in a float32
                    # copy rounded once at the end.
                    in_place = parameter.dtype == torch.float32
                    patched = parameter.detach() if in_place else parameter.detach().to(torch.float32, copy=True)
                    for adapter, strength in adapters:
                        change, scale = adapter.delta(parameter.shape, parameter.device)
                        if "dora_scale" in adapter.tensors:
                            _add_dora(patched, change * scale, adapter.tensors["dora_scale"], strength)
                        else:
                            patched += (strength * scale) * change
                    if not in_place:
                        parameter.copy_(patched.to(parameter.dtype))
        except BaseException:
            restore()
            raise
        return restore


def _add_dora(weight: torch.Tensor, change: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> None:
    """DoRA (in place, float32): W' = (W + ΔW)·m/‖·‖, then W += strength·(W' − W). The norm is taken per output
    row of the current W when the magnitude m has one entry per output, else per input column of W + ΔW (as
    ComfyUI computes it; + float32 eps)."""
    magnitude = dora_scale.to(device=weight.device, dtype=torch.float32)
    combined = weight + change
    if magnitude.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        columns = combined.transpose(0, 1)
        norm = columns.reshape(columns.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        norm = norm.transpose(0, 1)
    combined *= magnitude / (norm + torch.finfo(torch.float32).eps)
    weight += strength * (combined - weight)


def attach(target: Any, patch: LoraPatch) -> Any:
    """A clone of a DiffusionModel / ClipModel with `patch` added; merged into a LoraPatch that is already last, so
    stacked LoRAs share one backup per weight and are rounded to the storage dtype once, as ComfyUI does."""
    import dataclasses

    from .patches import copy_options

    if target.patches and isinstance(target.patches[-1], LoraPatch):
        return dataclasses.replace(target, patches=target.patches[:-1] + (target.patches[-1].merged(patch),),
                                   options=copy_options(target.options))
    return target.with_patches(patch)
