"""Two test-only nodes, installed as a custom_nodes module by test_sd_end_to_end.py (not a test file).

LatentProbe shows a LATENT's samples (and noise mask) as JSON text, so a CLI run can be checked in latent space;
WideEmptyLatent makes an empty latent with any channel count, to provoke a model/latent mismatch at run time.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import torch

from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import LATENT, Int, Output, Socket, String


class LatentProbe(Node):
    category = "testing"
    output_node = True

    samples: Annotated[Any, Socket(LATENT)]
    label: Annotated[str, String()] = ""

    def run(self, ctx: RunContext):
        latent = self.samples
        mask = latent.get("noise_mask")
        text = json.dumps({"label": self.label, "samples": latent["samples"].tolist(),
                           "noise_mask": mask.tolist() if mask is not None else None})
        return NodeOutput(values=(), ui={"text": [text]})


class WideEmptyLatent(Node):
    category = "testing"
    outputs = (Output(LATENT),)

    channels: Annotated[int, Int(min=1, max=64)] = 8
    width: Annotated[int, Int(min=8, max=4096, step=8)] = 64
    height: Annotated[int, Int(min=8, max=4096, step=8)] = 64

    def run(self, ctx: RunContext):
        return ({"samples": torch.zeros(1, self.channels, self.height // 8, self.width // 8)},)


NODES = [LatentProbe, WideEmptyLatent]
