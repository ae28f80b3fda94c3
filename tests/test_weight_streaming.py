"""Weight streaming: a model larger than the VRAM budget placed partly, the rest of its layers streamed per call.

The compute device is a pretend accelerator (whole-module and per-layer transfers are recorded instead of
performed), so the bookkeeping runs on a CPU. What the streamed layers fetch is recorded for real: each of their
calls moves weight and bias to the input's device through Tensor.to (a CPU -> CPU move here, which keeps the
values, so results must equal those of a run without a budget bit for bit).
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import kohya_lora_for_all, save_safetensors  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from latentloom.engine.layer_streaming import CAST_CLASSES, CastLinear  # noqa: E402
from latentloom.engine.memory import ModelManager, module_nbytes, parse_bytes  # noqa: E402

FP32 = {"diffusion": torch.float32, "text_encoder": torch.float32, "vae": torch.float32, "other": torch.float32}


class PretendAccelerator(ModelManager):
    """A budgeted compute device that records transfers and the most bytes it ever accounted there."""

    def __init__(self, vram_budget: int, stream_weights: bool = True):
        super().__init__(device="cuda", offload_device="cpu", dtypes=FP32, vram_budget=vram_budget,
                         stream_weights=stream_weights)
        self.transfers: list[tuple[int, str]] = []
        self.layer_transfers: list[tuple[int, str]] = []
        self.peak = 0

    def _transfer(self, module, device):
        self.transfers.append((id(module), device.type))

    def _transfer_layer(self, layer, device):
        self.layer_transfers.append((id(layer), device.type))

    @contextlib.contextmanager
    def use(self, module, changes=()):
        with super().use(module, changes) as placed:
            with self._lock:
                self.peak = max(self.peak, self._bytes_on_compute())
            yield placed


class FetchRecorder(TorchFunctionMode):
    """Counts Tensor.to calls per source tensor (by id), with the device each asked for."""

    def __init__(self):
        super().__init__()
        self.fetches: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and "device" in kwargs:
            self.fetches.setdefault(id(args[0]), []).append(torch.device(kwargs["device"]).type)
        return func(*args, **kwargs)


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
                               torch.nn.Linear(64, 4))


def layer_bytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.parameters(recurse=False))


def test_parse_bytes_reads_units_and_rejects_junk():
    assert parse_bytes("6GB") == 6 * 10**9
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("800mb") == 800 * 10**6
    assert parse_bytes("6000000000") == 6 * 10**9
    for bad in ("lots", "6XB", "-1GB", ""):
        with pytest.raises(ValueError, match="byte size"):
            parse_bytes(bad)


def test_a_model_over_budget_is_placed_partly_and_its_other_layers_stream_per_call():
    network = mlp()
    reference_input = torch.randn(3, 16)
    expected = network(reference_input)
    names_before = list(network.state_dict())
    total = module_nbytes(network)
    budget = total // 2
    manager = PretendAccelerator(vram_budget=budget)

    recorder = FetchRecorder()
    with manager.use(network) as placed_network, recorder:
        first = placed_network(reference_input)
        second = placed_network(reference_input)
    assert torch.equal(first, expected) and torch.equal(second, expected)

    # Placed bytes within budget; the rest is accounted in RAM and reported as streamed.
    stats = manager.stats()
    assert manager.peak <= budget
    assert stats.bytes_by_device["cuda"] == manager.peak and stats.bytes_by_device["cpu"] == total - manager.peak
    assert stats.streamed_bytes == total - manager.peak > 0
    placed_ids = {layer_id for layer_id, device in manager.layer_transfers if device == "cuda"}
    assert manager.transfers == []  # moved layer by layer, never whole
    layers = [m for m in network if list(m.parameters(recurse=False))]
    placed = [m for m in layers if id(m) in placed_ids]
    streamed = [m for m in layers if id(m) not in placed_ids]
    assert sum(layer_bytes(m) for m in placed) == manager.peak
    # The first layer (callers read the device from the first parameter) and the LayerNorm are always placed;
    # in module order the Linears fill the budget, the ones that no longer fit stream.
    assert network[0] in placed and network[1] in placed and streamed
    assert all(isinstance(m, CastLinear) and isinstance(m, torch.nn.Linear) for m in streamed)
    assert all(type(m) is not CastLinear for m in placed)
    assert manager.peak + min(layer_bytes(m) for m in streamed) > budget  # nothing that fit was left out
    assert list(network.state_dict()) == names_before
    # Each streamed layer fetched its weight and bias to the input's device once per call; placed layers never.
    for layer in streamed:
        assert recorder.fetches[id(layer.weight)] == ["cpu", "cpu"]
        assert recorder.fetches[id(layer.bias)] == ["cpu", "cpu"]
    for layer in placed:
        assert id(layer.weight) not in recorder.fetches

    # Another model needing the room offloads the idle one; only its placed bytes are freed from the budget.
    other = torch.nn.Linear(64, 64)
    with manager.use(other):
        assert manager._bytes_on_compute() == module_nbytes(other)
    assert (id(network), "cpu") in manager.transfers
    assert manager.stats().streamed_bytes == 0


def test_without_streaming_an_oversized_model_is_placed_whole(caplog):
    network = mlp()
    manager = PretendAccelerator(vram_budget=module_nbytes(network) // 2, stream_weights=False)
    with manager.use(network):
        pass
    assert manager.transfers == [(id(network), "cuda")] and manager.layer_transfers == []
    assert manager.stats().streamed_bytes == 0
    assert not any(isinstance(m, CastLinear) for m in network.modules())
    assert "loading it whole" in caplog.text


def test_sampling_with_a_streamed_unet_and_a_lora_equals_the_unbudgeted_run(tmp_path):
    from tiny_models import write_tiny_checkpoint

    from latentloom.nodes.conditioning import CLIPTextEncode
    from latentloom.nodes.loaders import CheckpointLoaderSimple
    from latentloom.nodes.lora import LoraLoader
    from latentloom.nodes.sampling import KSampler

    models = tmp_path / "models"
    write_tiny_checkpoint(models / "checkpoints" / "tiny.safetensors", family="sd1", seed=0)

    def workflow(ctx: StubContext, lora: bool) -> tuple[torch.Tensor, torch.nn.Module]:
        model, clip, _ = run_node(CheckpointLoaderSimple, ctx, ckpt_name="tiny.safetensors")
        if lora:
            model, clip = run_node(LoraLoader, ctx, model=model, clip=clip, lora_name="l.safetensors",
                                   strength_model=0.8, strength_clip=0.8)
        (positive,) = run_node(CLIPTextEncode, ctx, text="a red cat", clip=clip)
        (negative,) = run_node(CLIPTextEncode, ctx, text="", clip=clip)
        (out,) = KSampler.model_construct(model=model, seed=3, steps=2, cfg=5.0, sampler_name="euler",
                                          scheduler="normal", positive=positive, negative=negative,
                                          latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0).run(ctx)
        return out["samples"], model.unet

    plain_ctx = StubContext(make_env(models_dir=models))
    model, clip, _ = run_node(CheckpointLoaderSimple, plain_ctx, ckpt_name="tiny.safetensors")
    save_safetensors(kohya_lora_for_all(model, clip, seed=1), models / "loras" / "l.safetensors")
    expected, _ = workflow(plain_ctx, lora=False)
    expected_lora, _ = workflow(plain_ctx, lora=True)
    assert not torch.equal(expected, expected_lora)

    budget = module_nbytes(model.unet) * 2 // 3
    manager = PretendAccelerator(vram_budget=budget)
    ctx = StubContext(make_env(models_dir=models, manager=manager))
    recorder = FetchRecorder()
    with recorder:
        ours, unet = workflow(ctx, lora=False)
        ours_lora, _ = workflow(ctx, lora=True)
    assert torch.equal(ours, expected) and torch.equal(ours_lora, expected_lora)
    assert 0 < manager.peak <= budget and manager.stats().streamed_bytes > 0
    streamed = {m for m in unet.modules() if type(m) in CAST_CLASSES.values()}
    placed_ids = {layer_id for layer_id, device in manager.layer_transfers if device == "cuda"}
    assert streamed and not any(id(m) in placed_ids for m in streamed)
    # Each streamed layer fetched its weight in every UNet call: at least one per step, 2 steps, 2 workflows.
    assert min(len(recorder.fetches.get(id(layer.weight), [])) for layer in streamed) >= 4


def test_budget_flags_reach_the_memory_manager(tmp_path, capsys):
    from latentloom.server.cli import build_parser, make_engine
    from latentloom.server.dispatch import engine_factory_from_args

    for command in ("run", "serve"):
        args = build_parser().parse_args([command, "--vram-budget", "6GB", "--no-stream-weights",
                                          "--custom-nodes", str(tmp_path / "none")])
        assert (args.vram_budget, args.stream_weights) == (6 * 10**9, False)
    kwargs = engine_factory_from_args(args).kwargs  # serve's Ray workers build their engines with them too
    assert (kwargs["vram_budget"], kwargs["stream_weights"]) == (6 * 10**9, False)
    manager = make_engine(args).env.models
    assert (manager.vram_budget, manager.stream_weights) == (6 * 10**9, False)
    assert build_parser().parse_args(["run"]).stream_weights is True
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run", "--vram-budget", "lots"])
    assert exit_info.value.code == 2 and "not a byte size: 'lots'" in capsys.readouterr().err
