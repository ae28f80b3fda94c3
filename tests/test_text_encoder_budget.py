"""A large text encoder and the diffusion model under a compute budget that cannot hold both.

Flux's T5 (4.7 B parameters) and its transformer do not fit together on most GPUs. The memory manager's compute
budget is set between the larger of the two and their sum, on a simulated accelerator (transfers are recorded,
not performed, so the bookkeeping runs on a CPU): CLIPTextEncode puts the text encoders on the compute device,
KSampler then needs the transformer there, and a second encode needs the encoders back. The accounted bytes on
the compute device must never exceed the budget, each model is loaded once (never held twice), and the results
are those of a run without a budget.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import StubContext, make_env, run_node  # noqa: E402
from test_family_loading import _perturbed, clip_file_state, flux_original, t5_file_state  # noqa: E402
from test_flux_sampling import tiny_flux_for_text, write_t5_tokenizer  # noqa: E402
from tiny_models import _text_encoder, save_state  # noqa: E402

from latentloom.engine.memory import ModelManager, module_nbytes  # noqa: E402
from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.loaders import DualCLIPLoader, UNETLoader  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402

pytestmark = pytest.mark.slow  # a tiny transformer and text encoders loaded and swapped under a budget

FP32 = {"diffusion": torch.float32, "text_encoder": torch.float32, "vae": torch.float32, "other": torch.float32}


class BudgetedAccelerator(ModelManager):
    """A pretend accelerator with a compute budget that records the most bytes it ever accounted there."""

    def __init__(self, vram_budget: int):
        super().__init__(device="cuda", offload_device="cpu", dtypes=FP32, vram_budget=vram_budget)
        self.peak = 0
        self.transfers: list[tuple[int, str]] = []

    def _transfer(self, module, device):
        self.transfers.append((id(module), device.type))

    @contextlib.contextmanager
    def use(self, module, changes=()):
        with super().use(module, changes) as placed:
            with self._lock:
                self.peak = max(self.peak, self._bytes_on_compute())
            yield placed


def big_t5(seed: int) -> torch.nn.Module:
    """A T5 encoder with tiny_flux_for_text's text width (96), wide and deep enough to weigh about as much as
    the transformer, as T5-XXL does next to Flux."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=300, d_model=96, d_kv=16, d_ff=2048, num_layers=6, num_heads=3,
                      relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      use_cache=False)
    return _perturbed(T5EncoderModel(config), seed)


def write_files(models) -> tuple[int, int]:
    """The Flux transformer and its CLIP-L + T5 files; returns their sizes in bytes (fp32)."""
    transformer, clip_l, t5 = tiny_flux_for_text(11, True), _text_encoder(False, False, 12), big_t5(13)
    save_state(flux_original(transformer), models / "diffusion_models" / "flux1-dev.safetensors")
    save_state(clip_file_state(clip_l), models / "text_encoders" / "clip_l.safetensors")
    save_state(t5_file_state(t5), models / "text_encoders" / "t5xxl.safetensors")
    write_t5_tokenizer(models / "text_encoders" / "t5_tokenizer")
    return module_nbytes(transformer), module_nbytes(clip_l) + module_nbytes(t5)


def workflow(ctx: StubContext) -> list[torch.Tensor]:
    """Encode, sample, encode again: the encoders, then the transformer, then the encoders on the device."""
    (model,) = UNETLoader.model_construct(unet_name="flux1-dev.safetensors", weight_dtype="default").run(ctx)
    (clip,) = DualCLIPLoader.model_construct(clip_name1="clip_l.safetensors", clip_name2="t5xxl.safetensors",
                                             type="flux").run(ctx)
    (positive,) = run_node(CLIPTextEncode, ctx, text="a photo of a red cat", clip=clip)
    (out,) = KSampler.model_construct(model=model, seed=3, steps=2, cfg=1.0, sampler_name="euler",
                                      scheduler="simple", positive=positive, negative=positive,
                                      latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0).run(ctx)
    (again,) = run_node(CLIPTextEncode, ctx, text="a blue dog in the garden", clip=clip)
    return [positive[0][0], positive[0][1]["pooled_output"], out["samples"], again[0][0]]


def test_text_encoders_and_transformer_take_turns_within_the_budget(tmp_path):
    models = tmp_path / "models"
    unet_bytes, clip_bytes = write_files(models)
    assert 0.3 < clip_bytes / unet_bytes < 3  # "large": the same order as the diffusion model
    budget = max(unet_bytes, clip_bytes) + min(unet_bytes, clip_bytes) // 2  # one fits, both do not
    expected = workflow(StubContext(make_env(models_dir=models)))

    manager = BudgetedAccelerator(vram_budget=budget)
    results = workflow(StubContext(make_env(models_dir=models, manager=manager)))
    for ours, reference in zip(results, expected, strict=True):
        assert torch.equal(ours, reference)
    stats = manager.stats()
    print(f"budget {budget} bytes (transformer {unet_bytes}, text encoders {clip_bytes}); "
          f"peak accounted on the device {manager.peak}; offloads {stats.offloads}")
    assert max(unet_bytes, clip_bytes) <= manager.peak <= budget
    # Each model loaded once and never copied: the two entries hold exactly the files' bytes.
    assert stats.loads == 2 and stats.drops == 0
    assert sorted(entry["bytes"] for entry in stats.entries) == sorted([unet_bytes, clip_bytes])
    # The encoders went to the device, made room for the transformer, and came back for the second prompt;
    # the transformer made room in turn.
    assert stats.offloads >= 2
    devices_in_order = [device for _, device in manager.transfers]
    assert devices_in_order == ["cuda", "cpu", "cuda", "cpu", "cuda"]
