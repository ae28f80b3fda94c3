"""T2I-Adapters: loading their files into diffusers' T2IAdapter, and the control object the denoiser calls.

Files (ComfyUI's comfy/controlnet.py load_t2i_adapter): the original TencentARC layout, full (`conv_in.*`,
`body.K.block1/block2/in_conv.*` with two resnets per level, K = 2·level + resnet) or light (`body.L.in_conv.*`,
`body.L.body.R.block1/block2.*`, `body.L.out_conv.*`), or diffusers names (`adapter.*`). A full adapter whose first
convolution takes 256 or 768 channels is an SDXL adapter (16× pixel unshuffle, the last feature goes after the
middle block); the others unshuffle 8×. Widths, levels and resnet counts are read from the tensors. Not supported
(a clear error): the conv-downsampling / 3×3 / non-skip variants the diffusers class cannot express, and Stable
Cascade's controlnets (`backbone.*`).

Application follows ComfyUI's T2IAdapter: the hint is resized (nearest-exact, centre crop) to the latent size × 8
rounded up to the unshuffle factor, averaged to grey for one-channel adapters, and run once; every step inside the
σ window adds features × strength inside the UNet's down blocks (diffusers' down_intrablock_additional_residuals,
where ComfyUI adds to the input blocks' outputs) — unlike a ControlNet, the features do not depend on x or σ.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import convert
from .checkpoint import ModelFileError, _materialize
from .controlnet import AppliedControlNet, broadcast_hint
from .models import DiffusionModel
from .offline import ensure_offline
from .resize import common_upscale

StateDict = dict[str, torch.Tensor]
# ComfyUI's rule for SDXL adapters: the first convolution sees 16×16 unshuffled pixels of 1 or 3 channels.
_XL_CONV_IN_CHANNELS = (256, 768)


def is_t2i_adapter(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a T2I-Adapter, in any of the layouts loaded here (or Stable Cascade's controlnets,
    which ComfyUI loads the same way, to be reported as unsupported)."""
    return (("conv_in.weight" in state and "body.0.block1.weight" in state)
            or ("body.0.in_conv.weight" in state and "body.0.out_conv.weight" in state)
            or any(key.startswith("adapter.body.") for key in state)
            or "backbone.0.0.weight" in state or "backbone.10.blocks.0.weight" in state)


def adapter_to_diffusers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Original (TencentARC / ComfyUI) adapter names → diffusers T2IAdapter names; diffusers names pass through."""
    if any(key.startswith("adapter.") for key in state):
        return dict(state)
    light = "body.0.out_conv.weight" in state
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("conv_in."):
            out["adapter." + key] = value
            continue
        if light:
            match = re.match(r"body\.(\d+)\.body\.(\d+)\.(.+)$", key)
            out[f"adapter.body.{match[1]}.resnets.{match[2]}.{match[3]}" if match else "adapter." + key] = value
            continue
        match = re.match(r"body\.(\d+)\.(block1|block2|in_conv|down_opt|skep)\.(.+)$", key)
        if match is None:
            out["adapter." + key] = value  # left for the strict load to report
            continue
        # ComfyUI's full adapters have two resnets per level: body index = 2·level + resnet.
        level, resnet = divmod(int(match[1]), 2)
        if match[2] in ("block1", "block2"):
            out[f"adapter.body.{level}.resnets.{resnet}.{match[2]}.{match[3]}"] = value
        else:
            out[f"adapter.body.{level}.{match[2]}.{match[3]}"] = value
    return out


def _count(state: Mapping[str, Any], pattern: str) -> int:
    return len({m[1] for key in state if (m := re.match(pattern, key))})


def adapter_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """diffusers T2IAdapter keyword arguments read from diffusers-named weights."""
    if any(".down_opt." in key for key in state):
        raise ModelFileError(f"{what}: T2I-Adapter with convolution downsampling (down_opt.op) is not supported")
    if any(".skep." in key for key in state):
        raise ModelFileError(f"{what}: T2I-Adapter without skip-free resnets (skep) is not supported")
    levels = _count(state, r"adapter\.body\.(\d+)\.")
    resnets = _count(state, r"adapter\.body\.0\.resnets\.(\d+)\.block1\.weight$")
    if levels == 0 or resnets == 0:
        raise ModelFileError(f"{what}: no T2I-Adapter blocks (adapter.body.N.resnets.M) in the file")
    if "adapter.body.0.out_conv.weight" in state:  # light adapter: in_conv → resnets → out_conv per level
        channels = [int(state[f"adapter.body.{i}.out_conv.weight"].shape[0]) for i in range(levels)]
        if levels < 2 or channels[-1] != channels[-2]:
            raise ModelFileError(f"{what}: light T2I-Adapter widths {channels} are not supported (the last two "
                                 f"levels must be equally wide)")
        return {"in_channels": int(state["adapter.body.0.in_conv.weight"].shape[1]) // 64,
                "channels": channels[:-1], "num_res_blocks": resnets, "downscale_factor": 8,
                "adapter_type": "light_adapter"}
    if "adapter.conv_in.weight" not in state:
        raise ModelFileError(f"{what}: T2I-Adapter without conv_in is not supported")
    if state["adapter.body.0.resnets.0.block2.weight"].shape[-1] != 1:
        raise ModelFileError(f"{what}: T2I-Adapter with 3×3 second resnet convolutions is not supported")
    conv_in = int(state["adapter.conv_in.weight"].shape[1])
    xl = conv_in in _XL_CONV_IN_CHANNELS
    factor = 16 if xl else 8
    channels = [int(state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in range(levels)]
    if xl and levels != 4:
        raise ModelFileError(f"{what}: an SDXL T2I-Adapter has 4 levels, this one {levels}")
    return {"in_channels": conv_in // (factor * factor), "channels": channels, "num_res_blocks": resnets,
            "downscale_factor": factor, "adapter_type": "full_adapter_xl" if xl else "full_adapter"}


class EdgePaddedAvgPool(torch.nn.Module):
    """The adapters' 2× average pooling as ComfyUI runs it: an odd side is zero-padded on both ends and the zeros
    count in the average (diffusers' ceil_mode pooling differs there; on even sides both are the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2, padding=(x.shape[2] % 2, x.shape[3] % 2))


def load_t2i_adapter(state: StateDict, path: str | os.PathLike, manager: Any = None,
                     dtype: torch.dtype | None = None) -> T2IAdapter:
    """A T2I-Adapter state dict (already read from `path`) as a CONTROL_NET. The network runs in float32 unless
    `dtype` says otherwise: ComfyUI runs it in the sampled latent's dtype, which is float32."""
    ensure_offline()
    from diffusers import T2IAdapter as DiffusersT2IAdapter

    path = Path(path)
    what = path.name
    if any(key.startswith("backbone.") for key in state):
        raise ModelFileError(f"{what}: Stable Cascade controlnets are not supported")
    weights = adapter_to_diffusers(state)
    config = adapter_config(weights, what)
    with torch.device("meta"):
        module = DiffusersT2IAdapter(**config)
    module = _materialize(module, weights, dtype or torch.float32, f"{what} (T2I-Adapter)")
    for block in module.modules():
        if isinstance(getattr(block, "downsample", None), torch.nn.AvgPool2d):
            block.downsample = EdgePaddedAvgPool()
    return T2IAdapter(module, config["adapter_type"] == "full_adapter_xl", str(path), manager)


@dataclass(frozen=True, eq=False)
class T2IAdapter:
    """What a CONTROL_NET link carries for a T2I-Adapter file: a diffusers T2IAdapter."""

    module: torch.nn.Module
    xl: bool                      # SDXL adapter: 16× unshuffle, last feature after the middle block
    source: str = ""
    manager: Any = None
    control_type: tuple[int, ...] = ()  # SetUnionControlNetType's choice; adapters ignore it, as in ComfyUI

    @property
    def family(self) -> str:
        return "sdxl" if self.xl else "sd1"

    @property
    def input_channels(self) -> int:
        return int(convert.diffusers_config(self.module).in_channels)

    @property
    def unshuffle(self) -> int:
        return int(convert.diffusers_config(self.module).downscale_factor)

    def cache_nbytes(self) -> int:
        return 0  # the weights belong to the model memory manager

    def check_context_width(self, width: int) -> None:
        """Adapters read no text conditioning: any width fits."""

    def applied(self, hint: torch.Tensor, strength: float, start_percent: float = 0.0, end_percent: float = 1.0,
                previous: AppliedControlNet | None = None) -> AppliedT2IAdapter:
        """hint: IMAGE [B, H, W, C] in 0..1."""
        hint = hint.movedim(-1, 1).float().contiguous()
        return AppliedT2IAdapter(self, hint, float(strength), float(start_percent), float(end_percent), previous)

    def check_fits(self, unet_config: Any, features: list[torch.Tensor]) -> None:
        """The features' widths against the UNet's blocks (one per down block, plus the middle block for SDXL)."""
        widths = list(unet_config.block_out_channels)
        expected = widths + [widths[-1]] if self.xl else widths
        got = [int(f.shape[1]) for f in features]
        if got != expected:
            raise ValueError(f"the T2I-Adapter {Path(self.source).name} makes features {got} wide but the model's "
                             f"blocks are {expected} wide: the adapter is for another model architecture")


@dataclass(frozen=True, eq=False)
class AppliedT2IAdapter(AppliedControlNet):
    """A T2I-Adapter applied to a conditioning; it chains with ControlNets like ComfyUI's control objects."""

    net: T2IAdapter  # type: ignore[assignment]
    # The adapter's raw features by (latent height, width, device): computed once, reused at every step.
    _features: dict[tuple[Any, ...], list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def own_residuals(self, *args: Any, **kwargs: Any) -> None:
        return None  # adapters add nothing to the skip connections

    def adapter_hint(self, latent_height: int, latent_width: int) -> torch.Tensor:
        """The hint as the adapter sees it: ComfyUI's size (latent × 8, rounded up to the unshuffle factor)."""
        factor = self.net.unshuffle
        height = -(-latent_height * 8 // factor) * factor
        width = -(-latent_width * 8 // factor) * factor
        hint = self.hint
        if hint.shape[2] != height or hint.shape[3] != width:
            hint = common_upscale(hint, width, height, "nearest-exact", "center")
        if self.net.input_channels == 1 and hint.shape[1] > 1:
            hint = hint.mean(dim=1, keepdim=True)
        if hint.shape[1] != self.net.input_channels:
            raise ValueError(f"the T2I-Adapter {Path(self.net.source).name} takes {self.net.input_channels}-channel "
                             f"images, the hint has {hint.shape[1]} channels")
        return hint

    def features(self, x_in: torch.Tensor) -> list[torch.Tensor]:
        """The adapter's features for hints of this latent size (per hint image, not yet broadcast or scaled)."""
        key = (x_in.shape[2], x_in.shape[3], x_in.device)
        cached = self._features.get(key)
        if cached is None:
            net = self.net
            lease = net.manager.use(net.module) if net.manager is not None else contextlib.nullcontext(net.module)
            with lease as module, torch.no_grad():
                parameter = next(module.parameters())
                hint = self.adapter_hint(x_in.shape[2], x_in.shape[3]).to(parameter.device, parameter.dtype)
                cached = [f.to(x_in.device, torch.float32) for f in module(hint)]
            self._features.clear()
            self._features[key] = cached
        return cached

    def own_intrablock(self, x_in: torch.Tensor, sigma: torch.Tensor, model: DiffusionModel,
                       batched_number: int | None = None) -> list[torch.Tensor] | None:
        if not self.active_at(float(sigma.reshape(-1)[0]), model):
            return None
        features = self.features(x_in)
        self.net.check_fits(model.unet.config, features)
        return [broadcast_hint(f, x_in.shape[0], batched_number) * self.strength for f in features]
