"""Helpers for the server tests: an app over the engine's small test nodes (no diffusion models), a real uvicorn
server on 127.0.0.1 in a thread, and a websocket reader. Run as a script it serves such an app (restart tests):

    python -m tests.server_support PORT DATABASE ROOT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from latentloom.engine.api import Engine
from latentloom.engine.environment import Environment
from latentloom.engine.node import Node, NodeOutput
from latentloom.engine.registry import NodeRegistry
from latentloom.engine.types import FLOAT, Int, Output, Socket, String
from latentloom.server.app import create_app
from latentloom.server.state import ServerConfig
from tests import engine_nodes

# A 1x1 PNG and a 1x1 JPEG, for preview frames.
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                         "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201"
                         "a5d2b1e60000000049454e44ae426082")


class PreviewSteps(Node):
    """Reports `steps` progress updates, each with a PNG preview."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    steps: Annotated[int, Int(min=1, max=100)] = 2

    def run(self, ctx):
        for step in range(self.steps):
            ctx.progress(step + 1, self.steps, preview=("image/png", TINY_PNG))
        return (self.value,)


class SaveText(Node):
    """An output node that writes a file to the output folder and reports it like SaveImage does."""

    category = "test"
    output_node = True
    value: Annotated[Any, Socket(FLOAT)]
    filename_prefix: Annotated[str, String()] = "value"

    def run(self, ctx):
        folder = Path(ctx.env.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.filename_prefix}_{ctx.prompt_id[:8]}.txt"
        (folder / name).write_text(str(self.value))
        return NodeOutput(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


class SaveTestImage(Node):
    """An image output node like SaveImage: writes a small gradient PNG (brightness from `value`) to output/."""

    category = "test"
    output_node = True
    value: Annotated[Any, Socket(FLOAT)]
    filename_prefix: Annotated[str, String()] = "test"

    def run(self, ctx):
        from PIL import Image

        folder = Path(ctx.env.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        level = int(max(0.0, min(1.0, float(self.value))) * 255)
        image = Image.new("RGB", (96, 64), (level, 64, 255 - level))
        name = f"{self.filename_prefix}_{ctx.prompt_id[:8]}.png"
        image.save(folder / name)
        return NodeOutput(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


TEST_NODES = [*engine_nodes.NODES, PreviewSteps, SaveText, SaveTestImage]


def make_engine(root: Path) -> Engine:
    env = Environment.create(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                             temp_dir=root / "temp")
    for folder in (env.input_dir, env.output_dir, env.temp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return Engine(NodeRegistry(TEST_NODES), env)


def make_app(root: Path, **config: Any):
    config.setdefault("user_dir", root / "user")
    config.setdefault("allowed_hosts", ("testserver",))
    return create_app(make_engine(root), ServerConfig(**config))


# Graphs -----------------------------------------------------------------------------------------------------

def const_graph(value: float = 1.0, extra: float = 0.0) -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": extra}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def steps_graph(steps: int = 5, pause: float = 0.01, value: float = 1.0) -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": steps, "pause": pause}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def fail_graph(message: str = "boom") -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
            "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "message": message}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


# A real server ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app, port: int | None = None):
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL ("http://127.0.0.1:PORT")."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ws="websockets-sansio", lifespan="on",
                                           ws_per_message_deflate=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=15)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


async def read_until_done(ws, prompt_id: str, timeout: float = 20.0) -> list:
    """Messages (decoded JSON, or raw bytes for binary frames) up to this prompt's `executing {node: null}`."""
    messages = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            message = raw if isinstance(raw, bytes) else json.loads(raw)
            messages.append(message)
            if isinstance(message, dict) and message["type"] == "executing" \
                    and message["data"]["node"] is None and message["data"]["prompt_id"] == prompt_id:
                return messages


def main(argv: list[str]) -> None:
    import uvicorn

    port, database, root = int(argv[0]), Path(argv[1]), Path(argv[2])
    app = make_app(root, database=database)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio",
                ws_per_message_deflate=False)


if __name__ == "__main__":
    main(sys.argv[1:])
