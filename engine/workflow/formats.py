"""Recognise and load a workflow from any of the forms people share it in.

Accepted: an API prompt (JSON object of id -> {class_type, inputs}), a POST /prompt body wrapping one, an
editor (UI) workflow, and PNG images carrying `prompt` and/or `workflow` text chunks (as ComfyUI and we write
them: tEXt, also zTXt / iTXt). From a PNG the `prompt` chunk is preferred because it is exactly what ran;
without it the `workflow` chunk is converted.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

from latentloom.engine import jsonsafe
from latentloom.engine.workflow.api_to_ui import api_to_ui
from latentloom.engine.workflow.catalogue import WorkflowFormatError
from latentloom.engine.workflow.ui_to_api import ui_to_api

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DocumentFormat = Literal["api", "ui"]
SourceFormat = Literal["api_json", "ui_json", "png_prompt", "png_workflow"]
MAX_TEXT_BYTES = 64 * 1024 * 1024  # a workflow chunk is JSON text; refuse decompression bombs
OTHER_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"RIFF": "WebP/RIFF",
}


def read_png_text_chunks(data: bytes) -> dict[str, str]:
    """Keyword -> text of every tEXt, zTXt and iTXt chunk of a PNG file."""
    if not data.startswith(PNG_SIGNATURE):
        raise WorkflowFormatError("not a PNG file (bad signature)")
    texts: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, chunk_type = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if len(body) < length:
            raise WorkflowFormatError("PNG file is truncated")
        if chunk_type == b"IEND":
            break
        if chunk_type in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _decode_text_chunk(chunk_type, body)
            texts.setdefault(keyword, text)
    return texts


def _inflate(payload: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(payload, MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise WorkflowFormatError("PNG text chunk decompresses to more than 64 MiB")
    return out


def _decode_text_chunk(chunk_type: bytes, body: bytes) -> tuple[str, str]:
    keyword, _, rest = body.partition(b"\0")
    name = keyword.decode("latin-1")
    try:
        if chunk_type == b"tEXt":
            return name, rest.decode("latin-1")
        if chunk_type == b"zTXt":
            return name, _inflate(rest[1:]).decode("latin-1")
        compressed = rest[0]  # iTXt: flag, method, language\0, translated keyword\0, text
        _language, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return name, (_inflate(text) if compressed else text).decode("utf-8")
    except (zlib.error, IndexError, UnicodeDecodeError) as error:
        raise WorkflowFormatError(f"PNG text chunk {name!r} is corrupt: {error}") from error


def detect_format(document: Any) -> DocumentFormat:
    """'ui' or 'api' for a parsed JSON document; WorkflowFormatError says what it looks like otherwise."""
    if not isinstance(document, dict):
        raise WorkflowFormatError(f"a workflow must be a JSON object, got {type(document).__name__}")
    if isinstance(document.get("nodes"), list):
        return "ui"
    if document and all(isinstance(v, dict) and isinstance(v.get("class_type"), str) for v in document.values()):
        return "api"
    if not document:
        raise WorkflowFormatError("the workflow is empty")
    odd = next(k for k, v in document.items() if not (isinstance(v, dict) and "class_type" in v))
    raise WorkflowFormatError(
        "unknown workflow format: neither a UI workflow (no 'nodes' list) nor an API prompt "
        f"(entry {odd!r} has no 'class_type')"
    )


def _unwrap_request(document: Any) -> tuple[Any, dict[str, Any] | None]:
    """A POST /prompt body {prompt, extra_data: {extra_pnginfo: {workflow}}} -> (prompt, workflow)."""
    if isinstance(document, dict) and isinstance(document.get("prompt"), dict) and "nodes" not in document:
        extra = document.get("extra_data") or {}
        workflow = (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra, dict) else None
        inner = document["prompt"]
        if inner and all(isinstance(v, dict) and "class_type" in v for v in inner.values()):
            return inner, workflow if isinstance(workflow, dict) else None
    return document, None


def _parse_json(text: bytes | str, what: str) -> Any:
    """The one JSON reader for files and PNG chunks (engine.jsonsafe): malformed JSON, NaN/Infinity, lone
    surrogates, huge integers and absurd nesting are all a WorkflowFormatError saying where."""
    try:
        return jsonsafe.loads(text)
    except jsonsafe.JsonInputError as error:
        raise WorkflowFormatError(f"{what} is not valid JSON: {error}") from error


def _need_catalogue(catalogue: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    if catalogue is None:
        raise WorkflowFormatError("converting a UI workflow needs the node catalogue")
    return catalogue


def load_document(
    document: Any, catalogue: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, Any], dict[str, Any] | None, SourceFormat]:
    document, wrapped_workflow = _unwrap_request(document)
    kind = detect_format(document)
    if kind == "api":
        return document, wrapped_workflow, "api_json"
    return ui_to_api(document, _need_catalogue(catalogue)), document, "ui_json"


def load_png(
    data: bytes, catalogue: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, Any], dict[str, Any] | None, SourceFormat]:
    chunks = read_png_text_chunks(data)
    workflow = None
    if "workflow" in chunks:
        workflow = _parse_json(chunks["workflow"], "the PNG's 'workflow' chunk")
        if detect_format(workflow) != "ui":
            raise WorkflowFormatError("the PNG's 'workflow' chunk is not a UI workflow")
    if "prompt" in chunks:
        prompt = _parse_json(chunks["prompt"], "the PNG's 'prompt' chunk")
        if detect_format(prompt) != "api":
            raise WorkflowFormatError("the PNG's 'prompt' chunk is not an API prompt")
        return prompt, workflow, "png_prompt"
    if workflow is not None:
        return ui_to_api(workflow, _need_catalogue(catalogue)), workflow, "png_workflow"
    if "parameters" in chunks:
        raise WorkflowFormatError(
            "the PNG has A1111-style 'parameters' text but no ComfyUI 'prompt' or 'workflow' chunk")
    raise WorkflowFormatError("the PNG carries no workflow (no 'prompt' or 'workflow' text chunk)")


def load_workflow(
    source: str | os.PathLike[str] | bytes | dict[str, Any], catalogue: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, Any], dict[str, Any] | None, SourceFormat]:
    """(api_prompt, ui_workflow or None, detected format) from a file path, raw bytes or a parsed document.

    The detected format is one of 'api_json', 'ui_json', 'png_prompt' (PNG, its `prompt` chunk used) and
    'png_workflow' (PNG with only a `workflow` chunk, converted). Anything else raises WorkflowFormatError.
    """
    where = "the input"
    if isinstance(source, dict):
        try:
            jsonsafe.check(source)
        except jsonsafe.JsonInputError as error:
            raise WorkflowFormatError(f"the workflow is not valid JSON: {error}") from error
        return load_document(source, catalogue)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"workflow file not found: {path}") from error
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise WorkflowFormatError(f"cannot load a workflow from a {type(source).__name__}")
    try:
        if data.startswith(PNG_SIGNATURE):
            return load_png(data, catalogue)
        for signature, kind in OTHER_SIGNATURES.items():
            if data.startswith(signature):
                raise WorkflowFormatError(f"{kind} images are not read for workflows; use the PNG or JSON file")
        stripped = data.lstrip()
        if not stripped.startswith((b"{", b"[")):
            raise WorkflowFormatError("unknown format: neither JSON nor a PNG image")
        return load_document(_parse_json(data, "the file"), catalogue)
    except WorkflowFormatError as error:
        raise WorkflowFormatError(f"{where}: {error}") from error


def convert_workflow(
    source: str | os.PathLike[str] | bytes | dict[str, Any],
    to: Literal["api", "ui"],
    catalogue: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], SourceFormat]:
    """(the workflow in the requested format, the detected source format), for `convert FILE --to api|ui`.

    Asking for UI gives back the source's own UI workflow when it has one (a UI file, a PNG's `workflow`
    chunk), and a laid-out conversion of the API prompt otherwise.
    """
    prompt, workflow, detected = load_workflow(source, catalogue)
    if to == "api":
        return prompt, detected
    if to == "ui":
        return (workflow if workflow is not None else api_to_ui(prompt, catalogue)), detected
    raise WorkflowFormatError(f"unknown target format {to!r}: use 'api' or 'ui'")
