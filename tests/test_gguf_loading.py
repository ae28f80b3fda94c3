"""GGUF-quantised Flux files (as the ComfyUI-GGUF pack's: original Flux names, Q8_0 or F16 weights, F32 vectors)
loaded through UnetLoaderGGUF (and UNETLoader) with diffusers' GGUF support.

The tiny Flux is written with the gguf package's GGUFWriter: 2-D weights whose rows split into 32-value blocks in
Q8_0 (the others in F16, as the pack's converter leaves them), 1-D tensors in F32. Checked: the quantised weights
stay packed in memory (and the manager accounts for the packed bytes), sampling is bit-identical to the network
with the same weights dequantised up front (so dequantising per call is all that happens), and close to the
unquantised model (max difference printed).
"""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import flux_original, folder, tiny_flux  # noqa: E402
from test_weight_storage import flux_conditioning, load, sample  # noqa: E402
from tiny_models import save_state  # noqa: E402

from latentloom.engine.memory import module_nbytes  # noqa: E402
from latentloom.nodes.gguf_loaders import UnetLoaderGGUF, gguf_choices  # noqa: E402

pytestmark = pytest.mark.slow  # tiny Flux files written to GGUF and sampled

gguf = pytest.importorskip("gguf")


def write_gguf(state: dict[str, torch.Tensor], path, quantised: bool) -> None:
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in state.items():
        values = tensor.float().numpy()
        if tensor.ndim == 1:
            writer.add_tensor(name, values)
        elif quantised and tensor.shape[-1] % 32 == 0:
            packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def ctx(tmp_path) -> StubContext:
    ctx = StubContext(make_env(models_dir=tmp_path / "models"))
    state = flux_original(tiny_flux(3))
    save_state(state, folder(ctx.env, "diffusion_models") / "flux.safetensors")
    write_gguf(state, folder(ctx.env, "diffusion_models") / "flux-Q8_0.gguf", quantised=True)
    write_gguf(state, folder(ctx.env, "unet") / "flux-F16.gguf", quantised=False)
    return ctx


def dequantised_by_hand(model):
    """The same model in a plain diffusers network whose weights were dequantised once, up front."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    plain = type(model.unet).from_config(model.unet.config)
    plain.load_state_dict({k: dequantize_gguf_tensor(v).float() for k, v in model.unet.state_dict().items()})
    return model.clone(unet=plain.eval().requires_grad_(False))


def test_gguf_files_are_listed_and_load_through_the_pack_loader(ctx):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    assert gguf_choices(ctx.env) == ["flux-F16.gguf", "flux-Q8_0.gguf"]
    model, filename, digest = run_node(UnetLoaderGGUF, ctx, unet_name="flux-Q8_0.gguf")
    path = folder(ctx.env, "diffusion_models") / "flux-Q8_0.gguf"
    assert (filename, digest) == ("flux-Q8_0.gguf", hashlib.sha256(path.read_bytes()).hexdigest())
    assert (model.family, model.options["variant"], model.sampling.schedule) == ("flux", "flux_dev", "flux")
    packed = [m for m in model.unet.modules() if isinstance(m, GGUFLinear)]
    assert len(packed) > 10 and all(isinstance(m.weight, GGUFParameter) and m.weight.dtype == torch.uint8
                                    for m in packed)
    full = load(ctx, "flux.safetensors")
    accounted = {e["key"]: e["bytes"] for e in ctx.models.stats().entries}
    gguf_bytes = next(b for k, b in accounted.items() if "flux-Q8_0.gguf" in k)
    full_bytes = next(b for k, b in accounted.items() if "flux.safetensors" in k)
    assert gguf_bytes == module_nbytes(model.unet)
    print(f"Q8_0: {gguf_bytes} bytes accounted vs {full_bytes} in fp32 (ratio {gguf_bytes / full_bytes:.3f})")
    assert gguf_bytes < 0.35 * full_bytes
    # UNETLoader takes the same file (and shares the loaded model: same key).
    same = load(ctx, "flux-Q8_0.gguf")
    assert same is model
    assert full.unet is not model.unet


@pytest.mark.slow
def test_gguf_flux_samples_as_dequantised_weights_and_close_to_the_original(ctx):
    conditioning = flux_conditioning()
    reference = sample(ctx, load(ctx, "flux.safetensors"), conditioning, 16)
    for name, limit in (("flux-Q8_0.gguf", 0.05), ("flux-F16.gguf", 0.01)):
        (model, _, _) = run_node(UnetLoaderGGUF, ctx, unet_name=name)
        ours = sample(ctx, model, conditioning, 16)
        assert torch.equal(ours, sample(ctx, dequantised_by_hand(model), conditioning, 16))
        delta = (ours - reference).abs().max().item()
        print(f"{name}: final latents max|Δ| vs the unquantised fp32 model = {delta:.3e} "
              f"(|x| max {reference.abs().max():.2f})")
        assert 0 < delta < limit * reference.abs().max().item()


def test_a_gguf_file_that_is_not_a_diffusion_transformer_is_named(ctx):
    path = folder(ctx.env, "unet") / "not-a-model.gguf"
    write_gguf({"token_embd.weight": torch.randn(64, 64)}, path, quantised=True)
    with pytest.raises(ValueError, match=r"UnetLoaderGGUF.*unet_name.*not-a-model.gguf.*GGUF files of diffusion"):
        run_node(UnetLoaderGGUF, ctx, unet_name="not-a-model.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["gguf", "fp8"])
def test_flux_workflow_with_a_quantised_model_through_the_cli(tmp_path, capsys, loader):
    """ComfyUI's Flux template with the model loaded by UnetLoaderGGUF (Q8_0 file) or by UNETLoader in fp8:
    it runs through `latentloom run` and its image stays close to the unquantised workflow's."""
    import json

    from PIL import Image
    from test_flux_sampling import FluxFiles
    from test_flux_workflow import in_process_image
    from test_flux_workflow import workflow as flux_workflow

    from latentloom.server.cli import main

    files = FluxFiles(tmp_path, guidance=True, seed=40)
    document = flux_workflow(files.unet_name, 3.5, seed=5)
    if loader == "gguf":
        write_gguf(flux_original(files.transformer), tmp_path / "models" / "diffusion_models" / "flux1-dev-Q8_0.gguf",
                   True)
        document["10"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "flux1-dev-Q8_0.gguf"}}
    else:
        document["10"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    path = tmp_path / "flux.json"
    path.write_text(json.dumps(document))
    code = main(["run", str(path), "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out"),
                 "--input-dir", str(tmp_path / "input"), "--temp-dir", str(tmp_path / "temp"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    (png,) = summary["outputs"]
    with Image.open(png) as saved:
        ours = np.asarray(saved.convert("RGB")).astype(np.int16)
    unquantised = in_process_image(files, 3.5, seed=5).astype(np.int16)
    delta = np.abs(ours - unquantised)
    print(f"{loader}: image max|Δ| {delta.max()} / 255, mean {delta.mean():.2f} (image std {unquantised.std():.1f})")
    assert unquantised.std() > 1.0 and delta.mean() < 0.2 * unquantised.std()


def test_a_compute_dtype_override_reaches_the_quantised_layers(ctx):
    from latentloom.nodes.diffusion import compute

    (model, _, _) = run_node(UnetLoaderGGUF, ctx, unet_name="flux-Q8_0.gguf")
    options = {compute.COMPUTE_DTYPE: torch.bfloat16}
    generator = torch.Generator().manual_seed(7)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 40, generator=generator),
                  pooled_projections=torch.randn(1, 24, generator=generator), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]))
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    ids = dict(img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        ours = compute.network_for(model.unet, options)(**inputs, **ids)[0]
        by_hand = compute.network_for(dequantised_by_hand(model).unet, options)(**inputs, **ids)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, by_hand)
