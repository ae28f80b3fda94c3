"""LoRA training on a diffusion model (ComfyUI's TrainLoraNode numerics, comfy_extras/nodes_train.py).

Every step draws `batch_size` training latents, noise seeded with `seed + 1000·step` (ComfyUI's
Noise_RandomNoise), and one σ per sample from a uniform fraction of the model's schedule (percent_to_sigma); the
model predicts x0 from the noised latent and the loss compares it with the clean latent. The optimizer steps every
`grad_accumulation_steps` steps.

What is trained: an adapter per weight of every Linear / Conv layer (LoRA, LoHa or LoKr factors) and a full
difference per normalisation weight, named as ComfyUI names its trained LoRAs (`diffusion_model.<LDM module>.
lora_up.weight`, `.lora_down.weight`, `.alpha`, `.diff`), so the state dict is a LORA_MODEL that ComfyUI and our
LoraLoader read back. Biases are not trained (ComfyUI also trains `diff_b` bias offsets; see the module notes in
nodes/training.py).

How the input model is left alone: the shared UNet's parameters are never written. Each step passes
`W + ΔW(adapter parameters)` to the network through `torch.func.functional_call`, with the forward *and* the
backward pass inside that call, so gradient checkpointing (diffusers' own, switched on for the training call only)
recomputes the blocks with the same adapted weights. Gradients reach the adapter parameters only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import compute
from . import lora as lora_math
from .denoiser import ModelCall, unet_device
from .models import DiffusionModel
from .noise import initial_noise
from .sampling_conds import prepare_conditioning
from .schedules import ModelSampling, schedule_for

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
TRAINABLE_ALGORITHMS = ("LoRA", "LoHa", "LoKr")
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop,
}
LOSSES: dict[str, type[torch.nn.Module]] = {
    "MSE": torch.nn.MSELoss, "L1": torch.nn.L1Loss, "Huber": torch.nn.HuberLoss, "SmoothL1": torch.nn.SmoothL1Loss,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Layers whose weights get an adapter (ComfyUI: every layer of comfy.ops, i.e. with a weight function).
ADAPTED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
KEY_PREFIX = "diffusion_model."


class TrainingInputError(ValueError):
    """Bad training input; `input_name` says which node input is wrong."""

    def __init__(self, input_name: str, detail: str):
        super().__init__(detail)
        self.input_name = input_name
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------------
# Trainable adapters: ΔW as a differentiable function of a few parameters


class TrainableAdapter(torch.nn.Module):
    """ΔW for one weight (float32, any shape with the weight's element count) and its tensors in file naming."""

    alpha: float | None = None  # written to the file as `<key>.alpha` (not trained)

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def _scale(self, rank: int) -> float:
        """α / rank (α defaults to the rank: no scaling, as LoRA loaders read a file without alpha)."""
        return (self.alpha if self.alpha is not None else rank) / rank

    def state(self, key: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under `key` (the module's name in the file), detached."""
        state = {f"{key}.{name}": value.detach() for name, value in self.named_parameters()}
        if self.alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(self.alpha)
        return state


class LoraAdapter(TrainableAdapter):
    """ΔW = (α / rank) · up @ down (ComfyUI's LoraDiff; conv kernels flattened into `down`'s columns)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float):
        super().__init__()
        self.lora_up = torch.nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.lora_down = torch.nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.lora_up.weight = torch.nn.Parameter(up.clone())
        self.lora_down.weight = torch.nn.Parameter(down.clone())
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, generator: torch.Generator) -> LoraAdapter:
        # ComfyUI's init: up Kaiming-uniform, down zero, α = 1 (so ΔW starts at 0 and scales by 1/rank).
        up = torch.empty(weight.shape[0], rank)
        torch.nn.init.kaiming_uniform_(up, a=math.sqrt(5), generator=generator)
        return cls(up, torch.zeros(rank, weight[0].numel()), 1.0)

    def delta(self) -> torch.Tensor:
        rank = self.lora_down.weight.shape[0]
        return self._scale(rank) * (self.lora_up.weight.float() @ self.lora_down.weight.float())


class LohaAdapter(TrainableAdapter):
    """ΔW = (α / rank) · (w1a @ w1b) ⊙ (w2a @ w2b) (LyCORIS LoHa; ComfyUI's LohaDiff)."""

    def __init__(self, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, alpha: float):
        super().__init__()
        self.hada_w1_a = torch.nn.Parameter(w1a.clone())
        self.hada_w1_b = torch.nn.Parameter(w1b.clone())
        self.hada_w2_a = torch.nn.Parameter(w2a.clone())
        self.hada_w2_b = torch.nn.Parameter(w2b.clone())
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, generator: torch.Generator) -> LohaAdapter:
        # ComfyUI's init: normal(mean 0.1) / zero for the first pair, normal(0.1) / normal(0.01) for the second.
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        w1a = torch.normal(0.1, 1.0, (out_dim, rank), generator=generator)
        w2a = torch.normal(0.1, 1.0, (out_dim, rank), generator=generator)
        w2b = torch.normal(0.01, 1.0, (rank, in_dim), generator=generator)
        return cls(w1a, torch.zeros(rank, in_dim), w2a, w2b, 1.0)

    def delta(self) -> torch.Tensor:
        rank = self.hada_w1_b.shape[0]
        first = self.hada_w1_a.float() @ self.hada_w1_b.float()
        second = self.hada_w2_a.float() @ self.hada_w2_b.float()
        return self._scale(rank) * first * second


class LokrAdapter(TrainableAdapter):
    """ΔW = w1 ⊗ w2 (Kronecker product of two full factors; LyCORIS LoKr as ComfyUI trains it)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, alpha: float):
        super().__init__()
        self.lokr_w1 = torch.nn.Parameter(w1.clone())
        self.lokr_w2 = torch.nn.Parameter(w2.clone())
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, generator: torch.Generator) -> LokrAdapter:
        out1, out2 = factorization(weight.shape[0], rank)
        in1, in2 = factorization(weight[0].numel(), rank)
        w2 = torch.empty(out2, in2)
        torch.nn.init.kaiming_uniform_(w2, a=math.sqrt(5), generator=generator)
        return cls(torch.zeros(out1, in1), w2, 1.0)

    def delta(self) -> torch.Tensor:
        return torch.kron(self.lokr_w1.float(), self.lokr_w2.float())


class DiffAdapter(TrainableAdapter):
    """ΔW = diff, a full difference (normalisation weights; ComfyUI's `.diff`)."""

    def __init__(self, diff: torch.Tensor):
        super().__init__()
        self.diff = torch.nn.Parameter(diff.clone())

    def delta(self) -> torch.Tensor:
        return self.diff.float()


ADAPTER_CLASSES: dict[str, type[LoraAdapter] | type[LohaAdapter] | type[LokrAdapter]] = {
    "LoRA": LoraAdapter, "LoHa": LohaAdapter, "LoKr": LokrAdapter,
}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, m ≤ n: m = factor when it divides and factor² ≤ dimension, otherwise the
    divisor pair with the smallest sum whose smaller member is at most `factor` (LyCORIS's rule)."""
    if factor > 0 and dimension % factor == 0 and dimension >= factor * factor:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return min(m, n), max(m, n)


def _from_file(adapter: lora_math.Adapter, rank: int) -> TrainableAdapter:
    """A trainable copy of an adapter read from a LoRA file (continue training an existing LoRA)."""
    t = {name: value.float() for name, value in adapter.tensors.items()}
    if adapter.kind == "lora" and "mid" not in t and "dora_scale" not in t:
        down = t["down"].flatten(1)
        alpha = adapter.alpha if adapter.alpha is not None else float(down.shape[0])
        return LoraAdapter(t["up"].flatten(1), down, alpha)
    if adapter.kind == "loha" and "hada_t1" not in t and "dora_scale" not in t:
        alpha = adapter.alpha if adapter.alpha is not None else float(t["hada_w1_b"].shape[0])
        return LohaAdapter(t["hada_w1_a"], t["hada_w1_b"].flatten(1), t["hada_w2_a"], t["hada_w2_b"].flatten(1),
                           alpha)
    if adapter.kind == "lokr" and "lokr_w1" in t and "lokr_w2" in t and t["lokr_w2"].ndim == 2:
        return LokrAdapter(t["lokr_w1"], t["lokr_w2"], adapter.alpha if adapter.alpha is not None else 1.0)
    if adapter.kind == "diff":
        return DiffAdapter(t["diff"])
    raise TrainingInputError("existing_lora", f"'{adapter.key}' is a {adapter.kind} adapter in a form training "
                             "cannot continue (Tucker / DoRA / factored LoKr parts)")


def ldm_keys(unet: torch.nn.Module) -> dict[str, str]:
    """Diffusers weight name -> its module's key in ComfyUI-trained LoRA files (`diffusion_model.<LDM module>`)."""
    return {target.parameter: key for key, target in lora_math.key_map_unet(unet).items()
            if key.startswith(KEY_PREFIX)}


def create_adapters(unet: torch.nn.Module, algorithm: str, rank: int, seed: int, dtype: torch.dtype,
                    existing: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[str, TrainableAdapter]]:
    """Parameter name -> (file key, trainable adapter on the UNet's device in `dtype`) for every adapted weight.

    Weights the existing LoRA adapts continue from its factors; the others start fresh with `algorithm`."""
    if algorithm not in TRAINABLE_ALGORITHMS:
        raise TrainingInputError("algorithm", f"{algorithm} training is not built; choose one of "
                                 f"{', '.join(TRAINABLE_ALGORITHMS)}")
    keys = ldm_keys(unet)
    continued: dict[str, lora_math.Adapter] = {}
    if existing:
        parsed = lora_math.parse_lora(existing, lora_math.key_map_unet(unet), None,
                                      ("lora_te", "text_encoder", "text_encoders."))
        if not parsed.adapters:
            raise TrainingInputError("existing_lora", "none of its adapters match a layer of this model")
        continued = {target.parameter: adapter for target, adapter in parsed.adapters}
    generator = torch.Generator().manual_seed(seed)
    device = unet_device(unet)
    adapters: dict[str, tuple[str, TrainableAdapter]] = {}
    for module_name, module in unet.named_modules():
        if not isinstance(module, ADAPTED_LAYERS) or getattr(module, "weight", None) is None:
            continue
        name = f"{module_name}.weight"
        key = keys.get(name)
        if key is None:
            continue
        weight = module.weight
        adapter: TrainableAdapter
        if name in continued:
            adapter = _from_file(continued[name], rank)
        elif weight.ndim >= 2:
            adapter = ADAPTER_CLASSES[algorithm].create(weight, rank, generator)
        else:
            adapter = DiffAdapter(torch.zeros(weight.shape))
        if adapter.delta().numel() != weight.numel():
            raise TrainingInputError("existing_lora", f"'{key}' does not fit the weight of shape "
                                     f"{tuple(weight.shape)}")
        adapters[name] = (key, adapter.to(device=device, dtype=dtype))
    return adapters


def lora_state(adapters: Mapping[str, tuple[str, TrainableAdapter]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LORA_MODEL value: every adapter's tensors under ComfyUI's key names, on the CPU in `dtype`."""
    state: dict[str, torch.Tensor] = {}
    for key, adapter in adapters.values():
        for name, value in adapter.state(key).items():
            state[name] = value.to(device="cpu", dtype=dtype).contiguous()
    return state


def lora_patch(state: Mapping[str, torch.Tensor], unet: torch.nn.Module, strength: float) -> lora_math.LoraPatch:
    """A weight patch applying a LORA_MODEL at `strength` (the same parse as LoraLoader's, so a saved and reloaded
    file gives the very same patch)."""
    parsed = lora_math.parse_lora(state, lora_math.key_map_unet(unet))
    if not parsed.adapters:
        raise lora_math.LoraFormatError(f"none of its {len(parsed.unmatched)} adapted layers match this model")
    patch = lora_math.LoraPatch(tuple((target.parameter, adapter, float(strength))
                                      for target, adapter in parsed.adapters))
    patch.check(unet)
    return patch


def apply_lora_state(model: DiffusionModel, state: Mapping[str, torch.Tensor], strength: float) -> DiffusionModel:
    """A clone of `model` carrying the LoRA as a weight patch (stacked after any LoRA it already has)."""
    return lora_math.attach(model, lora_patch(state, model.unet, strength))


# ---------------------------------------------------------------------------------------------------------------
# The training loop


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 1
    steps: int = 16
    grad_accumulation_steps: int = 1
    learning_rate: float = 0.0005
    rank: int = 8
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    training_dtype: torch.dtype = torch.bfloat16
    lora_dtype: torch.dtype = torch.bfloat16
    algorithm: str = "LoRA"
    gradient_checkpointing: bool = True


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]   # the LORA_MODEL
    losses: list[float]              # one per step (ComfyUI's loss map "loss" list)


class _WeightHolder(torch.nn.Module):
    """Holds the UNet so that functional_call can substitute its weights for a whole training step."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        return step()


def _adapted_weights(unet: torch.nn.Module, adapters: Mapping[str, tuple[str, TrainableAdapter]],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`unet.<name>` -> the weight the step runs with: the (detached) stored weight plus the adapter's ΔW, and
    every other floating-point tensor cast to the training dtype when it is stored in another one."""
    weights: dict[str, torch.Tensor] = {}
    for name, parameter in unet.named_parameters():
        base = parameter.detach()
        if name in adapters:
            value = base.float() + adapters[name][1].delta().reshape(base.shape)
            weights[f"unet.{name}"] = value.to(dtype)
        elif base.is_floating_point() and base.dtype != dtype:
            weights[f"unet.{name}"] = base.to(dtype)
    for name, buffer in unet.named_buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            weights[f"unet.{name}"] = buffer.to(dtype)
    return weights


def _sigma_at(schedule: ModelSampling, fraction: float) -> float:
    # A fraction of exactly 0 would be "pure noise" (an infinite σ): use the schedule's largest σ instead.
    return float(schedule.sigma_max) if fraction <= 0.0 else schedule.percent_to_sigma(fraction)


@dataclass
class _Batch:
    """One step's draw: which latents, their clean and noised versions, σ per sample, their conditioning."""

    clean: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor
    context: torch.Tensor
    added: dict[str, torch.Tensor]


class _Dataset:
    """Scaled training latents with one prepared conditioning entry each, and ComfyUI's per-step draws."""

    def __init__(self, model: DiffusionModel, unet: torch.nn.Module, latents: torch.Tensor, positive: list,
                 schedule: ModelSampling):
        if len(positive) != latents.shape[0]:
            raise TrainingInputError("positive", f"{len(positive)} conditioning entries for {latents.shape[0]} "
                                     "latents; give one entry, or one per latent")
        self.device = unet_device(unet)
        self.schedule = schedule
        self.clean = model.latent_format.process_in(latents.to(device=self.device, dtype=torch.float32))
        self.entries = prepare_conditioning({"positive": positive}, self.clean[:1].shape, schedule, self.device,
                                            unet.config, model.family)["positive"]

    def draw(self, chosen: list[int], noise_seed: int, generator: torch.Generator) -> _Batch:
        """Noise from `noise_seed` (ComfyUI's Noise_RandomNoise), one σ per sample at a uniform fraction of the
        schedule (percent_to_sigma), x_t = x0 + σ·noise as the model's noise_scaling makes it."""
        clean = self.clean[chosen]
        noise = initial_noise(clean.cpu(), noise_seed).to(self.device)
        sigmas = torch.tensor([_sigma_at(self.schedule, torch.rand((), generator=generator).item())
                               for _ in chosen], device=self.device)
        noisy = self.schedule.noise_scaling(sigmas, noise, clean, False)
        context = torch.cat([self.entries[i].context[:1] for i in chosen])
        added = {name: torch.cat([self.entries[i].added[name][:1] for i in chosen])
                 for name in self.entries[chosen[0]].added}
        return _Batch(clean, noisy, sigmas, context, added)


def _loss(call: ModelCall, batch: _Batch, criterion: torch.nn.Module) -> torch.Tensor:
    """The loss of the model's x0 prediction from the noised latents against the clean latents."""
    predicted = call(batch.noisy, batch.sigmas, batch.context, batch.added or None, chunks=1)
    return criterion(predicted, batch.clean)


def train_lora(model: DiffusionModel, latents: torch.Tensor, positive: list, settings: TrainSettings,
               existing: Mapping[str, torch.Tensor] | None = None, manager: object = None,
               progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train adapters on `model` (left unchanged) with unscaled latents [N, C, h, w] and one conditioning pair
    per latent; `progress(step, total, loss)` is called after every step (and may raise to interrupt)."""
    if settings.optimizer not in OPTIMIZERS:
        raise TrainingInputError("optimizer", f"unknown optimizer {settings.optimizer!r}")
    if settings.loss_function not in LOSSES:
        raise TrainingInputError("loss_function", f"unknown loss function {settings.loss_function!r}")
    schedule = schedule_for(model.sampling)
    # ComfyUI's set_model_compute_dtype(training_dtype): the UNet runs in the training dtype.
    training_model = model.with_option(compute.COMPUTE_DTYPE, settings.training_dtype)
    total = settings.steps * settings.grad_accumulation_steps
    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad(), model.prepared(manager) as unet:
        data = _Dataset(model, unet, latents, positive, schedule)
        adapters = create_adapters(unet, settings.algorithm, settings.rank, settings.seed, settings.lora_dtype,
                                   existing)
        parameters = [p for _, adapter in adapters.values() for p in adapter.parameters()]
        optimizer = OPTIMIZERS[settings.optimizer](parameters, lr=settings.learning_rate)
        criterion = LOSSES[settings.loss_function]()
        call = ModelCall(training_model, unet, schedule)
        call.network = unet  # the weights come from functional_call below, already in the training dtype
        holder = _WeightHolder(unet)
        generator = torch.Generator().manual_seed(settings.seed)
        checkpointing_was_on = bool(getattr(unet, "is_gradient_checkpointing", False))
        if settings.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()  # type: ignore[operator]
        try:
            for step_index in range(total):
                chosen = torch.randperm(latents.shape[0], generator=generator)[:settings.batch_size].tolist()
                batch = data.draw(chosen, settings.seed + step_index * 1000, generator)

                def step(batch: _Batch = batch) -> torch.Tensor:
                    loss = _loss(call, batch, criterion)
                    loss.backward()  # inside functional_call: checkpointed blocks recompute with the same weights
                    return loss.detach()

                loss = torch.func.functional_call(holder, _adapted_weights(unet, adapters, settings.training_dtype),
                                                  (step,), strict=False)
                losses.append(float(loss))
                if (step_index + 1) % settings.grad_accumulation_steps == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                if progress is not None:
                    progress(step_index + 1, total, losses[-1])
        finally:
            if settings.gradient_checkpointing and not checkpointing_was_on and \
                    hasattr(unet, "disable_gradient_checkpointing"):
                unet.disable_gradient_checkpointing()  # type: ignore[operator]
    return TrainResult(lora_state(adapters, settings.lora_dtype), losses)


def evaluation_loss(model: DiffusionModel, latents: torch.Tensor, positive: list, draws: int = 8, seed: int = 0,
                    loss_function: str = "MSE", manager: object = None) -> float:
    """The training loss of `model` (with whatever LoRA it carries) on the whole dataset, averaged over `draws`
    fixed draws of noise and σ: a validation figure that, unlike the training curve, compares models on the same
    noise."""
    schedule = schedule_for(model.sampling)
    criterion = LOSSES[loss_function]()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), model.prepared(manager) as unet:
        data = _Dataset(model, unet, latents, positive, schedule)
        call = ModelCall(model, unet, schedule)
        everything = list(range(latents.shape[0]))
        total = sum(float(_loss(call, data.draw(everything, seed + index * 1000, generator), criterion))
                    for index in range(draws))
    return total / draws
