"""latentloom nodes: each family module exports NODES; builtin_nodes() lists them all (the entry point)."""

import os

# diffusers / transformers read this at import time; set before any of them is imported (no hub, ever).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# Family modules, imported in this order by builtin_nodes(). Each defines NODES = [NodeClass, ...].
NODE_MODULES: tuple[str, ...] = (
    "latentloom.nodes.utility",
    "latentloom.nodes.latent",
    "latentloom.nodes.vae_nodes",
    "latentloom.nodes.image",
    "latentloom.nodes.primitives",
    "latentloom.nodes.conditioning",
    "latentloom.nodes.loaders",
    "latentloom.nodes.sampling",
    "latentloom.nodes.lora",
    "latentloom.nodes.controlnet",
    "latentloom.nodes.preprocessors",
)


def builtin_nodes() -> list:
    import importlib

    found: list = []
    for module_name in NODE_MODULES:
        found.extend(importlib.import_module(module_name).NODES)
    return found


def create_engine(models_dir=None, input_dir=None, output_dir=None, temp_dir=None, extra_model_paths=None,
                  custom_nodes_dir=None, cache_bytes=None, entry_points: bool = True):
    """An Engine with the built-in nodes, plugins from the `latentloom.nodes` entry points, a custom_nodes
    folder, and the model memory manager as the "models" service."""
    from latentloom.engine.api import Engine
    from latentloom.engine.cache import DEFAULT_CACHE_BYTES
    from latentloom.engine.environment import Environment
    from latentloom.engine.registry import NodeRegistry

    registry = NodeRegistry()
    registry.register_all(builtin_nodes(), python_module="nodes")
    if entry_points:
        # The built-in entry point ("builtin") is registered above; only third-party plugins add nodes here.
        registry.load_entry_points(skip=("builtin",))
    if custom_nodes_dir is not None:
        registry.load_custom_nodes(custom_nodes_dir)
    if models_dir is None:
        models_dir = bundled_models_dir()
    env = Environment.create(models_dir=models_dir, input_dir=input_dir, output_dir=output_dir,
                             temp_dir=temp_dir, extra_model_paths=extra_model_paths)
    _add_model_manager(env)
    _add_embeddings(env)
    return Engine(registry, env, cache_bytes if cache_bytes is not None else DEFAULT_CACHE_BYTES)


def bundled_models_dir():
    """The bundled toy model in ComfyUI's layout: `models/` beside the source folders, or `latentloom/models` in
    an installed wheel (the same relative place: this package's parent)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "models"


def bundled_graphs_dir():
    """The saved workflows that run on the bundled model (`graphs/`, or `latentloom/graphs` in a wheel)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "graphs"


def _add_model_manager(env) -> None:
    try:
        from latentloom.engine.memory import ModelManager
    except ImportError:  # the memory manager is optional for graphs without models
        return
    env.services["models"] = ModelManager()


def _add_embeddings(env) -> None:
    """The resolver for `embedding:NAME` in prompts (textual inversion files in models/embeddings)."""
    from latentloom.nodes.diffusion.embeddings import EmbeddingLibrary

    env.services["embeddings"] = EmbeddingLibrary(env)
