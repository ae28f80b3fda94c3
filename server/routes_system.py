"""Catalogue, models and system: /object_info, /embeddings, /models, /experiment/models, /system_stats,
/features, /workflow_templates, /global_subgraphs and the /internal logs and folder routes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from latentloom.engine.environment import MODEL_FOLDERS

from .security import check_name, confine
from .state import ServerState, json_response, read_json, server_state

TEMPLATE_PACK = "latentloom"
# The ComfyUI API level we speak and the frontend we ship (the frontend warns when it is older than required).
COMFYUI_API_VERSION = "0.3.64"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def features(state: ServerState) -> dict:
    return {"supports_preview_metadata": True, "max_upload_size": float(state.config.max_upload_bytes)}


async def object_info(request: Request):
    state = server_state(request)
    return json_response(await run_in_threadpool(state.engine.catalogue))


async def object_info_one(request: Request):
    state = server_state(request)
    name = request.path_params["node_class"]
    node_cls = state.engine.registry.get(name)
    if node_cls is None:
        return json_response({})
    from latentloom.engine.registry import node_info

    return json_response({name: await run_in_threadpool(node_info, node_cls, state.env)})


async def embeddings(request: Request):
    env = server_state(request).env
    names = await run_in_threadpool(env.list_models, "embeddings")
    return json_response([os.path.splitext(n)[0] for n in names])


async def models(request: Request):
    return json_response(sorted(server_state(request).env.model_dirs))


def _model_folder(state: ServerState, request: Request) -> str:
    folder = request.path_params["folder"]
    if folder not in state.env.model_dirs:
        raise HTTPException(404, f"unknown model folder '{folder}'")
    return folder


async def models_in(request: Request):
    state = server_state(request)
    folder = _model_folder(state, request)
    return json_response(await run_in_threadpool(state.env.list_models, folder))


async def experiment_models(request: Request):
    env = server_state(request).env
    return json_response([{"name": name, "folders": [str(d) for d in dirs]}
                          for name, dirs in sorted(env.model_dirs.items())])


def _model_files(state: ServerState, folder: str) -> list[dict]:
    extensions = MODEL_FOLDERS.get(folder, ())
    found = []
    for index, directory in enumerate(state.env.model_dirs.get(folder, [])):
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*")):
            if path.is_file() and (not extensions or path.suffix.lower() in extensions):
                info = path.stat()
                found.append({"name": path.relative_to(directory).as_posix(), "pathIndex": index,
                              "modified": info.st_mtime, "created": info.st_ctime, "size": info.st_size})
    return found


async def experiment_models_in(request: Request):
    state = server_state(request)
    folder = _model_folder(state, request)
    return json_response(await run_in_threadpool(_model_files, state, folder))


PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".preview.jpg", ".webp", ".preview.webp")


def _model_preview(state: ServerState, folder: str, index: int, filename: str) -> bytes | None:
    """A picture stored beside a model file (`x.png`, `x.preview.jpg`, ...), re-encoded as WebP."""
    import io

    from PIL import Image

    directories = state.env.model_dirs.get(folder, [])
    if not 0 <= index < len(directories):
        return None
    model = confine(directories[index], filename, status=404)
    for suffix in PREVIEW_SUFFIXES:
        candidate = model.with_name(model.stem + suffix)
        if candidate.is_file() and candidate.resolve().is_relative_to(Path(directories[index]).resolve()):
            with Image.open(candidate) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "WEBP", quality=80)
                return buffer.getvalue()
    return None


async def experiment_model_preview(request: Request):
    state = server_state(request)
    folder = _model_folder(state, request)
    try:
        index = int(request.path_params["path_index"])
        data = await run_in_threadpool(_model_preview, state, folder, index, request.path_params["filename"])
    except (ValueError, OSError):
        data = None
    if data is None:
        return Response(status_code=404)
    return Response(data, media_type="image/webp")


def _memory() -> tuple[int, int]:
    total = free = 0
    try:
        with open("/proc/meminfo") as handle:
            values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if ":" in line}
        total, free = values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return total, free


def _devices(ram_total: int, ram_free: int) -> list[dict]:
    torch = sys.modules.get("torch")  # never import torch just for a health check
    if torch is not None and torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "type": "cuda",
                            "index": index, "vram_total": total, "vram_free": free,
                            "torch_vram_total": torch.cuda.memory_reserved(index),
                            "torch_vram_free": torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)})
        return devices
    return [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
             "torch_vram_total": 0, "torch_vram_free": 0}]


async def system_stats(request: Request):
    ram_total, ram_free = _memory()
    load_errors = dict(server_state(request).engine.registry.load_errors)
    frontend = _version("comfyui-frontend-package")
    return json_response({
        "system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                   "comfyui_version": COMFYUI_API_VERSION, "latentloom_version": _version("latentloom"),
                   "required_frontend_version": frontend, "installed_templates_version": "",
                   "required_templates_version": "", "python_version": sys.version,
                   "pytorch_version": _version("torch"), "embedded_python": False,
                   # ComfyUI shows the real argv; ours may hold an auth token, so only the command is shown.
                   "argv": ["latentloom", "serve"], "platform": platform.platform(),
                   # Custom node packs (or single nodes) that failed to load, with their first error.
                   "custom_node_errors": load_errors},
        "devices": _devices(ram_total, ram_free)})


async def get_features(request: Request):
    return json_response(features(server_state(request)))


def _graphs_dir(state: ServerState) -> Path | None:
    folder = state.config.graphs_dir
    return Path(folder) if folder and Path(folder).is_dir() else None


async def workflow_templates(request: Request):
    folder = _graphs_dir(server_state(request))
    names = sorted(p.stem for p in folder.glob("*.json")) if folder else []
    return json_response({TEMPLATE_PACK: names} if names else {})


async def workflow_template_file(request: Request):
    folder = _graphs_dir(server_state(request))
    if folder is None or request.path_params["module"] != TEMPLATE_PACK:
        return Response(status_code=404)
    name = check_name(request.path_params["name"])
    path = confine(folder, name if name.endswith(".json") else name + ".json", status=404)
    if not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="application/json")


async def global_subgraphs(request: Request):
    return json_response({})


async def logs(request: Request):
    entries = server_state(request).logs.snapshot()
    return json_response("".join(f"{e['t']} - {e['m']}" for e in entries))


async def logs_raw(request: Request):
    entries = server_state(request).logs.snapshot()
    return json_response({"entries": entries, "size": {"cols": 80, "rows": 24}})


async def logs_subscribe(request: Request):
    state = server_state(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not body.get("clientId"):
        raise HTTPException(400, "clientId is required")
    state.hub.set_log_subscription(str(body["clientId"]), bool(body.get("enabled")))
    return Response(status_code=200)


async def folder_paths(request: Request):
    state = server_state(request)
    paths = {name: [str(d) for d in dirs] for name, dirs in state.env.model_dirs.items()}
    paths.update({kind: [str(state.folder(kind))] for kind in ("input", "output", "temp")})
    return json_response(paths)


ROUTES = [
    Route("/object_info", object_info, methods=["GET"]),
    Route("/object_info/{node_class}", object_info_one, methods=["GET"]),
    Route("/embeddings", embeddings, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/models/{folder}", models_in, methods=["GET"]),
    Route("/experiment/models", experiment_models, methods=["GET"]),
    Route("/experiment/models/{folder}", experiment_models_in, methods=["GET"]),
    Route("/experiment/models/preview/{folder}/{path_index}/{filename:path}", experiment_model_preview,
          methods=["GET"]),
    Route("/system_stats", system_stats, methods=["GET"]),
    Route("/features", get_features, methods=["GET"]),
    Route("/workflow_templates", workflow_templates, methods=["GET"]),
    Route("/global_subgraphs", global_subgraphs, methods=["GET"]),
]
# Only with the /api prefix, as in ComfyUI.
API_ONLY_ROUTES = [Route("/workflow_templates/{module}/{name}", workflow_template_file, methods=["GET"])]
INTERNAL_ROUTES = [
    Route("/logs", logs, methods=["GET"]),
    Route("/logs/raw", logs_raw, methods=["GET"]),
    Route("/logs/subscribe", logs_subscribe, methods=["PATCH"]),
    Route("/folder_paths", folder_paths, methods=["GET"]),
]
