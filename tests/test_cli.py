"""The `latentloom` command: exit codes, readable node errors, JSON output, the catalogue, custom node folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latentloom.server.cli import main

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the test node pack installed as a custom_nodes module."""
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    shutil.copy(TESTS / "engine_nodes.py", custom / "testpack.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, document) -> str:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


GOOD = {"1": {"class_type": "Const", "inputs": {"value": 2}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def run_cli(*argv) -> int:
    return main(list(argv))


def test_run_json_reports_outputs(workdir, capsys):
    path = write(workdir / "g.json", GOOD)
    assert run_cli("run", path, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "success" and summary["text"] == ["5.0"] and summary["format"] == "api_json"


def test_run_with_override(workdir, capsys):
    path = write(workdir / "g.json", GOOD)
    assert run_cli("run", path, "--json", "--set", "2.b=10") == 0
    assert json.loads(capsys.readouterr().out)["text"] == ["12.0"]


@pytest.mark.parametrize("override", ["2.b", "9.b=1", "nodot=1"])
def test_bad_override_is_invalid(workdir, capsys, override):
    path = write(workdir / "g.json", GOOD)
    assert run_cli("run", path, "--set", override) == 2
    assert "override" in capsys.readouterr().err


def test_invalid_graph_exit_2_names_the_node(workdir, capsys):
    bad = json.loads(json.dumps(GOOD))
    bad["2"]["inputs"]["b"] = 5000  # above the max
    path = write(workdir / "g.json", bad)
    assert run_cli("run", path) == 2
    err = capsys.readouterr().err
    assert "node #2 Add" in err and "bigger than max" in err and "Traceback" not in err


def test_cycle_exit_2(workdir, capsys):
    cyclic = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    path = write(workdir / "g.json", cyclic)
    assert run_cli("validate", path) == 2
    err = capsys.readouterr().err
    assert "cycle" in err.lower() and "#1 Add" in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", "\x89PNG garbage"])
def test_unreadable_files_exit_2_without_traceback(workdir, capsys, content):
    path = write(workdir / "g.json", content)
    assert run_cli("run", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_missing_file(workdir, capsys):
    assert run_cli("validate", str(workdir / "nope.json")) == 2
    assert "no such file" in capsys.readouterr().err


def test_unknown_node_type(workdir, capsys):
    path = write(workdir / "g.json", {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert run_cli("validate", path, "--json") == 2
    body = json.loads(capsys.readouterr().out)
    assert body["valid"] is False and body["error"]["type"] == "missing_node_type"


def test_runtime_error_exit_1(workdir, capsys):
    failing = {"1": {"class_type": "Const", "inputs": {"value": 1}},
               "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "message": "kaput"}},
               "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    path = write(workdir / "g.json", failing)
    assert run_cli("run", path) == 1
    err = capsys.readouterr().err
    assert "node #2 Fail" in err and "kaput" in err and "Traceback" not in err


def test_nodes_json_is_a_comfyui_catalogue(workdir, capsys):
    assert run_cli("nodes", "--json") == 0
    catalogue = json.loads(capsys.readouterr().out)
    preview = catalogue["PreviewAny"]
    for key in ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                "description", "python_module", "category", "output_node"):
        assert key in preview
    assert preview["output_node"] is True and preview["input"]["required"]["source"] == ["*"]
    add = catalogue["Add"]
    assert add["python_module"] == "custom_nodes.testpack"
    assert add["input"]["required"]["b"] == ["FLOAT", {"default": 0.0, "min": -1000.0, "max": 1000.0}]
    assert add["input"]["required"]["a"] == ["FLOAT", {"forceInput": True}]
    assert catalogue["Pick"]["input"]["required"]["choice"] == [["red", "green", "blue"], {"default": "red"}]
    assert catalogue["MakeList"]["output_is_list"] == [True]


@pytest.mark.slow
def test_console_script_runs(workdir):
    path = write(workdir / "g.json", GOOD)
    done = subprocess.run([sys.executable, "-m", "latentloom.server.cli", "run", path, "--json"], capture_output=True,
                          text=True, cwd=workdir, env={"PYTHONPATH": str(TESTS.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == ["5.0"]


def test_run_accepts_ui_format_and_png(workdir, capsys):
    from PIL import Image, PngImagePlugin

    from latentloom.engine.workflow import api_to_ui
    from latentloom.server.cli import build_parser, make_engine

    engine = make_engine(build_parser().parse_args(["nodes"]))
    ui = api_to_ui(GOOD, engine.catalogue())
    ui_path = write(workdir / "ui.json", ui)
    assert run_cli("run", ui_path, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "ui_json" and summary["text"] == ["5.0"]

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(GOOD))
    Image.new("RGB", (8, 8)).save(workdir / "wf.png", pnginfo=info)
    assert run_cli("run", str(workdir / "wf.png"), "--json", "--set", "2.b=1") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "png_prompt" and summary["text"] == ["3.0"]


def test_convert_round_trip(workdir, capsys):
    api_path = write(workdir / "g.json", GOOD)
    assert run_cli("convert", api_path, "--to", "ui", "-o", str(workdir / "ui.json")) == 0
    assert run_cli("convert", str(workdir / "ui.json"), "--to", "api") == 0
    out = capsys.readouterr().out
    back = json.loads(out)
    assert {k: (v["class_type"], v["inputs"]) for k, v in back.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in GOOD.items()}


# Issue 18: documents the one JSON reader refuses are exit 2 with a message, for `validate` and `run` alike.
DEEP = "[" * 5000 + "]" * 5000
REFUSED_FILES = [
    ("5000 deep", DEEP, "nested more than"),
    ("200 deep inside a node", json.dumps(GOOD)[:-1] + ', "9": {"class_type": "Const", "inputs": {"value": '
     + "[" * 200 + "]" * 200 + "}}}", "nested more than"),
    ("NaN input", json.dumps(GOOD).replace('"value": 2', '"value": NaN'), "1.inputs.value: nan"),
    ("Infinity input", json.dumps(GOOD).replace('"value": 2', '"value": -Infinity'), "-inf is not a finite"),
    ("401-digit integer", json.dumps(GOOD).replace('"value": 2', '"value": ' + "7" * 401), "401 digits"),
    ("lone surrogate", json.dumps(GOOD).replace('"Add"', '"Add", "_meta": {"title": "\\ud800"}'), "surrogate"),
    ("UI workflow with a null node", json.dumps({"nodes": [None], "links": []}), "nodes[0] is null"),
    ("UI node with a null input slot", json.dumps({"nodes": [{"id": 1, "type": "Const", "inputs": [None]}],
                                                   "links": []}), "nodes[0].inputs[0] is null"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("name,content,message", REFUSED_FILES, ids=[c[0] for c in REFUSED_FILES])
def test_refused_documents_exit_2_without_traceback(workdir, capsys, command, name, content, message):
    path = write(workdir / "g.json", content)
    assert run_cli(command, path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err



# `--set` values go through the same reader: JSON it refuses names the override; text that is not JSON stays text.
@pytest.mark.parametrize("value,message", [
    (DEEP, "nested more than"), ("NaN", "nan is not a finite number"), ("[1, -Infinity]", "[1]: -inf is not"),
    ("7" * 401, "401 digits"),
])
def test_refused_override_values_exit_2_naming_the_override(workdir, capsys, value, message):
    path = write(workdir / "g.json", GOOD)
    assert run_cli("run", path, "--set", f"2.b={value}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override '2.b': ") and message in err and "Traceback" not in err


def test_override_text_that_is_not_json_stays_text(workdir, capsys):
    path = write(workdir / "g.json", GOOD)
    assert run_cli("run", path, "--set", "2.b=[1,") == 2  # reaches validation as the string "[1,"
    assert "'[1,'" in capsys.readouterr().err

def test_refused_png_chunk_exits_2(workdir, capsys):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", '{"1": {"class_type": "Const", "inputs": {"value": NaN}}}')
    Image.new("RGB", (4, 4)).save(workdir / "w.png", pnginfo=info)
    assert run_cli("validate", str(workdir / "w.png"), "--json") == 2
    body = json.loads(capsys.readouterr().out)
    assert body["status"] == "invalid" and "'prompt' chunk is not valid JSON" in body["error"]["message"]


def test_serve_cache_flags_reach_the_output_cache(tmp_path, capsys):
    from latentloom.engine.cache import DEFAULT_KEEP_PROMPTS
    from latentloom.server.cli import build_parser, make_engine
    from latentloom.server.dispatch import engine_factory_from_args

    none = str(tmp_path / "none")
    args = build_parser().parse_args(["serve", "--cache-bytes", "5000", "--cache-prompts", "3", "--custom-nodes", none])
    cache = make_engine(args, cache_bytes=args.cache_bytes).cache
    assert (cache.max_bytes, cache.keep_prompts) == (5000, 3)
    kwargs = engine_factory_from_args(args).kwargs  # the Ray workers' engines
    assert (kwargs["cache_bytes"], kwargs["cache_prompts"]) == (5000, 3)
    default = make_engine(build_parser().parse_args(["serve", "--custom-nodes", none])).cache
    assert default.keep_prompts == DEFAULT_KEEP_PROMPTS
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--cache-prompts", "0"])
    assert exit_info.value.code == 2 and "--cache-prompts: must be at least 1, got 0" in capsys.readouterr().err
