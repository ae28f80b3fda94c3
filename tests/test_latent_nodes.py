"""Latent nodes and the shared resize helper: ComfyUI's sizes, batch bookkeeping and upscale numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from node_context import make_context, run_node

from latentloom.nodes.diffusion.resize import bislerp, common_upscale
from latentloom.nodes.latent import (
    EmptyLatentImage,
    LatentComposite,
    LatentFromBatch,
    LatentUpscale,
    LatentUpscaleBy,
    RepeatLatentBatch,
    SetLatentNoiseMask,
)


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path)


def run(node_cls, ctx, **inputs):
    return run_node(node_cls, ctx, **inputs)


def test_empty_latent_is_zeros_at_one_eighth_size(ctx):
    (latent,) = run(EmptyLatentImage, ctx, width=768, height=520, batch_size=3)
    assert latent["samples"].shape == (3, 4, 65, 96)
    assert latent["samples"].dtype == torch.float32 and not latent["samples"].any()
    specs = EmptyLatentImage.input_specs()
    assert (specs["width"].min, specs["width"].max, specs["width"].step) == (16, 16384, 8)
    assert EmptyLatentImage.input_default("width") == 512 and specs["batch_size"].max == 4096


def test_latent_inputs_are_checked_before_the_node_runs(ctx):
    with pytest.raises(ValueError, match=r"LatentUpscale \(#1\): input 'samples': must be a LATENT .*got Tensor"):
        run(LatentUpscale, ctx, samples=torch.zeros(1, 4, 8, 8), upscale_method="bilinear", width=64, height=64,
            crop="disabled")
    with pytest.raises(ValueError, match=r"LatentComposite \(#1\): input 'samples_from': .*got 3-D"):
        run(LatentComposite, ctx, samples_to={"samples": torch.zeros(1, 4, 8, 8)},
            samples_from={"samples": torch.zeros(4, 8, 8)}, x=0, y=0, feather=0)
    with pytest.raises(ValueError, match=r"SetLatentNoiseMask \(#1\): input 'mask': must be a MASK"):
        run(SetLatentNoiseMask, ctx, samples={"samples": torch.zeros(1, 4, 8, 8)}, mask=torch.zeros(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"SetLatentNoiseMask \(#1\): input 'mask': must be a MASK .*\(1, 2, 8, 8\)"):
        run(SetLatentNoiseMask, ctx, samples={"samples": torch.zeros(1, 4, 8, 8)}, mask=torch.zeros(1, 2, 8, 8))
    # [batch, 1, height, width] masks (ComfyUI's consumers reshape them) are accepted as they are there.
    (masked,) = run(SetLatentNoiseMask, ctx, samples={"samples": torch.zeros(1, 4, 8, 8)}, mask=torch.ones(2, 1, 8, 8))
    assert masked["noise_mask"].shape == (2, 1, 8, 8)


# common_upscale / bislerp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_plain_methods_are_torch_interpolate(method):
    torch.manual_seed(0)
    samples = torch.randn(2, 4, 6, 10)
    expected = F.interpolate(samples, size=(9, 15), mode=method)
    torch.testing.assert_close(common_upscale(samples, 15, 9, method), expected)


def test_bislerp_slerps_channel_vectors_by_hand():
    # Two cells, orthogonal vectors of norm 1 and 2, widened 2 -> 4: torch's half-pixel mapping puts the new
    # cells at source positions 0, 0.25, 0.75, 1.
    samples = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)
    result = bislerp(samples, 4, 1)

    def slerp(r):
        direction = torch.tensor([math.sin((1 - r) * math.pi / 2), math.sin(r * math.pi / 2)])
        return direction * (1 * (1 - r) + 2 * r)

    expected = torch.stack([slerp(0.0), slerp(0.25), slerp(0.75), torch.tensor([0.0, 2.0])], dim=1)
    torch.testing.assert_close(result[0, :, 0, :], expected, rtol=0, atol=1e-5)


def test_bislerp_handles_zero_and_opposite_vectors_without_nan():
    samples = torch.zeros(1, 4, 3, 3)
    samples[0, :, 1, 1] = torch.tensor([1.0, 0, 0, 0])
    samples[0, :, 1, 2] = torch.tensor([-1.0, 0, 0, 0])  # opposite: falls back to linear interpolation
    result = bislerp(samples, 7, 5)
    assert result.shape == (1, 4, 5, 7) and torch.isfinite(result).all()


def test_center_crop_removes_the_excess_of_the_long_axis():
    samples = torch.arange(8 * 16, dtype=torch.float32).reshape(1, 1, 8, 16)
    cropped = common_upscale(samples, 8, 8, "nearest-exact", "center")  # aspect 2 -> 1: 4 columns off each side
    torch.testing.assert_close(cropped, samples[..., 4:12])
    tall = common_upscale(samples.transpose(-1, -2), 8, 8, "nearest-exact", "center")
    torch.testing.assert_close(tall, samples.transpose(-1, -2)[..., 4:12, :])


# Upscale nodes ----------------------------------------------------------------------------------------------


def test_latent_upscale_targets_pixels_over_8_and_keeps_other_keys(ctx):
    mask = torch.ones(1, 1, 64, 96)
    latent = {"samples": torch.randn(2, 4, 8, 12), "noise_mask": mask, "batch_index": [4, 5]}
    (out,) = run(LatentUpscale, ctx, samples=latent, upscale_method="bilinear", width=200, height=128,
                 crop="disabled")
    assert out["samples"].shape == (2, 4, 16, 25)  # 200 // 8 = 25
    assert out["noise_mask"] is mask and out["batch_index"] == [4, 5]
    assert latent["samples"].shape == (2, 4, 8, 12)  # the input dict is untouched


def test_latent_upscale_zero_side_keeps_the_aspect_with_a_64_px_floor(ctx):
    latent = {"samples": torch.randn(1, 4, 8, 12)}
    (out,) = run(LatentUpscale, ctx, samples=latent, upscale_method="nearest-exact", width=0, height=128,
                 crop="disabled")
    assert out["samples"].shape == (1, 4, 16, 24)  # width = round(12 * 128 / 8) = 192 px
    (out,) = run(LatentUpscale, ctx, samples=latent, upscale_method="nearest-exact", width=16, height=0,
                 crop="disabled")
    assert out["samples"].shape == (1, 4, 8, 8)  # width raised to 64 px; height round(8 * 64 / 12) = 43 -> 64
    (same,) = run(LatentUpscale, ctx, samples=latent, upscale_method="bislerp", width=0, height=0,
                  crop="disabled")
    assert same is latent


def test_latent_upscale_floor_of_64_px_applies_when_both_sides_are_given(ctx):
    latent = {"samples": torch.randn(1, 4, 8, 12)}
    (out,) = run(LatentUpscale, ctx, samples=latent, upscale_method="nearest-exact", width=8, height=200,
                 crop="disabled")
    assert out["samples"].shape == (1, 4, 25, 8)  # width 8 px raised to 64 (8 cells), as ComfyUI does


def test_latent_upscale_by_rounds_the_scaled_size(ctx):
    latent = {"samples": torch.randn(1, 4, 8, 13)}
    (out,) = run(LatentUpscaleBy, ctx, samples=latent, upscale_method="bislerp", scale_by=1.5)
    assert out["samples"].shape == (1, 4, 12, 20)  # round(19.5) = 20 (banker's rounding as Python's round)
    assert torch.isfinite(out["samples"]).all()


# Masks and batches --------------------------------------------------------------------------------------------


def test_set_latent_noise_mask_reshapes_to_b1hw(ctx):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = run(SetLatentNoiseMask, ctx, samples=latent, mask=torch.ones(40, 24))
    assert out["noise_mask"].shape == (1, 1, 40, 24) and "noise_mask" not in latent
    (out,) = run(SetLatentNoiseMask, ctx, samples=latent, mask=torch.ones(3, 40, 24))
    assert out["noise_mask"].shape == (3, 1, 40, 24)


def test_latent_from_batch_clamps_and_records_batch_index(ctx):
    samples = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 4, 2, 2).clone()
    masks = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])  # 2 masks for 4 items: cycled
    (out,) = run(LatentFromBatch, ctx, samples={"samples": samples, "noise_mask": masks}, batch_index=1, length=5)
    assert out["samples"][:, 0, 0, 0].tolist() == [1, 2, 3]
    assert out["batch_index"] == [1, 2, 3]
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [1, 0, 1]
    (out,) = run(LatentFromBatch, ctx, samples={"samples": samples, "batch_index": [7, 8, 9, 10]}, batch_index=10,
                 length=1)
    assert out["samples"][:, 0, 0, 0].tolist() == [3] and out["batch_index"] == [10]


def test_repeat_latent_batch_offsets_batch_indices(ctx):
    samples = torch.randn(2, 4, 2, 2)
    per_item = torch.rand(2, 1, 2, 2)
    (out,) = run(RepeatLatentBatch, ctx, samples={"samples": samples, "batch_index": [2, 3], "noise_mask": per_item},
                 amount=3)
    assert out["samples"].shape == (6, 4, 2, 2) and torch.equal(out["samples"][4:], samples)
    assert out["batch_index"] == [2, 3, 4, 5, 6, 7]
    assert out["noise_mask"].shape == (6, 1, 2, 2) and torch.equal(out["noise_mask"][2:4], per_item)
    shared = torch.rand(1, 1, 2, 2)
    (out,) = run(RepeatLatentBatch, ctx, samples={"samples": samples, "noise_mask": shared}, amount=2)
    assert out["noise_mask"] is shared and "batch_index" not in out


def test_latent_composite_pastes_and_clips(ctx):
    target = {"samples": torch.zeros(1, 4, 8, 8)}
    source = {"samples": torch.ones(1, 4, 6, 6)}
    (out,) = run(LatentComposite, ctx, samples_to=target, samples_from=source, x=32, y=16, feather=0)
    expected = torch.zeros(8, 8)
    expected[2:8, 4:8] = 1  # pasted at cell (2, 4), clipped at the target's edge
    assert torch.equal(out["samples"][0, 0], expected)
    assert not target["samples"].any()


def test_latent_composite_feathers_only_interior_edges(ctx):
    target = {"samples": torch.zeros(1, 4, 8, 8)}
    source = {"samples": torch.ones(1, 4, 4, 4)}
    (out,) = run(LatentComposite, ctx, samples_to=target, samples_from=source, x=8, y=0, feather=16)
    region = out["samples"][0, 0, 0:4, 1:5]
    rows = torch.tensor([1.0, 1.0, 1.0, 0.5])  # top edge is the target's edge: no ramp; bottom ramps 1, 0.5
    cols = torch.tensor([0.5, 1.0, 1.0, 0.5])
    torch.testing.assert_close(region, rows[:, None] * cols[None, :])
    assert out["samples"][0, 0, 4:].sum() == 0
