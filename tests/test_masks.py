"""Mask nodes and alpha compositing (nodes/masks.py) against formulas written out, scipy.ndimage, and graphs run
through the engine (one of them ComfyUI's own mask template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from node_context import make_context, run_node
from PIL import Image

from latentloom.engine.inputs import InputError
from latentloom.nodes import create_engine
from latentloom.nodes.masks import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    ImageCompositeMasked,
    ImageToMask,
    InvertMask,
    JoinImageWithAlpha,
    MaskComposite,
    MaskPreview,
    MaskToImage,
    PorterDuffImageComposite,
    SolidMask,
    SplitImageWithAlpha,
    ThresholdMask,
)


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, prompt={"1": {"class_type": "MaskPreview", "inputs": {}}})


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# Conversions and simple masks ----------------------------------------------------------------------------------


def test_mask_image_conversions_accept_every_mask_layout():
    mask = rand(2, 5, 7)
    image = run_node(MaskToImage, mask=mask)[0]
    assert image.shape == (2, 5, 7, 3) and all(torch.equal(image[..., c], mask) for c in range(3))
    assert run_node(MaskToImage, mask=mask[0])[0].shape == (1, 5, 7, 3)          # [H,W]
    assert run_node(MaskToImage, mask=mask.unsqueeze(1))[0].shape == (2, 5, 7, 3)  # [B,1,H,W]
    rgba = rand(2, 5, 7, 4, seed=1)
    for index, channel in enumerate(("red", "green", "blue", "alpha")):
        assert torch.equal(run_node(ImageToMask, image=rgba, channel=channel)[0], rgba[..., index])
    with pytest.raises(InputError, match=r"ImageToMask \(#1\): input 'channel': the image has no alpha"):
        run_node(ImageToMask, image=rgba[..., :3], channel="alpha")


def test_image_color_to_mask_matches_rounded_8_bit_colours_exactly():
    image = torch.zeros(1, 2, 3, 3)
    image[0, 0, 0] = torch.tensor([1.0, 128 / 255, 0.0])            # 0xFF8000
    image[0, 0, 1] = torch.tensor([254.6 / 255, 127.6 / 255, 0.4 / 255])  # rounds to 0xFF8000 too
    image[0, 1, 2] = torch.tensor([1.0, 129 / 255, 0.0])            # 0xFF8100
    mask = run_node(ImageColorToMask, image=image, color=0xFF8000)[0]
    assert mask.tolist() == [[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    assert run_node(ImageColorToMask, image=image, color=0)[0].sum() == 3  # the black pixels


def test_solid_invert_threshold_and_crop():
    solid = run_node(SolidMask, value=0.25, width=6, height=4)[0]
    assert solid.shape == (1, 4, 6) and solid.dtype == torch.float32 and bool((solid == 0.25).all())
    mask = rand(2, 6, 8)
    assert torch.allclose(run_node(InvertMask, mask=mask)[0], 1.0 - mask)
    threshold = run_node(ThresholdMask, mask=torch.tensor([[0.2, 0.5, 0.51]]), value=0.5)[0]
    assert threshold.tolist() == [[0.0, 0.0, 1.0]]  # strictly greater
    cropped = run_node(CropMask, mask=mask, x=5, y=1, width=10, height=2)[0]
    assert torch.equal(cropped, mask[:, 1:3, 5:8])  # clipped at the right edge
    with pytest.raises(InputError, match="input 'x': 8 is outside the mask"):
        run_node(CropMask, mask=mask, x=8, y=0, width=1, height=1)


# MaskComposite -----------------------------------------------------------------------------------------------

OPERATIONS = {
    "multiply": lambda d, s: d * s,
    "add": lambda d, s: d + s,
    "subtract": lambda d, s: d - s,
    "and": lambda d, s: float(round(d) >= 1 and round(s) >= 1),
    "or": lambda d, s: float(round(d) >= 1 or round(s) >= 1),
    "xor": lambda d, s: float((round(d) >= 1) != (round(s) >= 1)),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_mask_composite_applies_the_operation_on_the_overlap_only(operation):
    destination, source = rand(1, 5, 6, seed=2), rand(1, 4, 4, seed=3)
    out = run_node(MaskComposite, destination=destination, source=source, x=3, y=2, operation=operation)[0]
    expected = destination.clone()
    for row in range(5):
        for col in range(6):
            if row >= 2 and col >= 3:  # the source's top-left part lands there; the rest falls outside
                value = OPERATIONS[operation](destination[0, row, col].item(), source[0, row - 2, col - 3].item())
                expected[0, row, col] = min(max(value, 0.0), 1.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_mask_composite_batches_broadcast_one_source_but_not_one_destination():
    destination, source = rand(3, 4, 4), rand(1, 2, 2, seed=4)
    out = run_node(MaskComposite, destination=destination, source=source, x=0, y=0, operation="multiply")[0]
    assert out.shape == (3, 4, 4)
    assert torch.allclose(out[:, :2, :2], destination[:, :2, :2] * source[:, :, :])
    far = run_node(MaskComposite, destination=destination, source=source, x=10, y=0, operation="add")[0]
    assert torch.equal(far, destination)  # nothing overlaps
    with pytest.raises(InputError, match="input 'source': has 3 masks; the destination has 1"):
        run_node(MaskComposite, destination=destination[:1], source=rand(3, 2, 2), x=0, y=0, operation="add")


# Feather and grow --------------------------------------------------------------------------------------------


def test_feather_mask_uses_comfyuis_edge_factors():
    mask = torch.ones(2, 4, 6)
    out = run_node(FeatherMask, mask=mask, left=2, top=0, right=3, bottom=2)[0]
    # left 2: col 0 x 1/2, col 1 x 2/2. right 3 counts from index -0 = column 0: col 0 x 1/3, col 5 x 2/3,
    # col 4 x 3/3. bottom 2 likewise: row 0 x 1/2, row 3 x 2/2.
    columns = torch.tensor([1 / 2 * 1 / 3, 1.0, 1.0, 1.0, 1.0, 2 / 3])
    rows = torch.tensor([1 / 2, 1.0, 1.0, 1.0])
    assert torch.allclose(out, (rows[:, None] * columns[None, :]).expand(2, 4, 6), atol=1e-6)
    clamped = run_node(FeatherMask, mask=torch.ones(1, 2, 2), left=50, top=0, right=0, bottom=0)[0]
    assert torch.allclose(clamped, torch.tensor([[[0.5, 1.0], [0.5, 1.0]]]))  # left clamped to the width


@pytest.mark.parametrize("expand", [2, -2, 3, -1, 25, -25])
@pytest.mark.parametrize("tapered_corners", [True, False])
def test_grow_mask_equals_scipy_grey_morphology_repeated(expand, tapered_corners):
    mask = rand(2, 9, 11, seed=5)
    mask[1] = (mask[1] > 0.8).float()
    corner = 0 if tapered_corners else 1
    footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]], dtype=bool)
    out = run_node(GrowMask, mask=mask, expand=expand, tapered_corners=tapered_corners)[0]
    for index in range(2):
        expected = mask[index].numpy()
        for _ in range(abs(expand)):
            step = ndi.grey_dilation if expand > 0 else ndi.grey_erosion
            expected = step(expected, footprint=footprint)
        np.testing.assert_array_equal(out[index].numpy(), expected)
    assert torch.equal(run_node(GrowMask, mask=mask, expand=0, tapered_corners=True)[0], mask)


# Image compositing -------------------------------------------------------------------------------------------


def test_image_composite_masked_pastes_the_visible_part_through_the_mask():
    destination = rand(2, 8, 10, 3, seed=6)
    source = rand(1, 4, 4, 3, seed=7)
    mask = rand(4, 4, seed=8)
    out = run_node(ImageCompositeMasked, destination=destination, source=source, x=8, y=6, resize_source=False,
                   mask=mask)[0]
    expected = destination.clone()
    for row in range(6, 8):
        for col in range(8, 10):
            weight = mask[row - 6, col - 8]
            expected[:, row, col] = weight * source[0, row - 6, col - 8] + (1 - weight) * destination[:, row, col]
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.equal(out, destination) and torch.equal(destination, rand(2, 8, 10, 3, seed=6))  # not in place
    opaque = run_node(ImageCompositeMasked, destination=destination, source=source, x=1, y=2,
                      resize_source=False)[0]
    assert torch.equal(opaque[:, 2:6, 1:5], source.expand(2, -1, -1, -1))


def test_image_composite_masked_resizes_and_matches_channels():
    destination = torch.zeros(1, 6, 8, 3)
    source = torch.full((1, 2, 2, 3), 0.75)
    stretched = run_node(ImageCompositeMasked, destination=destination, source=source, x=3, y=3,
                         resize_source=True)[0]
    assert torch.allclose(stretched[:, 3:, 3:], torch.full((1, 3, 5, 3), 0.75))  # resized to 6x8, pasted at 3,3
    rgba_destination = torch.zeros(1, 4, 4, 4)
    half = torch.full((1, 4, 4), 0.5)
    out = run_node(ImageCompositeMasked, destination=rgba_destination, source=torch.ones(1, 4, 4, 3), x=0, y=0,
                   resize_source=False, mask=half)[0]
    assert out.shape == (1, 4, 4, 4) and torch.allclose(out, torch.full((1, 4, 4, 4), 0.5))  # source gets alpha 1
    dropped = run_node(ImageCompositeMasked, destination=destination, source=torch.ones(1, 6, 8, 4), x=0, y=0,
                       resize_source=False)[0]
    assert dropped.shape == (1, 6, 8, 3) and bool((dropped == 1).all())


def porter_duff_reference(mode, s, sa, d, da):
    """One channel of one pixel: colours s, d and alphas sa, da (not premultiplied) -> (colour, alpha)."""
    s, d = s * sa, d * da  # premultiplied
    union = sa + da - sa * da
    table = {
        "ADD": (min(sa + da, 1.0), min(s + d, 1.0)),
        "CLEAR": (0.0, 0.0),
        "DARKEN": (union, (1 - da) * s + (1 - sa) * d + min(s, d)),
        "DST": (da, d),
        "DST_ATOP": (sa, sa * d + (1 - da) * s),
        "DST_IN": (sa * da, d * sa),
        "DST_OUT": ((1 - sa) * da, (1 - sa) * d),
        "DST_OVER": (da + (1 - da) * sa, d + (1 - da) * s),
        "LIGHTEN": (union, (1 - da) * s + (1 - sa) * d + max(s, d)),
        "MULTIPLY": (sa * da, s * d),
        "OVERLAY": (union, 2 * s * d if 2 * d < da else sa * da - 2 * (da - s) * (sa - d)),
        "SCREEN": (union, s + d - s * d),
        "SRC": (sa, s),
        "SRC_ATOP": (da, da * s + (1 - sa) * d),
        "SRC_IN": (sa * da, s * da),
        "SRC_OUT": ((1 - da) * sa, (1 - da) * s),
        "SRC_OVER": (sa + (1 - sa) * da, s + (1 - sa) * d),
        "XOR": ((1 - da) * sa + (1 - sa) * da, (1 - da) * s + (1 - sa) * d),
    }
    alpha, colour = table[mode]
    colour = colour / alpha if alpha > 1e-5 else 0.0
    return min(max(colour, 0.0), 1.0), alpha


@pytest.mark.parametrize("mode", ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER",
                                  "LIGHTEN", "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT",
                                  "SRC_OVER", "XOR"])
def test_porter_duff_modes_follow_the_formulas(mode):
    source, destination = rand(1, 3, 4, 3, seed=9), rand(1, 3, 4, 3, seed=10)
    source_mask, destination_mask = rand(1, 3, 4, seed=11), rand(1, 3, 4, seed=12)
    source_mask[0, 0, 0] = destination_mask[0, 0, 0] = 1.0  # both transparent: colour 0
    image, mask = run_node(PorterDuffImageComposite, source=source, source_alpha=source_mask,
                           destination=destination, destination_alpha=destination_mask, mode=mode)
    for row in range(3):
        for col in range(4):
            sa, da = 1 - source_mask[0, row, col].item(), 1 - destination_mask[0, row, col].item()
            for channel in range(3):
                colour, alpha = porter_duff_reference(mode, source[0, row, col, channel].item(), sa,
                                                      destination[0, row, col, channel].item(), da)
                assert image[0, row, col, channel].item() == pytest.approx(colour, abs=1e-5)
                assert mask[0, row, col].item() == pytest.approx(1 - alpha, abs=1e-6)


def test_porter_duff_pairs_up_to_the_shortest_batch_and_fits_sizes_to_the_destination():
    image, mask = run_node(PorterDuffImageComposite, source=rand(3, 4, 4, 3), source_alpha=rand(2, 2, 2),
                           destination=rand(2, 6, 8, 3, seed=1), destination_alpha=rand(2, 3, 4), mode="SRC_OVER")
    assert image.shape == (2, 6, 8, 3) and mask.shape == (2, 6, 8)
    opaque = torch.zeros(1, 6, 8)
    image, mask = run_node(PorterDuffImageComposite, source=torch.full((1, 3, 4, 3), 0.25), source_alpha=opaque,
                           destination=rand(1, 6, 8, 3), destination_alpha=opaque, mode="SRC")
    assert torch.allclose(image, torch.full((1, 6, 8, 3), 0.25), atol=1e-6) and bool((mask == 0).all())
    with pytest.raises(InputError, match="input 'source': has 4 channels"):
        run_node(PorterDuffImageComposite, source=rand(1, 2, 2, 4), source_alpha=opaque,
                 destination=rand(1, 2, 2, 3), destination_alpha=opaque, mode="SRC")


def test_split_and_join_alpha_round_trip_and_join_resizes_the_mask():
    rgba = rand(2, 4, 4, 4)
    rgb, mask = run_node(SplitImageWithAlpha, image=rgba)
    assert torch.equal(rgb, rgba[..., :3]) and torch.allclose(mask, 1 - rgba[..., 3])
    assert torch.allclose(run_node(JoinImageWithAlpha, image=rgb, alpha=mask)[0], rgba, atol=1e-6)
    _, no_alpha = run_node(SplitImageWithAlpha, image=rgb)
    assert bool((no_alpha == 0).all())
    small = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    joined = run_node(JoinImageWithAlpha, image=rand(3, 4, 4, 3), alpha=small)[0]
    assert joined.shape == (1, 4, 4, 4)  # paired up to the shorter batch
    alpha = joined[0, ..., 3]
    # Bilinear 2 -> 4 (half-pixel centres): the corners keep the mask's values, pixel 1 is 3/4 + 1/4.
    assert alpha[0, 0].item() == pytest.approx(1.0) and alpha[0, 3].item() == pytest.approx(0.0)
    assert alpha[3, 3].item() == pytest.approx(0.75)
    assert alpha[0, 1].item() == pytest.approx(1 - (0.75 * 0.0 + 0.25 * 1.0))


def test_mask_preview_saves_a_grey_png_in_temp(ctx):
    mask = torch.tensor([[[0.0, 0.5], [1.0, 0.999]]])
    result = run_node(MaskPreview, ctx, mask=mask)
    [entry] = result.ui["images"]
    assert entry["type"] == "temp" and entry["subfolder"] == ""
    assert entry["filename"].startswith("ComfyUI_temp_") and entry["filename"].endswith("_00001_.png")
    with Image.open(Path(ctx.env.temp_dir) / entry["filename"]) as saved:
        assert saved.mode == "RGB" and json.loads(saved.text["prompt"]) == ctx.prompt
        assert np.array(saved)[..., 0].tolist() == [[0, 127], [255, 254]]  # 255·v truncated
        assert np.array_equal(np.array(saved)[..., 0], np.array(saved)[..., 2])


# Graphs through the engine -----------------------------------------------------------------------------------


def test_load_grow_feather_invert_composite_save_through_the_engine(tmp_path):
    engine = create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", entry_points=False)
    rgba = np.zeros((12, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 2] = np.arange(10, dtype=np.uint8)[None, :] * 20
    rgba[..., 3] = 255
    rgba[4:7, 3:6, 3] = 0  # a transparent hole: mask 1 there
    (tmp_path / "input").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "input" / "pic.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pic.png"}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 1], "expand": 1, "tapered_corners": True}},
        "3": {"class_type": "InvertMask", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 10, "height": 12, "batch_size": 1, "color": 0x0000FF}},
        "5": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["4", 0], "source": ["1", 0],
                                                               "x": 0, "y": 0, "resize_source": False,
                                                               "mask": ["3", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "masked"}},
    }
    result = engine.run(prompt)
    assert result.ok, result.error or result.node_errors
    with Image.open(tmp_path / "output" / result.outputs["6"]["images"][0]["filename"]) as saved:
        pixels = np.array(saved).astype(np.float64)
    # Independent: the hole grown by the 3x3 cross, inverted, then the picture over blue through that weight.
    hole = 1.0 - rgba[..., 3] / 255.0
    weight = 1.0 - ndi.grey_dilation(hole, footprint=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool))
    picture = rgba[..., :3] / 255.0
    blue = np.zeros_like(picture)
    blue[..., 2] = 1.0
    expected = np.clip(255.0 * (weight[..., None] * picture + (1 - weight[..., None]) * blue), 0, 255)
    assert np.abs(pixels - np.floor(expected + 1e-4)).max() <= 1
    assert pixels[5, 4].tolist() == [0, 0, 255] and pixels[3, 4].tolist() == [0, 0, 255]  # hole and grown rim
    assert pixels[0, 0].tolist() == [200, 0, 0]


@pytest.mark.slow
def test_comfyuis_mask_template_converts_and_runs(tmp_path):
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    path = Path(templates.__file__).resolve().parent / "templates" / "basic_mask_operations_and_compositing.json"
    if not path.is_file():
        pytest.skip("template not in this corpus version")
    engine = create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", entry_points=False)
    prompt = engine.load(json.loads(path.read_text()))
    previews = {node_id for node_id, entry in prompt.items() if entry["class_type"] in ("MaskPreview", "PreviewImage")}
    assert len(previews) >= 10 and {"MaskComposite", "FeatherMask", "ThresholdMask", "ImageCompositeMasked"} <= {
        entry["class_type"] for entry in prompt.values()}
    result = engine.run(prompt)
    assert result.ok, result.error or result.node_errors
    assert previews <= set(result.outputs)
    composite = next(node_id for node_id, entry in prompt.items() if entry["class_type"] == "ImageCompositeMasked")
    shown = next(node_id for node_id in previews if prompt[node_id]["inputs"].get("images") == [composite, 0])
    with Image.open(tmp_path / "temp" / result.outputs[shown]["images"][0]["filename"]) as saved:
        red = np.array(saved)[..., 0]
    # Red over black through a feathered (40 px each side) 0.5 canvas with a white 512 px square at 128,128: red =
    # 255·mask. ComfyUI's right-edge quirk scales column 0 by 1/40 twice and the last column by 2/40.
    assert red.shape == (1024, 1024)
    assert red[300, 300] == 255 and red[800, 800] == 127
    assert red[500, 1023] == int(255 * 0.5 * 2 / 40) and red[500, 1] == int(255 * 0.5 * 2 / 40)
    assert red[500, 0] == 0
