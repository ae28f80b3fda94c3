"""Custom node packs written for ComfyUI, loaded unchanged.

`load_packs(registry, env, folder)` imports each pack of a custom_nodes folder through the registry (real
packages, failures recorded) and turns what it provides into our nodes: our own `NODES` lists, and ComfyUI V1
classes from `NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS` (v1.py), or V3 classes from the
`ComfyExtension` its `comfy_entrypoint()` returns (v3.py); its `WEB_DIRECTORY` is recorded on the engine's
PackServer for the HTTP layer to serve. Before the first pack is imported, a meta path finder is put at the front
of sys.meta_path (finder.py) so that ComfyUI's module names (`folder_paths`, `nodes`, `comfy.*`, `server`,
`node_helpers`, `execution`, `latent_preview`, `comfy_execution.*`, `comfy_api.*`, `comfy_extras.*`) resolve to
the modules of this package, never to anything else of the same name on sys.path (the repository root holds a
`nodes/` and a `server/` folder). V3 classes a pack lists in NODE_CLASS_MAPPINGS are adapted by v3.py.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType

from latentloom.engine.environment import Environment
from latentloom.engine.node import Node
from latentloom.engine.registry import NodeRegistry

from .context import acting_for
from .finder import install_finder
from .folder_paths import add_custom_nodes_folder
from .prompt_server import pack_server
from .v1 import adapt_mappings
from .v3 import adapt_extension, adapt_v3, is_v3_class


def pack_nodes(module: ModuleType, pack: str) -> list[type[Node]]:
    """The node classes a pack module provides: its NODES, plus its adapted NODE_CLASS_MAPPINGS or, when it has
    none, the V3 nodes of its comfy_entrypoint() (ComfyUI's order of preference)."""
    own = list(getattr(module, "NODES", None) or [])
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if isinstance(mappings, dict):
        display_names = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
        names = display_names if isinstance(display_names, dict) else {}
        # V3 classes may sit in NODE_CLASS_MAPPINGS beside V1 ones (ComfyUI registers them under the key).
        v1 = {key: cls for key, cls in mappings.items() if not is_v3_class(cls)}
        v3 = [adapt_v3(cls, str(key), str(names[key]) if names.get(key) else None)
              for key, cls in mappings.items() if is_v3_class(cls)]
        return own + list(adapt_mappings(v1, display_names)) + v3
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
    if not Path(folder).is_dir():
        return  # no packs (the CLI's default ./custom_nodes is usually absent): ComfyUI's names stay unclaimed
    install_finder()
    add_custom_nodes_folder(env, Path(folder).resolve())  # folder_paths' "custom_nodes" entry
    server = pack_server(env)  # PromptServer.instance of this engine, before packs decorate its routes

    def read_pack(module: ModuleType, pack: str) -> list[type[Node]]:
        web = web_directory(module)
        if web is not None:  # recorded even when the pack has no nodes, as ComfyUI (JavaScript-only packs)
            server.web_directories[pack] = web
        return pack_nodes(module, pack)

    # Packs print banners at import; they go to stderr so that stdout stays the CLI's (`nodes --json`).
    with acting_for(env), contextlib.redirect_stdout(sys.stderr):
        registry.load_custom_nodes(folder, module_nodes=read_pack)


__all__ = ["load_packs", "pack_nodes", "web_directory"]
