"""latentloom nodes: each family module exports NODES; builtin_nodes() lists them all (the entry point)."""

import os

# diffusers / transformers read this at import time; set before any of them is imported (no hub, ever).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# Family modules, imported in this order by builtin_nodes(). Each defines NODES = [NodeClass, ...].
NODE_MODULES: tuple[str, ...] = (
    "nodes.utility",
)


def builtin_nodes() -> list:
    import importlib

    found: list = []
    for module_name in NODE_MODULES:
        found.extend(importlib.import_module(module_name).NODES)
    return found
