"""End to end in headless Chromium: the real ComfyUI frontend (comfyui-frontend-package) boots against our server,
loads a graph, queues it, receives progress and previews, shows the output image; an invalid graph marks its node.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright package
(`PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright`; it never downloads a browser here). Screenshots go
to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.server_support import live_server, make_app

CHROMIUM = os.environ.get("LATENTLOOM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REPO = Path(__file__).resolve().parent.parent
EDITOR_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed "
                       "(PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
]


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def new_user_root(root: Path) -> None:
    """A user who has seen the tutorial, so the template browser does not cover the canvas."""
    user = root / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))


@pytest.fixture()
def browser():
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


def open_editor(browser, base: str):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base + "/")
    page.wait_for_function("() => window.app && window.app.graph && window.app.api", timeout=60_000)
    page.errors = errors
    return page


RECORD_EVENTS = """() => {
    window.__events = [];
    for (const type of ['execution_start', 'executing', 'progress', 'b_preview', 'executed',
                        'execution_success', 'execution_error'])
        window.app.api.addEventListener(type, (e) => window.__events.push(type));
}"""


def test_editor_runs_a_graph_and_shows_the_output(tmp_path, browser):
    new_user_root(tmp_path)
    graph = {"1": {"class_type": "Const", "inputs": {"value": 0.7}},
             "2": {"class_type": "PreviewSteps", "inputs": {"value": ["1", 0], "steps": 5}},
             "3": {"class_type": "SaveTestImage", "inputs": {"value": ["2", 0], "filename_prefix": "browser"}}}
    # Previews on, as `latentloom serve --preview-method auto` (the default, as ComfyUI's, is none).
    with live_server(make_app(tmp_path, preview_method="auto")) as base:
        page = open_editor(browser, base)
        screenshot(page, "editor_boot")
        page.evaluate(RECORD_EVENTS)
        page.evaluate("async (g) => await window.app.loadApiJson(g, 'browser-test.json')", graph)
        types = page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")
        assert types == ["Const", "PreviewSteps", "SaveTestImage"]
        assert page.evaluate("async () => await window.app.queuePrompt(0, 1)") is True
        page.wait_for_function("() => window.__events.includes('execution_success')", timeout=30_000)
        # The output image is fetched from /api/view and drawn on the node.
        page.wait_for_function("""() => {
            const node = window.app.graph.getNodeById(3);
            return node.imgs && node.imgs.length && node.imgs[0].complete && node.imgs[0].naturalWidth === 96;
        }""", timeout=30_000)
        events = page.evaluate("() => window.__events")
        assert events.count("progress") == 5 and events.count("b_preview") == 5
        assert events.index("execution_start") < events.index("executed") < events.index("execution_success")
        src = page.evaluate("() => window.app.graph.getNodeById(3).imgs[0].src")
        assert "/api/view?filename=browser_" in src and "type=output" in src
        screenshot(page, "editor_output")
        assert not page.errors, page.errors
    outputs = list((tmp_path / "output").glob("browser_*.png"))
    assert len(outputs) == 1


def test_default_graph_is_the_servers(tmp_path, browser):
    """The frontend's built-in default graph (node types we lack) is replaced by the server's default graph."""
    new_user_root(tmp_path)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "default.json").write_text(json.dumps({
        "1": {"class_type": "Const", "inputs": {"value": 0.25}},
        "2": {"class_type": "SaveTestImage", "inputs": {"value": ["1", 0], "filename_prefix": "default"}}}))
    with live_server(make_app(tmp_path, graphs_dir=graphs)) as base:
        page = open_editor(browser, base)
        page.wait_for_function("() => window.app.graph._nodes.length > 0", timeout=30_000)
        types = page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")
        assert types == ["Const", "SaveTestImage"]
        page.evaluate(RECORD_EVENTS)
        assert page.evaluate("async () => await window.app.queuePrompt(0, 1)") is True
        page.wait_for_function("() => window.__events.includes('execution_success')", timeout=30_000)
        screenshot(page, "editor_default_graph")
        assert not page.errors, page.errors


def test_editor_works_behind_an_auth_token(tmp_path, browser):
    """Opening /?token=T once sets the cookie; the editor's fetches and websocket then authenticate with it."""
    new_user_root(tmp_path)
    with live_server(make_app(tmp_path, auth_token="tok-123")) as base:
        page = browser.new_page()
        assert page.goto(base + "/api/queue").status == 401
        page.goto(base + "/?token=tok-123")
        assert page.url == base + "/"
        page.wait_for_function("() => window.app && window.app.graph && window.app.api", timeout=60_000)
        page.wait_for_function("() => window.app.api.socket && window.app.api.socket.readyState === 1",
                               timeout=30_000)
        assert page.evaluate("async () => (await fetch('api/queue')).status") == 200
        screenshot(page, "editor_with_token")


def test_invalid_graph_marks_the_failing_node(tmp_path, browser):
    new_user_root(tmp_path)
    graph = {"1": {"class_type": "EvenOnly", "inputs": {"value": 3}},
             "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}
    with live_server(make_app(tmp_path)) as base:
        page = open_editor(browser, base)
        page.evaluate("async (g) => await window.app.loadApiJson(g, 'invalid.json')", graph)
        assert page.evaluate("async () => await window.app.queuePrompt(0, 1)") is False
        page.wait_for_function("() => window.app.lastNodeErrors && window.app.lastNodeErrors['1']",
                               timeout=15_000)
        errors = page.evaluate("() => window.app.lastNodeErrors")
        assert errors["1"]["errors"][0]["type"] == "custom_validation_failed"
        assert page.evaluate("() => window.app.graph.getNodeById(1).has_errors") is True
        assert not page.evaluate("() => window.app.graph.getNodeById(2).has_errors")
        screenshot(page, "editor_invalid_graph")


def runnable(engine, prompt: dict) -> bool:
    """Valid here, and every image a LoadImage* node reads exists (those names are checked only at run time)."""
    if not engine.validate(prompt).ok:
        return False
    for node in prompt.values():
        if node["class_type"].startswith("LoadImage"):
            name = str(node["inputs"].get("image", "")).split(" [")[0]
            if not (Path(engine.env.input_dir) / name).is_file():
                return False
    return True


def test_graphs_folder_opens_and_runs_in_the_editor(tmp_path, browser):
    """Every graph in graphs/ opens with known node types; those whose models are present in models/ (e.g. the
    toy checkpoint) are also queued from the editor, with progress and the output image checked."""
    graphs = sorted((REPO / "graphs").glob("*.json"))
    if not graphs:
        pytest.skip("graphs/ has no workflows yet")
    new_user_root(tmp_path)
    from latentloom.nodes import create_engine
    from latentloom.server.app import create_app
    from latentloom.server.state import ServerConfig

    input_dir = REPO / "input" if (REPO / "input").is_dir() else tmp_path / "input"
    engine = create_engine(models_dir=REPO / "models", input_dir=input_dir,
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp")
    app = create_app(engine, ServerConfig(user_dir=tmp_path / "user", graphs_dir=REPO / "graphs"))
    known = set(engine.registry.names())
    with live_server(app) as base:
        page = open_editor(browser, base)
        templates = page.evaluate("async () => (await (await fetch('api/workflow_templates')).json())")
        assert sorted(templates["latentloom"]) == sorted(p.stem for p in graphs)
        for path in graphs:
            document = page.evaluate(
                "async (n) => (await fetch('api/workflow_templates/latentloom/' + n + '.json')).json()", path.stem)
            if isinstance(document.get("nodes"), list):
                page.evaluate("async (d) => await window.app.loadGraphData(d)", document)
            else:
                page.evaluate("async (d) => await window.app.loadApiJson(d, 'graph.json')", document)
            types = set(page.evaluate("() => window.app.graph._nodes.map(n => n.type)"))
            assert types, path.name
            assert types - EDITOR_ONLY_TYPES <= known, f"{path.name}: unknown node types {types - known}"
            prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            assert prompt and {node["class_type"] for node in prompt.values()} <= known
            screenshot(page, f"graph_{path.stem}")
            # Each NAME.ui.json holds the prompt of NAME.json: running it again would only hit the cache.
            if not path.stem.endswith(".ui") and runnable(engine, prompt):  # models and inputs are here: run it
                page.evaluate(RECORD_EVENTS)
                assert page.evaluate("async () => await window.app.queuePrompt(0, 1)") is True
                page.wait_for_function("() => window.__events.includes('execution_success') || "
                                       "window.__events.includes('execution_error')", timeout=300_000)
                events = page.evaluate("() => window.__events")
                assert "execution_success" in events, f"{path.name} failed to run"
                if any("Sampler" in node["class_type"] for node in prompt.values()):
                    assert "progress" in events, f"{path.name}: no sampler progress arrived"
                # Output images load only for nodes on screen: zoom out so wide graphs fit.
                page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 0.3; c.ds.offset = [0, 0]; "
                              "c.setDirty(true, true); }")
                page.wait_for_function("""() => window.app.graph._nodes.some(
                    n => n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0)""",
                                       timeout=30_000)
                screenshot(page, f"graph_{path.stem}_output")
        assert not page.errors, page.errors


def test_custom_node_pack_web_extension_loads(tmp_path, browser):
    """A pack's WEB_DIRECTORY script is imported by the real frontend, registers an extension that sees the pack's
    node definition, and the node type is in the editor's node library."""
    from latentloom.nodes import create_engine
    from latentloom.server.app import create_app
    from latentloom.server.state import ServerConfig

    new_user_root(tmp_path)
    engine = create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp",
                           custom_nodes_dir=REPO / "tests" / "custom_node_packs")
    app = create_app(engine, ServerConfig(user_dir=tmp_path / "user", database=tmp_path / "queue.db"))
    with live_server(app) as base:
        page = open_editor(browser, base)
        page.wait_for_function("() => window.__packWeb && window.__packWeb.definitions.length > 0",
                               timeout=30_000)
        assert page.evaluate("() => window.__packWeb.definitions") == ["seen: Web Greeting (pack)"]
        registered = page.evaluate("""() => {
            const type = window.LiteGraph.registered_node_types['PackWebGreeting'];
            return type ? {title: type.title, category: type.category} : null;
        }""")
        assert registered == {"title": "Web Greeting (pack)", "category": "pack/web"}
        node = page.evaluate("""() => {
            const node = window.LiteGraph.createNode('PackWebGreeting');
            window.app.graph.add(node);
            return {type: node.type, widgets: node.widgets.map(w => [w.name, w.value])};
        }""")
        assert node == {"type": "PackWebGreeting", "widgets": [["name", "world"]]}
        screenshot(page, "editor_pack_extension")
        assert not page.errors, page.errors
