"""ComfyUI's module names for custom node packs: a meta path finder in front of sys.meta_path.

It answers only for the names below (and their sub-modules), each an alias of a module of this package: the
same module object under two names, so `import folder_paths` and `latentloom.nodes.comfy_compat.folder_paths`
are one module. `aiohttp` is answered only when aiohttp itself is not installed. A module under one of ComfyUI's
model-internal modules that this package does not have (internals.INTERNAL_MODULES) is answered by a stand-in
whose names fail when used. Nothing under `latentloom.*` is ever answered for, and a name already in
sys.modules (a real ComfyUI in the same process) is left alone.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from .internals import InternalsModule, is_internal

COMPAT = "latentloom.nodes.comfy_compat"
ALIASES: dict[str, str] = {
    "folder_paths": f"{COMPAT}.folder_paths",
    "nodes": f"{COMPAT}.core_nodes",
    "comfy": f"{COMPAT}.comfy",
    "comfy_execution": f"{COMPAT}.comfy_execution",
    "comfy_api": f"{COMPAT}.comfy_api",
    "node_helpers": f"{COMPAT}.node_helpers",
    "server": f"{COMPAT}.prompt_server",
    "execution": f"{COMPAT}.execution",
    "latent_preview": f"{COMPAT}.latent_preview",
    "comfy_extras": f"{COMPAT}.comfy_extras",
}
FALLBACKS: dict[str, str] = {"aiohttp": f"{COMPAT}.web_shim"}  # only when not installed


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, module: ModuleType):
        self.module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        """Already executed under its own name."""


class ComfyModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        top, _, rest = fullname.partition(".")
        base = ALIASES.get(top)
        if base is None and top in FALLBACKS and importlib.machinery.PathFinder.find_spec(top) is None:
            base = FALLBACKS[top]
            rest = ""  # aiohttp.web is the same module
        if base is None:
            return None
        real_name = f"{base}.{rest}" if rest else base
        try:
            module = importlib.import_module(real_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (real_name == exc.name or real_name.startswith(exc.name + ".")):
                raise  # a module of ours failed on an import of its own
            if not is_internal(fullname):
                return None  # not provided: the import fails as it would in a bare environment
            # ComfyUI's model internals: a stand-in whose names fail only when used (internals.py).
            return importlib.util.spec_from_loader(fullname, _AliasLoader(InternalsModule(fullname)),
                                                   is_package=True)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module), is_package=hasattr(module, "__path__"))


def install_finder() -> None:
    """Put the finder at the front of sys.meta_path (once per process)."""
    if not any(isinstance(finder, ComfyModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, ComfyModuleFinder())
