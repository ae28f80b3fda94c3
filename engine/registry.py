"""The node registry: explicit registration, plugins by entry point, a custom_nodes folder, and the catalogue
in ComfyUI's /object_info shape."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from .inputs import ValueCheckers
from .node import Node
from .types import COMBO, InputSpec

ENTRY_POINT_GROUP = "latentloom.nodes"
log = logging.getLogger(__name__)


class RegistryError(Exception):
    pass


class NodeRegistry:
    def __init__(self, nodes: Iterable[type[Node]] = ()):
        self._nodes: dict[str, type[Node]] = {}
        # Plugins that failed to load: name -> reason (shown by the CLI and /system_stats, never fatal).
        self.load_errors: dict[str, str] = {}
        # Checks the executor runs on linked socket values, by socket type name (registered by the node packages).
        self.value_checks = ValueCheckers()
        self.register_all(nodes)

    # Registration ---------------------------------------------------------------------------------------------

    def register(self, node_cls: type[Node], *, replace: bool = False) -> type[Node]:
        if not (isinstance(node_cls, type) and issubclass(node_cls, Node)):
            raise RegistryError(f"{node_cls!r} is not a Node subclass")
        name = node_cls.class_type()
        if name in self._nodes and self._nodes[name] is not node_cls and not replace:
            raise RegistryError(f"node type '{name}' is already registered by {self._nodes[name].__module__}")
        node_cls.input_specs()  # fail now, not at run time, on a malformed declaration
        self._nodes[name] = node_cls
        return node_cls

    def register_all(self, nodes: Iterable[type[Node]], *, python_module: str | None = None) -> None:
        for node_cls in nodes:
            if python_module is not None:
                node_cls.python_module = python_module
            self.register(node_cls)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP, skip: Iterable[str] = ()) -> None:
        """Each entry point names a callable returning node classes (or a list attribute of them)."""
        skip = set(skip)
        for entry_point in importlib.metadata.entry_points(group=group):
            if entry_point.name in skip:
                continue
            try:
                provided = entry_point.load()
                nodes = provided() if callable(provided) else provided
                module = "nodes" if entry_point.name == "builtin" else f"custom_nodes.{entry_point.name}"
                self.register_all(nodes, python_module=module)
            except Exception as exc:  # a broken plugin must not take the engine down
                self.load_errors[f"entry point {entry_point.name}"] = f"{type(exc).__name__}: {exc}"
                log.warning("node plugin %s failed to load: %s", entry_point.name, exc)

    def load_custom_nodes(self, folder: str | Path, module_nodes: ModuleNodes | None = None) -> None:
        """Import each package (`<pack>/__init__.py`) or module (`<pack>.py`) in `folder` and register its nodes.

        A pack is imported as the real package `latentloom_custom_nodes.<pack>` (its parent package is created
        first), so its relative imports of sub-modules work. `module_nodes(module, pack)` says which node classes
        a module provides; the default reads its `NODES` list. A node layer passes its own (e.g. one that also
        adapts other protocols). A pack that fails is recorded in `load_errors` with its first error and never
        stops the others; a class that fails to register is recorded as `<path>: <class type>`.
        """
        folder = Path(folder)
        if not folder.is_dir():
            return
        extract = module_nodes or nodes_list_of
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")) or path.name.endswith(".disabled"):
                continue
            if path.is_dir() and (path / "__init__.py").exists():
                source = path / "__init__.py"
            elif path.suffix == ".py":
                source = path
            else:
                continue
            pack = path.name if path.is_dir() else path.stem
            try:
                module = import_pack(pack, path, source)
                nodes = list(extract(module, pack))
            except Exception as exc:
                self.load_errors[str(path)] = f"{type(exc).__name__}: {exc}"
                log.warning("custom node pack %s failed to load: %s: %s", path, type(exc).__name__, exc)
                continue
            for node_cls in nodes:
                try:
                    node_cls.python_module = f"custom_nodes.{pack}"
                    self.register(node_cls)
                except Exception as exc:
                    label = node_cls.class_type() if isinstance(node_cls, type) and issubclass(node_cls, Node) \
                        else repr(node_cls)
                    self.load_errors[f"{path}: {label}"] = f"{type(exc).__name__}: {exc}"
                    log.warning("custom node %s of %s was not registered: %s", node_cls, path, exc)

    # Lookup ---------------------------------------------------------------------------------------------------

    def get(self, class_type: str) -> type[Node] | None:
        return self._nodes.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def names(self) -> list[str]:
        return list(self._nodes)

    # Catalogue ------------------------------------------------------------------------------------------------

    def object_info(self, env: Any = None) -> dict[str, dict[str, Any]]:
        return {name: node_info(cls, env) for name, cls in self._nodes.items()}


# Custom node packs ------------------------------------------------------------------------------------------------

PACKS_PACKAGE = "latentloom_custom_nodes"
# (module, pack name) -> the node classes the module provides.
ModuleNodes = Callable[[ModuleType, str], Iterable[type[Node]]]


def nodes_list_of(module: ModuleType, pack: str) -> list[type[Node]]:
    """Our own convention: a module lists its node classes in NODES."""
    if not hasattr(module, "NODES"):
        raise RegistryError(f"custom node pack '{pack}' defines no NODES list")
    return list(module.NODES)


def import_pack(pack: str, path: Path, source: Path) -> ModuleType:
    """Import a pack as `latentloom_custom_nodes.<name>`, a real package when it is a folder.

    Names from an earlier import of a pack with the same name (another folder, another engine) are dropped first,
    so its sub-modules are never mixed with this pack's. A failed import leaves nothing in sys.modules.
    """
    if PACKS_PACKAGE not in sys.modules:
        parent = ModuleType(PACKS_PACKAGE, "The custom node packs loaded by latentloom engines.")
        parent.__path__ = []  # a package (its children are found through their own specs)
        sys.modules[PACKS_PACKAGE] = parent
    module_name = f"{PACKS_PACKAGE}.{_identifier(pack)}"
    _forget_modules(module_name)
    spec = importlib.util.spec_from_file_location(
        module_name, source, submodule_search_locations=[str(path)] if path.is_dir() else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module loader for {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _forget_modules(module_name)
        raise
    return module


def _identifier(name: str) -> str:
    """A pack folder name as a module name part ('ComfyUI-KJNodes' -> 'ComfyUI_KJNodes')."""
    cleaned = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"_{cleaned}"


def _forget_modules(module_name: str) -> None:
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]


def input_spec_json(spec: InputSpec, default: Any, env: Any) -> list[Any]:
    """One input in ComfyUI's legacy encoding: [TYPE] or [TYPE, {options}], combos as [[choices...], {...}]."""
    options: dict[str, Any] = {}
    if default is not None:
        options["default"] = default
    for key in ("min", "max", "step", "round"):
        value = getattr(spec, key)
        if value is not None:
            options[key] = value
    if spec.multiline:
        options["multiline"] = True
    if spec.tooltip:
        options["tooltip"] = spec.tooltip
    if spec.force_input:
        options["forceInput"] = True
    if spec.lazy:
        options["lazy"] = True
    if spec.raw_link:
        options["rawLink"] = True
    options.update(spec.extra)
    if spec.type == COMBO and spec.choices is not None:
        return [spec.resolve_choices(env), options]
    # A combo without choices (the editor fetches them from a `remote` route) keeps ComfyUI's ["COMBO", {...}].
    return [spec.type, options] if options else [spec.type]


def node_info(cls: type[Node], env: Any = None) -> dict[str, Any]:
    required: dict[str, list[Any]] = {}
    optional: dict[str, list[Any]] = {}
    for name, spec in cls.input_specs().items():
        if spec.listed_as is not None:
            (optional if spec.listed_as.optional else required)[name] = spec.listed_as.entry
        elif spec.listed:
            target = optional if spec.optional else required
            target[name] = input_spec_json(spec, cls.input_default(name), env)
    inputs: dict[str, Any] = {"required": required}
    order: dict[str, list[str]] = {"required": list(required)}
    if optional:
        inputs["optional"] = optional
        order["optional"] = list(optional)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": order,
        "output": [out.type for out in cls.outputs],
        "output_is_list": [out.is_list for out in cls.outputs],
        "output_name": [out.display_name for out in cls.outputs],
        "name": cls.class_type(),
        "display_name": cls.display_name or cls.class_type(),
        "description": cls.description,
        "python_module": cls.python_module,
        "category": cls.category,
        "output_node": cls.output_node,
    }
    if any(out.tooltip for out in cls.outputs):
        info["output_tooltips"] = [out.tooltip for out in cls.outputs]
    if cls.deprecated:
        info["deprecated"] = True
    if cls.experimental:
        info["experimental"] = True
    return info
