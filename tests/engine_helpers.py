"""Fixtures shared by the engine tests: an Engine over the test nodes and a call log."""

from __future__ import annotations

from pathlib import Path

import engine_nodes
from engine_nodes import CallLog

from latentloom.engine.api import Engine
from latentloom.engine.environment import Environment
from latentloom.engine.registry import NodeRegistry


def make_engine(tmp_path: Path, cache_bytes: int = 1 << 30, cache_prompts: int | None = 8) -> tuple[Engine, CallLog]:
    registry = NodeRegistry(engine_nodes.NODES)
    env = Environment.create(input_dir=tmp_path / "in", output_dir=tmp_path / "out", temp_dir=tmp_path / "tmp")
    engine = Engine(registry, env, cache_bytes=cache_bytes, cache_prompts=cache_prompts)
    calls = CallLog()
    env.register(calls)
    return engine, calls


def const(value: float) -> dict:
    return {"class_type": "Const", "inputs": {"value": value}}


def add(source: str, b: float = 0.0) -> dict:
    return {"class_type": "Add", "inputs": {"a": [source, 0], "b": b}}


def collect(source: str, slot: int = 0) -> dict:
    return {"class_type": "Collect", "inputs": {"value": [source, slot]}}
