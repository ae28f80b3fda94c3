"""The environment a run sees: folders (input, output, temp, model roots) and shared services.

One Environment per engine instance; nothing here is module-level, so two engines in one process stay apart.
Services are keyed by their type: `env.register(library)`, then `env.service(EmbeddingLibrary)` returns it typed.
The model memory manager has its own accessor, `env.models`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .memory import ModelManager

ServiceT = TypeVar("ServiceT")

# Model folder names in ComfyUI's layout and the file extensions each accepts.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "vae": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "loras": (".safetensors", ".ckpt", ".pt", ".bin"),
    "controlnet": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "embeddings": (".safetensors", ".pt", ".bin"),
    "upscale_models": (".safetensors", ".pt", ".pth", ".ckpt"),
    "clip": (".safetensors", ".ckpt", ".pt", ".bin"),
    "unet": (".safetensors", ".ckpt", ".pt", ".bin"),
    "gligen": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "clip_vision": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "style_models": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "photomaker": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "model_patches": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "hypernetworks": (".pt", ".pth", ".ckpt", ".bin"),
    "configs": (".yaml",),
    "diffusers": (),
}
# ComfyUI aliases: files in models/text_encoders count as clip, diffusion_models as unet.
FOLDER_ALIASES = {"text_encoders": "clip", "diffusion_models": "unet"}


@dataclass
class Environment:
    input_dir: Path = field(default_factory=lambda: Path("input"))
    output_dir: Path = field(default_factory=lambda: Path("output"))
    temp_dir: Path = field(default_factory=lambda: Path("temp"))
    # folder name -> directories searched in order (first match wins)
    model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    # Shared services by type (the model memory manager, and what node packages add): use register / service.
    services: dict[type, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, models_dir: str | os.PathLike[str] | None = None,
               input_dir: str | os.PathLike[str] | None = None,
               output_dir: str | os.PathLike[str] | None = None,
               temp_dir: str | os.PathLike[str] | None = None,
               extra_model_paths: str | os.PathLike[str] | None = None) -> Environment:
        env = cls(
            input_dir=Path(input_dir or "input").resolve(),
            output_dir=Path(output_dir or "output").resolve(),
            temp_dir=Path(temp_dir or "temp").resolve(),
        )
        if models_dir is not None:
            env.add_model_root(models_dir)
        if extra_model_paths is not None:
            env.load_extra_model_paths(extra_model_paths)
        return env

    def add_model_root(self, root: str | os.PathLike[str]) -> None:
        root = Path(root).resolve()
        for folder in MODEL_FOLDERS:
            self.model_dirs.setdefault(folder, []).append(root / folder)
        for alias, folder in FOLDER_ALIASES.items():
            self.model_dirs[folder].append(root / alias)

    def load_extra_model_paths(self, yaml_path: str | os.PathLike[str]) -> None:
        """ComfyUI's extra_model_paths.yaml: sections with base_path and folder: relative path(s) (one per line)."""
        import yaml

        yaml_path = Path(yaml_path)
        data = yaml.safe_load(yaml_path.read_text()) or {}
        for section in data.values():
            if not isinstance(section, dict):
                continue
            base = Path(os.path.expanduser(str(section.get("base_path", yaml_path.parent))))
            if not base.is_absolute():
                base = yaml_path.parent / base
            for key, value in section.items():
                if key in ("base_path", "is_default"):
                    continue
                folder = FOLDER_ALIASES.get(str(key), str(key))
                for line in str(value).splitlines():
                    line = line.strip()
                    if line:
                        self.model_dirs.setdefault(folder, []).append((base / line).resolve())

    def list_models(self, folder: str) -> list[str]:
        """Files under a model folder, relative names with '/' separators, sorted (combo choices)."""
        extensions = MODEL_FOLDERS.get(folder, ())
        names: set[str] = set()
        for directory in self.model_dirs.get(folder, []):
            if not directory.is_dir():
                continue
            if folder == "diffusers":
                names.update(p.parent.relative_to(directory).as_posix()
                             for p in directory.rglob("model_index.json"))
                continue
            for path in directory.rglob("*"):
                if path.is_file() and (not extensions or path.suffix.lower() in extensions):
                    names.add(path.relative_to(directory).as_posix())
        return sorted(names)

    def find_model(self, folder: str, name: str) -> Path:
        """The path of a model file by its listed name; raises FileNotFoundError naming the folders searched."""
        for directory in self.model_dirs.get(folder, []):
            candidate = (directory / name).resolve()
            # Confine to the folder: a name with '..' must not reach outside it.
            if candidate.is_relative_to(directory.resolve()) and candidate.exists():
                return candidate
        searched = ", ".join(str(d) for d in self.model_dirs.get(folder, [])) or "(no folders configured)"
        raise FileNotFoundError(f"{folder} file '{name}' not found in {searched}")

    # Services ---------------------------------------------------------------------------------------------------

    def register(self, service: object, as_type: type | None = None) -> None:
        """Make `service` the one of its type (or of `as_type`, a class it is an instance of)."""
        kind = as_type or type(service)
        if not isinstance(service, kind):
            raise TypeError(f"{type(service).__name__} is not a {kind.__name__}")
        self.services[kind] = service

    def find_service(self, kind: type[ServiceT]) -> ServiceT | None:
        """The service registered as `kind`, else one registered under a subclass of it; None when there is none."""
        found = self.services.get(kind)
        if found is None:
            found = next((service for service in self.services.values() if isinstance(service, kind)), None)
        return found

    def service(self, kind: type[ServiceT]) -> ServiceT:
        found = self.find_service(kind)
        if found is None:
            raise LookupError(f"no {kind.__name__} is registered in this engine's environment")
        return found

    @property
    def models(self) -> ModelManager:
        """The model memory manager; created on first use when the engine did not register one."""
        from .memory import ModelManager

        manager = self.find_service(ModelManager)
        if manager is None:
            manager = ModelManager()
            self.register(manager)
        return manager
