"""Custom node packs written for ComfyUI, loaded unchanged.

`load_packs(registry, env, folder)` imports each pack of a custom_nodes folder through the registry (real
packages, failures recorded) and turns what it provides into our nodes: our own `NODES` lists, and ComfyUI V1
classes from `NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS` (v1.py), or V3 classes from the
`ComfyExtension` its `comfy_entrypoint()` returns (v3.py); its `WEB_DIRECTORY` is recorded on the engine's
PackServer for the HTTP layer to serve. Before the first pack is imported, a meta path finder is put at the front
of sys.meta_path (finder.py) so that ComfyUI's module names (`folder_paths`, `nodes`, `comfy.*`, `server`,
`node_helpers`, `comfy_execution.*`, `comfy_api.*`) resolve to the modules of this package, never to anything
else of the same name on sys.path (the repository root holds a `nodes/` and a `server/` folder).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from latentloom.engine.environment import Environment
from latentloom.engine.node import Node
from latentloom.engine.registry import NodeRegistry

from .context import acting_for
from .finder import install_finder
from .prompt_server import pack_server
from .v1 import adapt_mappings
from .v3 import adapt_extension


def pack_nodes(module: ModuleType, pack: str) -> list[type[Node]]:
    """The node classes a pack module provides: its NODES, plus its adapted NODE_CLASS_MAPPINGS or, when it has
    none, the V3 nodes of its comfy_entrypoint() (ComfyUI's order of preference)."""
    own = list(getattr(module, "NODES", None) or [])
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if isinstance(mappings, dict):
        display_names = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
        return own + list(adapt_mappings(mappings, display_names))
    entrypoint = getattr(module, "comfy_entrypoint", None)
    if entrypoint is not None:
        return own + list(adapt_extension(entrypoint, pack))
    if not own:
        raise ImportError(f"custom node pack '{pack}' defines neither NODE_CLASS_MAPPINGS, comfy_entrypoint nor "
                          "NODES")
    return own


def web_directory(module: ModuleType) -> Path | None:
    """The folder of a pack's WEB_DIRECTORY (relative to the folder holding its __init__.py or .py file), when it
    exists."""
    declared = getattr(module, "WEB_DIRECTORY", None)
    source = getattr(module, "__file__", None)
    if not isinstance(declared, (str, Path)) or not source:
        return None
    folder = (Path(source).parent / declared).resolve()
    return folder if folder.is_dir() else None


def load_packs(registry: NodeRegistry, env: Environment, folder: str | Path) -> None:
    """Load every pack in `folder` for the engine of `env` (errors end up in registry.load_errors)."""
    install_finder()
    server = pack_server(env)  # PromptServer.instance of this engine, before packs decorate its routes

    def read_pack(module: ModuleType, pack: str) -> list[type[Node]]:
        web = web_directory(module)
        if web is not None:  # recorded even when the pack has no nodes, as ComfyUI (JavaScript-only packs)
            server.web_directories[pack] = web
        return pack_nodes(module, pack)

    with acting_for(env):
        registry.load_custom_nodes(folder, module_nodes=read_pack)


__all__ = ["load_packs", "pack_nodes", "web_directory"]
