"""ComfyUI's `comfy` package as custom node packs import it (`comfy.utils`, `comfy.model_management`,
`comfy.samplers`), over latentloom's engine. Only the parts packs use most exist; see docs/ARCHITECTURE.md."""
