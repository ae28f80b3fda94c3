"""Image nodes: loading (alpha masks, annotated names, EXIF, frames), saving (names, metadata), transforms,
primitives."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from image_support import LocalAutoencoder
from node_context import make_context, run_node
from PIL import Image

from latentloom.engine.node import NodeOutput, RunContext
from latentloom.nodes.image import (
    EmptyImage,
    ImageBatch,
    ImageCrop,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
    ImageScaleToTotalPixels,
    LoadImage,
    LoadImageMask,
    PreviewImage,
    SaveImage,
)
from latentloom.nodes.image_files import list_input_images
from latentloom.nodes.primitives import PrimitiveBoolean, PrimitiveFloat, PrimitiveInt, PrimitiveString


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, prompt={"3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "é"}}},
                        extra_data={"extra_pnginfo": {"workflow": {"nodes": [1, 2]}, "note": "hi"}})


def run(node_cls, ctx, **inputs):
    return run_node(node_cls, ctx, **inputs)


def write_rgba(path, height=6, width=5):
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 40
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    rgba[1, 1, 3] = 51
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return rgba


# Saving ---------------------------------------------------------------------------------------------------


def test_save_image_numbers_files_and_reports_them(ctx):
    images = torch.rand(2, 8, 12, 3)
    result = run(SaveImage, ctx, images=images, filename_prefix="ComfyUI")
    assert isinstance(result, NodeOutput) and result.values == ()
    assert result.ui == {"images": [
        {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"},
    ]}
    with Image.open(ctx.env.output_dir / "ComfyUI_00002_.png") as saved:
        assert saved.size == (12, 8)
        assert np.array_equal(np.array(saved), np.clip(255 * images[1].numpy(), 0, 255).astype(np.uint8))
    assert SaveImage.output_node and SaveImage.input_default("filename_prefix") == "ComfyUI"


def test_save_image_counter_continues_after_existing_files(ctx):
    out = ctx.env.output_dir
    for name in ("ComfyUI_00007_.png", "ComfyUI_notanumber.png", "Other_00099_.png", "ComfyUIx_00050_.png"):
        (out / name).write_bytes(b"")
    result = run(SaveImage, ctx, images=torch.zeros(1, 4, 4, 3), filename_prefix="ComfyUI")
    assert result.ui["images"][0]["filename"] == "ComfyUI_00008_.png"


def test_save_image_subfolder_prefix_and_size_tokens(ctx):
    result = run(SaveImage, ctx, images=torch.zeros(1, 16, 24, 3), filename_prefix="runs/a/img_%width%x%height%")
    entry = result.ui["images"][0]
    assert entry == {"filename": "img_24x16_00001_.png", "subfolder": "runs/a", "type": "output"}
    assert (ctx.env.output_dir / "runs" / "a" / "img_24x16_00001_.png").is_file()
    year = str(time.localtime().tm_year)
    result = run(SaveImage, ctx, images=torch.zeros(1, 4, 4, 3), filename_prefix="%year%/shot")
    assert result.ui["images"][0]["subfolder"] == year


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/absolute"])
def test_save_image_refuses_to_leave_the_output_folder(ctx, prefix):
    with pytest.raises(ValueError, match=r"SaveImage \(#1\): input 'filename_prefix': .*outside the output folder"):
        run(SaveImage, ctx, images=torch.zeros(1, 4, 4, 3), filename_prefix=prefix)
    assert not (ctx.env.output_dir.parent / "escape_00001_.png").exists()


def test_save_image_writes_prompt_and_extra_pnginfo_text_chunks(ctx):
    result = run(SaveImage, ctx, images=torch.zeros(1, 4, 4, 3), filename_prefix="meta")
    with Image.open(ctx.env.output_dir / result.ui["images"][0]["filename"]) as saved:
        text = saved.text
    assert text["prompt"] == json.dumps(ctx.prompt) and "\\u00e9" in text["prompt"]  # ASCII-escaped, as ComfyUI
    assert json.loads(text["workflow"]) == {"nodes": [1, 2]}
    assert text["note"] == '"hi"'


def test_save_image_truncates_instead_of_rounding(ctx):
    images = torch.full((1, 2, 2, 3), 0.999)  # 254.745 -> 254
    result = run(SaveImage, ctx, images=images, filename_prefix="trunc")
    with Image.open(ctx.env.output_dir / result.ui["images"][0]["filename"]) as saved:
        assert np.array(saved).max() == 254


def test_preview_image_goes_to_temp_with_a_random_prefix(ctx):
    first = run(PreviewImage, ctx, images=torch.zeros(1, 4, 4, 3)).ui["images"][0]
    second = run(PreviewImage, ctx, images=torch.zeros(1, 4, 4, 3)).ui["images"][0]
    assert first["type"] == "temp" and first["subfolder"] == ""
    assert first["filename"].startswith("ComfyUI_temp_") and first["filename"].endswith("_00001_.png")
    assert len(first["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    assert first["filename"] != second["filename"]
    assert (ctx.env.temp_dir / first["filename"]).is_file()


# Loading --------------------------------------------------------------------------------------------------


def test_load_image_mask_is_one_minus_alpha(ctx):
    rgba = write_rgba(ctx.env.input_dir / "pic.png")
    image, mask = run(LoadImage, ctx, image="pic.png")
    assert image.shape == (1, 6, 5, 3) and mask.shape == (1, 6, 5)
    torch.testing.assert_close(image[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255))
    assert mask[0, 0, 0] == 1.0 and mask[0, 1, 1] == pytest.approx(0.8) and mask[0, 2, 2] == 0.0


def test_load_image_without_alpha_gives_an_empty_64px_mask(ctx):
    Image.new("RGB", (10, 7), (255, 0, 0)).save(ctx.env.input_dir / "red.jpg")
    image, mask = run(LoadImage, ctx, image="red.jpg")
    assert image.shape == (1, 7, 10, 3) and mask.shape == (1, 64, 64) and not mask.any()


def test_load_image_resolves_subfolders_and_annotated_names(ctx):
    write_rgba(ctx.env.input_dir / "sub" / "a.png", height=3)
    write_rgba(ctx.env.output_dir / "b.png", height=4)
    write_rgba(ctx.env.temp_dir / "c.png", height=5)
    assert run(LoadImage, ctx, image="sub/a.png")[0].shape[1] == 3
    assert run(LoadImage, ctx, image="b.png [output]")[0].shape[1] == 4
    assert run(LoadImage, ctx, image="c.png [temp]")[0].shape[1] == 5
    assert LoadImage.validate_inputs(ctx.env, {"image": "b.png [output]"}, {}) is True


def test_load_image_missing_or_escaping_files_are_reported_by_name(ctx):
    assert LoadImage.validate_inputs(ctx.env, {"image": "missing.png"}, {}) == "Invalid image file: missing.png"
    assert LoadImage.validate_inputs(ctx.env, {"image": "../x.png"}, {}) == "Invalid image file: ../x.png"
    assert LoadImage.validate_inputs(ctx.env, {}, {"image": "STRING"}) is True  # linked: checked at run time
    with pytest.raises(FileNotFoundError, match=r"LoadImage \(#1\): input 'image': image file 'missing.png' not found"):
        run(LoadImage, ctx, image="missing.png")
    (ctx.env.input_dir / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"LoadImage \(#1\): input 'image': cannot read image file 'broken.png'"):
        run(LoadImage, ctx, image="broken.png")


def test_load_image_applies_exif_orientation(ctx):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (10, 4), (0, 0, 255)).save(ctx.env.input_dir / "rotated.jpg", exif=exif)
    image, _ = run(LoadImage, ctx, image="rotated.jpg")
    assert image.shape == (1, 10, 4, 3)


def test_load_image_reads_every_frame_of_the_first_size(ctx):
    frames = [Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(ctx.env.input_dir / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    image, mask = run(LoadImage, ctx, image="anim.gif")
    assert image.shape == (3, 6, 8, 3) and mask.shape[0] == 3
    assert image[1, 0, 0].argmax() == 1 and image[2, 0, 0].argmax() == 2


def test_load_image_fingerprint_follows_the_content(ctx):
    path = ctx.env.input_dir / "f.png"
    write_rgba(path)
    first = LoadImage.fingerprint(ctx.env, {"image": "f.png"})
    assert LoadImage.fingerprint(ctx.env, {"image": "f.png"}) == first
    Image.new("RGB", (5, 6)).save(path)
    assert LoadImage.fingerprint(ctx.env, {"image": "f.png"}) != first


def test_image_combo_lists_top_level_images_with_upload(ctx):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (ctx.env.input_dir / name).write_bytes(b"")
    (ctx.env.input_dir / "sub").mkdir()
    (ctx.env.input_dir / "sub" / "c.png").write_bytes(b"")
    assert list_input_images(ctx.env) == ["a.jpg", "b.png"]
    spec = LoadImage.input_specs()["image"]
    assert spec.resolve_choices(ctx.env) == ["a.jpg", "b.png"] and spec.extra["image_upload"] is True
    assert spec.resolve_choices(None) == []


@pytest.mark.parametrize("channel, expected", [("alpha", 1 - 51 / 255), ("red", 200 / 255), ("green", 40 / 255)])
def test_load_image_mask_reads_one_channel(ctx, channel, expected):
    write_rgba(ctx.env.input_dir / "m.png")
    (mask,) = run(LoadImageMask, ctx, image="m.png", channel=channel)
    assert mask.shape == (1, 6, 5) and mask[0, 1, 1].item() == pytest.approx(expected)


# Transforms -------------------------------------------------------------------------------------------------


def test_image_scale_sizes_and_aspect(ctx):
    image = torch.rand(2, 40, 60, 3)
    assert run(ImageScale, ctx, image=image, upscale_method="bilinear", width=30, height=10,
               crop="disabled")[0].shape == (2, 10, 30, 3)
    assert run(ImageScale, ctx, image=image, upscale_method="area", width=0, height=20,
               crop="disabled")[0].shape == (2, 20, 30, 3)
    assert run(ImageScale, ctx, image=image, upscale_method="nearest-exact", width=0, height=0,
               crop="center")[0] is image
    lanczos = run(ImageScale, ctx, image=image, upscale_method="lanczos", width=90, height=60, crop="center")[0]
    assert lanczos.shape == (2, 60, 90, 3)
    assert torch.equal(lanczos * 255, (lanczos * 255).round())  # went through uint8


def test_image_scale_by_and_to_total_pixels(ctx):
    image = torch.rand(1, 100, 200, 3)
    assert run(ImageScaleBy, ctx, image=image, upscale_method="bicubic", scale_by=0.25)[0].shape == (1, 25, 50, 3)
    (scaled,) = run(ImageScaleToTotalPixels, ctx, image=image, upscale_method="bilinear", megapixels=0.25)
    factor = math.sqrt(0.25 * 1024 * 1024 / (100 * 200))
    assert scaled.shape == (1, round(100 * factor), round(200 * factor), 3)


def test_invert_batch_and_empty_image(ctx):
    image = torch.rand(1, 8, 8, 3)
    torch.testing.assert_close(run(ImageInvert, ctx, image=image)[0], 1 - image)
    (batch,) = run(ImageBatch, ctx, image1=image, image2=torch.rand(2, 16, 32, 3))
    assert batch.shape == (3, 8, 8, 3) and torch.equal(batch[0], image[0])
    (empty,) = run(EmptyImage, ctx, width=5, height=3, batch_size=2, color=0xFF8000)
    assert empty.shape == (2, 3, 5, 3)
    torch.testing.assert_close(empty[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0]))


def test_pad_for_outpaint_fills_grey_and_feathers_padded_sides(ctx):
    image = torch.rand(1, 20, 30, 3)
    padded, mask = run(ImagePadForOutpaint, ctx, image=image, left=8, top=0, right=0, bottom=8, feathering=4)
    assert padded.shape == (1, 28, 38, 3) and mask.shape == (1, 28, 38)
    assert torch.equal(padded[0, :20, 8:], image[0])
    assert (padded[0, 20:] == 0.5).all() and (padded[0, :, :8] == 0.5).all()
    assert (mask[0, 20:] == 1).all() and (mask[0, :, :8] == 1).all()
    inner = mask[0, :20, 8:]
    # d = distance to the left edge j, or to the bottom edge 20 - i (never 0: ComfyUI's asymmetry); value
    # ((4 - d) / 4)^2 below 4; the top and right sides were not padded
    assert inner[5, 0] == 1.0 and inner[5, 1] == pytest.approx(0.5625) and inner[5, 3] == pytest.approx(0.0625)
    assert inner[5, 4] == 0 and inner[0, 15] == 0
    assert inner[19, 15] == pytest.approx(0.5625) and inner[18, 15] == pytest.approx(0.25)
    _, unfeathered = run(ImagePadForOutpaint, ctx, image=image, left=8, top=0, right=0, bottom=0, feathering=10)
    assert unfeathered[0, :, 8:].sum() == 0  # 2 * 10 does not fit the 20 rows: no feathering at all


def test_image_crop_clamps_the_origin(ctx):
    image = torch.rand(1, 10, 12, 3)
    (crop,) = run(ImageCrop, ctx, image=image, width=4, height=3, x=2, y=5)
    assert torch.equal(crop, image[:, 5:8, 2:6])
    (edge,) = run(ImageCrop, ctx, image=image, width=4, height=4, x=50, y=50)
    assert edge.shape == (1, 1, 1, 3)


def test_primitives_pass_their_value_through(ctx):
    assert run(PrimitiveInt, ctx, value=-7) == (-7,)
    assert run(PrimitiveFloat, ctx, value=2.5) == (2.5,)
    assert run(PrimitiveString, ctx, value="x") == ("x",)
    assert run(PrimitiveBoolean, ctx, value=True) == (True,)
    assert PrimitiveInt.input_specs()["value"].extra["control_after_generate"] is True


# Through the engine ---------------------------------------------------------------------------------------------


def test_load_encode_upscale_decode_save_through_the_engine(tmp_path):
    from typing import ClassVar

    from latentloom.engine.api import Engine
    from latentloom.engine.registry import NodeRegistry
    from latentloom.engine.types import VAE, Output
    from latentloom.nodes import image as image_nodes
    from latentloom.nodes import latent as latent_nodes
    from latentloom.nodes import vae_nodes
    from latentloom.nodes.diffusion.vae import VAEModel

    class TestVAELoader(image_nodes.Node):
        outputs: ClassVar = (Output(VAE),)

        def run(self, ctx: RunContext):
            return (VAEModel(LocalAutoencoder()),)

    registry = NodeRegistry(latent_nodes.NODES + vae_nodes.NODES + image_nodes.NODES + [TestVAELoader])
    ctx = make_context(tmp_path)
    engine = Engine(registry, ctx.env)
    write_rgba(ctx.env.input_dir / "pic.png", height=16, width=24)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pic.png [input]"}},
        "2": {"class_type": "TestVAELoader", "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bislerp",
                                                          "scale_by": 2.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "e2e/out"}},
    }
    result = engine.run(prompt, extra_data={"extra_pnginfo": {"workflow": {"id": 1}}})
    assert result.ok, getattr(result, "error", None) or result.node_errors
    assert result.outputs["6"]["images"] == [{"filename": "out_00001_.png", "subfolder": "e2e", "type": "output"}]
    with Image.open(ctx.env.output_dir / "e2e" / "out_00001_.png") as saved:
        assert saved.size == (48, 32)
        assert json.loads(saved.text["prompt"])["1"]["inputs"]["image"] == "pic.png [input]"
        assert json.loads(saved.text["workflow"]) == {"id": 1}

    again = engine.run(prompt)
    assert "1" in again.cached and "6" in again.cached  # unchanged file: nothing re-runs, no new file
    write_rgba(ctx.env.input_dir / "pic.png", height=8, width=24)  # new content: the loader must run again
    changed = engine.run(prompt)
    assert "1" in changed.executed and changed.outputs["6"]["images"][0]["filename"] == "out_00002_.png"

    prompt["1"]["inputs"]["image"] = "nope.png"
    invalid = engine.run(prompt)
    assert invalid.status == "invalid" and not invalid.ok and invalid.executed == []
    assert "Invalid image file: nope.png" in json.dumps(invalid.node_errors)
