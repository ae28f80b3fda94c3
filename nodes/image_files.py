"""Image files: reading input images, annotated names (`x.png [output]`), and ComfyUI's output file naming.

Shared by the image nodes and usable by the server (/view, /upload) so both resolve names the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from latentloom.engine.files import atomic_writer

ANNOTATIONS = ("input", "output", "temp")
# Multi-picture formats whose extra frames are not animation frames (ComfyUI keeps only the first).
SINGLE_FRAME_FORMATS = ("MPO",)
# Extensions mimetypes may not know on every platform.
EXTRA_IMAGE_EXTENSIONS = (".webp", ".avif", ".heic", ".heif", ".jxl")


def is_image_name(name: str) -> bool:
    guessed, _ = mimetypes.guess_type(name)
    return (guessed or "").startswith("image/") or name.lower().endswith(EXTRA_IMAGE_EXTENSIONS)


def list_input_images(env: Any) -> list[str]:
    """Image files directly in the input folder, sorted (the LoadImage combo)."""
    if env is None:
        return []
    folder = Path(env.input_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_name(p.name))


def split_annotation(name: str, default: str = "input") -> tuple[str, str]:
    """'sub/x.png [output]' -> ('sub/x.png', 'output'); names without an annotation get `default`."""
    stripped = name.strip()
    for kind in ANNOTATIONS:
        suffix = f" [{kind}]"
        if stripped.endswith(suffix):
            return stripped[:-len(suffix)], kind
        if stripped.endswith(f"[{kind}]"):
            return stripped[:-len(kind) - 2].rstrip(), kind
    return name, default


def folder_for(env: Any, kind: str) -> Path:
    return Path({"input": env.input_dir, "output": env.output_dir, "temp": env.temp_dir}[kind])


def resolve_annotated_path(env: Any, name: str, default: str = "input") -> Path:
    """The file an (optionally annotated, optionally subfolder-qualified) name refers to, confined to its folder.

    Raises ValueError for names that would leave the folder.
    """
    relative, kind = split_annotation(name, default)
    base = folder_for(env, kind).resolve()
    path = Path(os.path.normpath(base / relative))
    if not path.is_relative_to(base) or path == base:
        raise ValueError(f"image name '{name}' points outside the {kind} folder")
    return path


def file_fingerprint(path: Path) -> str:
    """The file's sha256: any change of content re-runs the loader, a mere touch does not."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _frame_to_tensors(frame: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """One PIL frame -> (image [H,W,3], mask [H,W] = 1 - alpha; zeros 64x64 without alpha)."""
    if frame.mode == "I":
        frame = frame.point(lambda value: value * (1 / 255))
    rgb = np.array(frame.convert("RGB")).astype(np.float32) / 255.0
    if "A" in frame.getbands():
        alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
        mask = 1.0 - torch.from_numpy(alpha)
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
        mask = 1.0 - torch.from_numpy(alpha)
    else:
        mask = torch.zeros(64, 64, dtype=torch.float32)
    return torch.from_numpy(rgb), mask


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [F,H,W,3] and MASK [F,H,W] from an image file: every frame of the first frame's size, EXIF-rotated."""
    with Image.open(path) as opened:
        images, masks = [], []
        first_size = None
        for frame in ImageSequence.Iterator(opened):
            frame = ImageOps.exif_transpose(frame)
            if first_size is None:
                first_size = frame.size
            if frame.size != first_size:
                continue
            image, mask = _frame_to_tensors(frame)
            images.append(image)
            masks.append(mask)
            if opened.format in SINGLE_FRAME_FORMATS:
                break
    if not images:
        raise ValueError(f"image file '{path.name}' has no frames")
    if len({tuple(m.shape) for m in masks}) > 1:
        # Frames with and without alpha: the alpha-less ones get an empty mask of the image size.
        masks = [m if m.shape == images[0].shape[:2] else torch.zeros(images[0].shape[:2]) for m in masks]
    return torch.stack(images), torch.stack(masks)


def load_mask_file(path: Path, channel: str) -> torch.Tensor:
    """MASK [1,H,W] from one channel of an image file; for 'alpha' the mask is 1 - alpha."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.getbands() != ("R", "G", "B", "A"):
            if image.mode == "I":
                image = image.point(lambda value: value * (1 / 255))
            image = image.convert("RGBA")
        band = channel[0].upper()
        if band not in image.getbands():
            return torch.zeros(1, 64, 64, dtype=torch.float32)
        values = torch.from_numpy(np.array(image.getchannel(band)).astype(np.float32) / 255.0)
    if band == "A":
        values = 1.0 - values
    return values.unsqueeze(0)


# Saving ----------------------------------------------------------------------------------------------------


def expand_prefix_tokens(prefix: str, width: int, height: int) -> str:
    """%width% %height% %year% %month% %day% %hour% %minute% %second% (local time, zero-padded)."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {
        "width": str(width), "height": str(height), "year": str(now.tm_year),
        "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


@dataclass(frozen=True)
class SaveTarget:
    folder: Path        # absolute folder the files go to
    basename: str       # file name stem before _<counter>_
    counter: int        # first free counter
    subfolder: str      # folder relative to the type root, '/'-separated ('' for the root)


def existing_counter(name: str, basename: str) -> int | None:
    """N for files named '<basename>_N...' (N non-numeric -> 0); None when the name belongs to another prefix."""
    if not (name.startswith(basename) and name[len(basename):len(basename) + 1] == "_"):
        return None
    try:
        return int(name[len(basename) + 1:].split("_")[0])
    except ValueError:
        return 0


def next_counter(folder: Path, basename: str) -> int:
    """1 + the largest N among files '<basename>_N...' in `folder` (1 when there are none): ComfyUI's rule,
    shared with the server's commit of Ray workers' files (server.outputs_commit)."""
    if not folder.is_dir():
        return 1
    counters = [c for c in (existing_counter(p.name, basename) for p in folder.iterdir()) if c is not None]
    return max(counters) + 1 if counters else 1


class OutputNumbering(Protocol):
    """Chooses the first counter of each save made while a prompt runs (see `numbering_outputs`)."""

    def counter(self, folder: Path, basename: str, free: int, files: int) -> int:
        """The first counter for `files` files '<basename>_N_...' in `folder`; `free` is next_counter's answer."""
        ...


# The numbering of the prompt running in this context (set by the server's local worker around a run). A context
# variable, as in comfy_compat.context: it follows the run's asyncio tasks and is never shared between runs.
_output_numbering: ContextVar[OutputNumbering | None] = ContextVar("latentloom_output_numbering", default=None)


@contextlib.contextmanager
def numbering_outputs(numbering: OutputNumbering) -> Iterator[None]:
    """Every `save_target` inside this block (SaveImage, SaveLatent, model savers, packs' get_save_image_path)
    takes its counter from `numbering`."""
    token = _output_numbering.set(numbering)
    try:
        yield
    finally:
        _output_numbering.reset(token)


def save_target(root: Path, prefix: str, width: int = 0, height: int = 0, files: int = 1) -> SaveTarget:
    """Where the next `files` files for `prefix` go: ComfyUI's `<basename>_<counter:05>_.png` numbering.

    The counter is 1 + the largest N among files '<basename>_N...' already in the folder, so numbering continues
    after existing files. Prefixes that leave `root` are refused.

    Inside `numbering_outputs` the numbering has the last word. The server's local worker uses this so that a
    prompt re-run after a crash (kill -9 after SaveImage wrote its PNG, before the prompt finished) writes the
    same names as its first attempt, replacing those files atomically instead of counting up: the output folder
    then holds what one uninterrupted run leaves (`ComfyUI_00001_.png`, not a second `ComfyUI_00002_.png`), and
    the history and /view name those files.
    """
    root = Path(os.path.abspath(root))
    prefix = expand_prefix_tokens(prefix, width, height)
    normalised = os.path.normpath(prefix)
    subfolder, basename = os.path.split(normalised)
    folder = Path(os.path.abspath(os.path.join(root, subfolder)))
    if os.path.commonpath((root, folder)) != str(root) or not basename or basename in (".", ".."):
        raise ValueError(f"saving outside the output folder is not allowed (filename_prefix '{prefix}')")
    counter = next_counter(folder, basename)
    numbering = _output_numbering.get()
    if numbering is not None:
        counter = numbering.counter(folder, basename, counter, files)
    folder.mkdir(parents=True, exist_ok=True)
    return SaveTarget(folder, basename, counter, Path(subfolder).as_posix() if subfolder else "")


def png_metadata(prompt: Any, extra_pnginfo: dict | None) -> PngInfo:
    """tEXt 'prompt' = json of the API graph, plus one chunk per extra_pnginfo key (e.g. 'workflow')."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,C] 0..1 -> uint8 by clip(255 v) and truncation (ComfyUI's rule; rounding would differ by 1 LSB)."""
    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


def save_images(images: torch.Tensor, root: Path, prefix: str, kind: str, compress_level: int,
                metadata: PngInfo | None) -> list[dict[str, str]]:
    """Write a batch as PNGs; returns ComfyUI's UI entries {"filename", "subfolder", "type"}."""
    target = save_target(root, prefix, width=images.shape[2], height=images.shape[1], files=len(images))
    results = []
    counter = target.counter
    for batch_number, image in enumerate(images):
        pixels = to_uint8(image)
        pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        name = f"{target.basename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        with atomic_writer(target.folder / name) as handle:  # a killed run leaves no partial PNG in sight
            pil.save(handle, format="PNG", pnginfo=metadata, compress_level=compress_level)
        results.append({"filename": name, "subfolder": target.subfolder, "type": kind})
        counter += 1
    return results
