"""GLIGEN: text boxes that steer where things appear, through gated self-attention inside the UNet's transformers.

A GLIGEN file (ComfyUI's models/gligen, the original GLIGEN checkpoint layout) holds
  position_net.*  the box encoder: Fourier features of (x1, y1, x2, y2) + the phrase's pooled CLIP output → MLP
                  (linears.0/2/4, null_positive_feature, null_position_feature)
  <input_blocks|output_blocks>.<n>.1 | middle_block.1 + .transformer_blocks.<i>.fuser.*
                  one gated self-attention block per UNet transformer block (linear, attn.to_q/k/v/out.0,
                  ff.net.0.proj / ff.net.2, norm1, norm2, alpha_attn, alpha_dense)
and both parts have exactly the parameter names of diffusers' GLIGENTextBoundingboxProjection and
GatedSelfAttentionDense, which are the modules built here.

At sampling time (ComfyUI's comfy/gligen.py and samplers.py): a conditioning entry with
options["gligen"] = ("position", gligen, [(pooled [1, D], height, width, y, x) in latent cells, ...]) gets its boxes
as fractions of the latent it denoises, padded to 30 objects with a zero mask (the position net swaps padding
for its learnt null features); the position net turns them into grounding tokens, and each transformer block
runs x ← x + tanh(α_attn)·attn(norm1([x; linear(tokens)]))[:N] ; x ← x + tanh(α_dense)·ff(norm2(x))
after its self-attention and before its cross-attention (ComfyUI's "middle_patch", nodes.diffusion.unet_hooks).

Heads, as ComfyUI picks them from the weights: 8 heads when the tokens are 768 wide (SD1), else 64-wide heads
(at least one head, so that narrow test models load too).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelFileError, read_state_dict
from .offline import ensure_offline

MAX_OBJECTS = 30          # ComfyUI's and the GLIGEN paper's fixed number of grounding tokens
SD1_TOKEN_WIDTH = 768     # tokens this wide mean an SD1 GLIGEN: 8 heads
HEAD_WIDTH = 64           # otherwise 64-wide heads

# input_blocks.<n>.1.*, output_blocks.<n>.1.*, middle_block.1.* (ComfyUI numbers the middle block 0)
_FUSER_KEY = re.compile(r"(?:^|\.)(?:(input_blocks|output_blocks)\.(\d+)\.\d+|middle_block\.\d+)"
                        r"\.transformer_blocks\.(\d+)\.fuser\.(.+)$")
_SECTIONS = {"input_blocks": "input", "output_blocks": "output", None: "middle"}
_POSITION_NET = "position_net."
_POSITION_KEYS = ("null_positive_feature", "null_position_feature", "linears.0.weight", "linears.4.weight")


def fuser_name(block: tuple[str, int], index: int) -> str:
    """The ModuleDict name of the gated block of LDM block `block` ("input" | "middle" | "output", id), transformer
    block `index` inside it."""
    return f"{block[0]}_{block[1]}_{index}"


class GligenNetwork(torch.nn.Module):
    """The weights of one GLIGEN file: the box encoder and the gated self-attention blocks by fuser_name."""

    def __init__(self, position_net: torch.nn.Module, fusers: Mapping[str, torch.nn.Module]):
        super().__init__()
        self.position_net = position_net
        self.fusers = torch.nn.ModuleDict(dict(fusers))

    @property
    def phrase_width(self) -> int:
        position_net: Any = self.position_net  # diffusers' GLIGENTextBoundingboxProjection
        return int(position_net.positive_len)


def _split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, dict[str, torch.Tensor]]]:
    """(position-net tensors, {fuser_name: tensors}) from a GLIGEN state dict with any key prefix."""
    position: dict[str, torch.Tensor] = {}
    fusers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _FUSER_KEY.search(key)
        if match is not None:
            section, block, index, rest = match.groups()
            name = fuser_name((_SECTIONS[section], int(block or 0)), int(index))
            fusers.setdefault(name, {})[rest] = value
        elif _POSITION_NET in key:
            position[key[key.rindex(_POSITION_NET) + len(_POSITION_NET):]] = value
    return position, fusers


def _heads(token_width: int, inner_width: int) -> int:
    return 8 if token_width == SD1_TOKEN_WIDTH else max(1, inner_width // HEAD_WIDTH)


def gligen_network(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> GligenNetwork:
    """The GligenNetwork of a GLIGEN state dict (tensors loaded strictly: a missing or misshapen tensor is an
    error). Raises ValueError when the state dict is not a GLIGEN model."""
    ensure_offline()
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    position, fuser_states = _split_state(state)
    missing = [k for k in _POSITION_KEYS if k not in position]
    if missing:
        raise ValueError(f"not a GLIGEN model: no position_net.{missing[0]} (a GLIGEN file has position_net.* "
                         f"and per-block .fuser.* weights)")
    if not fuser_states:
        raise ValueError("not a GLIGEN model: no gated self-attention ('.fuser.') weights")
    phrase_width = int(position["null_positive_feature"].shape[0])
    position_width = int(position["null_position_feature"].shape[0])
    token_width = int(position["linears.4.weight"].shape[0])
    if position_width % 8:
        raise ValueError(f"position_net.null_position_feature has {position_width} values; expected 8 per "
                         f"Fourier frequency (sin and cos of x1, y1, x2, y2)")
    with torch.device("meta"):
        position_net = GLIGENTextBoundingboxProjection(positive_len=phrase_width, out_dim=token_width,
                                                       feature_type="text-only", fourier_freqs=position_width // 8)
        fusers: dict[str, torch.nn.Module] = {}
        for name, tensors in fuser_states.items():
            if "linear.weight" not in tensors or "attn.to_q.weight" not in tensors:
                raise ValueError(f"the gated block {name} lacks linear.weight or attn.to_q.weight")
            query_width, context_width = (int(n) for n in tensors["linear.weight"].shape)
            inner_width = int(tensors["attn.to_q.weight"].shape[0])
            heads = _heads(context_width, inner_width)
            fusers[name] = GatedSelfAttentionDense(query_width, context_width, heads, inner_width // heads)
    network = GligenNetwork(position_net, fusers)
    tensors = {f"position_net.{k}": v for k, v in position.items()}
    for name, fuser_tensors in fuser_states.items():
        tensors.update({f"fusers.{name}.{k}": v for k, v in fuser_tensors.items()})
    network.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return network.eval().requires_grad_(False)


@dataclass(frozen=True, eq=False)
class Gligen:
    """What a GLIGEN link carries: the network, the file it came from, and the memory manager that moves it."""

    network: GligenNetwork
    source: str = ""
    manager: Any = None

    @property
    def phrase_width(self) -> int:
        return self.network.phrase_width

    def cache_nbytes(self) -> int:
        return 0  # the weights belong to the model memory manager

    @contextlib.contextmanager
    def lease(self) -> Iterator[GligenNetwork]:
        """The network on the compute device for the block (where the memory manager puts it)."""
        if self.manager is None:
            yield self.network
            return
        with self.manager.use(self.network) as network:
            yield network


def load_gligen(path: str | Path, manager: Any = None, dtype: torch.dtype | None = None) -> Gligen:
    """A GLIGEN file as a Gligen; `dtype` defaults to the manager's diffusion dtype (float32 without one)."""
    path = Path(path)
    state = read_state_dict(path)
    if dtype is None:
        dtype = manager.dtype_for("diffusion") if manager is not None else torch.float32
    try:
        network = gligen_network(state, dtype)
    except ValueError as error:
        raise ModelFileError(f"{path.name}: {error}") from error
    return Gligen(network, str(path), manager)


# ---------------------------------------------------------------------------------------------------------------
# Boxes → grounding tokens → the per-call UNet patch

Box = tuple[torch.Tensor, int, int, int, int]   # (pooled [1, D], height, width, y, x) in latent cells


def box_inputs(boxes: list[Box] | None, batch: int, height: int, width: int,
               phrase_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes [B, 30, 4] as x1, y1, x2, y2 fractions of the latent, masks [B, 30], phrases [B, 30, D]) as
    ComfyUI's Gligen.set_position builds them (set_empty when `boxes` is None: nothing but padding)."""
    coordinates = torch.zeros((MAX_OBJECTS, 4))
    masks = torch.zeros((MAX_OBJECTS,))
    phrases = torch.zeros((MAX_OBJECTS, phrase_width))
    for n, (pooled, box_height, box_width, y, x) in enumerate(boxes or ()):
        if n >= MAX_OBJECTS:
            raise ValueError(f"GLIGEN takes at most {MAX_OBJECTS} boxes per conditioning, got {len(boxes or ())}")
        coordinates[n] = torch.tensor((x / width, y / height, (x + box_width) / width, (y + box_height) / height))
        masks[n] = 1.0
        phrases[n] = pooled.reshape(-1).float()
    return (coordinates.unsqueeze(0).repeat(batch, 1, 1), masks.unsqueeze(0).repeat(batch, 1),
            phrases.unsqueeze(0).repeat(batch, 1, 1))


@dataclass(frozen=True, eq=False)
class GligenBoxes:
    """A conditioning entry's options["gligen"] as a source of UNet patches for each model call
    (nodes.diffusion.sampling_conds: CondEntry.unet_patches)."""

    gligen: Gligen
    boxes: tuple[Box, ...] | None   # None: ComfyUI's "empty" kind (grounding tokens of padding only)

    def patches_for(self, input_shape: torch.Size, device: torch.device) -> dict[str, list[Callable]]:
        """{"middle_patch": [gated self-attention with this call's grounding tokens]} for a UNet input
        [B, C, h, w] (an area entry's boxes are fractions of its area, as in ComfyUI)."""
        batch, _, height, width = input_shape
        inputs = box_inputs(list(self.boxes) if self.boxes is not None else None, batch, height, width,
                            self.gligen.phrase_width)
        with self.gligen.lease() as network:
            parameter = next(network.parameters())
            tokens = network.position_net(*(t.to(device=parameter.device, dtype=parameter.dtype) for t in inputs))
        return {"middle_patch": [_GatedSelfAttention(self.gligen, tokens)]}


class _GatedSelfAttention:
    """ComfyUI's middle_patch: the gated block of the transformer block being run, on its hidden states."""

    def __init__(self, gligen: Gligen, tokens: torch.Tensor):
        self.gligen = gligen
        self.tokens = tokens

    def __call__(self, x: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        block = extra_options.get("block")
        name = fuser_name(block, int(extra_options.get("block_index", 0))) if block else "?"
        with self.gligen.lease() as network:
            if name not in network.fusers:
                raise ValueError(f"the GLIGEN model {Path(self.gligen.source).name} has no gated block for the "
                                 f"UNet's transformer at {block} (it was made for another architecture)")
            fuser: Any = network.fusers[name]  # diffusers' GatedSelfAttentionDense
            if fuser.linear.out_features != x.shape[-1]:
                raise ValueError(f"the GLIGEN model {Path(self.gligen.source).name} expects {block} to be "
                                 f"{fuser.linear.out_features} wide, the UNet's is {x.shape[-1]} (it was made "
                                 f"for another architecture)")
            parameter = fuser.linear.weight
            out = fuser(x.to(device=parameter.device, dtype=parameter.dtype),
                        self.tokens.to(device=parameter.device, dtype=parameter.dtype))
        return out.to(device=x.device, dtype=x.dtype)


def boxes_from_option(value: Any) -> GligenBoxes:
    """options["gligen"] (ComfyUI's ("position", gligen, boxes) tuple; any other kind means no boxes) checked and
    wrapped. Raises ValueError for a malformed value."""
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not isinstance(value[1], Gligen):
        raise ValueError("conditioning option 'gligen' must be (kind, GLIGEN model, boxes), as GLIGENTextBoxApply "
                         "makes it")
    kind, gligen, boxes = value
    if kind != "position":
        return GligenBoxes(gligen, None)
    checked: list[Box] = []
    for box in boxes:
        if len(box) != 5 or not isinstance(box[0], torch.Tensor):
            raise ValueError("each GLIGEN box must be (pooled text embedding, height, width, y, x)")
        if box[0].numel() != gligen.phrase_width:
            raise ValueError(f"a GLIGEN box's text embedding has {box[0].numel()} values; the GLIGEN model "
                             f"takes {gligen.phrase_width}")
        checked.append((box[0], int(box[1]), int(box[2]), int(box[3]), int(box[4])))
    if len(checked) > MAX_OBJECTS:
        raise ValueError(f"GLIGEN takes at most {MAX_OBJECTS} boxes per conditioning, got {len(checked)}")
    return GligenBoxes(gligen, tuple(checked))
