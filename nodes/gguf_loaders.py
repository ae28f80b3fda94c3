"""UnetLoaderGGUF: the ComfyUI-GGUF custom pack's loader of quantised diffusion models, with its signature, so the
many shared workflows that use it run as they are (nodes.diffusion.gguf_files loads the file through diffusers'
GGUF support). The pack lists the .gguf files of models/unet and models/diffusion_models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from latentloom.engine.environment import Environment
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import MODEL, STRING, Combo, Output

from .diffusion import checkpoint
from .model_files import file_identity, load_model, locate_model, model_fingerprint, model_key

GGUF_SUFFIX = ".gguf"


def gguf_choices(env: Environment | None) -> list[str]:
    """The .gguf files under the unet folders (models/unet, models/diffusion_models), as relative names."""
    if env is None:
        return []
    names: set[str] = set()
    for directory in env.model_dirs.get("unet", []):
        if directory.is_dir():
            names.update(path.relative_to(directory).as_posix() for path in directory.rglob(f"*{GGUF_SUFFIX}")
                         if path.is_file())
    return sorted(names)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class UnetLoaderGGUF(Node):
    display_name = "Unet Loader (GGUF)"
    category = "bootleg"
    description = ("A GGUF-quantised diffusion transformer (Flux, SD3, ... in their original names, as the "
                   "ComfyUI-GGUF pack's files are): quantised layers stay packed in memory and are dequantised per "
                   "call (diffusers' GGUF support).")
    outputs = (Output(MODEL, name="MODEL"), Output(STRING, name="filename"), Output(STRING, name="sha256"))
    unet_name: Annotated[str, Combo(gguf_choices)]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "unet", constants.get("unet_name"), "unet", "default")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "unet_name", "unet", self.unet_name)
        manager = ctx.models
        identity = file_identity(path)
        # The same key as UNETLoader's default load of the file: both share one loaded model.
        model = load_model(ctx, "unet_name", self.unet_name, model_key("unet", identity, "default"),
                           lambda: checkpoint.load_unet_file(path, manager))
        digest = manager.get_or_load(model_key("sha256", identity), lambda: file_sha256(path))
        return (model, self.unet_name, digest)


NODES = [UnetLoaderGGUF]
