"""latentloom nodes: each family module exports NODES; builtin_nodes() lists them all (the entry point)."""
