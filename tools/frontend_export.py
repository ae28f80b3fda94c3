"""Ask the real ComfyUI frontend what its Export (API) makes of UI workflow files, and compare with ours.

    .venv/bin/python tools/frontend_export.py --catalogue object_info.json FILE... [--compare] [--out OUT.json]

Serves comfyui-frontend-package's static app and a minimal API (users, settings, extensions, the given
catalogue as /object_info) on a loopback port, loads each file into the app in headless Chromium and calls
its graphToPrompt(). Needs `node`, a Chromium (tools/install_browser.sh; --chromium to point elsewhere) and
playwright-core, which is installed with npm into --npm-dir the first time. With --compare, prints which
files engine.workflow.ui_to_api converts identically. This is how the fixtures' expected API files and
tests/workflow_fixtures/frontend_export_hashes.json were checked; it is a developer tool, not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentloom.engine.workflow import WorkflowFormatError, ui_to_api  # noqa: E402

HERE = Path(__file__).resolve().parent
NODE_DEFAULTS = {"description": "", "python_module": "nodes", "category": "latentloom", "output_node": False}
SETTINGS = {"Comfy.TutorialCompleted": True}


def stub_app(catalogue: dict) -> Starlette:
    import comfyui_frontend_package

    static = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    object_info = {name: {**NODE_DEFAULTS, "name": name, "display_name": name, **entry}
                   for name, entry in catalogue.items()}

    async def users(_: Request):
        return JSONResponse({"storage": "server", "migrated": True})

    async def settings(_: Request):
        return JSONResponse(SETTINGS)

    async def setting(request: Request):
        return JSONResponse({} if request.method == "POST" else SETTINGS.get(request.path_params["key"]))

    async def extensions(_: Request):
        return JSONResponse([])

    async def nodes(_: Request):
        return JSONResponse(object_info)

    async def not_found(_: Request):
        return PlainTextResponse("404: Not Found", status_code=404)

    methods = ["GET", "POST", "PATCH", "DELETE"]
    return Starlette(routes=[
        Route("/api/users", users),
        Route("/api/settings", settings, methods=["GET", "POST"]),
        Route("/api/settings/{key:path}", setting, methods=["GET", "POST"]),
        Route("/api/extensions", extensions),
        Route("/api/object_info", nodes),
        Route("/api/{rest:path}", not_found, methods=methods),
        Route("/internal/{rest:path}", not_found, methods=methods),
        Route("/templates/{rest:path}", not_found),
        Mount("/", StaticFiles(directory=static, html=True)),
    ])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_playwright(npm_dir: Path) -> Path:
    modules = npm_dir / "node_modules"
    if not (modules / "playwright-core").is_dir():
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(npm_dir), "playwright-core@1"], check=True)
    return modules


def frontend_exports(files: list[Path], catalogue: dict, chromium: str, npm_dir: Path) -> dict[str, dict]:
    modules = ensure_playwright(npm_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(catalogue), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.1)
        env = {**os.environ, "NODE_PATH": str(modules)}
        done = subprocess.run(
            ["node", str(HERE / "frontend_export.js"), f"http://127.0.0.1:{port}/", chromium, *map(str, files)],
            check=True, capture_output=True, text=True, env=env,
        )
        return json.loads(done.stdout)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--npm-dir", type=Path, default=Path.home() / ".cache" / "latentloom-frontend-check")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    catalogue = json.loads(args.catalogue.read_text())
    exports = frontend_exports(args.files, catalogue, args.chromium, args.npm_dir)
    if args.out:
        args.out.write_text(json.dumps(exports, indent=1))
    if not args.compare:
        if not args.out:
            print(json.dumps(exports, indent=1))
        return
    summary = {"identical": 0, "different": [], "frontend_failed": []}
    for file, exported in exports.items():
        if "__not_loaded__" in exported or "__error__" in exported:
            summary["frontend_failed"].append(file)
            continue
        try:
            ours = ui_to_api(json.loads(Path(file).read_text()), catalogue)
        except WorkflowFormatError as error:
            ours = {"__error__": str(error)}
        if ours == exported:
            summary["identical"] += 1
        else:
            summary["different"].append(file)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
