"""Train the bundled toy upscale model, models/upscale_models/toy-upscale-x2.safetensors: a 2x Real-ESRGAN
"compact" network (SRVGGNetCompact, the architecture spandrel detects as "RealESRGAN Compact") that turns the toy
dataset's 64x64 images (tools/toy_dataset.py, what the toy diffusion model draws) into 128x128 ones.

Training pairs come from the same drawing at both sizes: the dataset renders each shape 4x supersampled (256x256
coverage) and box-filters it to 64x64; box-filtering the same coverage by 2 instead gives the 128x128 image. The
network starts as a nearest-neighbour upscale (its output adds a learned residual to the nearest-upscaled input)
and learns to redraw the edges sharp and anti-aliased. Seeded throughout: the same command writes the same file
on the same machine (float sums may differ in the last bits across CPUs and thread counts).

Usage: .venv/bin/python tools/make_toy_upscaler.py [--out models/upscale_models/toy-upscale-x2.safetensors]
Takes about 25 seconds on 2 CPU cores, and prints PSNR on held-out samples against bicubic and nearest upscaling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_dataset  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "models" / "upscale_models" / "toy-upscale-x2.safetensors"
SCALE = 2
FEATURES = 16
CONVS = 4
TRAIN_SEEDS = range(0, 256)
# Held out from training: the PSNR report and tests/test_upscale_models.py measure on these.
EVAL_SEEDS = range(100_000, 100_064)
STEPS = 1600
BATCH = 32
CROP = 16          # low-resolution crop side per training example, centred near an edge
LEARNING_RATE = 4e-3
SEED = 0


def render_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the dataset's 64x64 image, the same drawing at 128x128), both uint8 [H,W,3]."""
    sample = toy_dataset.make_sample(seed)
    spec = sample.spec
    # The dataset's private silhouette is the 4x-supersampled drawing; a 2x2 box filter makes it 2x the size.
    coverage = toy_dataset._coverage(spec).astype(np.float32)
    size = toy_dataset.IMAGE_SIZE * SCALE
    factor = toy_dataset.SUPERSAMPLE // SCALE
    alpha = coverage.reshape(size, factor, size, factor).mean(axis=(1, 3))[..., None]
    foreground = np.array(toy_dataset.SHAPE_COLOURS[spec.colour], dtype=np.float32)
    background = np.array(toy_dataset.BACKGROUND_COLOURS[spec.background], dtype=np.float32)
    large = np.clip(np.rint(alpha * foreground + (1 - alpha) * background), 0, 255).astype(np.uint8)
    return sample.image, large


def pairs(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(small [N,3,64,64], large [N,3,128,128]) float in 0..1."""
    small, large = zip(*(render_pair(seed) for seed in seeds), strict=True)
    return (torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 255,
            torch.from_numpy(np.stack(large)).permute(0, 3, 1, 2).float() / 255)


def edge_pixels(small: torch.Tensor, threshold: float = 0.02) -> list[torch.Tensor]:
    """Per image, the (row, column) of pixels whose 3x3 neighbourhood is not flat: the only places where the
    nearest-neighbour start is wrong, so the crops are centred there (flat crops teach nothing)."""
    grey = small.mean(1, keepdim=True)
    spread = F.max_pool2d(grey, 3, 1, 1) + F.max_pool2d(-grey, 3, 1, 1)
    return [torch.nonzero(image[0] > threshold) for image in spread]


def build_network() -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=FEATURES, num_conv=CONVS, upscale=SCALE, act_type="prelu")


def psnr(result: torch.Tensor, target: torch.Tensor) -> float:
    """On 8-bit values, as the saved PNGs hold them."""
    error = ((result.clamp(0, 1) * 255).round() - target * 255).pow(2).mean()
    return float(10 * torch.log10(255 ** 2 / error))


def train(steps: int = STEPS, log_every: int = 200) -> torch.nn.Module:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    small, large = pairs(TRAIN_SEEDS)
    edges = edge_pixels(small)
    network = build_network()
    optimiser = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    side, half = small.shape[-1], CROP // 2
    for step in range(steps):
        inputs, targets = [], []
        for index in torch.randint(len(small), (BATCH,), generator=generator).tolist():
            pixels = edges[index]
            row, column = pixels[int(torch.randint(len(pixels), (1,), generator=generator))].tolist()
            top, left = (min(max(position - half, 0), side - CROP) for position in (row, column))
            inputs.append(small[index, :, top:top + CROP, left:left + CROP])
            targets.append(large[index, :, SCALE * top:SCALE * (top + CROP), SCALE * left:SCALE * (left + CROP)])
        # Mean squared error: with L1 the residual collapses to zero (the nearest-neighbour start is a local optimum).
        loss = F.mse_loss(network(torch.stack(inputs)), torch.stack(targets))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: MSE {loss.item():.6f}", flush=True)
    return network.eval()


def evaluate(network: torch.nn.Module) -> dict[str, float]:
    small, large = pairs(EVAL_SEEDS)
    with torch.no_grad():
        results = {
            "model": network(small),
            "bicubic": F.interpolate(small, scale_factor=SCALE, mode="bicubic", align_corners=False),
            "nearest": F.interpolate(small, scale_factor=SCALE, mode="nearest"),
        }
    return {name: psnr(result, large) for name, result in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    from safetensors.torch import save_file

    started = time.monotonic()
    network = train(args.steps)
    print(f"trained in {time.monotonic() - started:.0f} s")
    print("held-out PSNR (dB): " + ", ".join(f"{name} {value:.2f}" for name, value in evaluate(network).items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in network.state_dict().items()}
    # One metadata entry: safetensors writes several in no fixed order, which would change the bytes.
    save_file(state, str(args.out), metadata={"made_by": f"tools/make_toy_upscaler.py --steps {args.steps}"})
    print(f"{args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
