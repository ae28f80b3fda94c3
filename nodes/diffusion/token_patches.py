"""Self-attention patches that change the token layout (nodes/attention_patches.py), as attn1 input / output
patches of the patch API, with ComfyUI 0.3.64's numerics.

HyperTile (tfernd/HyperTile): at the chosen resolutions the self-attention queries are cut into nh × nw tiles
that become separate batch entries; the keys and values stay whole and are reshaped to the queries' batch by
the attention maths (so each tile attends to one contiguous run of tokens, as in ComfyUI); the output patch
puts the tiles back. The tile counts are the largest divisors giving tiles of at least tile_size/8 latent cells,
one of the first `swap_size` candidates drawn at random per call.

ToMe for SD (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"): at full latent resolution the
query tokens are split into one destination per 2×2 cell (a random one) and sources; the `ratio`·N sources most
similar (cosine) to a destination are averaged into it, attention runs on the fewer queries, and the output
patch copies each merged destination's result back to its sources.

Randomness: ComfyUI draws from torch's global generator; here each draw uses a generator seeded from the call's
sigma and the attention's block, so a graph gives the same image every time it runs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch

Attn1Patch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Attn1OutputPatch = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
TokenMap = Callable[[torch.Tensor], torch.Tensor]


def call_generator(extra: dict[str, Any], device: torch.device, salt: str) -> torch.Generator:
    """A generator seeded from the UNet call's sigma, the attention's block and `salt`."""
    sigmas = extra.get("sigmas")
    sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else 0.0
    key = f"{sigma:.6e}|{extra.get('block')}|{extra.get('block_index')}|{salt}"
    return torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))


# ---------------------------------------------------------------------------------------------------------------
# HyperTile


def tile_count(length: int, min_tile: int, options: int, generator: torch.Generator) -> int:
    """How many tiles to cut `length` cells into: length // d for a divisor d ≥ min_tile (capped at length),
    one of the `options` smallest such divisors. ComfyUI draws the index from [0, candidates − 1) (the upper
    bound excluded), so the last candidate is never drawn when there are two or more."""
    smallest = min(min_tile, length)
    divisors = [d for d in range(smallest, length + 1) if length % d == 0][:options]
    candidates = [length // d for d in divisors]
    if len(candidates) > 1:
        index = int(torch.randint(0, len(candidates) - 1, (1,), generator=generator, device=generator.device))
    else:
        index = 0
    return candidates[index]


class HyperTilePatch:
    """attn1 input / output patches of HyperTile; `tiles` carries the layout from one to the other (an attention
    call's output patch runs right after its input patch)."""

    def __init__(self, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
        self.latent_tile = max(32, tile_size) // 8
        self.swap_size = swap_size
        self.max_depth = max_depth
        self.scale_depth = scale_depth
        self.tiles: tuple[int, int, int, int] | None = None

    def split(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict[str, Any]) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = n.shape[-2]
        shape = extra["original_shape"]
        # Token counts of the latent at depths 0 … max_depth (compared as floats, as ComfyUI does).
        depths = [(shape[-2] / 2 ** i) * (shape[-1] / 2 ** i) for i in range(self.max_depth + 1)]
        if tokens not in depths:
            return n, context, value
        aspect = shape[-1] / shape[-2]
        # ComfyUI's h and w (for a non-square latent they are the grid's sides swapped; kept for its numerics).
        h, w = round(math.sqrt(tokens * aspect)), round(math.sqrt(tokens / aspect))
        factor = 2 ** depths.index(tokens) if self.scale_depth else 1
        generator = call_generator(extra, torch.device("cpu"), "hypertile")
        nh = tile_count(h, self.latent_tile * factor, self.swap_size, generator)
        nw = tile_count(w, self.latent_tile * factor, self.swap_size, generator)
        if nh * nw <= 1:
            return n, context, value
        b, _, c = n.shape
        th, tw = h // nh, w // nw
        tiled = n.reshape(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)
        self.tiles = (nh, nw, th, tw)
        return tiled, context, value

    def merge(self, out: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        if self.tiles is None:
            return out
        nh, nw, th, tw = self.tiles
        self.tiles = None
        c = out.shape[-1]
        b = out.shape[0] // (nh * nw)
        return out.reshape(b, nh, nw, th, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * th * nw * tw, c)


# ---------------------------------------------------------------------------------------------------------------
# Token merging


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_merge(metric: torch.Tensor, w: int, h: int, r: int, generator: torch.Generator | None) \
        -> tuple[TokenMap, TokenMap]:
    """(merge, unmerge) for tokens [B, N, C] laid out h × w: one random destination per 2×2 cell (top-left
    cells only where h or w is odd: the rest of the grid stays source), the r sources most similar to a
    destination averaged into it; unmerge gives every merged source its destination's value."""
    b, n, _ = metric.shape
    if r <= 0 or w == 1 or h == 1:
        return _identity, _identity
    device = metric.device
    cells_h, cells_w = h // 2, w // 2
    with torch.no_grad():
        if generator is None:
            choice = torch.zeros(cells_h, cells_w, 1, device=device, dtype=torch.int64)
        else:
            choice = torch.randint(4, size=(cells_h, cells_w, 1), generator=generator, device=generator.device)
            choice = choice.to(device)
        # −1 marks a destination, 0 a source; sorting puts destinations first.
        marks = torch.zeros(cells_h, cells_w, 4, device=device, dtype=torch.int64)
        marks.scatter_(dim=2, index=choice, src=-torch.ones_like(choice))
        marks = marks.view(cells_h, cells_w, 2, 2).transpose(1, 2).reshape(cells_h * 2, cells_w * 2)
        if cells_h * 2 < h or cells_w * 2 < w:
            grid = torch.zeros(h, w, device=device, dtype=torch.int64)
            grid[:cells_h * 2, :cells_w * 2] = marks
            marks = grid
        order = marks.reshape(1, -1, 1).argsort(dim=1)
        destinations = cells_h * cells_w
        source_idx, dest_idx = order[:, destinations:, :], order[:, :destinations, :]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = x.shape[-1]
            return (torch.gather(x, 1, source_idx.expand(x.shape[0], n - destinations, c)),
                    torch.gather(x, 1, dest_idx.expand(x.shape[0], destinations, c)))

        unit = metric / metric.norm(dim=-1, keepdim=True)
        sources, dests = split(unit)
        similarity = sources @ dests.transpose(-1, -2)
        r = min(sources.shape[1], r)
        best, best_dest = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        kept_idx = ranked[..., r:, :]        # sources left alone
        merged_idx = ranked[..., :r, :]      # sources averaged into a destination
        target_idx = torch.gather(best_dest[..., None], dim=-2, index=merged_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        batch, count, c = src.shape
        kept = torch.gather(src, -2, kept_idx.expand(batch, count - r, c))
        moving = torch.gather(src, -2, merged_idx.expand(batch, r, c))
        dst = dst.scatter_reduce(-2, target_idx.expand(batch, r, c), moving, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        kept_count = kept_idx.shape[1]
        kept, dst = x[..., :kept_count, :], x[..., kept_count:, :]
        c = kept.shape[-1]
        moved = torch.gather(dst, -2, target_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        source_positions = source_idx.expand(b, source_idx.shape[1], 1)
        out.scatter_(-2, dest_idx.expand(b, destinations, c), dst)
        out.scatter_(-2, torch.gather(source_positions, 1, kept_idx).expand(b, kept_count, c), kept)
        out.scatter_(-2, torch.gather(source_positions, 1, merged_idx).expand(b, r, c), moved)
        return out

    return merge, unmerge


class TokenMergePatch:
    """attn1 input / output patches of ToMe; `unmerge` carries the inverse from one to the other."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.unmerge: TokenMap = _identity

    def split(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict[str, Any]) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, height, width = extra["original_shape"]
        downsample = int(math.ceil(math.sqrt((height * width) // n.shape[1])))
        if downsample > 1:  # merging only at the latent's full resolution
            self.unmerge = _identity
            return n, context, value
        r = int(n.shape[1] * self.ratio)
        generator = call_generator(extra, n.device, "tome") if r > 0 else None
        merge, self.unmerge = bipartite_merge(n, width, height, r, generator)
        return merge(n), context, value

    def restore(self, out: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        unmerge, self.unmerge = self.unmerge, _identity
        return unmerge(out)
