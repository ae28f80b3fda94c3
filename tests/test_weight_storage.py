"""Weights kept in fp8 / 16-bit storage and computed in the compute dtype (UNETLoader's weight_dtype).

A tiny Flux written in ComfyUI's original layout (fp32, and a copy saved in fp8 as the fp8 files users download)
and a tiny SD1 UNet are loaded through UNETLoader. Checked: the Linear / Conv weights really are fp8 in memory,
the memory manager accounts for the stored bytes (about a quarter of fp32), sampling is bit-identical to the same
network with its fp8 weights cast up to fp32 by hand (so the per-call cast is the only thing that happens) and
close to the fp32 model (the max difference is printed), and a ModelComputeDtype override still works.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402
from test_family_loading import flux_original, folder, tiny_flux  # noqa: E402
from tiny_models import TEXT_WIDTH, save_state, write_tiny_unet  # noqa: E402

from latentloom.engine.memory import module_nbytes  # noqa: E402
from latentloom.nodes.diffusion import compute, weight_storage  # noqa: E402
from latentloom.nodes.loaders import CheckpointLoaderSimple, UNETLoader  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

pytestmark = pytest.mark.slow  # tiny diffusers models built and sampled in fp8 / bf16

FP8_OPTIONS = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2}


@pytest.fixture
def ctx(tmp_path) -> StubContext:
    return StubContext(make_env(models_dir=tmp_path / "models"))


@pytest.fixture
def flux_files(ctx):
    """flux.safetensors (fp32) and flux_fp8.safetensors (every tensor in float8_e4m3fn) in diffusion_models."""
    state = flux_original(tiny_flux(3))
    save_state(state, folder(ctx.env, "diffusion_models") / "flux.safetensors")
    save_state({k: v.to(torch.float8_e4m3fn) for k, v in state.items()},
               folder(ctx.env, "diffusion_models") / "flux_fp8.safetensors")
    return ctx


def load(ctx, name: str, weight_dtype: str = "default"):
    (model,) = UNETLoader.model_construct(unet_name=name, weight_dtype=weight_dtype).run(ctx)
    return model


def accounted_bytes(ctx, weight_dtype: str, name: str) -> int:
    """The bytes the memory manager accounts for the loaded file's entry."""
    (entry,) = [e for e in ctx.models.stats().entries if weight_dtype in e["key"] and name in e["key"]]
    return entry["bytes"]


def cast_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in network.modules() if type(m) in weight_storage.CAST_CLASSES.values()]


def upcast_by_hand(model):
    """The same model with every weight cast to fp32 in a plain diffusers network (no per-call casting)."""
    plain = type(model.unet).from_config(model.unet.config)
    plain.load_state_dict({k: v.float() for k, v in model.unet.state_dict().items()})
    return model.clone(unet=plain.eval().requires_grad_(False))


def flux_conditioning():
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 5, 40, generator=generator),
             {"pooled_output": torch.randn(1, 24, generator=generator), "guidance": 3.5}]]


def sample(ctx, model, conditioning, channels: int, steps: int = 2) -> torch.Tensor:
    (out,) = KSampler.model_construct(model=model, seed=4, steps=steps, cfg=1.0, sampler_name="euler",
                                      scheduler="simple", positive=conditioning, negative=conditioning,
                                      latent_image={"samples": torch.zeros(1, channels, 8, 8)}, denoise=1.0).run(ctx)
    return out["samples"]


def test_fp8_weight_dtypes_keep_the_layers_in_fp8_and_the_manager_counts_stored_bytes(flux_files):
    ctx = flux_files
    full = load(ctx, "flux.safetensors")
    assert not cast_layers(full.unet) and {p.dtype for p in full.unet.parameters()} == {torch.float32}
    full_bytes = accounted_bytes(ctx, "default", "flux.safetensors")
    assert full_bytes == module_nbytes(full.unet)
    linear_weights = sum(m.weight.numel() for m in full.unet.modules() if isinstance(m, torch.nn.Linear))
    for option, dtype in FP8_OPTIONS.items():
        model = load(ctx, "flux.safetensors", option)
        layers = cast_layers(model.unet)
        assert layers and all(layer.weight.dtype == dtype for layer in layers)
        assert all(layer.bias is None or layer.bias.dtype == torch.float32 for layer in layers)
        # Everything but the layers' weights stays fp32: stored bytes = 1 per Linear weight + 4 per other value.
        expected = linear_weights + 4 * (sum(p.numel() for p in full.unet.parameters()) - linear_weights) \
            + sum(b.numel() * b.element_size() for b in model.unet.buffers())
        assert accounted_bytes(ctx, option, "flux.safetensors") == module_nbytes(model.unet) == expected
        ratio = expected / full_bytes
        print(f"{option}: {expected} bytes accounted vs {full_bytes} in fp32 (ratio {ratio:.3f})")
        assert ratio < 0.26
        assert compute.compute_dtype(model.options, model.unet) == torch.float32
    # A file that is already fp8 stays fp8 with weight_dtype default (never upcast at load) ...
    stored = load(ctx, "flux_fp8.safetensors")
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in cast_layers(stored.unet))
    assert accounted_bytes(ctx, "default", "flux_fp8.safetensors") < 0.26 * full_bytes
    # ... and so does the transformer of an all-in-one fp8 checkpoint (as flux1-dev-fp8.safetensors).
    from safetensors.torch import load_file

    fp8_state = load_file(str(folder(ctx.env, "diffusion_models") / "flux_fp8.safetensors"))
    save_state({f"model.diffusion_model.{k}": v for k, v in fp8_state.items()},
               folder(ctx.env, "checkpoints") / "flux1-dev-fp8.safetensors")
    (model, _, _) = CheckpointLoaderSimple.model_construct(ckpt_name="flux1-dev-fp8.safetensors").run(ctx)
    assert {layer.weight.dtype for layer in cast_layers(model.unet)} == {torch.float8_e4m3fn}
    assert module_nbytes(model.unet) == module_nbytes(stored.unet)


@pytest.mark.slow
def test_fp8_flux_samples_as_its_weights_cast_up_by_hand(flux_files):
    ctx = flux_files
    conditioning = flux_conditioning()
    reference = sample(ctx, load(ctx, "flux.safetensors"), conditioning, 16)
    for name, option in (("flux.safetensors", "fp8_e4m3fn"), ("flux.safetensors", "fp8_e5m2"),
                         ("flux_fp8.safetensors", "default")):
        model = load(ctx, name, option)
        ours = sample(ctx, model, conditioning, 16)
        by_hand = sample(ctx, upcast_by_hand(model), conditioning, 16)
        assert torch.equal(ours, by_hand)
        delta = (ours - reference).abs().max().item()
        print(f"{name} {option}: final latents max|Δ| vs fp32 = {delta:.3e} (|x| max {reference.abs().max():.2f})")
        assert 0 < delta < 0.1 * reference.abs().max().item()


def test_sd1_unet_in_fp8_through_unetloader(ctx):
    write_tiny_unet(folder(ctx.env, "unet") / "sd1_unet.safetensors", "sd1", seed=2)
    full = load(ctx, "sd1_unet.safetensors")
    model = load(ctx, "sd1_unet.safetensors", "fp8_e4m3fn")
    convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is weight_storage.CastConv2d and m.weight.dtype == torch.float8_e4m3fn
                         for m in convs)
    assert accounted_bytes(ctx, "fp8_e4m3fn", "sd1_unet") < 0.3 * accounted_bytes(ctx, "default", "sd1_unet")
    conditioning = [[torch.randn(1, 77, TEXT_WIDTH, generator=torch.Generator().manual_seed(3)), {}]]
    ours = sample(ctx, model, conditioning, 4)
    assert torch.equal(ours, sample(ctx, upcast_by_hand(model), conditioning, 4))
    reference = sample(ctx, full, conditioning, 4)
    delta = (ours - reference).abs().max().item()
    print(f"sd1 fp8_e4m3fn: final latents max|Δ| vs fp32 = {delta:.3e} (|x| max {reference.abs().max():.2f})")
    assert 0 < delta < 0.1 * reference.abs().max().item()


def test_a_bf16_file_stays_bf16_when_computing_in_fp32(ctx):
    state = flux_original(tiny_flux(5))
    save_state({k: v.to(torch.bfloat16) for k, v in state.items()},
               folder(ctx.env, "diffusion_models") / "flux_bf16.safetensors")
    model = load(ctx, "flux_bf16.safetensors")
    assert {layer.weight.dtype for layer in cast_layers(model.unet)} == {torch.bfloat16}
    generator = torch.Generator().manual_seed(6)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 40, generator=generator),
                  pooled_projections=torch.randn(1, 24, generator=generator), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    with torch.no_grad():
        ours = model.unet(**inputs).sample
        by_hand = upcast_by_hand(model).unet(**inputs).sample
    assert ours.dtype == torch.float32 and torch.equal(ours, by_hand)


def test_a_compute_dtype_override_casts_the_rest_and_leaves_stored_weights_to_their_layers(flux_files):
    model = load(flux_files, "flux.safetensors", "fp8_e4m3fn")
    options = {compute.COMPUTE_DTYPE: torch.bfloat16}
    network = compute.network_for(model.unet, options)
    assert isinstance(network, compute.CastNetwork)
    generator = torch.Generator().manual_seed(7)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 40, generator=generator),
                  pooled_projections=torch.randn(1, 24, generator=generator), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    bf16_inputs = {k: v if k.endswith("_ids") else v.to(torch.bfloat16) for k, v in inputs.items()}
    with torch.no_grad():
        ours = network(**bf16_inputs, return_dict=False)[0]
        # The whole-copy path on the same weights cast up by hand: every tensor copied to bf16.
        by_hand = compute.network_for(upcast_by_hand(model).unet, options)(**bf16_inputs, return_dict=False)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, by_hand)
    # Copies were made of the fp32 tensors only; the fp8 weights are cast as their layers run.
    copied = set(network._tensors)
    assert copied and not copied & weight_storage.per_call_cast_names(model.unet)


def test_a_lora_on_fp8_weights_is_rounded_into_fp8_and_undone_exactly(ctx):
    from adapter_support import kohya_lora_for_all, save_safetensors

    from latentloom.nodes.lora import LoraLoaderModelOnly

    write_tiny_unet(folder(ctx.env, "unet") / "sd1_unet.safetensors", "sd1", seed=2)
    model = load(ctx, "sd1_unet.safetensors", "fp8_e4m3fn")
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    save_safetensors(kohya_lora_for_all(model, None), ctx.env.model_dirs["loras"][0] / "all.safetensors")
    (patched,) = LoraLoaderModelOnly.model_construct(model=model, lora_name="all.safetensors",
                                                     strength_model=1.0).run(ctx)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with patched.prepared() as unet:
        weight = unet.get_parameter(name)
        assert weight.dtype == torch.float8_e4m3fn and not torch.equal(weight, original[name])
        conditioning = [[torch.randn(1, 77, TEXT_WIDTH, generator=torch.Generator().manual_seed(3)), {}]]
    # The patched fp8 weights are what the sampler runs on (the patches are re-applied by the sampler).
    assert torch.isfinite(sample(ctx, patched, conditioning, 4)).all()
    ctx.models.restore(model.unet)
    assert all(torch.equal(v, original[k]) for k, v in model.unet.state_dict().items())
