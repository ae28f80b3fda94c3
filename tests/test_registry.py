"""The registry: explicit registration, entry-point plugins, custom_nodes folders, catalogue encoding."""

import importlib.metadata
from typing import Annotated, Any

import engine_nodes
import pytest

from latentloom.engine.node import Node
from latentloom.engine.registry import NodeRegistry, RegistryError, node_info
from latentloom.engine.types import Combo, Float, Int, Output, Socket, String, types_compatible


class Sample(Node):
    category = "sampling"
    display_name = "A Sample"
    description = "for the catalogue test"
    outputs = (Output("LATENT", name="latent", tooltip="the result"),)
    model: Annotated[Any, Socket("MODEL", tooltip="the model")]
    seed: Annotated[int, Int(min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)] = 0
    cfg: Annotated[float, Float(min=0.0, max=100.0, step=0.1, round=0.01)] = 8.0
    name: Annotated[str, Combo(lambda env: env["choices"] if env else [])] = "a"
    text: Annotated[str, String(multiline=True, dynamicPrompts=True)] = ""
    mask: Annotated[Any, Socket("MASK", optional=True)] = None


def test_catalogue_shape():
    info = node_info(Sample, {"choices": ["a", "b"]})
    assert info["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 18446744073709551615,
                                                         "control_after_generate": True}]
    assert info["input"]["required"]["cfg"] == ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                                          "round": 0.01}]
    assert info["input"]["required"]["name"] == [["a", "b"], {"default": "a"}]
    assert info["input"]["required"]["text"] == ["STRING", {"default": "", "multiline": True,
                                                            "dynamicPrompts": True}]
    assert info["input"]["required"]["model"] == ["MODEL", {"tooltip": "the model"}]
    assert info["input"]["optional"] == {"mask": ["MASK"]}
    assert info["input_order"] == {"required": ["model", "seed", "cfg", "name", "text"], "optional": ["mask"]}
    assert info["output"] == ["LATENT"] and info["output_name"] == ["latent"]
    assert info["output_tooltips"] == ["the result"] and info["output_is_list"] == [False]
    assert (info["name"], info["display_name"], info["category"], info["output_node"]) == \
        ("Sample", "A Sample", "sampling", False)


def test_duplicate_names_are_refused():
    registry = NodeRegistry([Sample])

    class Sample2(Sample):
        type_name = "Sample"

    with pytest.raises(RegistryError):
        registry.register(Sample2)
    registry.register(Sample2, replace=True)
    assert registry.get("Sample") is Sample2


def test_a_field_without_spec_is_refused():
    class Broken(Node):
        value: int = 0

    with pytest.raises(TypeError):
        NodeRegistry([Broken])


def test_entry_points_are_loaded_and_broken_ones_reported(monkeypatch):
    class FakeEntryPoint:
        def __init__(self, name, provided):
            self.name, self.provided = name, provided

        def load(self):
            if isinstance(self.provided, Exception):
                raise self.provided
            return self.provided

    points = [FakeEntryPoint("pack", lambda: [Sample]), FakeEntryPoint("broken", ImportError("no such module")),
              FakeEntryPoint("builtin", lambda: [])]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points)
    registry = NodeRegistry()
    registry.load_entry_points(skip=("builtin",))
    assert registry.get("Sample") is Sample and Sample.python_module == "custom_nodes.pack"
    assert "no such module" in registry.load_errors["entry point broken"]


def test_custom_nodes_folder(tmp_path):
    (tmp_path / "good.py").write_text(
        "from typing import Annotated\n"
        "from latentloom.engine.node import Node\n"
        "from latentloom.engine.types import Int, Output\n"
        "class Seven(Node):\n"
        "    outputs = (Output('INT'),)\n"
        "    def run(self, ctx):\n"
        "        return (7,)\n"
        "NODES = [Seven]\n")
    (tmp_path / "bad.py").write_text("raise RuntimeError('broken pack')\n")
    (tmp_path / "notes.txt").write_text("ignored")
    registry = NodeRegistry()
    registry.load_custom_nodes(tmp_path)
    assert registry.get("Seven").python_module == "custom_nodes.good"
    assert "broken pack" in registry.load_errors[str(tmp_path / "bad.py")]


@pytest.mark.parametrize("received,expected,ok", [
    ("IMAGE", "IMAGE", True), ("IMAGE", "MASK", False), ("*", "MASK", True), ("IMAGE", "*", True),
    ("IMAGE,FLOAT", "FLOAT", True), ("INT", "IMAGE,FLOAT", False), ("LATENT", "IMAGE, LATENT", True)])
def test_type_matching(received, expected, ok):
    assert types_compatible(received, expected) is ok


def test_the_test_pack_registers():
    registry = NodeRegistry(engine_nodes.NODES)
    catalogue = registry.object_info()
    assert catalogue["Mix"]["input"]["required"]["mask"][0] == "FLOAT"
    assert catalogue["Mix"]["input"]["required"]["first"][1]["lazy"] is True
