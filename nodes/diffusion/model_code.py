"""The network classes the loaders build, imported when first needed, from their own modules.

diffusers' model-family packages (`diffusers.models.unets`, `.transformers`, `.autoencoders`, `.controlnets`)
import every model of their family in their `__init__` (Flux, Wan, HunyuanVideo, ...: about 200 modules and a
second or more of CPU), although an SD load needs one module of each. Before importing a class from its own
module, the family packages that are not imported yet are registered with their `__init__` deferred: it runs the
first time anything reads a name from the package itself (`from diffusers.models.transformers import X`), so
code that wants the whole family still gets it, while imports of single modules (which is what diffusers' own
lazy top level and the loaders do) skip it.

prepare() imports all of it and builds the CLIP tokenizer, for a server to run before it admits the first prompt
(as ComfyUI imports its model code before it listens), so the first image costs what a later one does plus the
checkpoint's own load.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import threading
from types import FunctionType, ModuleType
from typing import Any

from .offline import ensure_offline

DEFERRED_FAMILY_PACKAGES = ("diffusers.models.unets", "diffusers.models.transformers",
                            "diffusers.models.autoencoders", "diffusers.models.controlnets")
# Serialises completing a deferred package (two threads reading from it at once run its __init__ once).
_COMPLETING = threading.RLock()


def _defer_package_init(name: str) -> None:
    """Register package `name` (not yet imported) with an empty namespace whose `__init__` runs on first use."""
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    loader = spec.loader
    package = importlib.util.module_from_spec(spec)

    def complete_on_first_use(attribute: str) -> Any:
        if attribute.startswith("__"):  # probes such as __wrapped__ or __all__ by tools: not a use
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        with _COMPLETING:
            if package.__dict__.get("__getattr__") is complete_on_first_use:
                del package.__dict__["__getattr__"]
                loader.exec_module(package)
        return getattr(package, attribute)

    package.__dict__["__getattr__"] = complete_on_first_use
    sys.modules[name] = package
    setattr(parent, child, package)


def _import_model_module(module_name: str) -> ModuleType:
    ensure_offline()  # before diffusers / transformers read their environment
    if module_name not in sys.modules:
        import diffusers  # noqa: F401  (the top level first: it configures logging and its lazy namespace)

        with _COMPLETING:
            for package in DEFERRED_FAMILY_PACKAGES:
                _defer_package_init(package)
    module = importlib.import_module(module_name)
    for holder in (sys.modules.get("diffusers.models.attention_processor"), module):
        if holder is not None:
            sign_attention_processors(holder)
    return module


def sign_attention_processors(module: ModuleType) -> None:
    """Give the `__call__` of every attention processor class defined in `module` a precomputed `__signature__`.

    diffusers' Attention.forward runs inspect.signature on its processor's `__call__` at every call, to drop
    keyword arguments the processor does not take: about 8 % of a warm SD1 step on the CPU. inspect answers
    from a function's `__signature__` at once, and the answer is the same."""
    for value in list(vars(module).values()):  # signing again is a no-op (a few microseconds per class)
        if isinstance(value, type) and value.__module__ == module.__name__ and "Processor" in value.__name__:
            call = value.__dict__.get("__call__")
            if isinstance(call, FunctionType) and "__signature__" not in call.__dict__:
                call.__dict__["__signature__"] = inspect.signature(call)


def unet_class() -> Any:
    """diffusers' UNet2DConditionModel."""
    return _import_model_module("diffusers.models.unets.unet_2d_condition").UNet2DConditionModel


def autoencoder_class() -> Any:
    """diffusers' AutoencoderKL."""
    return _import_model_module("diffusers.models.autoencoders.autoencoder_kl").AutoencoderKL


def transformer_class(module: str, name: str) -> Any:
    """A diffusers diffusion-transformer class from its own module ("transformer_flux", "FluxTransformer2DModel")."""
    return getattr(_import_model_module(f"diffusers.models.transformers.{module}"), name)


def clip_text_classes() -> tuple[Any, Any, Any]:
    """transformers' (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection)."""
    ensure_offline()
    from transformers.models.clip.configuration_clip import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def prepare() -> None:
    """Import the SD network code and build the CLIP tokenizer now (seconds), instead of inside the first load."""
    from .tokenizer import clip_tokenizer

    unet_class()
    autoencoder_class()
    clip_text_classes()
    clip_tokenizer()
