"""Style models (ComfyUI's STYLE_MODEL, models/style_models): networks that turn a CLIP vision output into extra
conditioning tokens, appended to the text tokens by StyleModelApply.

Two file formats, told apart by their keys as ComfyUI does:
* the T2I-Adapter style adapter (`style_embedding`, ...): learned style tokens appended to the vision tokens, a few
  residual attention blocks (8 heads, QuickGELU MLP), layer norms and a projection to the text width; its outputs
  are the style tokens. Widths, depth and token count are read from the shapes (the published file: width 1024,
  3 blocks, 8 tokens, text width 768).
* Flux Redux (`redux_up`, `redux_down`): Linear → SiLU → Linear on the vision tokens.
Both read the CLIP vision output's last_hidden_state.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import ModelFileError, _materialize, read_state_dict

STYLE_ADAPTER_HEADS = 8


class _Float32LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32 whatever the storage dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = _Float32LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = _Float32LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tokens, batch, width]
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    """The T2I-Adapter style model: [B, tokens, width] vision tokens → [B, num_tokens, context_dim]."""

    def __init__(self, width: int, context_dim: int, layers: int, num_tokens: int,
                 heads: int = STYLE_ADAPTER_HEADS) -> None:
        super().__init__()
        # (the attribute names are the file's key names, "layes" included)
        self.transformer_layes = nn.Sequential(*[_ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.num_token = num_tokens
        self.style_embedding = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.ln_post = _Float32LayerNorm(width)
        self.ln_pre = _Float32LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, context_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = self.style_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([x, style], dim=1))
        x = self.transformer_layes(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, -self.num_token:, :]) @ self.proj.to(x.dtype)


class ReduxEncoder(nn.Module):
    """Flux Redux: [B, tokens, vision width] → [B, tokens, text width]."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.redux_up = nn.Linear(vision_width, text_width * 3)
        self.redux_down = nn.Linear(text_width * 3, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(nn.functional.silu(self.redux_up(x)))


@dataclass(frozen=True, eq=False)
class StyleModel:
    """What a STYLE_MODEL link carries."""

    model: nn.Module
    kind: str            # "style_adapter" | "redux"
    input_width: int     # the width of the vision tokens it reads
    source: str = ""

    def cache_nbytes(self) -> int:
        return 0  # the weights are owned (and counted) by the model memory manager

    def get_cond(self, clip_vision_output: Any, manager: Any = None) -> torch.Tensor:
        """The style tokens [B, n, text width] (float32, CPU) for a CLIP_VISION_OUTPUT."""
        hidden = clip_vision_output["last_hidden_state"]
        lease = manager.use(self.model) if manager is not None else contextlib.nullcontext(self.model)
        with torch.no_grad(), lease as model:
            parameter = next(model.parameters())
            return model(hidden.to(parameter.device, parameter.dtype)).float().cpu()


def _block_count(state: Mapping[str, torch.Tensor]) -> int:
    count = 0
    while f"transformer_layes.{count}.attn.in_proj_weight" in state:
        count += 1
    return count


def build_style_model(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str,
                      source: str = "") -> StyleModel:
    if "style_embedding" in state:
        _, num_tokens, width = state["style_embedding"].shape
        if "proj" not in state:
            raise ModelFileError(f"{what}: the style adapter has no proj weight")
        with torch.device("meta"):
            module: nn.Module = StyleAdapter(width, state["proj"].shape[1], _block_count(state), num_tokens)
        return StyleModel(_materialize(module, state, dtype, what), "style_adapter", width, source)
    if "redux_down.weight" in state and "redux_up.weight" in state:
        vision_width = state["redux_up.weight"].shape[1]
        with torch.device("meta"):
            module = ReduxEncoder(vision_width, state["redux_down.weight"].shape[0])
        return StyleModel(_materialize(module, state, dtype, what), "redux", vision_width, source)
    raise ModelFileError(f"{what}: not a style model (neither a T2I-Adapter style adapter nor a Redux model)")


def load_style_model_file(path: str | Path, manager: Any = None) -> StyleModel:
    """Kept in float32, as ComfyUI keeps style models (they are small and run once per apply)."""
    path = Path(path)
    return build_style_model(read_state_dict(path), torch.float32, path.name, str(path))
