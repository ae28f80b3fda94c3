"""ComfyUI's `folder_paths`, over the running engine's Environment (its model folders, extra_model_paths.yaml,
input / output / temp folders). Imported by packs as `folder_paths`.

The module-level names ComfyUI has as globals (`models_dir`, `folder_names_and_paths`, `output_directory`, ...)
are computed for the engine the caller acts for (see context.py), so two engines never share them. Writes
through `add_model_folder_path` or `folder_names_and_paths[name] = (paths, extensions)` change that engine's
Environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from latentloom.engine.environment import FOLDER_ALIASES, MODEL_FOLDERS, Environment

from ..image_files import save_target
from .context import current_env

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
# ComfyUI's folder names for two of ours (it keeps "clip" and "unet" as legacy aliases of these).
COMFY_NAMES = {"clip": "text_encoders", "unet": "diffusion_models"}


class FolderExtensions:
    """Per-engine extensions of folders that packs added or changed (a service of the Environment)."""

    def __init__(self) -> None:
        self.by_folder: dict[str, set[str]] = {}


class PackFolders:
    """The custom_nodes folders an engine loaded packs from (ComfyUI's "custom_nodes" folder entry)."""

    def __init__(self) -> None:
        self.folders: list[Path] = []


def add_custom_nodes_folder(env: Environment, folder: Path) -> None:
    """Record a custom_nodes folder of this engine (called before its packs are imported)."""
    packs = env.find_service(PackFolders)
    if packs is None:
        packs = PackFolders()
        env.register(packs)
    if folder not in packs.folders:
        packs.folders.append(folder)


def _folder(name: str) -> str:
    return FOLDER_ALIASES.get(name, name)


def _extensions(env: Environment, folder: str) -> set[str]:
    custom = env.find_service(FolderExtensions)
    if custom is not None and folder in custom.by_folder:
        return custom.by_folder[folder]
    if folder in MODEL_FOLDERS:
        return set(MODEL_FOLDERS[folder])
    return set(supported_pt_extensions)


def _set_extensions(env: Environment, folder: str, extensions: set[str]) -> None:
    custom = env.find_service(FolderExtensions)
    if custom is None:
        custom = FolderExtensions()
        env.register(custom)
    custom.by_folder[folder] = set(extensions)


def _model_roots(env: Environment) -> list[Path]:
    """The model roots (folders in ComfyUI's layout) this engine was given."""
    return list(dict.fromkeys(d.parent for d in env.model_dirs.get("checkpoints", [])))


def _dirs(env: Environment, folder_name: str) -> list[Path]:
    folder = _folder(folder_name)
    if folder == "custom_nodes":
        packs = env.find_service(PackFolders)
        return list(packs.folders) if packs is not None else []
    if folder in env.model_dirs:
        return env.model_dirs[folder]
    # A ComfyUI folder we do not use ourselves (clip_vision, style_models, ...): the same name under each root.
    return [root / folder_name for root in _model_roots(env)]


def get_folder_paths(folder_name: str) -> list[str]:
    return [str(d) for d in _dirs(current_env(), folder_name)]


def filter_files_extensions(files: list[str], extensions: set[str] | list[str]) -> list[str]:
    wanted = {e.lower() for e in extensions}
    return sorted(f for f in files if not wanted or os.path.splitext(f)[1].lower() in wanted)


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict[str, float]]:
    """(file names relative to `directory`, {folder: mtime}), as ComfyUI's helper returns them."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or [])
    files: list[str] = []
    folders = {directory: os.path.getmtime(directory)}
    for root, subdirs, names in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
        for sub in subdirs:
            path = os.path.join(root, sub)
            folders[path] = os.path.getmtime(path)
    return files, folders


def get_filename_list(folder_name: str) -> list[str]:
    env = current_env()
    folder = _folder(folder_name)
    extensions = _extensions(env, folder)
    names: set[str] = set()
    for directory in _dirs(env, folder_name):
        files, _ = recursive_search(str(directory), excluded_dir_names=[".git"])
        names.update(filter_files_extensions(files, extensions))
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    for directory in _dirs(current_env(), folder_name):
        base = directory.resolve()
        candidate = (base / filename).resolve()
        if candidate.is_relative_to(base) and candidate.is_file():  # a name with '..' must not leave the folder
            return str(candidate)
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    found = get_full_path(folder_name, filename)
    if found is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return found


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    env = current_env()
    folder = _folder(folder_name)
    if folder not in env.model_dirs:
        env.model_dirs[folder] = list(_dirs(env, folder_name))
    dirs = env.model_dirs[folder]
    path = Path(full_folder_path).resolve()
    if path in dirs:
        dirs.remove(path)
    if is_default:
        dirs.insert(0, path)
    else:
        dirs.append(path)


def _existing(folder: Path) -> str:
    """ComfyUI creates its input / output / temp folders at start, and packs list them at import: ours exist once
    asked for."""
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def get_output_directory() -> str:
    return _existing(current_env().output_dir)


def get_input_directory() -> str:
    return _existing(current_env().input_dir)


def get_temp_directory() -> str:
    return _existing(current_env().temp_dir)


def get_user_directory() -> str:
    return str(current_env().output_dir.parent / "user")


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": get_output_directory, "input": get_input_directory,
            "temp": get_temp_directory}.get(type_name, lambda: None)()


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """'x.png [output]' -> ('x.png', output folder); a name without annotation -> (name, None)."""
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = annotated_filepath(name)
    if base is None:
        base = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
                        ) -> tuple[str, str, int, str, str]:
    """(full folder, file name stem, next counter, subfolder, prefix): ComfyUI's numbering, our implementation."""
    target = save_target(Path(output_dir), filename_prefix, image_width, image_height)
    return str(target.folder), target.basename, target.counter, target.subfolder, filename_prefix


class FolderTable(MutableMapping[str, tuple[list[str], set[str]]]):
    """`folder_names_and_paths` for one engine: {folder: ([paths], {extensions})}, writable."""

    def __init__(self, env: Environment):
        self.env = env

    def __getitem__(self, name: str) -> tuple[list[str], set[str]]:
        folder = _folder(name)
        if folder == "custom_nodes":
            return [str(d) for d in _dirs(self.env, folder)], set()
        if folder not in self.env.model_dirs:
            raise KeyError(name)
        return [str(d) for d in self.env.model_dirs[folder]], _extensions(self.env, folder)

    def __setitem__(self, name: str, value: tuple[list[str], set[str]]) -> None:
        paths, extensions = value
        folder = _folder(name)
        self.env.model_dirs[folder] = [Path(p).resolve() for p in paths]
        _set_extensions(self.env, folder, set(extensions))

    def __delitem__(self, name: str) -> None:
        del self.env.model_dirs[_folder(name)]

    def __iter__(self) -> Iterator[str]:
        return iter([COMFY_NAMES.get(name, name) for name in self.env.model_dirs])

    def __len__(self) -> int:
        return len(self.env.model_dirs)


def __getattr__(name: str) -> Any:
    """ComfyUI's module globals, for the engine the caller acts for."""
    if name == "folder_names_and_paths":
        return FolderTable(current_env())
    if name == "models_dir":
        roots = _model_roots(current_env())
        return str(roots[0]) if roots else str(Path("models").resolve())
    if name == "base_path":
        return str(current_env().output_dir.parent)
    if name in ("output_directory", "input_directory", "temp_directory"):
        return get_directory_by_type(name.split("_")[0])
    raise AttributeError(f"module 'folder_paths' has no attribute '{name}'")
