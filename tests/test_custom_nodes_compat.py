"""ComfyUI's module surface as popular packs use it (found by loading ComfyUI_essentials, KJNodes, rgthree,
Comfyroll, WAS and Custom-Scripts unchanged), through tests/custom_node_packs_compat/surface_pack: module-level
imports of execution / latent_preview / comfy.sample / comfy.sd / comfy.cli_args / comfy.comfy_types /
comfy_extras and of model internals (stand-ins that fail only when used), V3 classes inside NODE_CLASS_MAPPINGS,
MatchType sockets, core node class attributes, `PromptServer.instance.app`, folder_paths' custom_nodes entry, and
pack banners kept off the CLI's stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentloom.nodes import bundled_models_dir, create_engine
from latentloom.nodes.comfy_compat.comfy_api.latest import io
from latentloom.nodes.comfy_compat.internals import MissingInternals, placeholder
from latentloom.nodes.comfy_compat.prompt_server import PackServer
from latentloom.server.cli import main

PACKS = Path(__file__).resolve().parent / "custom_node_packs_compat"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    (root / "input").mkdir()
    return create_engine(input_dir=root / "input", output_dir=root / "output", temp_dir=root / "temp",
                         custom_nodes_dir=PACKS)


def run_outputs(engine, tmp_path, prompt: dict, wanted: dict[str, tuple[str, int]]) -> dict:
    """Run `prompt` with a capture node per wanted output; the captured values by name."""
    captured = {}
    for name, (node, slot) in wanted.items():
        captured[name] = tmp_path / f"{name}.pt"
        prompt[f"capture_{name}"] = {"class_type": "SaveCapture", "inputs": {"value": [node, slot],
                                                                             "path": str(captured[name])}}
    result = engine.run(prompt)
    assert result.status == "success", (result.error, result.node_errors)
    return {name: torch.load(path, weights_only=False) for name, path in captured.items()}


def image(height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand((1, height, width, 3), generator=torch.Generator().manual_seed(seed))


def test_the_pack_loads_with_all_its_node_types(engine):
    assert engine.registry.load_errors == {}
    for name in ("SurfaceComposite", "SurfaceTiledDouble", "SurfaceNoise", "SurfaceStateDict", "SurfaceUpscale",
                 "SurfaceInternals", "SurfaceInfo", "SurfaceMatchKey", "SurfaceStack"):
        assert name in engine.registry, name
    # The static route the pack added through PromptServer.instance.app at import is recorded with its routes.
    statics = [item for item in engine.env.service(PackServer).routes if hasattr(item, "prefix")]
    assert [item.prefix for item in statics] == ["/surface_static"]


def test_catalogue_reads_core_class_lists_and_v3_mapping_entries(engine):
    info = engine.catalogue()
    from latentloom.nodes.image import ImageScale

    specs = ImageScale.input_specs()
    tiled = info["SurfaceTiledDouble"]["input"]["required"]
    assert tiled["upscale_method"][0] == list(specs["upscale_method"].choices)
    assert tiled["crop"][0] == list(specs["crop"].choices)
    assert info["SurfaceTiledDouble"]["output"] == ["*", "INT"]
    # A V3 class in NODE_CLASS_MAPPINGS is registered under its mapping key, with the mapping's display name.
    match = info["SurfaceMatchKey"]
    assert "SurfaceMatchSchemaId" not in info and match["display_name"] == "Surface Match"
    assert match["input"]["required"]["value"] == ["IMAGE,MASK"]
    assert match["input"]["required"]["repeat"][1]["advanced"] is True
    assert match["input"]["required"]["container"][0] == ["auto", "mp4"]
    assert match["output"] == ["IMAGE,MASK", "BBOX"]


def test_v3_match_type_node_runs_on_images_and_masks(engine, tmp_path):
    picture = image()
    prompt = {"img": {"class_type": "SurfaceImageSource", "inputs": {"seed": 0, "height": 24, "width": 32}},
              "m": {"class_type": "SurfaceMatchKey", "inputs": {"value": ["img", 0], "repeat": 3,
                                                                "container": "mp4"}},
              "mask": {"class_type": "ImageToMask", "inputs": {"image": ["img", 0], "channel": "red"}},
              "mm": {"class_type": "SurfaceMatchKey", "inputs": {"value": ["mask", 0], "repeat": 2,
                                                                 "container": "auto"}}}
    got = run_outputs(engine, tmp_path, prompt, {"images": ("m", 0), "box": ("m", 1), "masks": ("mm", 0)})
    assert torch.equal(got["images"], picture.repeat(3, 1, 1, 1))
    assert got["box"] == {"container": "mp4"}
    assert torch.equal(got["masks"], picture[..., 0].repeat(2, 1, 1))


def test_v3_accept_all_inputs_gets_the_inputs_added_beyond_the_schema(engine, tmp_path):
    prompt = {f"i{k}": {"class_type": "SurfaceImageSource", "inputs": {"seed": k, "height": 8, "width": 8}}
              for k in (1, 2, 3)}
    prompt["s"] = {"class_type": "SurfaceStack", "inputs": {"image_1": ["i1", 0], "image_3": ["i3", 0],
                                                            "image_2": ["i2", 0]}}
    got = run_outputs(engine, tmp_path, prompt, {"stack": ("s", 0)})["stack"]
    assert torch.equal(got, torch.cat([image(8, 8, 1), image(8, 8, 2), image(8, 8, 3)]))


def test_comfy_extras_composite_pastes_the_source(engine, tmp_path):
    destination, source = image(24, 32, 1), image(8, 10, 2)
    prompt = {"d": {"class_type": "SurfaceImageSource", "inputs": {"seed": 1, "height": 24, "width": 32}},
              "s": {"class_type": "SurfaceImageSource", "inputs": {"seed": 2, "height": 8, "width": 10}},
              "c": {"class_type": "SurfaceComposite", "inputs": {"destination": ["d", 0], "source": ["s", 0],
                                                                 "x": 5, "y": 3}}}
    got = run_outputs(engine, tmp_path, prompt, {"out": ("c", 0)})["out"]
    expected = destination.clone()
    expected[:, 3:11, 5:15, :] = source
    assert torch.allclose(got, expected, atol=1e-6)


def test_tiled_scale_and_progress(engine, tmp_path):
    picture = image(24, 40, 3)
    events = []
    prompt = {"img": {"class_type": "SurfaceImageSource", "inputs": {"seed": 3, "height": 24, "width": 40}},
              "t": {"class_type": "SurfaceTiledDouble", "inputs": {"image": ["img", 0],
                                                                   "upscale_method": "nearest-exact",
                                                                   "crop": "disabled"}}}
    prompt["capture"] = {"class_type": "SaveCapture", "inputs": {"value": ["t", 0], "path": str(tmp_path / "t.pt")}}
    prompt["capture_tiles"] = {"class_type": "SaveCapture", "inputs": {"value": ["t", 1],
                                                                       "path": str(tmp_path / "n.pt")}}
    result = engine.run(prompt, listener=events.append)
    assert result.status == "success", result.error
    doubled = torch.load(tmp_path / "t.pt")
    # Overlapping tiles of a nearest-neighbour doubling blend to the same values: the whole image doubled.
    assert torch.allclose(doubled, picture.repeat_interleave(2, 1).repeat_interleave(2, 2), atol=1e-6)
    tiles = torch.load(tmp_path / "n.pt")
    progress = [e for e in events if getattr(e, "node", None) == "t" and type(e).__name__ == "Progress"]
    assert tiles > 1 and progress and progress[-1].value == tiles == progress[-1].max


def test_prepare_noise_is_comfyui_noise_and_prepare_callback_reports_progress(engine, tmp_path):
    events = []
    prompt = {"l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
              "n": {"class_type": "SurfaceNoise", "inputs": {"samples": ["l", 0], "seed": 11}},
              "capture": {"class_type": "SaveCapture", "inputs": {"value": ["n", 0], "path": str(tmp_path / "z.pt")}}}
    result = engine.run(prompt, listener=events.append)
    assert result.status == "success", result.error
    noise = torch.load(tmp_path / "z.pt")["samples"]
    expected = torch.randn((2, 4, 6, 8), generator=torch.Generator("cpu").manual_seed(11))
    assert torch.equal(noise, expected)
    steps = [(e.value, e.max) for e in events if getattr(e, "node", None) == "n" and type(e).__name__ == "Progress"]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_save_and_load_torch_file_with_prefix_replace(engine, tmp_path):
    prompt = {"s": {"class_type": "SurfaceStateDict", "inputs": {"filename": "w.safetensors"}}}
    got = run_outputs(engine, tmp_path, prompt, {"key": ("s", 0), "total": ("s", 1)})
    assert got == {"key": "diffusion_model.a.weight surface", "total": 15.0}


def test_old_style_upscale_model_loading_matches_our_upscale_node(engine, tmp_path):
    name = "toy-upscale-x2.safetensors"
    assert (bundled_models_dir() / "upscale_models" / name).is_file()
    prompt = {"img": {"class_type": "SurfaceImageSource", "inputs": {"seed": 4, "height": 12, "width": 16}},
              "pack": {"class_type": "SurfaceUpscale", "inputs": {"image": ["img", 0], "model_name": name}},
              "loader": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}},
              "ours": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["loader", 0],
                                                                         "image": ["img", 0]}}}
    got = run_outputs(engine, tmp_path, prompt, {"pack": ("pack", 0), "ours": ("ours", 0)})
    assert got["pack"].shape == (1, 24, 32, 3) and torch.equal(got["pack"], got["ours"])


def test_model_internals_fail_clearly_when_used(engine):
    result = engine.run({"i": {"class_type": "SurfaceInternals", "inputs": {"value": 2.0}},
                         "c": {"class_type": "SaveCapture", "inputs": {"value": ["i", 0], "path": "unused.pt"}}})
    assert result.status == "error" and result.error["node_id"] == "i"
    assert "comfy.ldm.modules.attention.optimized_attention is part of ComfyUI's model internals" in \
        result.error["exception_message"]
    stand_in = placeholder("comfy.ops.disable_weight_init")
    assert stand_in.Linear is not None and issubclass(type("Sub", (stand_in.Linear,), {}), stand_in.Linear)
    with pytest.raises(MissingInternals, match=r"comfy\.ops\.disable_weight_init\.Linear"):
        stand_in.Linear(2, 3)


def test_module_values_packs_read(engine, tmp_path):
    got = run_outputs(engine, tmp_path, {"i": {"class_type": "SurfaceInfo", "inputs": {}}},
                      {"folder": ("i", 0), "no_metadata": ("i", 1), "feature": ("i", 2), "batch": ("i", 3)})
    assert got == {"folder": str(PACKS), "no_metadata": False, "feature": False, "batch": "type:LatentBatch"}


def test_io_enum_compares_like_comfyui():
    from latentloom.nodes.comfy_compat.comfy.comfy_types.node_typing import IO

    assert IO.IMAGE == "IMAGE" and str(IO.ANY) == "*" and f"{IO.MASK}" == "MASK"
    assert not (IO.ANY != "LATENT") and not (IO.NUMBER != "INT") and IO.IMAGE != "MASK"
    assert io.MatchType.Template("T").io_type() == "*"


def test_pack_banners_stay_off_the_cli_json(capsys, tmp_path):
    assert main(["nodes", "--json", "--custom-nodes", str(PACKS), "--output-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    catalogue = json.loads(captured.out)
    assert "SurfaceMatchKey" in catalogue and "surface_pack: loaded" in captured.err
