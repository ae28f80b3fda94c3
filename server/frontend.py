"""The ComfyUI web frontend (the `comfyui-frontend-package` wheel) served at `/`, plus the small routes it reads at
boot: /extensions (our one JS module), /i18n (no extra translations) and /templates/* (the bundled template index:
empty; our graphs/ come through /workflow_templates instead).

The frontend's built-in default graph uses node types we do not have (1.58 ships a Z-Image graph), so our
extension swaps it, before the first graph loads, for the server's default graph (/latentloom/default_graph: the
graphs/ workflow named default, else the first txt2img one, else the first one, in UI format)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}


def frontend_root() -> Path | None:
    """The package's static/ folder, found through the installed package (None when it is not installed)."""
    try:
        root = importlib.resources.files("comfyui_frontend_package") / "static"
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "index.html").is_file() else None


EXTENSION_URL = "/extensions/latentloom/latentloom.js"
# Runs when the frontend imports its extensions, which is before it loads the first graph. The default graph is a
# shared object: replacing its contents changes every later "load default" too.
EXTENSION_JS = """// latentloom: make the editor's default graph one that this server can run.
try {
  const response = await fetch('api/latentloom/default_graph');
  const target = window.comfyAPI && window.comfyAPI.defaultGraph && window.comfyAPI.defaultGraph.defaultGraph;
  if (response.ok && target) {
    const graph = await response.json();
    if (graph && Array.isArray(graph.nodes)) {
      for (const key of Object.keys(target)) delete target[key];
      Object.assign(target, graph);
    }
  }
} catch (error) {
  console.warn('[latentloom] default graph not replaced:', error);
}
export {};
"""


async def extensions(request: Request):
    """Our module, then the .js files of the custom node packs' web folders (the frontend imports each)."""
    from starlette.concurrency import run_in_threadpool

    from .pack_routes import extension_urls

    pack_urls = await run_in_threadpool(extension_urls, request.app.state.server.engine)
    return JSONResponse([EXTENSION_URL, *pack_urls])


async def extension_script(request: Request):
    return Response(EXTENSION_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


def default_graph_file(graphs_dir: Path | None) -> Path | None:
    if graphs_dir is None or not Path(graphs_dir).is_dir():
        return None
    files = sorted(Path(graphs_dir).glob("*.json"))
    for candidates in ([f for f in files if f.stem == "default"], [f for f in files if f.stem.startswith("txt2img")],
                       files):
        if candidates:
            return candidates[0]
    return None


def _default_graph(state) -> dict | None:
    import json

    path = default_graph_file(state.config.graphs_dir)
    if path is None:
        return None
    document = json.loads(path.read_text())
    if not (isinstance(document, dict) and isinstance(document.get("nodes"), list)):
        from latentloom.engine.workflow import api_to_ui

        document = with_view(api_to_ui(document, state.engine.catalogue()))
    return document


def with_view(graph: dict) -> dict:
    """A view that puts the nodes' top-left corner clear of the editor's menus (for graphs we laid out)."""
    extra = graph.setdefault("extra", {})
    placed = [node.get("pos") for node in graph.get("nodes", []) if isinstance(node, dict)]
    positions: list[Any] = [p for p in placed if isinstance(p, (list, tuple)) and len(p) == 2]
    if positions:
        left = min(float(p[0]) for p in positions)
        top = min(float(p[1]) for p in positions)
        extra["ds"] = {"scale": 1.0, "offset": [120.0 - left, 120.0 - top]}
    return graph


async def default_graph(request: Request):
    from starlette.concurrency import run_in_threadpool

    state = request.app.state.server
    try:
        graph = await run_in_threadpool(_default_graph, state)
    except Exception as exc:  # a broken graphs/ file must not break the editor: it keeps its own default
        return JSONResponse({"error": f"default graph unavailable: {exc}"}, status_code=404)
    if graph is None:
        return JSONResponse({"error": "no graphs to offer"}, status_code=404)
    return JSONResponse(graph)


async def i18n(request: Request):
    return JSONResponse({})


async def templates(request: Request):
    name = request.path_params["name"]
    if name.startswith("index") and name.endswith(".json"):
        return JSONResponse([])
    return Response(status_code=404)


class FrontendFiles(StaticFiles):
    """Static files with ComfyUI's cache policy: scripts and styles revalidate, the index never caches."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        if path in ("", ".", "index.html") or path.endswith((".js", ".css", ".json")):
            response.headers.update(NO_CACHE if path in ("", ".", "index.html") else {"Cache-Control": "no-cache"})
        return response


async def user_css(request: Request):
    # index.html links an optional user stylesheet; an empty one keeps the console free of MIME errors.
    return Response("", media_type="text/css")


def api_routes() -> list:
    return [Route("/extensions", extensions, methods=["GET"]), Route("/i18n", i18n, methods=["GET"]),
            Route("/latentloom/default_graph", default_graph, methods=["GET"])]


def static_routes(root: Path | None) -> list:
    routes: list = [Route("/templates/{name:path}", templates, methods=["GET"]),
                    Route("/user.css", user_css, methods=["GET"]),
                    Route(EXTENSION_URL, extension_script, methods=["GET"])]
    if root is None:
        async def missing(request: Request):
            return Response("comfyui-frontend-package is not installed: the API works, the editor is missing.\n",
                            media_type="text/plain", status_code=404)
        routes.append(Route("/", missing, methods=["GET"]))
        return routes
    index = Path(root) / "index.html"

    async def home(request: Request):
        return FileResponse(index, headers=NO_CACHE)

    routes.append(Route("/", home, methods=["GET"]))
    routes.append(Mount("/", app=FrontendFiles(directory=str(root), html=False), name="frontend"))
    return routes
