"""What every model loader node shares: the model folders' choices, the file identity that keys the memory manager,
the output-cache fingerprint of a model file, and loading with errors that name the node input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError, MissingInputFile
from latentloom.engine.memory import ModelManager
from latentloom.engine.node import RunContext

from .diffusion import checkpoint


def model_choices(folder: str) -> Callable[[Environment | None], list[str]]:
    return lambda env: env.list_models(folder) if env is not None else []


def file_identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def model_key(kind: str, identity: tuple, *options: Any) -> tuple:
    """The memory manager's key for what a loader builds from a file (identity = path, size, mtime)."""
    return (kind, *options, *identity)


def folder_identity(path: Path, index: Path) -> tuple[str, int, int]:
    stat = index.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def find_model_file(env: Environment | None, folder: str, name: Any) -> Path | None:
    if env is None or not isinstance(name, str):
        return None
    try:
        return env.find_model(folder, name)
    except FileNotFoundError:
        return None


def times_dropped(env: Environment, key: tuple) -> int:
    manager = env.find_service(ModelManager)
    return manager.times_dropped(key) if manager is not None else 0


def model_fingerprint(env: Environment | None, folder: str, name: Any, kind: str, *options: Any) -> Any:
    """Size and mtime of the named file, and how often the memory manager dropped its models: the output cache
    re-runs the loader when the file changes or when the weights its cached outputs hold were evicted."""
    path = find_model_file(env, folder, name)
    if env is None or path is None:
        return None
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        identity = folder_identity(path, index)
    else:
        identity = file_identity(path)
    return [identity[1:], times_dropped(env, model_key(kind, identity, *options))]


def locate_model(ctx: RunContext, input_name: str, folder: str, name: str) -> Path:
    if not name:
        raise InputError(input_name, f"is empty; choose a file from models/{folder}")
    try:
        return ctx.env.find_model(folder, name)
    except FileNotFoundError as error:
        raise MissingInputFile(input_name, str(error)) from error


def load_model(ctx: RunContext, input_name: str, name: str, key: tuple, loader: Callable[[], Any]) -> Any:
    """Load through the manager; file and architecture errors are re-raised naming the input and the file."""
    try:
        return ctx.models.get_or_load(key, loader)
    except (FileNotFoundError, checkpoint.ModelFileError, ValueError) as error:
        detail = str(error)
        if Path(name).name not in detail:
            detail = f"{name}: {detail}"
        kind = MissingInputFile if isinstance(error, FileNotFoundError) else InputError
        raise kind(input_name, detail) from error
    except (KeyError, RuntimeError) as error:  # e.g. tensors of the wrong shapes for the architecture
        if isinstance(error, torch.OutOfMemoryError):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise InputError(input_name, f"{name}: the file does not fit this loader ({type(error).__name__}: "
                                     f"{first_line})") from error
