"""Files: /view, /upload/image, /upload/mask, /view_metadata/{folder}, /internal/files/{type}.

Every client-named path is confined by realpath to its folder (security.confine). Unsafe types (SVG, HTML, JS,
anything not a known media type) are never served inline.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import re
import struct
from pathlib import Path
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from latentloom.engine import jsonsafe
from latentloom.engine.files import is_part_name, write_atomically

from .security import INLINE_TYPES, BodyTooLarge, check_name, check_relative_path, confine
from .state import ServerState, json_response, server_state

ANNOTATED = re.compile(r"^(?P<name>.+) \[(?P<type>input|output|temp)\]$")
FILE_TYPES = ("input", "output", "temp")


def content_disposition(name: str, inline: bool) -> str:
    """An escaped header: an ASCII fallback plus the RFC 5987 UTF-8 form."""
    fallback = re.sub(r'[^A-Za-z0-9._ -]', "_", name) or "file"
    return f'{"inline" if inline else "attachment"}; filename="{fallback}"; filename*=UTF-8\'\'{quote(name)}'


def resolve_file(state: ServerState, filename: str, file_type: str, subfolder: str) -> Path:
    """The real path of a file named like /view names it (annotated names override the type)."""
    match = ANNOTATED.match(filename)
    if match:
        filename, file_type = match.group("name"), match.group("type")
    folder = state.folder(file_type or "output")
    if folder is None:
        raise HTTPException(400, f"invalid type '{file_type}': expected input, output or temp")
    if filename.startswith("/") or ".." in filename.replace("\\", "/").split("/"):
        raise HTTPException(400, f"invalid filename: {filename!r}")
    # A name with a folder part ('sub/x.png', as LoadImage values are written) joins the subfolder.
    head, _, name = filename.replace("\\", "/").rpartition("/")
    check_name(name)
    path = confine(folder, subfolder, head, name, status=403)
    if is_part_name(path.name) or not path.is_file():  # an unfinished write is never served
        raise HTTPException(404, "file not found")
    return path


def _encode_preview(path: Path, fmt: str, quality: int, channel: str) -> bytes:
    from PIL import Image

    with Image.open(path) as opened:
        opened.load()
        image: Image.Image = opened
        if channel == "a":
            alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
            image = Image.merge("RGBA", (Image.new("L", image.size, 0),) * 3 + (alpha,))
        elif channel == "rgb" or fmt == "jpeg":
            image = image.convert("RGB")
        elif image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA")
        buffer = io.BytesIO()
        if fmt == "png":
            image.save(buffer, "PNG")
        else:
            image.save(buffer, fmt.upper(), quality=quality)
        return buffer.getvalue()


async def view(request: Request):
    state = server_state(request)
    query = request.query_params
    filename = query.get("filename")
    if not filename:
        raise HTTPException(404, "filename is required")
    path = resolve_file(state, filename, query.get("type") or "output", query.get("subfolder") or "")
    preview = query.get("preview")
    channel = (query.get("channel") or "rgba").lower()
    if channel not in ("rgba", "rgb", "a"):
        raise HTTPException(400, "channel must be rgba, rgb or a")
    if preview or channel != "rgba":
        fmt, quality = "png", 90
        if preview:
            name, _, raw_quality = preview.partition(";")
            fmt = name.strip().lower() if name.strip().lower() in ("webp", "jpeg") else "webp"
            if "a" in channel and channel != "rgba":
                fmt = "webp"
            try:
                quality = max(1, min(100, int(raw_quality))) if raw_quality else 90
            except ValueError:
                raise HTTPException(400, "preview quality must be an integer") from None
        try:
            data = await run_in_threadpool(_encode_preview, path, fmt, quality, channel)
        except Exception as exc:
            raise HTTPException(400, f"not an image: {exc}") from exc
        return Response(data, media_type=f"image/{fmt}",
                        headers={"Content-Disposition": content_disposition(path.stem + "." + fmt, True)})
    guessed = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    inline = guessed in INLINE_TYPES
    return FileResponse(path, media_type=guessed if inline else "application/octet-stream",
                        headers={"Content-Disposition": content_disposition(path.name, inline),
                                 "Content-Security-Policy": "default-src 'none'; sandbox"})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store_upload(folder: Path, subfolder: str, name: str, data: bytes, overwrite: bool) -> str:
    """Write `data` as folder/subfolder/name; an existing same-named file with the same content is reused, a
    different one gets 'name (1).ext'. Returns the final file name."""
    check_name(name)
    target_dir = confine(folder, subfolder, status=400)
    target_dir.mkdir(parents=True, exist_ok=True)
    target_dir = confine(folder, subfolder, status=400)  # re-check: mkdir may have met a symlink
    stem, suffix = os.path.splitext(name)
    final = name
    if not overwrite:
        digest = hashlib.sha256(data).hexdigest()
        counter = 0
        while (target_dir / final).exists() or (target_dir / final).is_symlink():
            existing = confine(target_dir, final, status=400)
            if existing.is_file() and _sha256(existing) == digest:
                return final
            counter += 1
            final = f"{stem} ({counter}){suffix}"
            check_name(final)  # 'name (N).ext' may outgrow the limit
    path = confine(target_dir, final, status=400)
    write_atomically(path, data)
    return final


async def _upload_fields(request: Request) -> tuple[UploadFile, str, Path, str, str, bool, dict]:
    """(the file part, its checked base name, the target folder, its type, subfolder, overwrite, all fields)."""
    state = server_state(request)
    try:
        form = await request.form(max_files=4, max_fields=32)
    except (HTTPException, BodyTooLarge):
        raise
    except Exception as exc:
        raise HTTPException(400, f"multipart/form-data expected: {exc}") from exc
    image = form.get("image")
    if not isinstance(image, UploadFile) or not image.filename:
        raise HTTPException(400, "an 'image' file part with a file name is required")
    name = check_name(os.path.basename(image.filename.replace("\\", "/")))
    file_type = str(form.get("type") or "input")
    folder = state.folder(file_type)
    if folder is None:
        raise HTTPException(400, f"invalid type '{file_type}': expected input, output or temp")
    subfolder = str(form.get("subfolder") or "")
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    check_relative_path([subfolder.replace("\\", "/"), name])
    return image, name, folder, file_type, subfolder, overwrite, dict(form)


async def upload_image(request: Request):
    image, name, folder, file_type, subfolder, overwrite, _ = await _upload_fields(request)
    data = await image.read()
    final = await run_in_threadpool(store_upload, folder, subfolder, name, data, overwrite)
    return json_response({"name": final, "subfolder": subfolder, "type": file_type})


def _apply_mask(original: Path, mask_bytes: bytes) -> bytes:
    from PIL import Image, PngImagePlugin

    with Image.open(original) as source, Image.open(io.BytesIO(mask_bytes)) as mask:
        info = PngImagePlugin.PngInfo()
        for key, value in (source.info or {}).items():
            if isinstance(key, str) and isinstance(value, str):
                info.add_text(key, value)
        result = source.convert("RGBA")
        alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
        result.putalpha(alpha.resize(result.size))
        buffer = io.BytesIO()
        result.save(buffer, "PNG", pnginfo=info)
        return buffer.getvalue()


async def upload_mask(request: Request):
    state = server_state(request)
    image, name, folder, file_type, subfolder, overwrite, fields = await _upload_fields(request)
    try:
        ref = jsonsafe.loads(str(fields.get("original_ref") or ""))
        if not isinstance(ref, dict) or not ref.get("filename"):
            raise ValueError("original_ref needs a filename")
    except ValueError as exc:
        raise HTTPException(400, f"original_ref must be JSON {{filename, subfolder, type}}: {exc}") from exc
    original = resolve_file(state, str(ref["filename"]), str(ref.get("type") or "input"),
                            str(ref.get("subfolder") or ""))
    try:
        data = await run_in_threadpool(_apply_mask, original, await image.read())
    except Exception as exc:
        raise HTTPException(400, f"cannot apply the mask: {exc}") from exc
    final = await run_in_threadpool(store_upload, folder, subfolder, name, data, overwrite)
    return json_response({"name": final, "subfolder": subfolder, "type": file_type})


def safetensors_metadata(path: Path) -> dict | None:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024 * 1024:
            return None
        header = jsonsafe.loads(handle.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


async def view_metadata(request: Request):
    state = server_state(request)
    folder = request.path_params["folder"]
    filename = request.query_params.get("filename", "")
    if not filename.endswith(".safetensors") or folder not in state.env.model_dirs:
        return Response(status_code=404)
    try:
        path = state.env.find_model(folder, filename)
        metadata = await run_in_threadpool(safetensors_metadata, path)
    except (FileNotFoundError, ValueError, OSError):
        return Response(status_code=404)
    if metadata is None:
        return Response(status_code=404)
    return json_response(metadata)


async def internal_files(request: Request):
    state = server_state(request)
    folder = state.folder(request.path_params["kind"])
    if folder is None:
        return json_response({"error": "Invalid directory type"}, 400)
    if not Path(folder).is_dir():
        return json_response([])
    entries = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    return json_response([e.name for e in entries])


ROUTES = [
    Route("/view", view, methods=["GET"]),
    Route("/upload/image", upload_image, methods=["POST"]),
    Route("/upload/mask", upload_mask, methods=["POST"]),
    Route("/view_metadata/{folder}", view_metadata, methods=["GET"]),
]
INTERNAL_ROUTES = [Route("/files/{kind}", internal_files, methods=["GET"])]
