"""Model upscaling (nodes/upscale.py, nodes/diffusion/tiling.py) on tiny randomly initialised spandrel networks
written to files as upscale model files are shipped (ESRGAN's old-arch .pth, Real-ESRGAN compact .safetensors,
a BasicSR-style SwinIR .pth), and on the bundled toy upscaler. Outputs are compared with the networks themselves,
tilings with untiled runs and with ComfyUI's blend formula written out."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from node_context import CountingManager, StubContext, make_env, run_node
from PIL import Image

from latentloom.engine.inputs import InputError, MissingInputFile
from latentloom.nodes import create_engine
from latentloom.nodes.diffusion.checkpoint import save_state_dict
from latentloom.nodes.diffusion.tiling import TilePlan, feather, tiled_apply, upscale_tiled
from latentloom.nodes.model_files import file_identity, model_key
from latentloom.nodes.upscale import ImageUpscaleWithModel, UpscaleModelLoader

# spandrel's architectures are imported where the networks are built: spandrel imports torchvision, seconds that
# collecting this module for `make test-fast` need not pay.

REPO = Path(__file__).resolve().parent.parent
TOY_UPSCALER = REPO / "models" / "upscale_models" / "toy-upscale-x2.safetensors"


def tiny_esrgan() -> torch.nn.Module:
    # spandrel reads gc (32) as a constant of the architecture, so only the width and depth shrink.
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(1)
    return ESRGAN(num_filters=8, num_blocks=1, scale=4).eval()


def tiny_compact(pointwise: bool = False) -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(2)
    network = Compact(num_feat=8, num_conv=2, upscale=2).eval()
    if pointwise:  # only the centre taps of the 3x3 kernels: every output pixel depends on one input pixel
        with torch.no_grad():
            for layer in network.modules():
                if isinstance(layer, torch.nn.Conv2d):
                    centre = layer.weight[:, :, 1, 1].clone()
                    layer.weight.zero_()
                    layer.weight[:, :, 1, 1] = centre
    return network


def tiny_swinir() -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(3)
    return SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
                  upsampler="pixelshuffle").eval()


def write_models(folder: Path) -> dict[str, torch.nn.Module]:
    """The three files, and the network each holds (for SwinIR: its EMA weights)."""
    from spandrel.architectures.SwinIR import SwinIR

    folder.mkdir(parents=True, exist_ok=True)
    esrgan, compact, swinir = tiny_esrgan(), tiny_compact(), tiny_swinir()
    torch.save(esrgan.state_dict(), folder / "esrgan-x4.pth")                 # old-arch keys, no wrapper
    save_state_dict(compact.state_dict(), folder / "compact-x2.safetensors")
    # BasicSR's layout with DataParallel names: {"params_ema": ..., "params": ...}; the EMA weights are used.
    torch.manual_seed(4)
    other = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
                   upsampler="pixelshuffle")
    torch.save({"params_ema": {f"module.{k}": v for k, v in swinir.state_dict().items()},
                "params": {f"module.{k}": v for k, v in other.state_dict().items()}}, folder / "swinir-x2.pth")
    return {"esrgan-x4.pth": esrgan, "compact-x2.safetensors": compact, "swinir-x2.pth": swinir}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, dict[str, torch.nn.Module]]:
    models = tmp_path_factory.mktemp("models")
    return models, write_models(models / "upscale_models")


@pytest.fixture
def ctx(model_files) -> StubContext:
    return StubContext(make_env(models_dir=model_files[0]))


def load(ctx: StubContext, name: str):
    (model,) = run_node(UpscaleModelLoader, ctx, model_name=name)
    return model


def upscale(ctx: StubContext, model, image: torch.Tensor) -> torch.Tensor:
    (result,) = run_node(ImageUpscaleWithModel, ctx, upscale_model=model, image=image)
    return result


def random_image(height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


# Loading and running each architecture ------------------------------------------------------------------------


@pytest.mark.parametrize("name, architecture, scale", [
    ("esrgan-x4.pth", "ESRGAN", 4),
    ("compact-x2.safetensors", "RealESRGAN Compact", 2),
    ("swinir-x2.pth", "SwinIR", 2),
])
def test_each_architecture_loads_and_upscales_as_the_network_itself(ctx, model_files, name, architecture, scale):
    from spandrel import ImageModelDescriptor

    model = load(ctx, name)
    assert isinstance(model, ImageModelDescriptor) and model.architecture.name == architecture
    assert model.scale == scale and not model.model.training
    assert sorted(UpscaleModelLoader.input_specs()["model_name"].resolve_choices(ctx.env)) == sorted(model_files[1])
    image = random_image(20, 24, batch=2)
    result = upscale(ctx, model, image)
    assert result.shape == (2, 20 * scale, 24 * scale, 3) and result.dtype == torch.float32
    assert not result.is_inference()  # later nodes may change it in place
    network = model_files[1][name]
    with torch.no_grad():
        expected = network(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    # One tile per image (both fit in 512 px): two progress reports out of two.
    assert [report[:2] for report in ctx.reports] == [(1, 2), (2, 2)]


def test_the_loader_and_the_upscale_go_through_the_memory_manager(model_files):
    ctx = StubContext(make_env(models_dir=model_files[0], manager=CountingManager()))
    first, second = load(ctx, "compact-x2.safetensors"), load(ctx, "compact-x2.safetensors")
    assert first is second
    upscale(ctx, first, random_image(8, 8))
    assert ctx.models.used == [first.model]  # put on the compute device for the run
    path = model_files[0] / "upscale_models" / "compact-x2.safetensors"
    key = model_key("upscale_model", file_identity(path))
    assert key in ctx.models
    assert ctx.models.drop(key)
    assert load(ctx, "compact-x2.safetensors") is not first
    fingerprint = UpscaleModelLoader.fingerprint(ctx.env, {"model_name": "compact-x2.safetensors"})
    assert fingerprint == [file_identity(path)[1:], 1]


def test_a_model_file_replaced_on_disk_is_loaded_afresh(tmp_path):
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    save_state_dict(tiny_compact().state_dict(), folder / "x.safetensors")
    ctx = StubContext(make_env(models_dir=tmp_path / "models"))
    before = load(ctx, "x.safetensors")
    save_state_dict(tiny_compact(pointwise=True).state_dict(), folder / "x.safetensors")
    os.utime(folder / "x.safetensors", ns=(1, 10**18))
    after = load(ctx, "x.safetensors")
    assert after is not before
    assert torch.count_nonzero(after.model.body[0].weight[:, :, 0, 0]) == 0


# Tiling -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, width", [(40, 8), (16, 8), (10, 8), (8, 8), (5, 8), (30, 0), (1, 1), (3, 1)])
def test_feather_weights_follow_comfyuis_formula(length, width):
    # Each of the `width` outermost cells at either end is multiplied by (t+1)/width, t counted from that end;
    # a tile not longer than the feather keeps weight 1. Where the two ramps meet, both factors apply.
    expected = np.ones(length)
    if 0 < width < length:
        for index in range(length):
            expected[index] *= min(1.0, (index + 1) / width) * min(1.0, (length - index) / width)
    np.testing.assert_allclose(feather(length, width).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("size, tile, overlap", [(600, 512, 32), (512, 512, 32), (513, 512, 32), (1500, 256, 32),
                                                 (70, 32, 8), (10, 128, 32)])
def test_tile_counts_are_comfyuis_steps(size, tile, overlap):
    expected = 1 if size <= tile else math.ceil((size - overlap) / (tile - overlap))
    plan = TilePlan.create((size, 7), (tile, tile), overlap)
    assert len(plan.rows) == expected and plan.count == expected


def explicit_blend(image: torch.Tensor, function, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """ComfyUI's tiled_scale for one image, written out: full-size weight maps per tile, summed and divided."""
    _, _, height, width = image.shape

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        return [max(0, min(size - overlap, p)) for p in range(0, size - overlap, tile - overlap)]

    total = torch.zeros(1, 3, height * scale, width * scale, dtype=torch.float64)
    weights = torch.zeros_like(total)
    ramp = overlap * scale
    for top in starts(height):
        for left in starts(width):
            piece = image[:, :, top:top + tile, left:left + tile]
            out = function(piece).double()
            rows, columns = out.shape[-2:]
            weight = torch.ones(rows, columns, dtype=torch.float64)
            for axis, length in ((0, rows), (1, columns)):
                if ramp >= length:
                    continue
                index = torch.arange(length, dtype=torch.float64)
                factor = (index + 1).clamp(max=ramp) / ramp * (length - index).clamp(max=ramp) / ramp
                weight *= factor[:, None] if axis == 0 else factor[None, :]
            total[:, :, top * scale:top * scale + rows, left * scale:left * scale + columns] += out * weight
            weights[:, :, top * scale:top * scale + rows, left * scale:left * scale + columns] += weight
    return (total / weights).float()


def test_tiled_upscale_is_the_feathered_blend_of_the_tiles(ctx):
    # A real ESRGAN sees across tile borders, so tiles disagree at the seams: the blend itself is what is checked.
    model = load(ctx, "esrgan-x4.pth")
    image = random_image(40, 70).movedim(-1, 1)
    with torch.no_grad():
        tiled = tiled_apply(image, model, (32, 32), 8, 4, 3)
        expected = explicit_blend(image, model, 32, 8, 4)
        untiled = model(image)
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-5)
    assert (tiled - untiled).abs().max() > 1e-3  # the seams are real: a cut-out tile is not the whole picture


def test_tiling_a_local_model_equals_the_untiled_run(tmp_path):
    folder = tmp_path / "models" / "upscale_models"
    save_state_dict(tiny_compact(pointwise=True).state_dict(), folder / "pointwise.safetensors")
    ctx = StubContext(make_env(models_dir=tmp_path / "models"))
    model = load(ctx, "pointwise.safetensors")
    image = random_image(530, 600, seed=5)  # over 512 both ways: 2x2 tiles of ComfyUI's 512 px, overlap 32
    result = upscale(ctx, model, image)
    with torch.no_grad():
        untiled = model(image.movedim(-1, 1)).movedim(1, -1)
    assert result.shape == (1, 1060, 1200, 3)
    torch.testing.assert_close(result, untiled, rtol=0, atol=2e-6)
    assert [report[:2] for report in ctx.reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_out_of_memory_halves_the_tile_down_to_128(ctx):
    model = load(ctx, "compact-x2.safetensors")
    image = random_image(300, 40, seed=6).movedim(-1, 1)
    pieces, retries, reports = [], [], []

    def fits_in_256(piece: torch.Tensor) -> torch.Tensor:
        pieces.append(tuple(piece.shape[-2:]))
        if max(piece.shape[-2:]) > 256:
            raise torch.OutOfMemoryError("simulated: tiles over 256 px do not fit")
        return model(piece)

    with torch.no_grad():
        result = upscale_tiled(image, fits_in_256, 2, 3, progress=lambda d, t: reports.append((d, t)),
                               on_out_of_memory=retries.append)
        expected = tiled_apply(image, model, (256, 256), 32, 2, 3)
    assert retries == [256] and pieces == [(300, 40), (256, 40), (76, 40)]
    assert reports == [(1, 2), (2, 2)]  # the failed 512-px pass reported nothing; the 256-px pass counts 2 tiles
    torch.testing.assert_close(result, expected, rtol=0, atol=0)

    pieces.clear()
    retries.clear()

    def never_fits(piece: torch.Tensor) -> torch.Tensor:
        pieces.append(max(piece.shape[-2:]))
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        upscale_tiled(image, never_fits, 2, 3, on_out_of_memory=retries.append)
    assert retries == [256, 128] and pieces == [300, 256, 128]


# Bad input ----------------------------------------------------------------------------------------------------


def test_a_file_that_is_no_upscale_model_is_an_input_error(ctx, model_files):
    folder = model_files[0] / "upscale_models"
    save_state_dict({"encoder.weight": torch.zeros(4, 4)}, folder / "junk.safetensors")
    (folder / "broken.pth").write_bytes(b"not a zip")
    # A pickle that needs a class beyond tensors and containers is refused, not executed.
    torch.save({"weights": torch.zeros(2), "extra": Path("x")}, folder / "code.pth")
    try:
        with pytest.raises(InputError, match=r"UpscaleModelLoader \(#1\): input 'model_name': junk.safetensors: "
                                             r"not an upscale model architecture spandrel knows"):
            load(ctx, "junk.safetensors")
        with pytest.raises(InputError, match=r"input 'model_name': broken.pth: not a readable weights file"):
            load(ctx, "broken.pth")
        with pytest.raises(InputError, match=r"input 'model_name': code.pth: refused to load: .*Unsupported global"):
            load(ctx, "code.pth")
    finally:
        for name in ("junk.safetensors", "broken.pth", "code.pth"):
            (folder / name).unlink()
    with pytest.raises(MissingInputFile, match="input 'model_name'"):
        load(ctx, "absent.pth")
    with pytest.raises(InputError, match="input 'model_name': is empty"):
        load(ctx, "")


def test_bad_images_and_models_are_input_errors(ctx):
    model = load(ctx, "compact-x2.safetensors")
    with pytest.raises(InputError, match=r"input 'image': has 4 channels; the RealESRGAN Compact upscale model "
                                         r"takes 3"):
        upscale(ctx, model, torch.rand(1, 8, 8, 4))
    with pytest.raises(InputError, match=r"input 'image': is empty"):
        upscale(ctx, model, torch.rand(1, 0, 8, 3))
    with pytest.raises(InputError, match=r"input 'upscale_model': must be an UPSCALE_MODEL .*got str"):
        upscale(ctx, "esrgan-x4.pth", torch.rand(1, 8, 8, 3))
    with pytest.raises(InputError, match=r"input 'upscale_model': must be an UPSCALE_MODEL .*got SRVGGNetCompact"):
        upscale(ctx, model.model, torch.rand(1, 8, 8, 3))


# Through the engine -------------------------------------------------------------------------------------------


def test_load_image_upscale_save_through_the_engine(tmp_path, model_files):
    engine = create_engine(models_dir=model_files[0], input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                           temp_dir=tmp_path / "temp", entry_points=False)
    pixels = (np.random.default_rng(7).random((18, 22, 3)) * 255).astype(np.uint8)
    (tmp_path / "input").mkdir()
    Image.fromarray(pixels).save(tmp_path / "input" / "small.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "esrgan-x4.pth"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
    }
    result = engine.run(prompt)
    assert result.ok, result.error or result.node_errors
    with Image.open(tmp_path / "output" / result.outputs["4"]["images"][0]["filename"]) as saved:
        assert saved.size == (88, 72)
        written = np.asarray(saved.convert("RGB")).astype(np.int64)
    with torch.no_grad():
        network = model_files[1]["esrgan-x4.pth"]
        expected = network(torch.from_numpy(pixels).float().div(255).permute(2, 0, 1)[None]).clamp(0, 1)
    expected_bytes = np.floor(expected[0].permute(1, 2, 0).numpy() * 255)  # SaveImage truncates 255*v
    assert np.abs(written - expected_bytes).max() <= 1
    # A wrong link type is refused before anything runs.
    prompt["3"]["inputs"]["upscale_model"] = ["1", 0]
    assert engine.run(prompt).status == "invalid"


# The bundled toy upscaler -------------------------------------------------------------------------------------


@pytest.mark.skipif(not TOY_UPSCALER.is_file(), reason="toy upscaler not shipped")
def test_the_toy_upscaler_beats_bicubic_on_held_out_toy_images():
    sys.path.insert(0, str(REPO / "tools"))
    from make_toy_upscaler import EVAL_SEEDS, pairs, psnr

    assert TOY_UPSCALER.stat().st_size < 1 << 20
    ctx = StubContext(make_env(models_dir=REPO / "models"))
    model = load(ctx, TOY_UPSCALER.name)
    assert model.architecture.name == "RealESRGAN Compact" and model.scale == 2
    small, large = pairs(EVAL_SEEDS[:16])
    result = upscale(ctx, model, small.movedim(1, -1)).movedim(-1, 1)
    bicubic = F.interpolate(small, scale_factor=2, mode="bicubic", align_corners=False)
    assert psnr(result, large) > psnr(bicubic, large) + 5  # measured: 42.5 dB against 33.6 dB
