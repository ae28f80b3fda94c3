"""Model-option nodes (nodes/model_sampling.py) and the schedules / prediction types behind them, against formulas
written out, diffusers' schedulers where they implement the same thing (EulerDiscreteScheduler with
rescale_betas_zero_snr, EDMEulerScheduler, LCMScheduler), hand-built reference networks, and tiny-checkpoint
graphs."""

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from adapter_support import tiny_objects  # noqa: E402
from branch_graphs import branches_graph, probe_engine, probed_latents  # noqa: E402
from node_context import StubContext, make_env  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion import compute, predictions  # noqa: E402
from latentloom.nodes.diffusion.denoiser import ModelCall  # noqa: E402
from latentloom.nodes.diffusion.models import SamplingConfig  # noqa: E402
from latentloom.nodes.diffusion.resize import common_upscale  # noqa: E402
from latentloom.nodes.diffusion.schedules import (  # noqa: E402
    SCHEDULER_NAMES,
    DistilledDiscreteSchedule,
    calculate_sigmas,
    exponential_sigmas,
    schedule_for,
)
from latentloom.nodes.model_sampling import (  # noqa: E402
    ModelComputeDtype,
    ModelSamplingContinuousEDM,
    ModelSamplingContinuousV,
    ModelSamplingDiscrete,
    PatchModelAddDownscale,
    TorchCompileModel,
)


@pytest.fixture(scope="module")
def model():
    return tiny_objects("sd1", 0)[0]


@pytest.fixture
def ctx():
    return StubContext(make_env())


def sampled(node_class, model, ctx, **inputs):
    (patched,) = node_class.model_construct(model=model, **inputs).run(ctx)
    return patched


def scaled_linear_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# --- schedules -------------------------------------------------------------------------------------------------

def test_zero_terminal_snr_rescale_matches_the_formula_and_diffusers():
    from diffusers import EulerDiscreteScheduler

    schedule = schedule_for(SamplingConfig(zsnr=True))
    # Lin et al. 2023, written out: √ᾱ shifted to end at 0, scaled to keep its first value; the last ᾱ is pinned.
    root = np.sqrt(scaled_linear_alphas_cumprod())
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alpha_bar = root ** 2
    alpha_bar[-1] = 4.8973451890853435e-08
    expected = np.sqrt((1 - alpha_bar) / alpha_bar)
    np.testing.assert_allclose(schedule.sigmas.numpy(), expected.astype(np.float32), rtol=1e-6)
    assert schedule.sigma_max.item() == pytest.approx(4518.8, rel=1e-4)
    # diffusers rescales the betas (in float32) and pins the last ᾱ at 2⁻²⁴ instead: equal elsewhere.
    reference = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       rescale_betas_zero_snr=True)
    alphas = reference.alphas_cumprod.double()
    np.testing.assert_allclose(schedule.sigmas[:-1].numpy(), ((1 - alphas) / alphas).sqrt()[:-1].numpy(), rtol=2e-4)
    # The plain schedule is untouched by the option's existence.
    plain = schedule_for(SamplingConfig())
    assert plain.sigma_max.item() == pytest.approx(14.614641, abs=1e-6)


def test_edm_schedule_matches_diffusers_edm_euler():
    from diffusers import EDMEulerScheduler

    schedule = schedule_for(SamplingConfig(prediction="edm", schedule="continuous_edm", sigma_min=0.002,
                                           sigma_max=80.0, sigma_data=0.5))
    assert schedule.sigmas.shape == (1000,)
    assert schedule.sigma_min.item() == pytest.approx(0.002, rel=1e-5)
    assert schedule.sigma_max.item() == pytest.approx(80.0, rel=1e-5)
    steps = torch.diff(schedule.log_sigmas.double())
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-3)  # log-uniform table
    reference = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras")
    reference.set_timesteps(12)
    torch.testing.assert_close(calculate_sigmas(schedule, "karras", 12), reference.sigmas.float(), rtol=1e-5,
                               atol=0)
    sigma = torch.tensor([0.01, 1.0, 40.0])
    torch.testing.assert_close(schedule.timestep(sigma), reference.precondition_noise(sigma))
    torch.testing.assert_close(schedule.sigma(schedule.timestep(sigma)), sigma)
    # percent_to_sigma is log-linear between the ends.
    assert schedule.percent_to_sigma(0.5) == pytest.approx(math.sqrt(0.002 * 80.0), rel=1e-5)
    assert (schedule.percent_to_sigma(0.0), schedule.percent_to_sigma(1.0)) == (999999999.9, 0.0)


def test_continuous_v_and_cosmos_timesteps():
    v = schedule_for(SamplingConfig(prediction="v", schedule="continuous_v", sigma_min=0.03, sigma_max=500.0))
    sigma = torch.tensor([0.03, 1.0, 500.0])
    torch.testing.assert_close(v.timestep(sigma), torch.atan(sigma) * 2 / math.pi)
    torch.testing.assert_close(v.sigma(v.timestep(sigma)), sigma, rtol=1e-4, atol=0)
    cosmos = schedule_for(SamplingConfig(prediction="cosmos_rflow", schedule="cosmos_rflow", sigma_min=0.002,
                                         sigma_max=80.0))
    torch.testing.assert_close(cosmos.timestep(sigma), sigma / (sigma + 1))
    t = torch.tensor([0.5, 0.9, 0.99, 0.999])
    torch.testing.assert_close(cosmos.sigma(t), torch.tensor([1.0, 9.0, 80.0, 80.0]), rtol=1e-5, atol=0)


def test_lcm_schedule_and_boundary_condition_match_diffusers_lcm():
    from diffusers import LCMScheduler

    schedule = schedule_for(SamplingConfig(prediction="lcm", schedule="discrete_distilled"))
    assert isinstance(schedule, DistilledDiscreteSchedule) and schedule.sigmas.shape == (50,)
    full = schedule_for(SamplingConfig())
    assert torch.equal(schedule.sigmas, full.sigmas[19::20])
    reference = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             original_inference_steps=50)
    reference.set_timesteps(50)
    ours = schedule.timestep(schedule.sigmas.flip(0))
    assert ours.long().tolist() == reference.timesteps.tolist()  # 999, 979, ..., 19
    torch.testing.assert_close(schedule.sigma(ours), schedule.sigmas.flip(0))
    lcm = predictions.LCMPrediction()
    for t in (19, 499, 999):
        c_skip, c_out = lcm.boundary_scalings(torch.tensor(float(t)))
        ref_skip, ref_out = reference.get_scalings_for_boundary_condition_discrete(t)
        assert (c_skip.item(), c_out.item()) == (pytest.approx(ref_skip, rel=1e-6), pytest.approx(ref_out, rel=1e-6))


CASES = {
    "discrete zsnr": SamplingConfig(prediction="v", zsnr=True),
    "lcm": SamplingConfig(prediction="lcm", schedule="discrete_distilled"),
    "edm": SamplingConfig(prediction="edm", schedule="continuous_edm", sigma_data=0.5),
    "continuous v": SamplingConfig(prediction="v", schedule="continuous_v", sigma_min=0.03, sigma_max=500.0),
    "cosmos": SamplingConfig(prediction="cosmos_rflow", schedule="cosmos_rflow", sigma_min=0.002, sigma_max=80.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_works_on_every_schedule(case, scheduler):
    schedule = schedule_for(CASES[case])
    sigmas = calculate_sigmas(schedule, scheduler, 10)
    top = schedule.sigma_max.item()
    assert torch.isfinite(sigmas).all() and sigmas[-1] == 0 and len(sigmas) >= 9
    assert (sigmas[:-1] > 0).all() and (torch.diff(sigmas) <= 0).all(), sigmas
    if scheduler == "ddim_uniform":  # every (table size // steps)-th entry from index 1: never the top
        stride = len(schedule.sigmas) // 10
        assert sigmas[0] == schedule.sigmas[1 + stride * ((len(schedule.sigmas) - 2) // stride)]
    else:
        assert sigmas[0].item() == pytest.approx(top, rel=0.06)
    if scheduler in ("simple", "ddim_uniform", "beta"):  # these read the table
        assert all(v in schedule.sigmas.tolist() for v in sigmas[:-1].tolist())


def test_normal_scheduler_on_the_edm_schedule_is_log_uniform():
    """ComfyUI's "normal" is uniform in the network timestep, ¼·log σ for EDM: the exponential schedule."""
    schedule = schedule_for(CASES["edm"])
    expected = exponential_sigmas(10, schedule.sigma_min.item(), schedule.sigma_max.item())
    torch.testing.assert_close(calculate_sigmas(schedule, "normal", 10), expected, rtol=1e-4, atol=0)


# --- prediction types through the model call -----------------------------------------------------------------

def expected_denoised(prediction: str, x, output, sigma, sigma_data, timestep):
    s, d = sigma.reshape(-1, 1, 1, 1), sigma_data
    if prediction == "eps":
        return x - output * s
    if prediction == "v":
        return x * d ** 2 / (s ** 2 + d ** 2) - output * s * d / (s ** 2 + d ** 2).sqrt()
    if prediction == "edm":
        return x * d ** 2 / (s ** 2 + d ** 2) + output * s * d / (s ** 2 + d ** 2).sqrt()
    if prediction in ("x0", "img_to_img"):
        return output
    if prediction == "lcm":
        scaled = timestep.reshape(-1, 1, 1, 1) * 10
        return scaled / (scaled ** 2 + 0.25).sqrt() * (x - output * s) + 0.25 / (scaled ** 2 + 0.25) * x
    assert prediction == "cosmos_rflow"
    r = s / (s + 1)
    return x * (1 - r) - output * r


def expected_input(prediction: str, x, sigma, sigma_data):
    s = sigma.reshape(-1, 1, 1, 1)
    if prediction == "img_to_img":
        return x
    if prediction == "cosmos_rflow":
        return x / (s + 1)
    return x / (s ** 2 + sigma_data ** 2).sqrt()


MODEL_CALL_CASES = {
    "eps": SamplingConfig(),
    "v": SamplingConfig(prediction="v", zsnr=True),
    "x0": SamplingConfig(prediction="x0"),
    "img_to_img": SamplingConfig(prediction="img_to_img"),
    "lcm": CASES["lcm"],
    "edm": CASES["edm"],
    "cosmos_rflow": CASES["cosmos"],
    "continuous v": CASES["continuous v"],
}


@pytest.mark.parametrize("case", MODEL_CALL_CASES)
def test_model_call_uses_the_prediction_type_and_timestep(model, case):
    config = MODEL_CALL_CASES[case]
    patched = model.with_sampling(config)
    schedule = schedule_for(config)
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn((2, 4, 8, 8), generator=g) * 3, torch.randn((2, 77, 32), generator=g)
    sigma = torch.tensor([2.5, 2.5])
    ours = ModelCall(patched, model.unet, schedule)(x, sigma, context)
    timestep = schedule.timestep(sigma)
    if config.schedule == "discrete":
        assert timestep.tolist() == [float(round(timestep[0].item()))] * 2
    x_in = expected_input(config.prediction, x, sigma, config.sigma_data)
    with torch.no_grad():
        output = model.unet(x_in, timestep, encoder_hidden_states=context, return_dict=False)[0]
    expected = expected_denoised(config.prediction, x, output, sigma, config.sigma_data, timestep)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_edm_preconditioning_matches_diffusers():
    from diffusers import EDMEulerScheduler

    g = torch.Generator().manual_seed(5)
    x, output = torch.randn((1, 4, 4, 4), generator=g), torch.randn((1, 4, 4, 4), generator=g)
    sigma = torch.tensor([3.0])
    for ours, kind in ((predictions.EDMPrediction(0.5), "epsilon"), (predictions.VPrediction(0.5), "v_prediction")):
        reference = EDMEulerScheduler(sigma_data=0.5, prediction_type=kind)
        torch.testing.assert_close(ours.calculate_input(sigma, x), reference.precondition_inputs(x, sigma))
        torch.testing.assert_close(ours.calculate_denoised(sigma, output, x),
                                   reference.precondition_outputs(x, output, sigma))


def test_noise_scaling():
    noise, latent, sigma = torch.ones((1, 1, 2, 2)), torch.full((1, 1, 2, 2), 0.5), torch.tensor(3.0)
    eps = predictions.EpsPrediction()
    assert torch.allclose(eps.noise_scaling(sigma, noise, latent, max_denoise=True), 0.5 + math.sqrt(10) * noise)
    assert torch.allclose(eps.noise_scaling(sigma, noise, latent), latent + 3 * noise)
    cosmos = predictions.CosmosRFlowPrediction()
    assert torch.allclose(cosmos.noise_scaling(sigma, noise, latent, max_denoise=True), latent + 3 * noise)


# --- the nodes -------------------------------------------------------------------------------------------------

def test_sampling_nodes_set_the_config_and_leave_the_input_alone(model, ctx):
    lcm = sampled(ModelSamplingDiscrete, model, ctx, sampling="lcm", zsnr=True)
    assert (lcm.sampling.prediction, lcm.sampling.schedule, lcm.sampling.zsnr) == ("lcm", "discrete_distilled", True)
    assert lcm.sampling.beta_end == model.sampling.beta_end and model.sampling == SamplingConfig()
    edm = sampled(ModelSamplingContinuousEDM, model, ctx, sampling="edm", sigma_max=80.0, sigma_min=0.002)
    assert (edm.sampling.prediction, edm.sampling.schedule, edm.sampling.sigma_data) == ("edm", "continuous_edm", 0.5)
    playground = sampled(ModelSamplingContinuousEDM, model, ctx, sampling="edm_playground_v2.5", sigma_max=80.0,
                         sigma_min=0.002)
    latent = torch.randn((1, 4, 3, 3))
    mean = torch.tensor([-1.6574, 1.886, -1.383, 2.5155]).view(1, 4, 1, 1)
    std = torch.tensor([8.4927, 5.9022, 6.5498, 5.2299]).view(1, 4, 1, 1)
    torch.testing.assert_close(playground.latent_format.process_in(latent), (latent - mean) * 0.5 / std)
    torch.testing.assert_close(playground.latent_format.process_out(playground.latent_format.process_in(latent)),
                               latent)
    assert model.latent_format.scale_factor == 0.18215
    cosmos = sampled(ModelSamplingContinuousEDM, model, ctx, sampling="cosmos_rflow", sigma_max=80.0, sigma_min=0.002)
    assert cosmos.sampling.schedule == "cosmos_rflow"
    v = sampled(ModelSamplingContinuousV, model, ctx, sampling="v_prediction", sigma_max=500.0, sigma_min=0.03)
    assert (v.sampling.schedule, v.sampling.sigma_min, v.sampling.sigma_max) == ("continuous_v", 0.03, 500.0)


@pytest.mark.parametrize("node", [ModelSamplingContinuousEDM, ModelSamplingContinuousV])
def test_bad_sigma_range_is_an_input_error(model, ctx, node):
    sampling = "v_prediction"
    with pytest.raises(InputError) as error:
        sampled(node, model, ctx, sampling=sampling, sigma_max=10.0, sigma_min=0.0)
    assert error.value.input_name == "sigma_min"
    with pytest.raises(InputError) as error:
        sampled(node, model, ctx, sampling=sampling, sigma_max=0.5, sigma_min=1.0)
    assert error.value.input_name == "sigma_max"


def unet_call(model, x, sigma, context):
    return ModelCall(model, model.unet, schedule_for(model.sampling))(x, sigma, context)


def inputs():
    g = torch.Generator().manual_seed(6)
    return torch.randn((1, 4, 8, 8), generator=g) * 5, torch.tensor([5.0]), torch.randn((1, 77, 32), generator=g)


@pytest.mark.slow
def test_compute_dtype_runs_the_unet_in_that_dtype(model, ctx):
    x, sigma, context = inputs()
    plain = unet_call(model, x, sigma, context)
    bf16 = sampled(ModelComputeDtype, model, ctx, dtype="bf16")
    ours = unet_call(bf16, x, sigma, context)
    # Reference: a bf16 copy of the network, fed the bf16 input the model call makes.
    reference = model.clone(unet=copy.deepcopy(model.unet).to(torch.bfloat16))
    torch.testing.assert_close(ours, unet_call(reference, x, sigma, context), rtol=0, atol=0)
    assert 0 < (ours - plain).abs().max() < 0.05 * plain.abs().max()
    assert next(model.unet.parameters()).dtype == torch.float32  # the shared weights are never converted
    back = sampled(ModelComputeDtype, bf16, ctx, dtype="default")
    assert torch.equal(unet_call(back, x, sigma, context), plain)


def micro_model(model):
    """A one-level diffusers UNet without a middle block: dynamo traces it in seconds (the sd1 tiny UNet takes
    ~15 s a trace on this machine)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
                                layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                mid_block_type=None, cross_attention_dim=32, norm_num_groups=8).eval()
    return model.clone(unet=unet.requires_grad_(False))


@pytest.mark.slow
def test_torch_compile_wraps_the_unet_below_the_function_wrapper(model, ctx):
    """Through the seam (a TorchCompile with the "eager" backend: inductor compiles the tiny UNet on this CPU,
    but in minutes; see the slow tests): same result, the compiled module is what gets called, and a
    model-function wrapper still wraps the call."""
    micro = micro_model(model)
    x, sigma, context = inputs()
    plain = unet_call(micro, x, sigma, context)
    compiled = micro.with_option(compute.TORCH_COMPILE, compute.TorchCompile("eager"))
    call = ModelCall(compiled, micro.unet, schedule_for(micro.sampling))
    assert isinstance(call.network, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(call(x, sigma, context), plain, rtol=1e-5, atol=1e-5)
    wrapped = compiled.set_model_unet_function_wrapper(
        lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"]) * 0.5)
    torch.testing.assert_close(unet_call(wrapped, x, sigma, context), plain * 0.5, rtol=1e-5, atol=1e-5)
    # With a compute dtype too, the compiled module runs on the cast weights.
    both = compiled.with_option(compute.COMPUTE_DTYPE, torch.bfloat16)
    reference = micro.clone(unet=copy.deepcopy(micro.unet).to(torch.bfloat16))
    torch.testing.assert_close(unet_call(both, x, sigma, context), unet_call(reference, x, sigma, context))
    node = sampled(TorchCompileModel, model, ctx, backend="inductor")
    assert node.options[compute.TORCH_COMPILE].backend == "inductor" and compute.TORCH_COMPILE not in model.options
    if not torch.cuda.is_available():
        with pytest.raises(InputError) as error:
            sampled(TorchCompileModel, model, ctx, backend="cudagraphs")
        assert error.value.input_name == "backend"


@pytest.mark.slow
def test_torch_compile_with_inductor_gives_the_same_result(model, ctx):
    x, sigma, context = inputs()
    compiled = sampled(TorchCompileModel, model, ctx, backend="inductor")
    torch.testing.assert_close(unet_call(compiled, x, sigma, context), unet_call(model, x, sigma, context),
                               rtol=1e-4, atol=1e-4)


class ResizedInput(torch.nn.Module):
    """Reference Deep Shrink part: the wrapped module's first input resized by 1/2 (bicubic)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden, *args, **kwargs):
        h, w = hidden.shape[-2:]
        return self.inner(common_upscale(hidden, w // 2, h // 2, "bicubic"), *args, **kwargs)


class ResizedOutput(torch.nn.Module):
    """Reference Deep Shrink part: the wrapped module's output h resized ×2 (bicubic)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        h = out[0]
        return (common_upscale(h, h.shape[-1] * 2, h.shape[-2] * 2, "bicubic"), *out[1:])


@pytest.mark.slow
def test_deep_shrink_equals_a_hand_built_reference(model, ctx):
    """Downscale after the skip of input block 3 (the first downsampler): the next down block sees h at half
    size, and output block 8 (the last resnet of up block 2, whose skip is block 3's) gets h resized back before
    the concatenation. The reference replaces those two modules in a copy of the UNet."""
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn((1, 4, 32, 32), generator=g) * 5, torch.randn((1, 77, 32), generator=g)
    patched = sampled(PatchModelAddDownscale, model, ctx, block_number=3, downscale_factor=2.0, start_percent=0.0,
                      end_percent=0.35, downscale_after_skip=True, downscale_method="bicubic",
                      upscale_method="bicubic")
    reference = model.clone(unet=copy.deepcopy(model.unet))
    reference.unet.down_blocks[1].resnets[0] = ResizedInput(reference.unet.down_blocks[1].resnets[0])
    reference.unet.up_blocks[2].attentions[1] = ResizedOutput(reference.unet.up_blocks[2].attentions[1])
    inside, outside = torch.tensor([10.0]), torch.tensor([1.0])  # percent_to_sigma(0.35) ≈ 2.9
    assert schedule_for(model.sampling).percent_to_sigma(0.35) == pytest.approx(2.9, abs=0.2)
    ours = unet_call(patched, x, inside, context)
    torch.testing.assert_close(ours, unet_call(reference, x, inside, context), rtol=1e-5, atol=1e-5)
    assert (ours - unet_call(model, x, inside, context)).abs().max() > 1e-2
    assert torch.equal(unet_call(patched, x, outside, context), unet_call(model, x, outside, context))
    # Before the skip: the skip of block 3 is small too, so the mismatch moves up to output block 9.
    before = sampled(PatchModelAddDownscale, model, ctx, block_number=3, downscale_factor=2.0, start_percent=0.0,
                     end_percent=0.35, downscale_after_skip=False, downscale_method="bicubic",
                     upscale_method="bicubic")
    assert unet_call(before, x, inside, context).shape == x.shape
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.unet.modules())


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return probe_engine(tmp_path_factory, "model_sampling")


def run_branches(engine, node: str, inputs: dict, sampler: str = "euler", scheduler: str = "normal"):
    patch = {"patch": {"class_type": node, "inputs": {"model": ["ckpt", 0], **inputs}}}
    found = probed_latents(engine.run(branches_graph(patch, "patch", sampler=sampler, scheduler=scheduler)))
    return found["plain"], found["patched"]


GRAPH_CASES = [
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}, "euler", "normal"),
    ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}, "lcm", "sgm_uniform"),
    ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}, "euler", "karras"),
    ("ModelSamplingContinuousV", {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}, "euler",
     "normal"),
    ("ModelComputeDtype", {"dtype": "bf16"}, "euler", "normal"),
    ("PatchModelAddDownscale", {"block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0,
                                "end_percent": 0.35, "downscale_after_skip": True, "downscale_method": "bicubic",
                                "upscale_method": "bislerp"}, "euler", "normal"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("node", "inputs", "sampler", "scheduler"), GRAPH_CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(GRAPH_CASES)])
def test_graph_with_the_node_samples_and_changes_only_its_branch(engine, node, inputs, sampler, scheduler):
    plain, patched = run_branches(engine, node, inputs, sampler, scheduler)
    assert torch.isfinite(patched).all() and patched.shape == plain.shape == (1, 4, 16, 16)
    assert (patched - plain).abs().max() > 1e-4
    if node == "ModelComputeDtype":  # the same model in lower precision: close, not equal
        assert (patched - plain).abs().max() < 0.1 * plain.abs().max()


@pytest.mark.slow
def test_graph_with_the_default_discrete_sampling_equals_the_plain_model(engine):
    plain, patched = run_branches(engine, "ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False})
    assert torch.equal(plain, patched)


@pytest.mark.slow
def test_graph_with_torch_compile_model(engine):
    plain, patched = run_branches(engine, "TorchCompileModel", {"backend": "inductor"})
    # Inductor fuses and reorders float sums; over the sampling steps that moves a few values by up to ~3e-4.
    torch.testing.assert_close(patched, plain, rtol=1e-3, atol=1e-3)
