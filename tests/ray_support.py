"""Helpers for the Ray scale-out tests and benchmark: an engine over the server test nodes plus a few image and
model-loading nodes (built the same way in the server and in every actor), apps in Ray mode, graphs.

Importing this module does not import Ray (the local-mode test checks that)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import torch

from latentloom.engine.api import Engine
from latentloom.engine.environment import Environment
from latentloom.engine.memory import ModelManager
from latentloom.engine.node import Node, RunContext
from latentloom.engine.registry import NodeRegistry
from latentloom.engine.types import FLOAT, IMAGE, Combo, Float, Int, Output, Socket
from latentloom.nodes.image import PreviewImage, SaveImage
from latentloom.server.app import create_app
from latentloom.server.state import ServerConfig
from tests.server_support import TEST_NODES


class ValueImage(Node):
    """An IMAGE batch filled with `value` (clamped to 0..1)."""

    category = "test"
    outputs = (Output(IMAGE),)
    value: Annotated[Any, Socket(FLOAT)]
    size: Annotated[int, Int(min=1, max=256)] = 16
    batch: Annotated[int, Int(min=1, max=8)] = 1

    def run(self, ctx: RunContext):
        level = max(0.0, min(1.0, float(self.value)))
        return (torch.full((self.batch, self.size, self.size, 3), level),)


class TinyLoader(Node):
    """Loads a model file through the memory manager under a loader-style key (kind, path, size, mtime_ns),
    like the real loaders: what the dispatcher's affinity routing looks at."""

    category = "test"
    outputs = (Output(FLOAT),)
    ckpt_name: Annotated[str, Combo(lambda env: env.list_models("checkpoints") if env else [])] = ""

    def run(self, ctx: RunContext):
        path = ctx.env.find_model("checkpoints", self.ckpt_name)
        stat = path.stat()
        key = ("tiny", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        ctx.models.get_or_load(key, lambda: torch.nn.Linear(4, 4))
        return (float(stat.st_size),)


class Spin(Node):
    """CPU work in `steps` progress steps (matrix products of `size`): the benchmark's stand-in for sampling."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    steps: Annotated[int, Int(min=1, max=1000)] = 10
    size: Annotated[int, Int(min=8, max=2048)] = 256
    seed: Annotated[float, Float(min=0.0, max=1e9)] = 0.0

    def run(self, ctx: RunContext):
        generator = torch.Generator().manual_seed(int(self.seed))
        matrix = torch.randn(self.size, self.size, generator=generator) / self.size ** 0.5
        state = torch.randn(self.size, self.size, generator=generator)
        for step in range(self.steps):
            state = torch.tanh(matrix @ state)
            ctx.progress(step + 1, self.steps)
        return (float(self.value) + float(state.mean()) * 0.0,)


class Crash(Node):
    """Ends the worker process that runs it, like a segfault or the OOM killer would (only inside a Ray actor)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            raise RuntimeError("Crash only ends Ray actor processes")
        os._exit(1)


RAY_TEST_NODES = [*TEST_NODES, ValueImage, TinyLoader, Spin, Crash, SaveImage, PreviewImage]


def make_engine(root: str | Path) -> Engine:
    """The engine of the server and of each actor (an actor then points its output folders at its staging)."""
    root = Path(root)
    env = Environment.create(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                             temp_dir=root / "temp")
    for folder in (env.input_dir, env.output_dir, env.temp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    env.register(ModelManager(device="cpu"))
    return Engine(NodeRegistry(RAY_TEST_NODES), env)


def make_ray_app(root: Path, num_workers: int | None = 2, **config: Any):
    from latentloom.server.dispatch import PoolOptions
    from latentloom.server.ray_pool import EngineFactory

    config.setdefault("user_dir", root / "user")
    config.setdefault("allowed_hosts", ("testserver",))
    options = PoolOptions(EngineFactory("tests.ray_support:make_engine", {"root": str(root)}),
                          num_workers=num_workers)
    return create_app(make_engine(root), ServerConfig(workers="ray", worker_options=options, **config))


def image_graph(value: float = 0.5, steps: int = 3, pause: float = 0.01, prefix: str = "ray") -> dict:
    """Const -> Steps (progress) -> ValueImage -> SaveImage (a counted PNG in output/)."""
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": steps, "pause": pause}},
            "3": {"class_type": "ValueImage", "inputs": {"value": ["2", 0], "size": 8, "batch": 1}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}}}


def loader_graph(ckpt_name: str, value: float = 1.0) -> dict:
    return {"1": {"class_type": "TinyLoader", "inputs": {"ckpt_name": ckpt_name}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": value}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def spin_graph(seed: int, steps: int = 10, size: int = 256) -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
            "2": {"class_type": "Spin", "inputs": {"value": ["1", 0], "steps": steps, "size": size, "seed": seed}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def wait_history(client, prompt_id: str, timeout: float = 30.0) -> dict:
    """The history entry of `prompt_id` once it is there (client: httpx or Starlette TestClient)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/history/{prompt_id}").json()
        if prompt_id in body:
            return body[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def workers_that_ran(pool, prompt_ids: list[str], timeout: float = 10.0) -> list[str]:
    """The worker of each prompt, from the pool's timings (recorded just after the history entry is written)."""
    def known():
        by_prompt = {t["prompt_id"]: t["worker"] for t in list(pool.timings)}
        return [by_prompt[p] for p in prompt_ids] if all(p in by_prompt for p in prompt_ids) else None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = known()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError("the pool recorded no timing for some prompts")
