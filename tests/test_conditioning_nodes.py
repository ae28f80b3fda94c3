"""The conditioning nodes: text encoding into CONDITIONING lists and each list operation's effect."""

from __future__ import annotations

import pytest
import torch
from node_context import CountingManager, StubContext, make_env, run_node
from tiny_clip import PROJECTION, WIDTH, tiny_clip

import latentloom.nodes.conditioning as cn
from latentloom import nodes
from latentloom.nodes.diffusion.embeddings import EmbeddingLibrary


def run(node_cls, **inputs):
    return run_node(node_cls, inputs.pop("ctx", None), **inputs)


@pytest.fixture(scope="module")
def sd1():
    return tiny_clip("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_clip("sdxl", seed=3)


def cond_pair(fill: float, tokens: int = 77, width: int = 4, **options) -> list:
    return [torch.full((1, tokens, width), fill), {"pooled_output": torch.full((1, 3), fill), **options}]


# Registration and declared inputs ---------------------------------------------------------------------------


def test_module_is_registered_and_exports_all_nodes():
    assert "latentloom.nodes.conditioning" in nodes.NODE_MODULES
    assert {n.class_type() for n in cn.NODES} == {
        "CLIPTextEncode", "CLIPSetLastLayer", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner",
        "ConditioningCombine", "ConditioningAverage", "ConditioningConcat", "ConditioningSetArea",
        "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength", "ConditioningSetMask",
        "ConditioningZeroOut", "ConditioningSetTimestepRange", "InpaintModelConditioning", "LotusConditioning"}


@pytest.mark.parametrize("node_cls,expected", [
    (cn.CLIPTextEncode, {"text": None, "clip": None}),
    (cn.CLIPSetLastLayer, {"clip": None, "stop_at_clip_layer": -1}),
    (cn.CLIPTextEncodeSDXL, {"clip": None, "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                             "target_width": 1024, "target_height": 1024, "text_g": None, "text_l": None}),
    (cn.CLIPTextEncodeSDXLRefiner, {"ascore": 6.0, "width": 1024, "height": 1024, "text": None, "clip": None}),
    (cn.ConditioningAverage, {"conditioning_to": None, "conditioning_from": None, "conditioning_to_strength": 1.0}),
    (cn.ConditioningSetArea, {"conditioning": None, "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}),
    (cn.ConditioningSetAreaPercentage, {"conditioning": None, "width": 1.0, "height": 1.0, "x": 0.0, "y": 0.0,
                                        "strength": 1.0}),
    (cn.ConditioningSetMask, {"conditioning": None, "mask": None, "strength": 1.0, "set_cond_area": "default"}),
    (cn.ConditioningSetTimestepRange, {"conditioning": None, "start": 0.0, "end": 1.0}),
])
def test_input_names_order_and_defaults(node_cls, expected):
    specs = node_cls.input_specs()
    assert list(specs) == list(expected)
    assert {name: node_cls.input_default(name) for name in specs} == expected


def test_prompt_inputs_are_multiline_dynamic_strings_and_ranges_match():
    for node_cls, name in ((cn.CLIPTextEncode, "text"), (cn.CLIPTextEncodeSDXL, "text_g"),
                           (cn.CLIPTextEncodeSDXL, "text_l"), (cn.CLIPTextEncodeSDXLRefiner, "text")):
        spec = node_cls.input_specs()[name]
        assert spec.type == "STRING" and spec.multiline and spec.extra.get("dynamicPrompts") is True
    layer = cn.CLIPSetLastLayer.input_specs()["stop_at_clip_layer"]
    assert (layer.min, layer.max, layer.step) == (-24, -1, 1)
    area_width = cn.ConditioningSetArea.input_specs()["width"]
    assert (area_width.min, area_width.max, area_width.step) == (64, 16384, 8)
    assert cn.ConditioningSetTimestepRange.input_specs()["start"].step == 0.001
    assert cn.ConditioningSetMask.input_specs()["set_cond_area"].resolve_choices() == ["default", "mask bounds"]
    assert cn.CLIPTextEncode.outputs[0].type == "CONDITIONING" and cn.CLIPSetLastLayer.outputs[0].type == "CLIP"


# Text encoding -------------------------------------------------------------------------------------------------


def test_clip_text_encode_outputs_cond_and_pooled(sd1):
    (conditioning,) = run(cn.CLIPTextEncode, text="a (photo:1.2) of a cat", clip=sd1)
    cond, pooled = sd1.encode("a (photo:1.2) of a cat")
    assert len(conditioning) == 1
    torch.testing.assert_close(conditioning[0][0], cond, rtol=0, atol=0)
    assert set(conditioning[0][1]) == {"pooled_output"}
    torch.testing.assert_close(conditioning[0][1]["pooled_output"], pooled, rtol=0, atol=0)


def test_clip_text_encode_uses_the_model_manager_and_the_embedding_library(sd1):
    manager = CountingManager()
    ctx = StubContext(env=make_env(manager=manager))
    ctx.env.register(EmbeddingLibrary(ctx.env))  # no embeddings folder: "embedding:nothing" is not found
    (conditioning,) = run(cn.CLIPTextEncode, text="a embedding:nothing cat", clip=sd1, ctx=ctx)
    assert manager.used == [sd1.encoders]
    assert any("nothing" in w for w in ctx.warnings)
    torch.testing.assert_close(conditioning[0][0], sd1.encode("a cat")[0], rtol=0, atol=0)


def test_clip_text_encode_without_clip_names_node_and_input():
    with pytest.raises(ValueError, match=r"CLIPTextEncode \(#1\): input 'clip': must be a CLIP model \(got "
                                         r"NoneType\); if it comes from a checkpoint loader"):
        run(cn.CLIPTextEncode, text="a cat", clip=None)


def test_clip_set_last_layer_returns_a_clone(sd1):
    (skipped,) = run(cn.CLIPSetLastLayer, clip=sd1, stop_at_clip_layer=-2)
    assert skipped.layer_idx == -2 and sd1.layer_idx is None and skipped.encoders is sd1.encoders
    (encoded,) = run(cn.CLIPTextEncode, text="a cat", clip=skipped)
    torch.testing.assert_close(encoded[0][0], sd1.clone_with_layer(-2).encode("a cat")[0], rtol=0, atol=0)
    assert not torch.allclose(encoded[0][0], sd1.encode("a cat")[0], atol=1e-4)


def test_sdxl_text_encode_adds_size_options_and_pads_the_shorter_prompt(sdxl):
    long_g = "cat, " * 50                                         # 100 tokens: two chunks
    (conditioning,) = run(cn.CLIPTextEncodeSDXL, clip=sdxl, width=832, height=1216, crop_w=16, crop_h=32,
                          target_width=1024, target_height=1024, text_g=long_g, text_l="a dog")
    cond, options = conditioning[0]
    assert cond.shape == (1, 154, WIDTH["l"] + WIDTH["g"])
    assert {k: options[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == {
        "width": 832, "height": 1216, "crop_w": 16, "crop_h": 32, "target_width": 1024, "target_height": 1024}
    assert options["pooled_output"].shape == (1, PROJECTION["g"])
    # l: "a dog" then an empty-prompt chunk; g: the long prompt.
    tokens = sdxl.tokenize(long_g)
    tokens["l"] = sdxl.tokenize("a dog")["l"] + sdxl.empty_tokens()["l"]
    expected, pooled = sdxl.encode_tokens(tokens)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    torch.testing.assert_close(options["pooled_output"], pooled, rtol=0, atol=0)
    assert not torch.allclose(cond[:, :77, :WIDTH["l"]], cond[:, 77:, :WIDTH["l"]], atol=1e-4)


def test_sdxl_text_encode_rejects_sd1_clip(sd1):
    with pytest.raises(ValueError, match=r"CLIPTextEncodeSDXL \(#1\): input 'clip': must be an SDXL CLIP"):
        run(cn.CLIPTextEncodeSDXL, clip=sd1, text_g="a", text_l="b")


def test_sdxl_refiner_encode_adds_aesthetic_score():
    refiner = tiny_clip("sdxl_refiner", seed=3)
    (conditioning,) = run(cn.CLIPTextEncodeSDXLRefiner, ascore=2.5, width=768, height=512, text="a cat",
                          clip=refiner)
    cond, options = conditioning[0]
    assert cond.shape == (1, 77, WIDTH["g"])
    assert (options["aesthetic_score"], options["width"], options["height"]) == (2.5, 768, 512)


# List operations ---------------------------------------------------------------------------------------------


def test_combine_concatenates_lists():
    a, b, c = cond_pair(1.0), cond_pair(2.0), cond_pair(3.0)
    (combined,) = run(cn.ConditioningCombine, conditioning_1=[a], conditioning_2=[b, c])
    assert [pair[0][0, 0, 0].item() for pair in combined] == [1.0, 2.0, 3.0]


def test_average_blends_tensors_and_pooled():
    to, source = cond_pair(1.0, extra="kept"), cond_pair(3.0)
    (result,) = run(cn.ConditioningAverage, conditioning_to=[to], conditioning_from=[source],
                    conditioning_to_strength=0.25)
    cond, options = result[0]
    torch.testing.assert_close(cond, torch.full((1, 77, 4), 0.25 * 1.0 + 0.75 * 3.0))
    torch.testing.assert_close(options["pooled_output"], torch.full((1, 3), 2.5))
    assert options["extra"] == "kept" and to[1]["pooled_output"][0, 0] == 1.0   # input untouched


def test_average_pads_short_source_with_zeros_and_cuts_long_one():
    to = cond_pair(2.0, tokens=154)
    (result,) = run(cn.ConditioningAverage, conditioning_to=[to], conditioning_from=[cond_pair(4.0)],
                    conditioning_to_strength=0.5)
    cond = result[0][0]
    assert cond.shape == (1, 154, 4)
    torch.testing.assert_close(cond[:, :77], torch.full((1, 77, 4), 3.0))
    torch.testing.assert_close(cond[:, 77:], torch.full((1, 77, 4), 1.0))       # 0.5·2 + 0.5·0
    (cut,) = run(cn.ConditioningAverage, conditioning_to=[cond_pair(2.0)],
                 conditioning_from=[cond_pair(4.0, tokens=154)], conditioning_to_strength=0.5)
    assert cut[0][0].shape == (1, 77, 4)


def test_average_takes_pooled_from_source_when_target_has_none():
    to = [torch.zeros(1, 77, 4), {}]
    (result,) = run(cn.ConditioningAverage, conditioning_to=[to], conditioning_from=[cond_pair(3.0)],
                    conditioning_to_strength=0.5)
    # The missing target pooled counts as the source's, so the blend gives the source's pooled unchanged.
    torch.testing.assert_close(result[0][1]["pooled_output"], torch.full((1, 3), 3.0))


def test_average_and_concat_warn_on_multiple_sources():
    ctx = StubContext()
    run(cn.ConditioningConcat, conditioning_to=[cond_pair(1.0)], conditioning_from=[cond_pair(2.0), cond_pair(3.0)],
        ctx=ctx)
    assert ctx.warnings and "first" in ctx.warnings[0]


def test_concat_appends_tokens_and_keeps_options():
    to = cond_pair(1.0, area=(8, 8, 0, 0))
    (result,) = run(cn.ConditioningConcat, conditioning_to=[to, cond_pair(5.0)], conditioning_from=[cond_pair(2.0)])
    assert len(result) == 2
    cond, options = result[0]
    assert cond.shape == (1, 154, 4)
    assert cond[0, 0, 0] == 1.0 and cond[0, 100, 0] == 2.0
    assert options["area"] == (8, 8, 0, 0) and options is not to[1]
    torch.testing.assert_close(options["pooled_output"], to[1]["pooled_output"])


def test_set_area_in_latent_cells():
    source = [cond_pair(1.0)]
    (result,) = run(cn.ConditioningSetArea, conditioning=source, width=512, height=260, x=64, y=15, strength=2.5)
    assert result[0][1]["area"] == (260 // 8, 512 // 8, 15 // 8, 64 // 8)
    assert result[0][1]["strength"] == 2.5 and result[0][1]["set_area_to_bounds"] is False
    assert result[0][0] is source[0][0]
    assert "area" not in source[0][1]


def test_set_area_percentage():
    (result,) = run(cn.ConditioningSetAreaPercentage, conditioning=[cond_pair(1.0)], width=0.5, height=0.25, x=0.1,
                    y=0.2, strength=0.7)
    assert result[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert result[0][1]["strength"] == 0.7


def test_set_area_strength_changes_only_strength():
    source = [cond_pair(1.0, area=(4, 4, 0, 0), strength=1.0)]
    (result,) = run(cn.ConditioningSetAreaStrength, conditioning=source, strength=3.0)
    assert result[0][1]["strength"] == 3.0 and result[0][1]["area"] == (4, 4, 0, 0)
    assert source[0][1]["strength"] == 1.0


def test_set_mask_adds_batch_axis_and_bounds_flag():
    mask = torch.zeros(16, 24)
    mask[4:8, 2:10] = 1.0
    (result,) = run(cn.ConditioningSetMask, conditioning=[cond_pair(1.0)], mask=mask, strength=0.6,
                    set_cond_area="mask bounds")
    options = result[0][1]
    assert options["mask"].shape == (1, 16, 24) and torch.equal(options["mask"][0], mask)
    assert options["set_area_to_bounds"] is True and options["mask_strength"] == 0.6
    (default,) = run(cn.ConditioningSetMask, conditioning=[cond_pair(1.0)], mask=mask[None], strength=1.0,
                     set_cond_area="default")
    assert default[0][1]["set_area_to_bounds"] is False and default[0][1]["mask"].shape == (1, 16, 24)
    with pytest.raises(ValueError, match=r"ConditioningSetMask \(#1\): input 'mask': must be a MASK .*got NoneType"):
        run(cn.ConditioningSetMask, conditioning=[cond_pair(1.0)], mask=None)


def test_zero_out_zeroes_cond_and_pooled():
    source = [cond_pair(1.0, strength=0.5), [torch.ones(1, 77, 4), {}]]
    (result,) = run(cn.ConditioningZeroOut, conditioning=source)
    assert torch.count_nonzero(result[0][0]) == 0 and result[0][0].shape == (1, 77, 4)
    assert torch.count_nonzero(result[0][1]["pooled_output"]) == 0 and result[0][1]["strength"] == 0.5
    assert "pooled_output" not in result[1][1]
    assert source[0][0].eq(1.0).all() and source[0][1]["pooled_output"].eq(1.0).all()


def test_timestep_range():
    (result,) = run(cn.ConditioningSetTimestepRange, conditioning=[cond_pair(1.0), cond_pair(2.0)], start=0.2,
                    end=0.75)
    assert [(o["start_percent"], o["end_percent"]) for _, o in result] == [(0.2, 0.75), (0.2, 0.75)]


def test_lotus_conditioning_is_the_null_prompt_embedding_as_comfyui_returns_it():
    (conditioning,) = run(cn.LotusConditioning)
    [[embedding, options]] = conditioning
    assert options == {} and embedding.shape == (1, 2, 1024) and embedding.dtype == torch.float32
    assert torch.equal(embedding.half().float(), embedding)  # stored as float16 values
    # Spot values of ComfyUI 0.3.64's tensor: the first and last entries and the BOS token's largest feature.
    assert embedding[0, 0, 0].item() == -0.3134765625 and embedding[0, 1, -1].item() == 1.5009765625
    assert embedding[0, 0].max().item() == 13.0234375
    # Each run gives a fresh tensor: a node downstream that writes into it cannot change the next run's.
    (again,) = run(cn.LotusConditioning)
    assert again[0][0] is not embedding and torch.equal(again[0][0], embedding)
