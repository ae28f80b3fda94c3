"""ComfyUI's `comfy_execution` package: the graph helpers packs import (ExecutionBlocker, GraphBuilder)."""
