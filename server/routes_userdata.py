"""Users, settings and user data (saved workflows and the editor's files), all inside user_dir/default/.

`{file}` is one URL path segment that the client percent-encodes (`workflows%2Fa.json`); the router sees the
decoded path, so these handlers read the raw path to tell `a%2Fb/move/c` apart from a nested path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from latentloom.engine import jsonsafe
from latentloom.engine.files import write_atomically

from .security import confine
from .state import ServerState, bool_query, json_response, read_json, server_state

SETTINGS_FILE = "comfy.settings.json"


# Users and settings -------------------------------------------------------------------------------------------

async def get_users(request: Request):
    state = server_state(request)
    return json_response({"storage": "server", "migrated": state.user_root.is_dir()})


async def post_users(request: Request):
    # Single-user server: the one user always exists.
    return json_response({"error": "this server has a single user"}, 400)


def _load_settings(state: ServerState) -> dict:
    path = state.user_root / SETTINGS_FILE
    try:
        data = jsonsafe.loads_lenient(path.read_bytes())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_settings(state: ServerState, settings: dict) -> None:
    write_atomically(state.user_root / SETTINGS_FILE, jsonsafe.dumps(settings, indent=4).encode())


async def get_settings(request: Request):
    return json_response(_load_settings(server_state(request)))


async def get_setting(request: Request):
    settings = _load_settings(server_state(request))
    return json_response(settings.get(request.path_params["setting_id"]))


async def post_settings(request: Request):
    state = server_state(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise HTTPException(400, "a JSON object of settings is expected")
    with state.settings_lock:
        settings = _load_settings(state)
        settings.update(body)
        _save_settings(state, settings)
    return Response(status_code=200)


async def post_setting(request: Request):
    state = server_state(request)
    value = await read_json(request)
    with state.settings_lock:
        settings = _load_settings(state)
        settings[request.path_params["setting_id"]] = value
        _save_settings(state, settings)
    return Response(status_code=200)


# User data ----------------------------------------------------------------------------------------------------

def _file_info(path: Path, root: Path) -> dict:
    info = path.stat()
    return {"path": path.relative_to(root).as_posix(), "size": info.st_size, "modified": info.st_mtime,
            "created": info.st_ctime}


def _user_path(state: ServerState, relative: str, status: int = 403) -> Path:
    if not relative or relative.endswith("/"):
        raise HTTPException(400, "a file path is required")
    return confine(state.user_root, relative, status=status)


async def list_userdata(request: Request):
    state = server_state(request)
    directory = request.query_params.get("dir")
    if not directory:
        raise HTTPException(400, "dir is required")
    root = state.user_root
    base = confine(root, directory)
    if not base.is_dir():
        return Response(status_code=404)
    recurse = bool_query(request, "recurse")
    full_info = bool_query(request, "full_info")
    split = bool_query(request, "split")
    paths = base.rglob("*") if recurse else base.iterdir()
    files = sorted(p for p in paths if p.is_file() and Path(os.path.realpath(p)).is_relative_to(root))
    result: list[Any]
    if full_info:
        result = [_file_info(p, base) for p in files]
    elif split:
        result = [[p.relative_to(base).as_posix(), *p.relative_to(base).parts] for p in files]
    else:
        result = [p.relative_to(base).as_posix() for p in files]
    return json_response(result)


async def list_userdata_v2(request: Request):
    state = server_state(request)
    root = state.user_root
    if not root.is_dir():
        return json_response([])
    relative = request.query_params.get("path", "")
    base = confine(root, relative)
    if not base.exists():
        return Response(status_code=404)
    if not base.is_dir():
        raise HTTPException(400, "path is not a directory")
    entries: list[dict[str, Any]] = []
    for path in base.rglob("*"):
        if not Path(os.path.realpath(path)).is_relative_to(root):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            entries.append({"name": path.name, "path": rel, "type": "directory"})
        elif path.is_file():
            info = path.stat()
            entries.append({"name": path.name, "path": rel, "type": "file", "size": info.st_size,
                            "modified": info.st_mtime})
    entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
    return json_response(entries)


def _segments(request: Request) -> list[str]:
    """The percent-decoded segments after /userdata/ in the raw (still encoded) request path."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    raw_text = raw.decode("latin-1").split("?", 1)[0]
    marker = "/userdata/"
    tail = raw_text[raw_text.index(marker) + len(marker):] if marker in raw_text else ""
    return [unquote(part) for part in tail.split("/")]


def _written(path: Path, root: Path, full_info: bool):
    return _file_info(path, root) if full_info else path.relative_to(root).as_posix()


async def userdata_file(request: Request):
    state = server_state(request)
    root = state.user_root
    segments = _segments(request)
    if len(segments) == 3 and segments[1] == "move" and request.method == "POST":
        return await _move(request, state, segments[0], segments[2])
    if len(segments) != 1:
        raise HTTPException(400, "encode nested paths as one segment (a%2Fb.json)")
    path = _user_path(state, segments[0])
    if request.method == "GET":
        if not path.is_file():
            return Response(status_code=404)
        return FileResponse(path)
    if request.method == "DELETE":
        if not path.is_file():
            return Response(status_code=404)
        path.unlink()
        return Response(status_code=204)
    overwrite = bool_query(request, "overwrite", True)
    if path.exists() and not overwrite:
        return Response(status_code=409)
    if path.is_dir():
        raise HTTPException(400, "the path is a directory")
    body = await request.body()
    try:
        await run_in_threadpool(write_atomically, path, body)
    except OSError as exc:
        raise HTTPException(400, f"cannot write the file: {exc.strerror}") from exc
    return json_response(_written(path, root, bool_query(request, "full_info")))


async def _move(request: Request, state: ServerState, source: str, dest: str):
    root = state.user_root
    source_path = _user_path(state, source)
    dest_path = _user_path(state, dest)  # the destination is confined too (ComfyUI re-checks the source)
    if not source_path.is_file():
        return Response(status_code=404)
    if dest_path.exists() and not bool_query(request, "overwrite", True):
        return Response(status_code=409)
    try:
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        confine(root, dest)  # mkdir may have followed a symlink
        os.replace(source_path, dest_path)
    except OSError as exc:
        raise HTTPException(400, f"cannot move the file: {exc.strerror}") from exc
    return json_response(_written(dest_path, root, bool_query(request, "full_info")))


ROUTES = [
    Route("/users", get_users, methods=["GET"]),
    Route("/users", post_users, methods=["POST"]),
    Route("/settings", get_settings, methods=["GET"]),
    Route("/settings", post_settings, methods=["POST"]),
    Route("/settings/{setting_id}", get_setting, methods=["GET"]),
    Route("/settings/{setting_id}", post_setting, methods=["POST"]),
    Route("/userdata", list_userdata, methods=["GET"]),
    Route("/userdata/{rest:path}", userdata_file, methods=["GET", "POST", "DELETE"]),
    Route("/v2/userdata", list_userdata_v2, methods=["GET"]),
]
