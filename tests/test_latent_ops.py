"""The latent-ops family (nodes/latent_ops.py) against ComfyUI's formulas written out here, element by element
where the formula is per pixel; the masked composite, crops, cuts and rebatching against index arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from node_context import make_context, run_node

from latentloom.nodes.diffusion.latent_operations import OperationOnGuidance, Sharpen, TonemapReinhard
from latentloom.nodes.diffusion.models import DiffusionModel
from latentloom.nodes.latent_ops import (
    LatentAdd,
    LatentApplyOperation,
    LatentApplyOperationCFG,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentBlend,
    LatentCompositeMasked,
    LatentConcat,
    LatentCrop,
    LatentCut,
    LatentFlip,
    LatentInterpolate,
    LatentMultiply,
    LatentOperationSharpen,
    LatentOperationTonemapReinhard,
    LatentRotate,
    LatentSubtract,
    RebatchLatents,
)


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def latent(*shape, seed=0, **extra):
    return {"samples": randn(*shape, seed=seed), **extra}


def centre_cropped_bilinear(samples, height, width, rows, cols):
    """The reference for ComfyUI's reshape_latent_to: the given centre crop, then bilinear (half-pixel centres)."""
    return F.interpolate(samples[:, :, rows, cols], size=(height, width), mode="bilinear", align_corners=False)


# Arithmetic ----------------------------------------------------------------------------------------------------


def test_add_subtract_multiply_same_shape(ctx):
    a, b = latent(2, 4, 6, 8, seed=1, noise_mask=torch.ones(1, 1, 48, 64)), latent(2, 4, 6, 8, seed=2)
    (added,) = run_node(LatentAdd, ctx, samples1=a, samples2=b)
    (subtracted,) = run_node(LatentSubtract, ctx, samples1=a, samples2=b)
    (scaled,) = run_node(LatentMultiply, ctx, samples=a, multiplier=-2.5)
    assert torch.equal(added["samples"], a["samples"] + b["samples"])
    assert torch.equal(subtracted["samples"], a["samples"] - b["samples"])
    assert torch.equal(scaled["samples"], a["samples"] * -2.5)
    # The first latent's other keys pass through; the inputs are left alone.
    assert added["noise_mask"] is a["noise_mask"]
    assert torch.equal(a["samples"], randn(2, 4, 6, 8, seed=1))


def test_add_resizes_the_second_latent_and_cycles_its_batch(ctx):
    a, b = latent(3, 4, 6, 8, seed=1), latent(2, 4, 10, 10, seed=2)
    (added,) = run_node(LatentAdd, ctx, samples1=a, samples2=b)
    # 10x10 -> aspect 8/6: keep round((10 - 10 * 0.75) / 2) = 1 row off top and bottom, then 8x10 -> 6x8.
    resized = centre_cropped_bilinear(b["samples"], 6, 8, slice(1, 9), slice(0, 10))
    expected = a["samples"] + resized[[0, 1, 0]]
    torch.testing.assert_close(added["samples"], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"LatentAdd \(#1\): input 'samples2': has 16 channels"):
        run_node(LatentAdd, ctx, samples1=a, samples2=latent(1, 16, 6, 8))


def _interpolate_reference(first: np.ndarray, second: np.ndarray, ratio: float) -> np.ndarray:
    out = np.zeros_like(first)
    for b in range(first.shape[0]):
        for y in range(first.shape[2]):
            for x in range(first.shape[3]):
                u, v = first[b, :, y, x].astype(np.float64), second[b, :, y, x].astype(np.float64)
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                du = u / nu if nu else np.zeros_like(u)
                dv = v / nv if nv else np.zeros_like(v)
                mixed = du * ratio + dv * (1 - ratio)
                nm = np.linalg.norm(mixed)
                out[b, :, y, x] = (mixed / nm if nm else 0) * (nu * ratio + nv * (1 - ratio))
    return out


def test_interpolate_mixes_directions_and_lengths_per_pixel(ctx):
    a, b = latent(1, 4, 3, 5, seed=3), latent(1, 4, 3, 5, seed=4)
    a["samples"][0, :, 1, 2] = 0  # a zero vector has no direction: only b's direction remains there
    for ratio in (0.0, 0.3, 1.0):
        (mixed,) = run_node(LatentInterpolate, ctx, samples1=a, samples2=b, ratio=ratio)
        expected = _interpolate_reference(a["samples"].numpy(), b["samples"].numpy(), ratio)
        np.testing.assert_allclose(mixed["samples"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # Batches larger than one are mixed item by item.
    a2, b2 = latent(3, 4, 2, 2, seed=5), latent(3, 4, 2, 2, seed=6)
    (mixed,) = run_node(LatentInterpolate, ctx, samples1=a2, samples2=b2, ratio=0.25)
    expected = _interpolate_reference(a2["samples"].numpy(), b2["samples"].numpy(), 0.25)
    np.testing.assert_allclose(mixed["samples"].numpy(), expected, rtol=1e-5, atol=1e-6)


# Batches -----------------------------------------------------------------------------------------------------


def test_batch_resizes_without_cycling_and_records_batch_indices(ctx):
    mask = torch.rand(1, 1, 48, 64)
    a = latent(2, 4, 6, 8, seed=1, noise_mask=mask)
    b = latent(3, 4, 12, 8, seed=2, batch_index=[7, 8, 9])
    (joined,) = run_node(LatentBatch, ctx, samples1=a, samples2=b)
    # 12x8 -> aspect 8/6 is wider: keep round((12 - 12 * 0.5) / 2) = 3 rows off each side, then 6x8 (no resize).
    resized = centre_cropped_bilinear(b["samples"], 6, 8, slice(3, 9), slice(0, 8))
    torch.testing.assert_close(joined["samples"], torch.cat([a["samples"], resized]), rtol=0, atol=1e-6)
    assert joined["batch_index"] == [0, 1, 7, 8, 9]
    assert joined["noise_mask"] is mask  # the first latent's keys are kept, as ComfyUI does
    (again,) = run_node(LatentBatch, ctx, samples1=b, samples2=a)
    assert again["batch_index"] == [7, 8, 9, 0, 1] and again["samples"].shape == (5, 4, 12, 8)


def test_batch_seed_behavior(ctx):
    (fixed,) = run_node(LatentBatchSeedBehavior, ctx, samples=latent(3, 4, 2, 2), seed_behavior="fixed")
    assert fixed["batch_index"] == [0, 0, 0]
    picked = latent(2, 4, 2, 2, batch_index=[5, 6])
    (fixed,) = run_node(LatentBatchSeedBehavior, ctx, samples=picked, seed_behavior="fixed")
    assert fixed["batch_index"] == [5, 5] and picked["batch_index"] == [5, 6]
    (free,) = run_node(LatentBatchSeedBehavior, ctx, samples=picked, seed_behavior="random")
    assert "batch_index" not in free and torch.equal(free["samples"], picked["samples"])


def test_rebatch_joins_runs_of_one_size_and_cuts_them(ctx):
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :8] = 1.0
    latents = [latent(3, 4, 8, 8, seed=1), latent(2, 4, 8, 8, seed=2, noise_mask=mask),
               latent(1, 4, 4, 4, seed=3), latent(1, 4, 8, 8, seed=4, batch_index=[42])]
    (batches,) = run_node(RebatchLatents, ctx, latents=latents, batch_size=[2])
    assert [b["samples"].shape[0] for b in batches] == [2, 2, 1, 1, 1]
    everything = torch.cat([latents[0]["samples"], latents[1]["samples"]])
    assert torch.equal(batches[0]["samples"], everything[0:2]) and torch.equal(batches[2]["samples"], everything[4:])
    assert [b["batch_index"] for b in batches] == [[0, 1], [2, 3], [4], [5], [42]]
    # A batch whose masks are all ones has its mask dropped; a batch mixing items keeps one mask per item.
    assert "noise_mask" not in batches[0] and "noise_mask" not in batches[3]
    assert torch.equal(batches[1]["noise_mask"][0], torch.ones(1, 64, 64))
    assert torch.equal(batches[1]["noise_mask"][1], mask[0]) and torch.equal(batches[2]["noise_mask"], mask[1:])
    (single,) = run_node(RebatchLatents, ctx, latents=latents[:2], batch_size=[8])
    assert len(single) == 1 and single[0]["samples"].shape[0] == 5
    with pytest.raises(ValueError, match=r"RebatchLatents \(#1\): input 'latents': .*same channels"):
        run_node(RebatchLatents, ctx, latents=[latent(1, 4, 8, 8), latent(1, 16, 8, 8)], batch_size=[2])


# Composite, concat, cut, crop --------------------------------------------------------------------------------


def _composite_reference(dest, source, x, y, mask=None):
    out = dest.clone()
    left, top = x // 8, y // 8
    for b in range(dest.shape[0]):
        for row in range(source.shape[2]):
            for col in range(source.shape[3]):
                ty, tx = top + row, left + col
                if ty >= dest.shape[2] or tx >= dest.shape[3]:
                    continue
                weight = 1.0 if mask is None else float(mask[b % mask.shape[0], row, col])
                pasted = source[b % source.shape[0], :, row, col]
                out[b, :, ty, tx] = weight * pasted + (1 - weight) * dest[b, :, ty, tx]
    return out


def test_composite_masked_pastes_clips_and_blends(ctx):
    dest, source = latent(2, 4, 6, 7, seed=1, batch_index=[3, 4]), latent(1, 4, 4, 4, seed=2)
    (pasted,) = run_node(LatentCompositeMasked, ctx, destination=dest, source=source, x=32, y=24,
                         resize_source=False)
    expected = _composite_reference(dest["samples"], source["samples"], 32, 24)
    assert torch.equal(pasted["samples"], expected) and pasted["batch_index"] == [3, 4]
    assert not torch.equal(dest["samples"], pasted["samples"])  # the input is not written to
    # A mask at the source's size, one per item (cycled over the destination's batch), weights each pixel.
    mask = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(9))
    (blended,) = run_node(LatentCompositeMasked, ctx, destination=dest, source=source, x=8, y=0,
                          resize_source=False, mask=mask)
    torch.testing.assert_close(blended["samples"], _composite_reference(dest["samples"], source["samples"], 8, 0,
                                                                        mask), rtol=0, atol=1e-6)
    # Past the edge nothing is pasted.
    (outside,) = run_node(LatentCompositeMasked, ctx, destination=dest, source=source, x=4096, y=0,
                          resize_source=False)
    assert torch.equal(outside["samples"], dest["samples"])
    # resize_source stretches the source over the whole destination first.
    (stretched,) = run_node(LatentCompositeMasked, ctx, destination=dest, source=source, x=0, y=0,
                            resize_source=True)
    expected = F.interpolate(source["samples"], size=(6, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(stretched["samples"], expected.expand(2, -1, -1, -1), rtol=0, atol=1e-6)


def test_concat_along_each_axis(ctx):
    a, b = latent(2, 4, 3, 5, seed=1), latent(1, 4, 3, 5, seed=2)
    both = b["samples"].expand(2, -1, -1, -1)
    for dim, axis in (("x", 3), ("y", 2), ("t", 1)):
        (forward,) = run_node(LatentConcat, ctx, samples1=a, samples2=b, dim=dim)
        (backward,) = run_node(LatentConcat, ctx, samples1=a, samples2=b, dim="-" + dim)
        size = a["samples"].shape[axis]
        assert torch.equal(forward["samples"].narrow(axis, 0, size), a["samples"])
        assert torch.equal(forward["samples"].narrow(axis, size, size), both)
        assert torch.equal(backward["samples"].narrow(axis, 0, size), both)
    with pytest.raises(ValueError, match=r"LatentConcat \(#1\): input 'samples2': shape \(1, 4, 4, 5\)"):
        run_node(LatentConcat, ctx, samples1=a, samples2=latent(1, 4, 4, 5), dim="x")


@pytest.mark.parametrize(("index", "amount", "expected"), [
    (0, 1, [0]), (2, 3, [2, 3, 4]), (4, 10, [4]), (99, 2, [4]), (-2, 5, [3, 4]), (-9, 2, [0, 1]), (-3, 1, [2]),
])
def test_cut_clamps_start_and_length(ctx, index, amount, expected):
    samples = torch.arange(5.0).reshape(1, 1, 1, 5).repeat(2, 3, 4, 1)
    (cut,) = run_node(LatentCut, ctx, samples={"samples": samples}, dim="x", index=index, amount=amount)
    assert cut["samples"][0, 0, 0].tolist() == expected
    (rows,) = run_node(LatentCut, ctx, samples={"samples": samples.transpose(2, 3)}, dim="y", index=index,
                       amount=amount)
    assert rows["samples"][0, 0, :, 0].tolist() == expected


def test_crop_divides_by_eight_and_keeps_the_corner_inside(ctx):
    samples = randn(1, 4, 16, 20)
    (cropped,) = run_node(LatentCrop, ctx, samples={"samples": samples}, width=64, height=96, x=40, y=16)
    assert torch.equal(cropped["samples"], samples[:, :, 2:14, 5:13])
    # x=4096 -> 512 latent px, moved back to 20 - 8 = 12; the crop ends at the latent's edge.
    (corner,) = run_node(LatentCrop, ctx, samples={"samples": samples}, width=512, height=512, x=4096, y=4096)
    assert torch.equal(corner["samples"], samples[:, :, 8:, 12:])


def test_flip_and_rotate(ctx):
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 1, 2, 3)
    (vertical,) = run_node(LatentFlip, ctx, samples={"samples": grid}, flip_method="x-axis: vertically")
    (horizontal,) = run_node(LatentFlip, ctx, samples={"samples": grid}, flip_method="y-axis: horizontally")
    assert vertical["samples"][0, 0].tolist() == [[4, 5, 6], [1, 2, 3]]
    assert horizontal["samples"][0, 0].tolist() == [[3, 2, 1], [6, 5, 4]]
    turned = {r: run_node(LatentRotate, ctx, samples={"samples": grid}, rotation=r)[0]["samples"][0, 0].tolist()
              for r in ("none", "90 degrees", "180 degrees", "270 degrees")}
    assert turned == {"none": [[1, 2, 3], [4, 5, 6]], "90 degrees": [[4, 1], [5, 2], [6, 3]],  # clockwise
                      "180 degrees": [[6, 5, 4], [3, 2, 1]], "270 degrees": [[3, 6], [2, 5], [1, 4]]}


def test_blend_weights_the_first_latent_and_resizes_the_second_bicubically(ctx):
    a, b = latent(2, 4, 6, 8, seed=1), latent(2, 4, 6, 8, seed=2)
    (blended,) = run_node(LatentBlend, ctx, samples1=a, samples2=b, blend_factor=0.3)
    torch.testing.assert_close(blended["samples"], a["samples"] * 0.3 + b["samples"] * 0.7, rtol=0, atol=1e-7)
    other = latent(1, 4, 10, 10, seed=3)
    (resized,) = run_node(LatentBlend, ctx, samples1=a, samples2=other, blend_factor=0.5)
    scaled = F.interpolate(other["samples"][:, :, 1:9, :], size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized["samples"], a["samples"] * 0.5 + scaled * 0.5, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"LatentBlend \(#1\): input 'samples2': shape \(3, 4, 6, 8\)"):
        run_node(LatentBlend, ctx, samples1=a, samples2=latent(3, 4, 6, 8), blend_factor=0.5)


# Latent operations --------------------------------------------------------------------------------------------


def _tonemap_reference(samples: np.ndarray, multiplier: float) -> np.ndarray:
    out = np.zeros_like(samples, dtype=np.float64)
    for b in range(samples.shape[0]):
        lengths = np.linalg.norm(samples[b].astype(np.float64), axis=0) + 1e-10
        top = (lengths.std(ddof=1) * 5 + lengths.mean()) * multiplier
        compressed = lengths / (1 + lengths / top)  # Reinhard's x / (1 + x) on lengths / top, times top
        out[b] = samples[b] / lengths * compressed
    return out


def test_tonemap_reinhard_compresses_lengths_keeps_directions(ctx):
    samples = randn(2, 4, 5, 6, seed=7) * torch.tensor([1.0, 6.0]).reshape(2, 1, 1, 1)
    for multiplier in (0.5, 1.0, 3.0):
        (operation,) = run_node(LatentOperationTonemapReinhard, ctx, multiplier=multiplier)
        (result,) = run_node(LatentApplyOperation, ctx, samples={"samples": samples}, operation=operation)
        np.testing.assert_allclose(result["samples"].numpy(), _tonemap_reference(samples.numpy(), multiplier),
                                   rtol=2e-5, atol=1e-6)
    assert not TonemapReinhard(0.0)(latent=samples).any()  # the curve's limit, not ComfyUI's 0/0


def _sharpen_reference(samples: np.ndarray, radius: int, sigma: float, alpha: float) -> np.ndarray:
    from scipy.signal import correlate2d  # here, not at the top: scipy.signal takes a second to import

    size = 2 * radius + 1
    grid = np.linspace(-1, 1, size)
    squared = grid[:, None] ** 2 + grid[None, :] ** 2
    gaussian = np.exp(-squared / (2 * sigma * sigma))
    kernel = -10 * alpha * gaussian / gaussian.sum()
    kernel[radius, radius] += 1.0 - kernel.sum()  # the kernel sums to 1: flat areas stay as they are
    out = np.zeros_like(samples, dtype=np.float64)
    for b in range(samples.shape[0]):
        lengths = np.linalg.norm(samples[b].astype(np.float64), axis=0) + 1e-6
        for c in range(samples.shape[1]):
            padded = np.pad(samples[b, c] / lengths, radius, mode="reflect")
            out[b, c] = lengths * correlate2d(padded, kernel, mode="valid")
    return out


def test_sharpen_matches_the_kernel_written_out(ctx):
    samples = randn(2, 4, 9, 11, seed=8)
    for radius, sigma, alpha in ((1, 1.0, 0.1), (3, 0.5, 1.2), (4, 2.0, 0.02)):
        (operation,) = run_node(LatentOperationSharpen, ctx, sharpen_radius=radius, sigma=sigma, alpha=alpha)
        (result,) = run_node(LatentApplyOperation, ctx, samples={"samples": samples}, operation=operation)
        np.testing.assert_allclose(result["samples"].numpy(), _sharpen_reference(samples.numpy(), radius, sigma,
                                                                                 alpha), rtol=1e-4, atol=1e-5)
    flat = torch.ones(1, 4, 8, 8)
    assert torch.allclose(Sharpen(2, 1.0, 0.5)(latent=flat), flat, atol=1e-6)
    with pytest.raises(ValueError, match=r"LatentApplyOperation \(#1\): input 'operation': sharpen_radius 9 needs"):
        run_node(LatentApplyOperation, ctx, samples={"samples": samples}, operation=Sharpen(9, 1.0, 0.1))


def test_apply_operation_takes_any_callable_and_checks_what_comes_back(ctx):
    samples = randn(1, 4, 3, 3)
    (doubled,) = run_node(LatentApplyOperation, ctx, samples={"samples": samples, "batch_index": [2]},
                          operation=lambda latent, **kwargs: latent * 2)
    assert torch.equal(doubled["samples"], samples * 2) and doubled["batch_index"] == [2]
    with pytest.raises(ValueError, match=r"input 'operation': must be a LATENT_OPERATION .*got float"):
        run_node(LatentApplyOperation, ctx, samples={"samples": samples}, operation=1.5)
    with pytest.raises(ValueError, match=r"input 'operation': the operation returned \(4,\)"):
        run_node(LatentApplyOperation, ctx, samples={"samples": samples}, operation=lambda latent: latent[0, :, 0, 0])


def test_apply_operation_cfg_acts_on_the_guidance_direction(ctx):
    model = DiffusionModel(unet=torch.nn.Identity(), family="sd1")
    operation = TonemapReinhard(0.8)
    (patched,) = run_node(LatentApplyOperationCFG, ctx, model=model, operation=operation)
    assert "sampler_pre_cfg_function" not in model.options  # the input model is not changed
    (hook,) = patched.options["sampler_pre_cfg_function"]
    assert isinstance(hook, OperationOnGuidance) and hook.operation is operation
    cond, uncond = randn(1, 4, 4, 4, seed=1), randn(1, 4, 4, 4, seed=2)
    cond_out, uncond_out = hook({"conds_out": [cond, uncond], "cond_scale": 7.0})
    torch.testing.assert_close(cond_out, operation(latent=cond - uncond) + uncond)
    assert uncond_out is uncond
    (only,) = hook({"conds_out": [cond]})
    torch.testing.assert_close(only, operation(latent=cond))


@pytest.mark.slow
def test_apply_operation_cfg_in_a_sampling_pass(ctx):
    """On a tiny real UNet: an operation that zeroes the guidance direction leaves only the uncond prediction, so
    cfg 7 samples as cfg 0 does; the identity operation changes nothing; tone mapping changes the result."""
    from diffusers import UNet2DConditionModel

    from latentloom.nodes.sampling import KSampler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    model = DiffusionModel(unet=unet, family="sd1")
    positive, negative = [[randn(1, 77, 32, seed=1), {}]], [[randn(1, 77, 32, seed=2), {}]]

    def sample(sampled_model, cfg):
        return run_node(KSampler, ctx, model=sampled_model, seed=5, steps=3, cfg=cfg, sampler_name="euler",
                        scheduler="normal", positive=positive, negative=negative,
                        latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)[0]["samples"]

    def patched(operation):
        return run_node(LatentApplyOperationCFG, ctx, model=model, operation=operation)[0]

    plain, unguided = sample(model, 7.0), sample(model, 0.0)
    assert not torch.allclose(plain, unguided, atol=1e-3)
    torch.testing.assert_close(sample(patched(lambda latent: latent * 0), 7.0), unguided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample(patched(lambda latent: latent), 7.0), plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sample(patched(TonemapReinhard(0.5)), 7.0), plain, atol=1e-3)
