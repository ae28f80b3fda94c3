"""Helpers for the VAE / latent / image node tests (not tests): a fake run context and a tiny random VAE."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from engine.environment import Environment  # noqa: E402


@dataclass
class FakeContext:
    """The parts of engine.node.RunContext the nodes use."""

    env: Environment
    prompt: dict = field(default_factory=dict)
    extra_data: dict = field(default_factory=dict)
    node_id: str = "1"
    display_node_id: str = "1"
    prompt_id: str = "test"
    reports: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def progress(self, value: int, maximum: int, preview: Any = None) -> None:
        self.reports.append((value, maximum))

    def check_interrupt(self) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def make_context(tmp_path: Path, **kwargs: Any) -> FakeContext:
    env = Environment.create(input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                             temp_dir=tmp_path / "temp")
    for folder in (env.input_dir, env.output_dir, env.temp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return FakeContext(env=env, **kwargs)


def tiny_autoencoder(seed: int = 0) -> torch.nn.Module:
    """SD-shaped AutoencoderKL (4 blocks => /8, 4 latent channels) with random weights, a few hundred kB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
    ).eval()
