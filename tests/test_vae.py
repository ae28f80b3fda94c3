"""VAEModel and the VAE nodes: ComfyUI's pixel/latent conventions, tiling, OOM fallback, inpaint preparation."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from image_support import LocalAutoencoder, tiny_autoencoder
from node_context import make_context, run_node

from latentloom.nodes.diffusion import vae as vae_module
from latentloom.nodes.diffusion.vae import VAEModel, tiled_apply
from latentloom.nodes.vae_nodes import (
    VAEDecode,
    VAEDecodeTiled,
    VAEEncode,
    VAEEncodeForInpaint,
    VAEEncodeTiled,
    inpaint_inputs,
)


@pytest.fixture(scope="module")
def autoencoder():
    return tiny_autoencoder(seed=3)


def smooth_latent(height: int, width: int, batch: int = 1) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    channels = [torch.sin(2 * xs) + 0.3, torch.cos(2 * ys), xs * ys, 0.5 * xs - ys]
    return torch.stack(channels)[None].repeat(batch, 1, 1, 1)


# Conventions against diffusers called directly ---------------------------------------------------------------


def test_encode_crops_centred_to_multiples_of_8_and_returns_the_posterior_mean(autoencoder):
    torch.manual_seed(0)
    pixels = torch.rand(2, 35, 42, 4)  # 35 % 8 = 3 -> offset 1; 42 % 8 = 2 -> offset 1; alpha ignored
    latent = VAEModel(autoencoder).encode(pixels)
    expected_input = pixels[:, 1:33, 1:41, :3].movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        expected = autoencoder.encode(expected_input).latent_dist.mean
    assert latent.shape == (2, 4, 4, 5) and latent.dtype == torch.float32
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(VAEModel(autoencoder).encode(pixels), latent, rtol=0, atol=0)  # no sampling


def test_decode_maps_to_clamped_images_like_comfyui(autoencoder):
    torch.manual_seed(0)
    latent = torch.randn(2, 4, 5, 6)
    images = VAEModel(autoencoder).decode(latent)
    with torch.no_grad():
        raw = autoencoder.decode(latent).sample
    assert images.shape == (2, 40, 48, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1).movedim(1, -1), rtol=0, atol=1e-6)
    assert images.min() >= 0 and images.max() <= 1


def test_decode_rejects_latents_with_the_wrong_channel_count(autoencoder):
    with pytest.raises(ValueError, match="4 latent channels"):
        VAEModel(autoencoder).decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="IMAGE"):
        VAEModel(autoencoder).encode(torch.zeros(1, 16, 16))


def test_batches_split_by_free_memory_give_the_same_result(autoencoder, monkeypatch):
    torch.manual_seed(0)
    latent = torch.randn(3, 4, 4, 4)
    whole = VAEModel(autoencoder).decode(latent)
    calls = []
    original = autoencoder.decode
    monkeypatch.setattr(autoencoder, "decode", lambda z: calls.append(z.shape[0]) or original(z))
    monkeypatch.setattr(vae_module, "_free_memory", lambda device: 1)  # room for one item at a time
    split = VAEModel(autoencoder).decode(latent)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_memory_manager_lease_wraps_every_call(autoencoder):
    leases = []

    class Manager:
        @contextlib.contextmanager
        def use(self, module):
            leases.append(module)
            yield module

    vae = VAEModel(autoencoder)
    vae.decode(torch.zeros(1, 4, 2, 2), manager=Manager())
    vae.encode(torch.zeros(1, 16, 16, 3), manager=Manager())
    assert leases == [autoencoder, autoencoder]
    assert vae.cache_nbytes() == 0


# Tiling -----------------------------------------------------------------------------------------------------


def test_tiled_apply_blends_a_pointwise_function_exactly():
    torch.manual_seed(0)
    samples = torch.randn(2, 4, 20, 28)
    weights = torch.randn(3, 4, 1, 1)

    def upscale(x):
        return F.conv2d(F.interpolate(x, scale_factor=8, mode="nearest"), weights)

    tiles = []
    result = tiled_apply(samples, upscale, (8, 12), overlap=3, scale=8, out_channels=3,
                         on_tile=lambda: tiles.append(1))
    torch.testing.assert_close(result, upscale(samples), rtol=0, atol=1e-5)
    # starts every 5 rows (0,5,10,15 -> 4) x every 9 columns (0,9,18 -> 3), per image
    assert len(tiles) == 2 * 4 * 3


def test_tiled_decode_equals_full_decode_for_a_pointwise_decoder():
    vae = VAEModel(LocalAutoencoder(kernel=1))
    latent = smooth_latent(24, 40, batch=2)
    reports = []
    tiled = vae.decode_tiled(latent, tile=8, overlap=2, progress=lambda v, m: reports.append((v, m)))
    torch.testing.assert_close(tiled, vae.decode(latent), rtol=0, atol=1e-5)
    assert max(max(h, w) for h, w in vae.autoencoder.decode_sizes[:-1]) <= 16
    assert reports[-1][0] == reports[-1][1] == len(reports)


def test_tiled_decode_is_close_to_full_decode_on_a_smooth_latent():
    # A decoder with one latent cell of context: only the outermost cell of each tile sees zero padding, and the
    # feather gives those pixels small weights, the smaller the wider the overlap. Tolerances on images in 0..1
    # (image std ~0.09): overlap 8 cells -> max 0.03, mean 0.002 (measured 0.023 / 0.0013).
    vae = VAEModel(LocalAutoencoder(kernel=3))
    latent = smooth_latent(48, 48)
    full = vae.decode(latent)
    wide = (vae.decode_tiled(latent, tile=24, overlap=8) - full).abs()
    narrow = (vae.decode_tiled(latent, tile=24, overlap=2) - full).abs()
    assert wide.max() < 0.03 and wide.mean() < 0.002
    assert narrow.mean() > 2 * wide.mean() and narrow.max() > wide.max()
    assert wide.max() > 0  # the tiles really did see padding: this was not a whole decode


def test_tiled_decode_with_a_tile_covering_everything_is_the_plain_decode(autoencoder):
    latent = smooth_latent(6, 5)
    vae = VAEModel(autoencoder)
    torch.testing.assert_close(vae.decode_tiled(latent, tile=16, overlap=4), vae.decode(latent), rtol=0, atol=1e-6)


def test_tiled_encode_equals_full_encode_for_a_local_encoder():
    torch.manual_seed(0)
    pixels = torch.rand(1, 96, 136, 3)
    vae = VAEModel(LocalAutoencoder())
    tiled = vae.encode_tiled(pixels, tile=32, overlap=16)
    assert tiled.shape == (1, 4, 12, 17)
    torch.testing.assert_close(tiled, vae.encode(pixels), rtol=0, atol=1e-5)
    assert max(max(size) for size in vae.autoencoder.encode_sizes[:-1]) <= 64


@pytest.mark.slow
def test_real_tiny_vae_tiled_decode_runs_and_stays_in_range(autoencoder):
    images = VAEModel(autoencoder).decode_tiled(smooth_latent(12, 20), tile=8, overlap=2)
    assert images.shape == (1, 96, 160, 3) and 0 <= images.min() and images.max() <= 1


# Out-of-memory fallback ---------------------------------------------------------------------------------------


def test_decode_falls_back_to_tiles_on_out_of_memory():
    autoencoder = LocalAutoencoder(kernel=1)
    original = autoencoder.decode

    def decode_small_only(latent):
        if max(latent.shape[-2:]) > 16:
            raise torch.OutOfMemoryError("simulated: latent too big")
        return original(latent)

    autoencoder.decode = decode_small_only
    latent = smooth_latent(24, 24)
    vae = VAEModel(autoencoder, fallback_decode_tile=8, fallback_decode_overlap=2)
    images = vae.decode(latent)
    expected = VAEModel(LocalAutoencoder(kernel=1)).decode(latent)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_encode_falls_back_to_tiles_on_out_of_memory():
    autoencoder = LocalAutoencoder()
    original = autoencoder.encode

    def encode_small_only(pixels):
        if max(pixels.shape[-2:]) > 64:
            raise torch.OutOfMemoryError("simulated: image too big")
        return original(pixels)

    autoencoder.encode = encode_small_only
    torch.manual_seed(0)
    pixels = torch.rand(1, 96, 96, 3)
    vae = VAEModel(autoencoder, fallback_encode_tile=32, fallback_encode_overlap=8)
    torch.testing.assert_close(vae.encode(pixels), VAEModel(LocalAutoencoder()).encode(pixels), rtol=0, atol=1e-5)


def test_out_of_memory_in_a_tile_too_is_reported():
    autoencoder = LocalAutoencoder()

    def always_oom(latent):
        raise torch.OutOfMemoryError("simulated")

    autoencoder.decode = always_oom
    with pytest.raises(torch.OutOfMemoryError):
        VAEModel(autoencoder).decode(torch.zeros(1, 4, 4, 4))


# Nodes --------------------------------------------------------------------------------------------------------


def test_vae_encode_and_decode_nodes_round_trip_shapes(autoencoder, tmp_path):
    ctx = make_context(tmp_path)
    vae = VAEModel(autoencoder)
    (latent,) = VAEEncode.model_construct(pixels=torch.rand(1, 64, 48, 3), vae=vae).run(ctx)
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 4, 8, 6)
    (images,) = VAEDecode.model_construct(samples=latent, vae=vae).run(ctx)
    assert images.shape == (1, 64, 48, 3)
    with pytest.raises(ValueError, match=r"VAEDecode \(#1\): input 'vae': must be a VAE \(got str\)"):
        run_node(VAEDecode, ctx, samples=latent, vae="not a vae")
    with pytest.raises(ValueError, match=r"VAEDecode \(#1\): input 'samples': must be a LATENT"):
        run_node(VAEDecode, ctx, samples=latent["samples"], vae=vae)


def test_tiled_nodes_convert_pixel_sizes_and_clamp_the_overlap(tmp_path, monkeypatch):
    ctx = make_context(tmp_path)
    vae = VAEModel(LocalAutoencoder())
    seen = {}
    monkeypatch.setattr(VAEModel, "decode_tiled", lambda self, samples, tile, overlap, **kw: seen.update(
        decode=(tile, overlap)) or torch.zeros(1))
    monkeypatch.setattr(VAEModel, "encode_tiled", lambda self, pixels, tile, overlap, **kw: seen.update(
        encode=(tile, overlap)) or torch.zeros(1))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    VAEDecodeTiled.model_construct(samples=latent, vae=vae, tile_size=256, overlap=64).run(ctx)
    assert seen["decode"] == (32, 8)
    # overlap more than a quarter of the tile is cut to a quarter (128 px -> 16 px = 2 latent cells)
    VAEDecodeTiled.model_construct(samples=latent, vae=vae, tile_size=64, overlap=128).run(ctx)
    assert seen["decode"] == (8, 2)
    VAEEncodeTiled.model_construct(pixels=torch.zeros(1, 64, 64, 3), vae=vae, tile_size=512, overlap=64).run(ctx)
    assert seen["encode"] == (512, 64)


def test_inpaint_preparation_greys_masked_pixels_and_grows_the_noise_mask():
    pixels = torch.rand(1, 34, 40, 3)  # height 34 -> cropped to 32 from offset 1
    mask = torch.zeros(1, 34, 40)
    mask[0, 11, 20] = 1.0  # one masked pixel -> (10, 20) after the crop
    prepared, noise_mask = inpaint_inputs(pixels, mask, grow_mask_by=6)
    assert prepared.shape == (1, 32, 40, 3) and noise_mask.shape == (1, 1, 32, 40)
    torch.testing.assert_close(prepared[0, 10, 20], torch.full((3,), 0.5))
    unmasked = torch.ones(32, 40, dtype=torch.bool)
    unmasked[10, 20] = False
    torch.testing.assert_close(prepared[0][unmasked], pixels[0, 1:33][unmasked])
    # A 6x6 box with padding 3: output (r, c) covers inputs r-3..r+2, so the pixel marks rows 8..13, cols 18..23.
    rows, cols = torch.nonzero(noise_mask[0, 0], as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (8, 13, 18, 23)
    assert noise_mask.sum().item() == 36
    _, unchanged = inpaint_inputs(pixels, mask, grow_mask_by=0)
    assert unchanged.sum().item() == 1


def test_inpaint_mask_is_resized_bilinearly_and_rounded():
    pixels = torch.rand(1, 16, 16, 3)
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0  # top-left quarter after resizing
    prepared, noise_mask = inpaint_inputs(pixels, mask, grow_mask_by=0)
    assert noise_mask[0, 0, :8, :8].sum() > 40 and noise_mask[0, 0, 8:, :].sum() == 0
    assert torch.equal(prepared[0, 12:, 12:], pixels[0, 12:, 12:])


def test_vae_encode_for_inpaint_node_returns_samples_and_noise_mask(autoencoder, tmp_path):
    ctx = make_context(tmp_path)
    node = VAEEncodeForInpaint.model_construct(pixels=torch.rand(1, 32, 32, 3), vae=VAEModel(autoencoder),
                                               mask=torch.ones(1, 32, 32), grow_mask_by=6)
    (latent,) = node.run(ctx)
    assert latent["samples"].shape == (1, 4, 4, 4)
    assert latent["noise_mask"].shape == (1, 1, 32, 32) and latent["noise_mask"].min() == 1
    # Everything masked: the encoder saw a uniform 0.5 grey image.
    grey = VAEModel(autoencoder).encode(torch.full((1, 32, 32, 3), 0.5))
    torch.testing.assert_close(latent["samples"], grey, rtol=0, atol=1e-6)
