"""Custom node packs written for ComfyUI, loaded unchanged from tests/custom_node_packs/: real packages with
relative imports, V1 classes (widgets, combos, custom and "*" sockets, OUTPUT_IS_LIST, INPUT_IS_LIST, lazy
inputs, hidden inputs, IS_CHANGED, VALIDATE_INPUTS, async FUNCTION, ui results), ComfyUI's modules
(folder_paths, nodes, comfy.*, node_helpers, server), a pack that fails to import, a node that fails to run;
through the engine, the CLI and the server."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from latentloom.engine.registry import NodeRegistry
from latentloom.engine.run_state import InterruptToken
from latentloom.nodes import create_engine
from latentloom.server.app import create_app
from latentloom.server.cli import main
from latentloom.server.state import ServerConfig
from tests.server_support import live_server, read_until_done

PACKS = Path(__file__).resolve().parent / "custom_node_packs"


def make_root(root: Path) -> Path:
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"not read by these tests")
    (root / "models" / "pack_things").mkdir()
    (root / "models" / "pack_things" / "thing.pt").write_bytes(b"x")
    (root / "input").mkdir()
    (root / "input" / "note.txt").write_text("first")
    return root


def engine_for(root: Path):
    return create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp", custom_nodes_dir=PACKS)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("packs"))


@pytest.fixture(scope="module")
def engine(root):
    return engine_for(root)


def preview(node: str, slot: int = 0) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": [node, slot]}}


def texts(result) -> dict[str, list[str]]:
    return {node: ui["text"] for node, ui in result.outputs.items() if "text" in ui}


# Loading and the catalogue ------------------------------------------------------------------------------------

def test_packs_load_and_a_broken_one_is_reported(engine):
    errors = engine.registry.load_errors
    assert list(errors) == [str(PACKS / "broken_pack"), f"{PACKS / 'v1_partial.py'}: PackBrokenInputs",
                            f"{PACKS / 'v3_nodes'}: V3Broken"]  # the V3 pack's error is checked in its own tests
    assert errors[str(PACKS / "broken_pack")] == "ModuleNotFoundError: No module named 'comfy.not_provided_here'"
    assert "input 'value': expected (TYPE, options), got 42" in errors[f"{PACKS / 'v1_partial.py'}: PackBrokenInputs"]
    for name in ("PackScale", "PackLazySwitch", "PackAsyncDouble", "PackInvertAndSave", "PackNotify", "OurNegate"):
        assert name in engine.registry
    # ComfyUI's module names are ours only for the packs, and the repository's own folders are never imported.
    import latentloom.nodes.comfy_compat.core_nodes as compat_nodes

    assert sys.modules["nodes"] is compat_nodes and sys.modules["folder_paths"].__name__.startswith("latentloom.")
    assert sys.modules["latentloom.nodes"].__file__ != compat_nodes.__file__



NAMES_PROBE = """
import importlib, json, sys
from latentloom.nodes import create_engine
create_engine(custom_nodes_dir=sys.argv[1])
found = {}
for name in ("nodes", "server", "folder_paths", "comfy"):
    try:
        found[name] = importlib.import_module(name).__name__
    except ModuleNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_pack", [False, True])
def test_comfyui_module_names_are_claimed_only_for_a_custom_nodes_folder(tmp_path, with_pack):
    """Without a custom_nodes folder (the CLI's default ./custom_nodes is usually absent) an engine leaves
    ComfyUI's module names to whatever else the process has; with one, packs get ours. A fresh process each: the
    finder, once installed, serves the whole process."""
    folder = tmp_path / "custom_nodes"
    if with_pack:
        folder.mkdir()
        (folder / "our_style.py").write_text((PACKS / "our_style.py").read_text())
    done = subprocess.run([sys.executable, "-c", NAMES_PROBE, str(folder)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if with_pack:
        assert found == {"nodes": "latentloom.nodes.comfy_compat.core_nodes",
                         "server": "latentloom.nodes.comfy_compat.prompt_server",
                         "folder_paths": "latentloom.nodes.comfy_compat.folder_paths",
                         "comfy": "latentloom.nodes.comfy_compat.comfy"}
    else:
        assert found == {"nodes": None, "server": None, "folder_paths": None, "comfy": None}

def test_catalogue_entries_keep_the_v1_declaration(engine):
    catalogue = engine.catalogue()
    scale = catalogue["PackScale"]
    assert scale["display_name"] == "Scale (pack)" and scale["category"] == "pack/basics"
    assert scale["python_module"] == "custom_nodes.v1_basics" and scale["description"] == "Multiplies a number."
    assert scale["input"]["required"]["value"] == ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                                             "step": 0.5}]
    assert scale["input"]["optional"]["offset"] == ["FLOAT", {"default": 0.0, "forceInput": True}]
    assert scale["output_name"] == ["scaled"] and scale["output"] == ["FLOAT"]
    assert catalogue["PackShout"]["input"]["required"]["mode"] == [["shout", "keep"], {"default": "shout"}]
    assert catalogue["PackRange"]["output_is_list"] == [True, False]
    assert catalogue["PackSum"]["input"]["required"]["values"] == ["*"]
    assert catalogue["PackLazySwitch"]["input"]["required"]["first"][1]["lazy"] is True
    assert catalogue["PackShowText"]["output_node"] is True
    # A combo filled from folder_paths lists the engine's model files; comfy.samplers gives our sampler names.
    files = catalogue["PackModelFiles"]["input"]["required"]
    assert files["ckpt_name"][0] == ["tiny.safetensors"] and "euler" in files["sampler"][0]


def test_combo_choices_follow_the_model_folder(engine, root):
    extra = root / "models" / "checkpoints" / "later.safetensors"
    extra.write_bytes(b"x")
    try:
        assert engine.catalogue()["PackModelFiles"]["input"]["required"]["ckpt_name"][0] == \
            ["later.safetensors", "tiny.safetensors"]
    finally:
        extra.unlink()


def test_two_engines_keep_their_own_folders_and_routes(engine, tmp_path):
    other_root = make_root(tmp_path)
    (other_root / "models" / "checkpoints" / "tiny.safetensors").rename(
        other_root / "models" / "checkpoints" / "other.safetensors")
    other = engine_for(other_root)
    listed = {name: e.catalogue()["PackModelFiles"]["input"]["required"]["ckpt_name"][0]
              for name, e in (("first", engine), ("other", other))}
    assert listed == {"first": ["tiny.safetensors"], "other": ["other.safetensors"]}
    from latentloom.nodes.comfy_compat.prompt_server import PackServer

    first_routes, other_routes = (e.env.service(PackServer).routes for e in (engine, other))
    assert first_routes is not other_routes and len(first_routes) == len(other_routes) == 2


# Running ------------------------------------------------------------------------------------------------------

def test_widgets_relative_imports_lists_and_hidden_inputs(engine):
    graph = {"1": {"class_type": "PackScale", "inputs": {"value": 2.5, "factor": 3}},
             "2": {"class_type": "OurNegate", "inputs": {"value": ["1", 0]}},
             "3": preview("2"),
             "4": {"class_type": "PackShout", "inputs": {"text": "hey", "mode": "shout"}},
             "5": {"class_type": "PackShowText", "inputs": {"text": ["4", 0]}},
             "6": {"class_type": "PackRange", "inputs": {"count": 4}},
             "7": {"class_type": "PackSum", "inputs": {"values": ["6", 0], "start": 10}},
             "8": preview("7"),
             "9": preview("6", 1)}
    result = engine.run(graph)
    assert result.status == "success", result.error
    shown = texts(result)
    assert shown["3"] == ["-7.5"]                       # 2.5 * 3, negated by our own-style node
    assert shown["5"] == ["HEY! #5 PackShowText"]       # sub-package helper; UNIQUE_ID and PROMPT hidden inputs
    assert shown["8"] == ["16.0"]                       # OUTPUT_IS_LIST [0..3] summed by an INPUT_IS_LIST node
    assert shown["9"] == ["4 items"]


def test_input_names_may_clash_with_node_attributes(engine):
    graph = {"1": {"class_type": "PackClashingNames", "inputs": {"description": "x", "version": 3, "run": False}},
             "2": preview("1")}
    result = engine.run(graph)
    assert result.status == "success", result.error
    assert texts(result)["2"] == ["x-3-False"]
    assert engine.catalogue()["PackClashingNames"]["category"] == "sd"  # ComfyUI's default category


def test_node_expansion_with_graph_builder(engine):
    result = engine.run({"1": {"class_type": "PackScaleTwice", "inputs": {"value": 1.5, "factor": 3}},
                         "2": preview("1")})
    assert result.status == "success", result.error
    assert texts(result)["2"] == ["13.5"]  # 1.5 * 3 * 3 by the two expanded PackScale nodes


def test_lazy_inputs_evaluate_only_what_the_node_asks_for(engine):
    graph = {"1": {"class_type": "PackScale", "inputs": {"value": 1.5, "factor": 2}},
             "2": {"class_type": "PackFail", "inputs": {"value": ["1", 0]}},
             "3": {"class_type": "PackLazySwitch", "inputs": {"use_first": False, "first": ["2", 0],
                                                              "second": ["1", 0]}},
             "4": {"class_type": "PackAsyncDouble", "inputs": {"value": ["3", 0]}},
             "5": preview("4")}
    result = engine.run(graph)
    assert result.status == "success", result.error
    assert texts(result)["5"] == ["6.0"] and "2" not in result.executed
    graph["3"]["inputs"]["use_first"] = True  # now the failing branch is asked for
    failed = engine.run(graph)
    assert failed.status == "error" and failed.error["node_type"] == "PackFail"


def test_a_node_that_raises_gives_the_usual_node_error(engine):
    graph = {"1": {"class_type": "PackScale", "inputs": {"value": 2.5, "factor": 3}},
             "2": {"class_type": "PackFail", "inputs": {"value": ["1", 0]}},
             "3": preview("2")}
    result = engine.run(graph)
    assert result.status == "error"
    assert {k: result.error[k] for k in ("node_id", "node_type", "exception_type", "exception_message")} == \
        {"node_id": "2", "node_type": "PackFail", "exception_type": "ValueError",
         "exception_message": "cannot handle 7.5"}


def test_validation_uses_the_v1_rules(engine):
    odd = engine.run({"1": {"class_type": "PackEven", "inputs": {"number": 3}}, "2": preview("1")})
    assert odd.status == "invalid"
    error = odd.node_errors["1"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and "3 is odd" in error["details"]
    # VALIDATE_INPUTS names `number`, so its max (10) is not checked, as in ComfyUI; other inputs keep theirs.
    assert engine.run({"1": {"class_type": "PackEven", "inputs": {"number": 12}}, "2": preview("1")}).ok
    too_big = engine.run({"1": {"class_type": "PackScale", "inputs": {"value": 500.0, "factor": 1}},
                          "2": preview("1")})
    assert too_big.node_errors["1"]["errors"][0]["type"] == "value_bigger_than_max"
    bad_choice = engine.run({"1": {"class_type": "PackShout", "inputs": {"text": "a", "mode": "whisper"}},
                             "2": preview("1")})
    assert bad_choice.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"


def test_is_changed_feeds_the_cache_key(engine, root):
    note = root / "input" / "note.txt"
    graph = {"1": {"class_type": "PackReadFile", "inputs": {"name": "note.txt"}}, "2": preview("1")}
    first = engine.run(graph)
    assert texts(first)["2"] == ["first"] and "1" in first.executed
    again = engine.run(graph)
    assert "1" not in again.executed and texts(again)["2"] == ["first"]
    note.write_text("second")
    stat = note.stat()
    os.utime(note, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = engine.run(graph)
    assert "1" in changed.executed and texts(changed)["2"] == ["second"]
    # A missing file makes IS_CHANGED answer NaN: never cached, like ComfyUI.
    missing = {"1": {"class_type": "PackReadFile", "inputs": {"name": "absent.txt"}}, "2": preview("1")}
    assert engine.run(missing).status == "error"


def test_folder_paths_and_core_nodes_the_v1_way(engine, root):
    events = []
    graph = {"1": {"class_type": "PackSolid", "inputs": {"width": 3, "height": 2, "level": 0.25}},
             "2": {"class_type": "PackInvertAndSave", "inputs": {"images": ["1", 0], "filename_prefix": "packed"}},
             "3": {"class_type": "PackModelFiles", "inputs": {"ckpt_name": "tiny.safetensors", "sampler": "euler"}},
             "4": preview("3")}
    result = engine.run(graph, listener=events.append)
    assert result.status == "success", result.error
    saved = result.outputs["2"]["images"]
    assert saved == [{"filename": "packed_00001_.png", "subfolder": "", "type": "output"}]
    from PIL import Image

    with Image.open(root / "output" / "packed_00001_.png") as image:
        assert image.size == (6, 4) and image.getpixel((0, 0)) == (191, 191, 191)  # 1 - 0.25, upscaled 2x
    (inverted,) = result.values["2"][0]
    assert inverted.shape == (1, 4, 6, 3)
    assert [(e.value, e.max) for e in events if e.type == "progress" and e.node == "2"] == [(1, 2), (2, 2)]
    path, things, name, counter, subfolder, sampler, appended = texts(result)["4"][0].split("|")
    assert Path(path) == (root / "models" / "checkpoints" / "tiny.safetensors").resolve()
    assert things == "thing.pt"  # a folder a pack added with add_model_folder_path at import
    assert (name, counter, subfolder, sampler, appended) == ("pic", "1", "sub", "euler", "3")


def test_interrupts_reach_pack_loops(engine):
    token = InterruptToken()
    timer = threading.Timer(0.1, token.request)
    timer.start()
    started = time.monotonic()
    result = engine.run({"1": {"class_type": "PackSlowCount", "inputs": {"steps": 1000}}, "2": preview("1")},
                        interrupt=token)
    timer.join()
    assert result.status == "interrupted" and time.monotonic() - started < 5  # not the 10 s the loop would take


# The command line and the server ------------------------------------------------------------------------------

def test_cli_runs_a_pack_workflow(tmp_path, capsys):
    work = make_root(tmp_path)
    graph = {"1": {"class_type": "PackShout", "inputs": {"text": "cli", "mode": "shout"}},
             "2": {"class_type": "PackShowText", "inputs": {"text": ["1", 0]}}}
    (work / "g.json").write_text(json.dumps(graph))
    code = main(["run", str(work / "g.json"), "--json", "--custom-nodes", str(PACKS), "--models-dir",
                 str(work / "models"), "--input-dir", str(work / "input"), "--output-dir", str(work / "output"),
                 "--temp-dir", str(work / "temp")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success" and summary["text"] == ["CLI! #2 PackShowText"]
    assert str(PACKS / "broken_pack") in summary["custom_node_errors"]
    assert main(["nodes", "--custom-nodes", str(PACKS), "--models-dir", str(work / "models")]) == 0
    listing = capsys.readouterr()
    assert "PackLazySwitch" in listing.out and "broken_pack: ModuleNotFoundError" in listing.err


def test_server_serves_pack_routes_and_messages(tmp_path):
    work = make_root(tmp_path)
    app = create_app(engine_for(work), ServerConfig(user_dir=work / "user", database=work / "queue.db"))

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=base) as http:
            hello = await http.get("/v1_routes/hello/bob", params={"n": 3})
            assert hello.status_code == 200 and hello.json() == {"hello": "bob", "times": 3}
            assert (await http.get("/api/v1_routes/hello/ann")).json() == {"hello": "ann", "times": 1}
            echo = await http.post("/api/v1_routes/echo", json={"a": [1, 2]})
            assert echo.status_code == 201 and echo.json() == {"echo": {"a": [1, 2]}}
            stats = (await http.get("/system_stats")).json()
            assert str(PACKS / "broken_pack") in stats["system"]["custom_node_errors"]
            assert (await http.get("/object_info/PackNotify")).json()["PackNotify"]["category"] == "pack/server"
            async with connect(base.replace("http://", "ws://") + "/ws?clientId=me") as ws:
                await ws.recv()  # status
                graph = {"1": {"class_type": "PackNotify", "inputs": {"message": "hi"}}}
                reply = await http.post("/prompt", json={"prompt": graph, "client_id": "me"})
                assert reply.status_code == 200, reply.text
                messages = await read_until_done(ws, reply.json()["prompt_id"])
        custom = [m for m in messages if isinstance(m, dict) and m["type"] == "v1_routes.message"]
        assert custom == [{"type": "v1_routes.message", "data": {"message": "hi", "node": "1"}}]
        frames = [m for m in messages if isinstance(m, bytes) and struct.unpack(">I", m[:4])[0] == 3]
        assert frames and frames[0][8:] == b"1said hi"
        executed = [m for m in messages if isinstance(m, dict) and m["type"] == "executed"]
        assert executed[0]["data"]["output"] == {"text": ["hi"]}

    with live_server(app) as base:
        asyncio.run(scenario(base))


def test_our_nodes_convention_still_loads_without_the_compat_layer(tmp_path):
    registry = NodeRegistry()
    registry.load_custom_nodes(PACKS)  # the default reader: NODES only
    assert "OurNegate" in registry and "PackScale" not in registry
    assert str(PACKS / "v1_basics") in registry.load_errors  # a V1 pack needs the compat layer's reader


def test_server_serves_pack_web_extensions(tmp_path):
    work = make_root(tmp_path)
    app = create_app(engine_for(work), ServerConfig(user_dir=work / "user", database=work / "queue.db"))
    with live_server(app) as base, httpx.Client(base_url=base) as http:
        listed = http.get("/api/extensions").json()
        assert listed == ["/extensions/latentloom/latentloom.js", "/extensions/v1_web/greeting.js",
                          "/extensions/v1_web/lib/label.js"]
        assert http.get("/extensions").json() == listed
        script = http.get("/extensions/v1_web/greeting.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert script.text == (PACKS / "v1_web" / "web" / "greeting.js").read_text()
        style = http.get("/extensions/v1_web/lib/style.css")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        assert http.get("/extensions/v1_web/absent.js").status_code == 404
        assert http.get("/extensions/v1_basics/__init__.py").status_code == 404  # a pack without a web folder
        # Nothing outside the web folder, however the path is spelled.
        for escape in ("/extensions/v1_web/..%2F__init__.py", "/extensions/v1_web/%2e%2e/__init__.py",
                       "/extensions/v1_web/lib/..%2F..%2F__init__.py"):
            assert http.get(escape).status_code == 403, escape
        # Our own extension module is still ours, and the security middleware covers the pack files too.
        assert "default_graph" in http.get("/extensions/latentloom/latentloom.js").text
        assert http.get("/extensions/v1_web/greeting.js", headers={"Host": "evil.example"}).status_code == 403
