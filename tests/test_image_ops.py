"""Image operations (nodes/image_ops.py) against formulas written out and independent computations (scipy.ndimage
filters and grey morphology, PIL quantize / transpose), and a graph through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from node_context import make_context, run_node
from PIL import Image

from latentloom.engine.inputs import InputError
from latentloom.nodes import create_engine
from latentloom.nodes.image_ops import (
    GetImageSize,
    ImageAddNoise,
    ImageBlend,
    ImageBlur,
    ImageFlip,
    ImageFromBatch,
    ImageQuantize,
    ImageRGBToYUV,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageSharpen,
    ImageStitch,
    ImageYUVToRGB,
    LoadImageOutput,
    Morphology,
    RebatchImages,
    RepeatImageBatch,
    ResizeAndPadImage,
    WebcamCapture,
)
from latentloom.nodes.imaging import bayer_matrix


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# Post-processing ---------------------------------------------------------------------------------------------

BLENDS = {
    "normal": lambda a, b: b,
    "multiply": lambda a, b: a * b,
    "screen": lambda a, b: 1 - (1 - a) * (1 - b),
    "overlay": lambda a, b: np.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
    "soft_light": lambda a, b: np.where(
        b <= 0.5, a - (1 - 2 * b) * a * (1 - a),
        a + (2 * b - 1) * (np.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, np.sqrt(a)) - a)),
    "difference": lambda a, b: a - b,
}


@pytest.mark.parametrize("mode", list(BLENDS))
def test_image_blend_modes_follow_the_formulas(mode):
    first, second = rand(2, 4, 5, 3), rand(2, 4, 5, 3, seed=1)
    out = run_node(ImageBlend, image1=first, image2=second, blend_factor=0.3, blend_mode=mode)[0]
    a, b = first.double().numpy(), second.double().numpy()
    expected = np.clip(a * 0.7 + BLENDS[mode](a, b) * 0.3, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_image_blend_fits_image2_and_broadcasts_one_image():
    first = rand(3, 4, 6, 3)
    out = run_node(ImageBlend, image1=first, image2=torch.full((1, 8, 12, 3), 0.5), blend_factor=1.0,
                   blend_mode="normal")[0]
    assert out.shape == (3, 4, 6, 3) and torch.allclose(out, torch.full_like(out, 0.5), atol=1e-6)
    with pytest.raises(InputError, match="input 'image2': has 2 images and image1 3"):
        run_node(ImageBlend, image1=first, image2=rand(2, 4, 6, 3), blend_factor=0.5, blend_mode="normal")


def numpy_gaussian(size, sigma):
    axis = np.linspace(-1, 1, size)
    grid = axis[:, None] ** 2 + axis[None, :] ** 2
    weights = np.exp(-grid / (2 * sigma * sigma))
    return weights / weights.sum()


def per_channel(image, kernel):
    """scipy correlation of every channel of [B,H,W,C], borders mirrored without repeating the edge."""
    array = image.double().numpy()
    out = np.empty_like(array)
    for b in range(array.shape[0]):
        for c in range(array.shape[-1]):
            out[b, ..., c] = ndi.correlate(array[b, ..., c], kernel, mode="mirror")
    return out


@pytest.mark.parametrize("radius,sigma", [(1, 1.0), (2, 0.5), (4, 3.0)])
def test_image_blur_is_comfyuis_gaussian_with_mirrored_borders(radius, sigma):
    image = rand(2, 9, 11, 4)
    out = run_node(ImageBlur, image=image, blur_radius=radius, sigma=sigma)[0]
    assert out.shape == image.shape
    np.testing.assert_allclose(out.numpy(), per_channel(image, numpy_gaussian(2 * radius + 1, sigma)), atol=1e-5)


@pytest.mark.parametrize("radius,sigma,alpha", [(1, 1.0, 1.0), (3, 0.7, 0.25)])
def test_image_sharpen_is_an_unsharp_kernel_summing_to_one(radius, sigma, alpha):
    image = rand(1, 8, 9, 3)
    kernel = numpy_gaussian(2 * radius + 1, sigma) * -(alpha * 10)
    kernel[radius, radius] += 1 - kernel.sum()
    out = run_node(ImageSharpen, image=image, sharpen_radius=radius, sigma=sigma, alpha=alpha)[0]
    np.testing.assert_allclose(out.numpy(), np.clip(per_channel(image, kernel), 0, 1), atol=1e-5)
    unchanged = run_node(ImageSharpen, image=image, sharpen_radius=radius, sigma=sigma, alpha=0.0)[0]
    assert torch.allclose(unchanged, image, atol=1e-6)


def test_filters_refuse_a_radius_the_image_cannot_mirror():
    with pytest.raises(InputError, match="input 'blur_radius': 4 must be smaller than the image's height"):
        run_node(ImageBlur, image=rand(1, 4, 9, 3), blur_radius=4, sigma=1.0)


def test_bayer_matrices_are_the_classic_index_matrices():
    classic = {2: [[0, 2], [3, 1]], 4: [[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]}
    for order, index in classic.items():
        np.testing.assert_allclose(bayer_matrix(order), (np.array(index) + 0.5) / order**2 - 0.5)
    assert bayer_matrix(16).shape == (16, 16) and sorted(((bayer_matrix(16) + 0.5) * 256 - 0.5).ravel()) == list(
        range(256))


def test_image_quantize_matches_pil_and_dithers():
    image = rand(2, 16, 16, 3)
    for dither, pil_dither in (("none", Image.Dither.NONE), ("floyd-steinberg", Image.Dither.FLOYDSTEINBERG)):
        out = run_node(ImageQuantize, image=image, colors=5, dither=dither)[0]
        for index in range(2):
            pixels = Image.fromarray((image[index].numpy() * 255).astype(np.uint8))
            expected = pixels.quantize(palette=pixels.quantize(colors=5), dither=pil_dither).convert("RGB")
            assert np.array_equal(np.round(out[index].numpy() * 255).astype(np.uint8), np.array(expected))
    two_colours = torch.zeros(1, 8, 8, 3)
    two_colours[:, :, 4:] = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(run_node(ImageQuantize, image=two_colours, colors=2, dither="none")[0], two_colours)
    ramp = torch.linspace(0, 1, 256).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    dithered = run_node(ImageQuantize, image=ramp, colors=2, dither="bayer-4")[0][0, ..., 0].numpy()
    # Written out: an 8-bit pixel plus the tiled Bayer threshold spread over the palette step, truncated, then the
    # nearer of the two palette greys.
    levels = (ramp[0, ..., 0].numpy() * 255).astype(np.uint8)
    palette = Image.fromarray(levels).convert("RGB").quantize(colors=2).getpalette()
    greys = sorted(palette[0::3][:len(palette) // 3])
    spread = 2 * 256 / (len(palette) // 3)
    thresholds = np.tile(spread * bayer_matrix(4) + 0.5, (4, 4))
    shifted = np.clip(levels + thresholds, 0, 255).astype(np.uint8).astype(np.float64)
    expected = np.where(np.abs(shifted - greys[0]) <= np.abs(shifted - greys[1]), greys[0], greys[1])
    ties = np.abs(shifted - greys[0]) == np.abs(shifted - greys[1])
    assert len(greys) == 2 and np.array_equal(np.round(dithered * 255)[~ties], expected[~ties])
    plain = run_node(ImageQuantize, image=ramp, colors=2, dither="none")[0][0, ..., 0].numpy()
    assert not np.array_equal(plain, dithered)
    rgba = torch.cat([two_colours, torch.full((1, 8, 8, 1), 0.25)], dim=-1)
    assert torch.equal(run_node(ImageQuantize, image=rgba, colors=2, dither="none")[0], rgba)  # alpha kept


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_morphology_equals_scipy_grey_morphology(kernel_size):
    image = rand(2, 9, 11, 3)
    footprint = np.ones((kernel_size, kernel_size), dtype=bool)

    def erode(plane):
        return ndi.grey_erosion(plane, footprint=footprint, mode="nearest")

    def dilate(plane):
        return ndi.grey_dilation(plane, footprint=footprint, mode="nearest")

    expected = {"erode": erode, "dilate": dilate, "open": lambda p: dilate(erode(p)),
                "close": lambda p: erode(dilate(p)), "gradient": lambda p: dilate(p) - erode(p),
                "top_hat": lambda p: p - dilate(erode(p)), "bottom_hat": lambda p: erode(dilate(p)) - p}
    for operation, reference in expected.items():
        out = run_node(Morphology, image=image, operation=operation, kernel_size=kernel_size)[0]
        assert out.shape == image.shape
        for b in range(2):
            for c in range(3):
                np.testing.assert_allclose(out[b, ..., c].numpy(), reference(image[b, ..., c].numpy()), atol=1e-6)


def test_yuv_follows_bt601_and_round_trips():
    image = rand(2, 5, 6, 3)
    y, u, v = run_node(ImageRGBToYUV, image=image)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    assert torch.allclose(y[..., 0], luma, atol=1e-6) and torch.equal(y[..., 0], y[..., 2])
    assert torch.allclose(u[..., 1], (b - luma) * 0.564 + 0.5, atol=1e-6)
    assert torch.allclose(v[..., 2], (r - luma) * 0.713 + 0.5, atol=1e-6)
    back = run_node(ImageYUVToRGB, Y=y, U=u, V=v)[0]
    assert torch.allclose(back, image, atol=2e-3)
    with pytest.raises(InputError, match="input 'U'"):
        run_node(ImageYUVToRGB, Y=y, U=u[:1], V=v)


# Transforms and batches --------------------------------------------------------------------------------------


def pil_ops(image, transpose):
    pixels = (image.numpy() * 255).astype(np.uint8)
    return torch.stack([torch.from_numpy(np.array(Image.fromarray(p).transpose(transpose))) for p in pixels])


def as_bytes(image):
    return (image * 255).to(torch.uint8)


def test_flip_and_rotate_match_pil_transposes():
    image = rand(2, 4, 6, 3)
    flips = {"x-axis: vertically": Image.Transpose.FLIP_TOP_BOTTOM,
             "y-axis: horizontally": Image.Transpose.FLIP_LEFT_RIGHT}
    for method, transpose in flips.items():
        assert torch.equal(as_bytes(run_node(ImageFlip, image=image, flip_method=method)[0]), pil_ops(image, transpose))
    rotations = {"90 degrees": Image.Transpose.ROTATE_270, "180 degrees": Image.Transpose.ROTATE_180,
                 "270 degrees": Image.Transpose.ROTATE_90}  # PIL turns anticlockwise, ComfyUI clockwise
    for rotation, transpose in rotations.items():
        out = run_node(ImageRotate, image=image, rotation=rotation)[0]
        assert torch.equal(as_bytes(out), pil_ops(image, transpose))
    assert torch.equal(run_node(ImageRotate, image=image, rotation="none")[0], image)


def test_image_stitch_pads_spaces_and_orders_the_parts():
    first, second = torch.zeros(2, 4, 3, 3), torch.ones(1, 2, 5, 4)
    out = run_node(ImageStitch, image1=first, image2=second, direction="left", match_image_size=False,
                   spacing_width=2, spacing_color="red")[0]
    assert out.shape == (2, 4, 5 + 2 + 3, 4)
    # image2 (repeated for the second batch entry) is padded 1 row above and below with black (red is not a grey).
    assert torch.equal(out[:, 1:3, :5], torch.ones(2, 2, 5, 4)) and bool((out[:, 0, :5, :3] == 0).all())
    assert out[0, 0, 5].tolist() == [1.0, 0.0, 0.0, 1.0]  # the red spacer, opaque
    assert torch.equal(out[..., 7:, :3], first[..., :3]) and bool((out[..., 7:, 3] == 1).all())  # alpha added
    down = run_node(ImageStitch, image1=torch.zeros(1, 2, 2, 3), image2=torch.full((1, 3, 4, 3), 0.5),
                    direction="down", match_image_size=False, spacing_width=0, spacing_color="white")[0]
    assert down.shape == (1, 5, 4, 3) and bool((down[0, :2, :1] == 1).all()) and bool((down[0, :2, 1:3] == 0).all())
    matched = run_node(ImageStitch, image1=torch.zeros(1, 6, 4, 3), image2=rand(1, 3, 5, 3), direction="right",
                       match_image_size=True, spacing_width=0, spacing_color="white")[0]
    assert matched.shape == (1, 6, 4 + 10, 3)  # image2 scaled to height 6: width int(6 · 5/3)
    alone = torch.zeros(1, 2, 2, 3)
    assert run_node(ImageStitch, image1=alone, direction="up", match_image_size=True, spacing_width=0,
                    spacing_color="white")[0] is alone


def test_batch_nodes():
    batch = rand(5, 2, 2, 3)
    assert torch.equal(run_node(ImageFromBatch, image=batch, batch_index=3, length=4)[0], batch[3:5])
    assert torch.equal(run_node(ImageFromBatch, image=batch, batch_index=99, length=1)[0], batch[4:5])
    repeated = run_node(RepeatImageBatch, image=batch[:2], amount=3)[0]
    assert torch.equal(repeated, torch.cat([batch[:2]] * 3))
    rebatched = run_node(RebatchImages, images=[batch[:3], batch[3:]], batch_size=[2])[0]
    assert [len(part) for part in rebatched] == [2, 2, 1] and torch.equal(torch.cat(rebatched), batch)


def test_add_noise_is_seeded_gaussian_noise_clipped():
    image = torch.full((1, 4, 4, 3), 0.5)
    out = run_node(ImageAddNoise, image=image, seed=123, strength=0.25)[0]
    torch.manual_seed(123)
    assert torch.equal(out, torch.clip(image + 0.25 * torch.randn(1, 4, 4, 3), 0, 1))
    assert not torch.equal(out, run_node(ImageAddNoise, image=image, seed=124, strength=0.25)[0])
    assert run_node(ImageAddNoise, image=image, seed=2**64 - 1, strength=1.0)[0].shape == image.shape


def test_scale_to_max_dimension_and_resize_and_pad():
    tall = rand(1, 10, 4, 3)
    assert run_node(ImageScaleToMaxDimension, image=tall, upscale_method="area", largest_size=25)[0].shape == (
        1, 25, 10, 3)
    assert run_node(ImageScaleToMaxDimension, image=rand(1, 3, 9, 3), upscale_method="lanczos",
                    largest_size=6)[0].shape == (1, 2, 6, 3)
    with pytest.raises(InputError, match="input 'largest_size'"):
        run_node(ImageScaleToMaxDimension, image=tall, upscale_method="area", largest_size=0)
    wide = torch.tensor([[[[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]]]])  # 1x2
    padded = run_node(ResizeAndPadImage, image=wide, target_width=7, target_height=6, padding_color="black",
                      interpolation="nearest-exact")[0]
    # Scale min(7/2, 6/1) = 3.5: 7x3 (int), centred vertically at row (6 - 3) // 2 = 1, black around.
    assert padded.shape == (1, 6, 7, 3)
    assert bool((padded[0, [0, 4, 5]] == 0).all())
    # nearest-exact 2 -> 7 columns: source column floor((i + 0.5) · 2 / 7) = 0, 0, 0, 1, 1, 1, 1.
    assert torch.equal(padded[0, 1:4], wide[0, 0, [0, 0, 0, 1, 1, 1, 1]].expand(3, 7, 3))


def test_get_image_size_returns_sizes_and_shows_them():
    result = run_node(GetImageSize, image=rand(3, 5, 7, 3))
    assert tuple(result.values) == (7, 5, 3)
    assert result.ui == {"text": ["width: 7, height: 5\n batch size: 3"]}


# Loading -----------------------------------------------------------------------------------------------------


def write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((3, 4, 3), value, dtype=np.uint8)).save(path)


def test_load_image_output_and_webcam_capture_read_annotated_files(tmp_path):
    ctx = make_context(tmp_path)
    write_png(ctx.env.output_dir / "render.png", 51)
    write_png(ctx.env.temp_dir / "webcam" / "shot.png", 102)
    image, mask = run_node(LoadImageOutput, ctx, image="render.png [output]")
    assert image.shape == (1, 3, 4, 3) and torch.allclose(image, torch.full_like(image, 0.2))
    assert mask.shape == (1, 64, 64)
    [captured] = run_node(WebcamCapture, ctx, image="webcam/shot.png [temp]", width=0, height=0,
                          capture_on_queue=True)
    assert torch.allclose(captured, torch.full((1, 3, 4, 3), 0.4))
    assert LoadImageOutput.validate_inputs(ctx.env, {"image": "nope.png [output]"}, {}) == \
        "Invalid image file: nope.png [output]"
    assert WebcamCapture.validate_inputs(ctx.env, {"image": "webcam/shot.png [temp]"}, {}) is True
    assert LoadImageOutput.fingerprint(ctx.env, {"image": "render.png [output]"}) != WebcamCapture.fingerprint(
        ctx.env, {"image": "webcam/shot.png [temp]"})


def test_rebatch_blur_stitch_and_size_through_the_engine(tmp_path):
    engine = create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", entry_points=False)
    pixels = (np.arange(6 * 8 * 3).reshape(6, 8, 3) * 5 % 256).astype(np.uint8)
    (tmp_path / "output").mkdir()
    Image.fromarray(pixels).save(tmp_path / "output" / "earlier.png")
    prompt = {
        "1": {"class_type": "LoadImageOutput", "inputs": {"image": "earlier.png [output]"}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
        "3": {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "y-axis: horizontally"}},
        "4": {"class_type": "ImageStitch", "inputs": {"image1": ["2", 0], "image2": ["3", 0], "direction": "right",
                                                      "match_image_size": False, "spacing_width": 2,
                                                      "spacing_color": "black"}},
        "5": {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": 3}},
        "6": {"class_type": "RebatchImages", "inputs": {"images": ["5", 0], "batch_size": 2}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ops"}},
        "8": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
        "9": {"class_type": "EmptyImage", "inputs": {"width": ["8", 0], "height": ["8", 1], "batch_size": ["8", 2],
                                                     "color": 0}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    events = []
    result = engine.run(prompt, listener=events.append)
    assert result.ok, result.error or result.node_errors
    saved = result.outputs["7"]["images"]
    assert len(saved) == 3  # one SaveImage call per rebatched list entry: 2 + 1 images
    shown = [event.output for event in events if event.type == "executed" and event.node == "8"]
    assert shown == [{"text": ["width: 18, height: 6\n batch size: 1"]}]  # the size, shown on the node
    with Image.open(tmp_path / "temp" / result.outputs["10"]["images"][0]["filename"]) as sized:
        assert sized.size == (18, 6)
    with Image.open(tmp_path / "output" / saved[0]["filename"]) as first:
        out = np.array(first).astype(np.float64)
    blurred = per_channel(torch.from_numpy(pixels[None].astype(np.float32) / 255), numpy_gaussian(3, 1.0))[0]
    assert out.shape == (6, 18, 3)
    assert np.abs(out[:, :8] - np.floor(255 * blurred + 1e-4)).max() <= 1
    assert (out[:, 8:10] == 0).all() and (out[:, 10:] == pixels[:, ::-1]).all()
