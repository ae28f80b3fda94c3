"""Stand-ins for ComfyUI's model-internal modules (`comfy.ldm.*`, `comfy.ops`, `comfy.patcher_extension`, ...),
which latentloom cannot provide: its models are its own classes, not ComfyUI's.

Many packs import names from them at module level for the few nodes that patch ComfyUI's model code, so a
missing module would cost the whole pack. Here such a module imports, and every name in it is a placeholder
class: it can be imported, subclassed, compared, used as a dict key or attribute path (`ops.disable_weight_init.
Linear`), but calling or instantiating it raises MissingInternals naming what was used. So the pack's other
nodes load and run, and the nodes that need ComfyUI's internals fail with that error when they run.

Under `comfy_extras.*`, a name that is one of our built-in node types (`LatentBatch`, `CLIPTextEncodeSDXL`) is
that node's V1-style class from the `nodes` module instead of a placeholder. The other names there are
placeholders that are also `io.ComfyNode` subclasses, since ComfyUI's nodes there are V3 nodes: a pack's node
that subclasses one (KJNodes' `LTXVAddGuideMulti(LTXVAddGuide)`) and defines its own schema registers as a V3 node,
and fails with MissingInternals only when it runs into the parent's helpers (`cls.encode`, ...).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NoReturn

# ComfyUI modules (and their sub-modules) answered by stand-ins when this package has no real module for them.
INTERNAL_MODULES: tuple[str, ...] = (
    "comfy.ldm", "comfy.ops", "comfy.quant_ops", "comfy.taesd", "comfy.k_diffusion", "comfy.patcher_extension",
    "comfy.context_windows", "comfy.latent_formats", "comfy.sampler_helpers", "comfy.controlnet",
    "comfy.clip_vision", "comfy.lora", "comfy.model_base", "comfy.model_detection", "comfy.supported_models",
    "comfy.text_encoders", "comfy.hooks", "comfy.weight_adapter", "comfy.sd1_clip", "comfy.sdxl_clip",
    "comfy.clip_model", "comfy.diffusers_load", "comfy.float", "comfy.gligen", "comfy.lora_convert",
    "comfy_api.torch_helpers", "comfy_extras",
)


class MissingInternals(NotImplementedError):
    """Pack code used a part of ComfyUI's model internals that latentloom does not have."""


def is_internal(fullname: str) -> bool:
    return any(fullname == name or fullname.startswith(name + ".") for name in INTERNAL_MODULES)


class _PlaceholderMeta(type):
    """Placeholders are classes: subclassable and hashable; attribute paths give further placeholders."""

    latentloom_missing: str

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        child = placeholder(f"{cls.latentloom_missing}.{name}")
        setattr(cls, name, child)  # the same object on every access (subclass checks, dict keys)
        return child

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise MissingInternals(f"{cls.latentloom_missing} is part of ComfyUI's model internals, which latentloom "
                               "does not provide (this node needs ComfyUI itself)")


def placeholder(fullname: str) -> type:
    module, _, name = fullname.rpartition(".")
    bases: tuple[type, ...] = ()
    if fullname.startswith("comfy_extras."):
        from .comfy_api.latest._io import ComfyNode

        bases = (ComfyNode,)
    return _PlaceholderMeta(name, bases, {"latentloom_missing": fullname, "__module__": module})


def is_placeholder(value: Any) -> bool:
    """A stand-in itself (not a pack's subclass of one)."""
    return isinstance(value, _PlaceholderMeta) and "latentloom_missing" in vars(value)


def _core_node_class(name: str) -> Any:
    from .core_nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS.get(name)


class InternalsModule(ModuleType):
    """A stand-in module: any public name is a placeholder (or, under comfy_extras, our node's V1 class)."""

    def __init__(self, name: str):
        super().__init__(name, f"Stand-in for ComfyUI's {name} (model internals latentloom does not provide).")
        self.__path__: list[str] = []  # a package, so `import comfy.ldm.flux.math` finds sub-modules too

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        found = _core_node_class(name) if self.__name__.startswith("comfy_extras") else None
        value = found if found is not None else placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)  # the same object on every access
        return value
