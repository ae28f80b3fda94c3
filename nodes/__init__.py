"""latentloom nodes: each family module exports NODES; builtin_nodes() lists them all (the entry point)."""

# Family modules, imported in this order by builtin_nodes(). Each defines NODES = [NodeClass, ...].
NODE_MODULES: tuple[str, ...] = (
    "latentloom.nodes.utility",
    "latentloom.nodes.latent",
    "latentloom.nodes.latent_ops",
    "latentloom.nodes.latent_files",
    "latentloom.nodes.vae_nodes",
    "latentloom.nodes.image",
    "latentloom.nodes.masks",
    "latentloom.nodes.image_ops",
    "latentloom.nodes.primitives",
    "latentloom.nodes.conditioning",
    "latentloom.nodes.loaders",
    "latentloom.nodes.gguf_loaders",
    "latentloom.nodes.sampling",
    "latentloom.nodes.samplers_custom",
    "latentloom.nodes.guidance",
    "latentloom.nodes.lora",
    "latentloom.nodes.controlnet",
    "latentloom.nodes.control_extras",
    "latentloom.nodes.preprocessors",
    "latentloom.nodes.model_patches",
    "latentloom.nodes.model_sampling",
    "latentloom.nodes.model_families",
    "latentloom.nodes.family_flux",
    "latentloom.nodes.family_qwen_image",
    "latentloom.nodes.family_sd3",
    "latentloom.nodes.family_controlnets",
    "latentloom.nodes.family_lumina2",
    "latentloom.nodes.family_hidream",
    "latentloom.nodes.family_auraflow",
    "latentloom.nodes.family_extras",
    "latentloom.nodes.upscale",
    "latentloom.nodes.attention_patches",
    "latentloom.nodes.training",
    "latentloom.nodes.merging",
    "latentloom.nodes.model_saving",
    "latentloom.nodes.gligen",
    "latentloom.nodes.hooks",
    "latentloom.nodes.image_prompting",
)


def builtin_nodes() -> list:
    import importlib

    found: list = []
    for module_name in NODE_MODULES:
        found.extend(importlib.import_module(module_name).NODES)
    return found


def create_engine(models_dir=None, input_dir=None, output_dir=None, temp_dir=None, extra_model_paths=None,
                  custom_nodes_dir=None, cache_bytes=None, entry_points: bool = True, vram_budget=None,
                  stream_weights: bool = True, cache_prompts=None):
    """An Engine with the built-in nodes, plugins from the `latentloom.nodes` entry points, a custom_nodes
    folder, the socket value checks, the model memory manager and the embedding library as services.
    vram_budget (bytes; None: the manager's default) and stream_weights configure the memory manager; cache_bytes
    and cache_prompts (None: the defaults) bound the output cache by size and by the prompts an entry outlives."""
    from latentloom.engine.api import Engine
    from latentloom.engine.cache import DEFAULT_CACHE_BYTES, DEFAULT_KEEP_PROMPTS
    from latentloom.engine.environment import Environment
    from latentloom.engine.memory import ModelManager
    from latentloom.engine.registry import NodeRegistry

    from .diffusion.embeddings import EmbeddingLibrary
    from .diffusion.offline import ensure_offline
    from .socket_values import register_value_checks

    ensure_offline()  # before any node module imports diffusers / transformers
    registry = NodeRegistry()
    registry.register_all(builtin_nodes(), python_module="nodes")
    register_value_checks(registry.value_checks)
    if entry_points:
        # The built-in entry point ("builtin") is registered above; only third-party plugins add nodes here.
        registry.load_entry_points(skip=("builtin",))
    if models_dir is None:
        models_dir = bundled_models_dir()
    env = Environment.create(models_dir=models_dir, input_dir=input_dir, output_dir=output_dir,
                             temp_dir=temp_dir, extra_model_paths=extra_model_paths)
    env.register(ModelManager(vram_budget=vram_budget, stream_weights=stream_weights))
    env.register(EmbeddingLibrary(env))  # resolves `embedding:NAME` in prompts (models/embeddings)
    if custom_nodes_dir is not None:
        # Packs in our NODES style or ComfyUI's (V1), with ComfyUI's module names (nodes/comfy_compat).
        from .comfy_compat import load_packs

        load_packs(registry, env, custom_nodes_dir)
    return Engine(registry, env, cache_bytes if cache_bytes is not None else DEFAULT_CACHE_BYTES,
                  cache_prompts if cache_prompts is not None else DEFAULT_KEEP_PROMPTS)


def bundled_models_dir():
    """The bundled toy model in ComfyUI's layout: `models/` beside the source folders, or `latentloom/models` in
    an installed wheel (the same relative place: this package's parent)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "models"


def bundled_graphs_dir():
    """The saved workflows that run on the bundled model (`graphs/`, or `latentloom/graphs` in a wheel)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "graphs"
