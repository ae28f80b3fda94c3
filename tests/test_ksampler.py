"""The model wrapper and the sampling nodes: UNet wiring, CFG, conditioning weights, inpainting, SDXL added
conditioning, the ControlNet hook, and KSampler & co. end to end on a tiny random diffusers UNet."""

import io
import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from node_context import CountingManager, StubContext, make_env, run_node  # noqa: E402

from latentloom.engine.memory import ModelManager  # noqa: E402
from latentloom.nodes.diffusion.denoiser import GuidedDenoiser, Guider, ModelCall  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel, SamplingConfig  # noqa: E402
from latentloom.nodes.diffusion.samplers import sampler_for_name  # noqa: E402
from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning  # noqa: E402
from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas  # noqa: E402
from latentloom.nodes.sampling import (  # noqa: E402
    BasicGuider,
    BasicScheduler,
    CFGGuider,
    DisableNoise,
    KSampler,
    KSamplerAdvanced,
    KSamplerSelect,
    RandomNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
)

SCHEDULE = DiscreteSchedule()


class RecordingUNet(torch.nn.Module):
    """A stand-in UNet: output = fn(inputs), every call recorded."""

    def __init__(self, fn, sdxl=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.fn = fn
        self.calls = []
        self.config = SimpleNamespace(addition_embed_type="text_time" if sdxl else None,
                                      projection_class_embeddings_input_dim=8 + 6 * 4, addition_time_embed_dim=4)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **kwargs):
        self.calls.append(dict(sample=sample.clone(), timestep=timestep.clone(), context=encoder_hidden_states,
                               **kwargs))
        return (self.fn(sample, timestep, encoder_hidden_states),)


def context_mean(sample, timestep, context):
    """An eps prediction that reveals which context each batch row got."""
    return context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(sample).clone()


def cond(value, tokens=77, dim=8, **options):
    return [torch.full((1, tokens, dim), float(value)), options]


def denoiser(unet, positive, negative, cfg, shape=(1, 4, 8, 8), prediction="eps"):
    model = DiffusionModel(unet=unet, family="sd1", sampling=SamplingConfig(prediction=prediction))
    conds = {"positive": positive, "negative": negative}
    prepared = prepare_conditioning(conds, torch.Size(shape), SCHEDULE, torch.device("cpu"), unet.config, "sd1")
    return GuidedDenoiser(ModelCall(model, unet, SCHEDULE), prepared["positive"], prepared.get("negative"), cfg)


# --- the model call ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_model_call_scaling_timestep_and_prediction(prediction):
    unet = RecordingUNet(lambda sample, t, c: torch.full_like(sample, 0.25))
    x = torch.randn(2, 4, 8, 8)
    sigma = SCHEDULE.sigma(torch.tensor([600.3, 600.3]))
    model = DiffusionModel(unet=unet, family="sd1", sampling=SamplingConfig(prediction=prediction))
    out = ModelCall(model, unet, SCHEDULE)(x, sigma, torch.zeros(2, 77, 8))
    call = unet.calls[0]
    s = sigma[0]
    assert torch.allclose(call["sample"], x / torch.sqrt(s ** 2 + 1))
    assert call["timestep"].tolist() == [600.0, 600.0]  # nearest integer, never fractional
    if prediction == "eps":
        expected = x - 0.25 * s
    else:
        expected = x / (s ** 2 + 1) - 0.25 * s / torch.sqrt(s ** 2 + 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_cfg_on_denoised_with_uncond_first():
    unet = RecordingUNet(context_mean)
    guided = denoiser(unet, [cond(1.0)], [cond(3.0)], cfg=7.5)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    out = guided(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0]["sample"].shape[0] == 2
    assert unet.calls[0]["context"][:, 0, 0].tolist() == [3.0, 1.0]  # [uncond, cond]
    d_cond, d_uncond = x - 1.0 * 2.0, x - 3.0 * 2.0
    assert torch.allclose(out, d_uncond + (d_cond - d_uncond) * 7.5, atol=1e-5)


@pytest.mark.parametrize("cfg, runs_uncond", [(1.0, False), (1.0 + 1e-12, False), (0.5, True), (0.0, True)])
def test_cfg_one_shortcut(cfg, runs_uncond):
    unet = RecordingUNet(context_mean)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    out = denoiser(unet, [cond(1.0)], [cond(3.0)], cfg=cfg)(x, sigma)
    assert unet.calls[0]["sample"].shape[0] == (2 if runs_uncond else 1)
    d_cond, d_uncond = x - 2.0, x - 6.0
    expected = d_uncond + (d_cond - d_uncond) * cfg if runs_uncond else d_cond * cfg
    assert torch.allclose(out, expected, atol=1e-5)
    if cfg == 1.0:
        assert torch.equal(out, ModelCall(DiffusionModel(unet=unet, family="sd1"), unet, SCHEDULE)(
            x, sigma, torch.full((1, 77, 8), 1.0)))


def test_model_option_hooks():
    unet = RecordingUNet(context_mean)
    seen = []

    def rescale(args):  # noise-space CFG, as RescaleCFG-style hooks return it
        seen.append(sorted(args))
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    def post(args):
        return args["denoised"] * 2.0

    model = DiffusionModel(unet=unet, family="sd1", options={"sampler_cfg_function": rescale,
                                                             "sampler_post_cfg_function": [post]})
    prepared = prepare_conditioning({"positive": [cond(1.0)], "negative": [cond(3.0)]}, torch.Size((1, 4, 8, 8)),
                                    SCHEDULE, torch.device("cpu"), unet.config, "sd1")
    guided = GuidedDenoiser(ModelCall(model, unet, SCHEDULE), prepared["positive"], prepared["negative"], 7.5)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    plain = denoiser(RecordingUNet(context_mean), [cond(1.0)], [cond(3.0)], cfg=7.5)(x, sigma)
    assert torch.allclose(guided(x, sigma), plain * 2.0, atol=1e-4)
    assert "cond_denoised" in seen[0] and "uncond_denoised" in seen[0]
    # disable_cfg1_optimization keeps the negative evaluated at cfg 1.
    keep = DiffusionModel(unet=unet, family="sd1", options={"disable_cfg1_optimization": True})
    unet.calls.clear()
    GuidedDenoiser(ModelCall(keep, unet, SCHEDULE), prepared["positive"], prepared["negative"], 1.0)(x, sigma)
    assert unet.calls[0]["sample"].shape[0] == 2


def test_cfg_pp_sampler_forces_the_negative_and_sees_it_through_inpainting():
    unet = RecordingUNet(context_mean)
    model = DiffusionModel(unet=unet, family="sd1")
    guider = Guider(model, {"positive": [cond(1.0)], "negative": [cond(3.0)]}, 1.0)
    sigmas = torch.tensor([2.0, 1.0])
    x0 = torch.zeros(1, 4, 8, 8)
    out = guider.sample(x0, x0, sampler_for_name("euler_cfg_pp"), sigmas, denoise_mask=torch.ones(1, 1, 8, 8),
                        seed=0)
    assert unet.calls[0]["sample"].shape[0] == 2  # cfg 1, but CFG++ needs the unguided prediction
    # x = 0 → D = −2 (eps 1 · σ 2), D_uncond = −6: x_next = D + (x − D_u)/σ · σ_next = −2 + 3 = 1 (scaled space).
    assert torch.allclose(out, torch.full_like(out, 1.0 / 0.18215), rtol=1e-5)


def test_entries_average_by_strength_and_mask():
    unet = RecordingUNet(context_mean)
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0
    positive = [cond(1.0, strength=1.0), cond(5.0, strength=3.0), cond(9.0, mask=mask)]
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    out = denoiser(unet, positive, [cond(0.0)], cfg=1.0)(x, sigma)
    eps = out - x
    left = -(1.0 * 1 + 5.0 * 3 + 9.0 * 1) / 5
    right = -(1.0 * 1 + 5.0 * 3) / 4
    assert torch.allclose(eps[..., :4], torch.full_like(eps[..., :4], left), atol=1e-5)
    assert torch.allclose(eps[..., 4:], torch.full_like(eps[..., 4:], right), atol=1e-5)


def test_area_entry_only_touches_its_area():
    unet = RecordingUNet(context_mean)
    positive = [cond(1.0), cond(5.0, area=(12, 12, 0, 0))]  # (h, w, y, x) in latent cells
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([1.0])
    out = denoiser(unet, positive, [cond(0.0)], cfg=1.0, shape=(1, 4, 16, 16))(x, sigma)
    eps = -(out - x)
    assert torch.allclose(eps[..., 12:, :], torch.ones_like(eps[..., 12:, :]), atol=1e-5)
    assert torch.allclose(eps[..., 0, 0], torch.full_like(eps[..., 0, 0], 3.0), atol=1e-5)  # (1 + 5) / 2
    # The area's inner edges fade in over 8 cells: its last row weighs 1/8.
    assert eps[0, 0, 11, 0].item() == pytest.approx((1 + 5 / 8) / (1 + 1 / 8), rel=1e-5)
    assert any(call["sample"].shape[-1] == 12 for call in unet.calls)


def test_area_prompt_gets_a_negative_twin():
    unet = RecordingUNet(context_mean)
    prepared = prepare_conditioning({"positive": [cond(1.0), cond(5.0, area=(4, 4, 0, 0))],
                                     "negative": [cond(3.0)]}, torch.Size((1, 4, 16, 16)), SCHEDULE,
                                    torch.device("cpu"), unet.config, "sd1")
    negatives = prepared["negative"]
    assert len(negatives) == 2 and negatives[1].area == (4, 4, 0, 0)
    assert negatives[1].context[0, 0, 0].item() == 3.0


def test_start_end_percent_window():
    unet = RecordingUNet(context_mean)
    positive = [cond(1.0), cond(5.0, start_percent=0.5, end_percent=1.0)]
    guided = denoiser(unet, positive, [cond(0.0)], cfg=1.0)
    x = torch.zeros(1, 4, 8, 8)
    boundary = SCHEDULE.percent_to_sigma(0.5)
    early = guided(x, torch.tensor([boundary * 1.5]))
    late = guided(x, torch.tensor([boundary / 1.5]))
    assert torch.allclose(early, torch.full_like(early, -1.0 * boundary * 1.5), atol=1e-4)  # only the first entry
    assert torch.allclose(late, torch.full_like(late, -3.0 * boundary / 1.5), atol=1e-4)  # average of both


def test_sdxl_added_conditioning():
    unet = RecordingUNet(context_mean, sdxl=True)
    pooled = torch.arange(8.0).reshape(1, 8)
    positive = [cond(1.0, pooled_output=pooled)]
    negative = [cond(3.0, pooled_output=-pooled, width=1024, height=768, crop_w=8, crop_h=16, target_width=512,
                     target_height=256)]
    model = DiffusionModel(unet=unet, family="sdxl")
    prepared = prepare_conditioning({"positive": positive, "negative": negative}, torch.Size((1, 4, 12, 10)),
                                    SCHEDULE, torch.device("cpu"), unet.config, "sdxl")
    guided = GuidedDenoiser(ModelCall(model, unet, SCHEDULE), prepared["positive"], prepared["negative"], 5.0)
    guided(torch.zeros(1, 4, 12, 10), torch.tensor([3.0]))
    added = unet.calls[0]["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], torch.cat([-pooled, pooled]))
    # [uncond, cond]: explicit options, then defaults from the latent size (h·8, w·8, 0, 0, h·8, w·8).
    assert added["time_ids"].tolist() == [[768, 1024, 16, 8, 256, 512], [96, 80, 0, 0, 96, 80]]


class RecordingControl:
    def __init__(self, scale=1.0, active=True):
        self.calls = []
        self.scale = scale
        self.active = active

    def residuals(self, x_in, sigma, timestep, context, model, batched_number=None):
        self.calls.append(SimpleNamespace(x_in=x_in, sigma=sigma, timestep=timestep, context=context, model=model,
                                          batched_number=batched_number))
        if not self.active:
            return None
        down = tuple(torch.full((x_in.shape[0], 2, 4, 4), self.scale) for _ in range(3))
        return down, torch.full((x_in.shape[0], 2, 2, 2), self.scale * 2)


def test_controlnet_hook_receives_unet_inputs_and_feeds_residuals():
    unet = RecordingUNet(context_mean)
    control = RecordingControl(scale=0.5)
    positive = [cond(1.0, control=control, control_apply_to_uncond=True)]
    guided = denoiser(unet, positive, [cond(3.0)], cfg=4.0)
    x, sigma = torch.randn(1, 4, 8, 8), SCHEDULE.sigmas[[420]]
    guided(x, sigma)
    # Copied onto the negative, so both share one batched call.
    assert len(unet.calls) == 1 and len(control.calls) == 1
    seen = control.calls[0]
    call = unet.calls[0]
    assert torch.equal(seen.x_in, call["sample"]) and seen.timestep.tolist() == [420.0, 420.0]
    assert torch.equal(seen.context, call["context"]) and isinstance(seen.model, DiffusionModel)
    assert seen.batched_number == 2  # two conditioning chunks (negative, positive) share the batch
    assert [r[0, 0, 0, 0].item() for r in call["down_block_additional_residuals"]] == [0.5, 0.5, 0.5]
    assert call["mid_block_additional_residual"][0, 0, 0, 0].item() == 1.0


def test_controlnet_gating_and_separate_batches():
    unet = RecordingUNet(context_mean)
    control = RecordingControl(active=False)
    guided = denoiser(unet, [cond(1.0, control=control)], [cond(3.0)], cfg=4.0)
    guided(torch.randn(1, 4, 8, 8), torch.tensor([2.0]))
    # Not applied to uncond: different control objects never share a UNet call.
    assert len(unet.calls) == 2
    with_control = [c for c in unet.calls if "down_block_additional_residuals" in c]
    assert with_control == []  # residuals() returned None: the UNet runs plain


def test_inpainting_model_gets_mask_and_masked_latent_channels():
    unet = RecordingUNet(lambda sample, t, c: torch.zeros_like(sample[:, :4]))
    unet.config.in_channels = 9
    model = DiffusionModel(unet=unet, family="sd1", options={"variant": "inpaint"})
    guider = Guider(model, {"positive": [cond(1.0)], "negative": [cond(3.0)]}, 5.0)
    source = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0
    sigmas = torch.tensor([2.0, 0.0])
    guider.sample(torch.zeros(1, 4, 8, 8), source, sampler_for_name("euler"), sigmas, denoise_mask=mask, seed=0)
    sample = unet.calls[0]["sample"]
    assert sample.shape == (2, 9, 8, 8)
    assert torch.equal(sample[:, 4], (torch.arange(8) < 4).float().expand(2, 8, 8))  # the mask, rounded
    assert torch.allclose(sample[:, 5:], (source * 0.18215).expand(2, 4, 8, 8))  # masked latent, unscaled by c_in
    # No mask: all-ones mask and the blank-picture latent.
    unet.calls.clear()
    guider.sample(torch.zeros(1, 4, 8, 8), source, sampler_for_name("euler"), sigmas, seed=0)
    sample = unet.calls[0]["sample"]
    assert torch.equal(sample[:, 4], torch.ones(2, 8, 8))
    assert sample[0, 5:, 0, 0].tolist() == pytest.approx([0.8223, -0.6876, 0.6364, 0.1380])


# --- whole sampling passes on a tiny real UNet ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    with torch.no_grad():  # make the output depend strongly on the inputs
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_unet):
    return DiffusionModel(unet=tiny_unet, family="sd1")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]], \
        [[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]


def stub(manager: ModelManager | None = None) -> StubContext:
    return StubContext(env=make_env(manager=manager))


def plain_diffusers_euler(unet, noise, sigmas, positive, negative, cfg):
    """Reference loop written straight against diffusers: its own sigma table, eps-space CFG."""
    from diffusers import DDPMScheduler

    table = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    log_table = (((1 - table) / table) ** 0.5).log()
    x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    context = torch.cat([negative, positive])
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            t = (sigma.log() - log_table).abs().argmin().float()
            x_in = x / torch.sqrt(sigma ** 2 + 1)
            eps = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=context).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            x = x + eps * (sigma_next - sigma)  # Euler: d = (x − D)/σ = eps
    return x / 0.18215


def test_engine_loop_equals_plain_diffusers_loop(tiny_model, prompts):
    positive, negative = prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ctx = stub()
    out = KSampler.model_construct(model=tiny_model, seed=42, steps=6, cfg=6.5, sampler_name="euler",
                                   scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                                   denoise=1.0).run(ctx)[0]
    sigmas = calculate_sigmas(SCHEDULE, "normal", 6)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    reference = plain_diffusers_euler(tiny_model.unet, noise, sigmas, positive[0][0], negative[0][0], 6.5)
    assert reference.abs().max() > 1.0
    assert torch.allclose(out["samples"], reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # Without the nearest-integer timestep the result would differ clearly (the wiring matters).
    assert [value for value, _, _ in ctx.reports] == [1, 2, 3, 4, 5, 6]


def test_ksampler_end_to_end(tiny_model, prompts):
    from PIL import Image

    positive, negative = prompts
    manager = CountingManager()
    ctx = stub(manager)
    mask = torch.ones(1, 1, 8, 8)
    latent = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [0, 3], "noise_mask": mask}
    node = KSampler.model_construct(model=tiny_model, seed=7, steps=4, cfg=5.0, sampler_name="dpmpp_2m",
                                    scheduler="karras", positive=positive, negative=negative, latent_image=latent,
                                    denoise=1.0)
    out = node.run(ctx)[0]
    assert out["samples"].shape == (2, 4, 8, 8) and out["samples"].dtype == torch.float32
    assert out["noise_mask"] is mask and out["batch_index"] == [0, 3]
    assert manager.used == [tiny_model.unet]
    assert [(v, m) for v, m, _ in ctx.reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(preview is None for _, _, preview in ctx.reports)  # no preview method asked: no JPEGs made
    previewing = stub()
    previewing.extra_data["preview_method"] = "latent2rgb"
    again = node.run(previewing)[0]
    kind, jpeg = previewing.reports[-1][2]
    assert kind == "image/jpeg" and Image.open(io.BytesIO(jpeg)).size == (8, 8)
    assert torch.equal(out["samples"], again["samples"])
    other = KSampler.model_construct(**{**dict(node), "seed": 8}).run(stub())[0]
    assert not torch.allclose(out["samples"], other["samples"])


@pytest.mark.slow
def test_inpaint_mask_keeps_unmasked_latent(tiny_model, prompts):
    positive, negative = prompts
    source = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1.0  # left half may change (bilinear to 8x8 keeps it exactly 0/1 away from the edge)
    for sampler_name in ("euler", "ddim", "euler_ancestral"):
        out = KSampler.model_construct(model=tiny_model, seed=3, steps=5, cfg=4.0, sampler_name=sampler_name,
                                       scheduler="normal", positive=positive, negative=negative,
                                       latent_image={"samples": source, "noise_mask": mask}, denoise=0.8
                                       ).run(stub())[0]["samples"]
        assert torch.allclose(out[..., 5:], source[..., 5:], atol=1e-5), sampler_name
        assert (out[..., :3] - source[..., :3]).abs().max() > 0.1, sampler_name


@pytest.mark.slow
def test_denoise_zero_and_advanced_split(tiny_model, prompts):
    positive, negative = prompts
    source = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    unchanged = KSampler.model_construct(model=tiny_model, seed=1, steps=4, cfg=3.0, sampler_name="euler",
                                         scheduler="normal", positive=positive, negative=negative,
                                         latent_image=source, denoise=0.0).run(stub())[0]
    assert torch.equal(unchanged["samples"], source["samples"])

    common = dict(model=tiny_model, noise_seed=11, steps=8, cfg=3.0, sampler_name="euler", scheduler="karras",
                  positive=positive, negative=negative)
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    full = KSamplerAdvanced.model_construct(**common, add_noise="enable", latent_image=empty, start_at_step=0,
                                            end_at_step=10000, return_with_leftover_noise="disable").run(stub())[0]
    first = KSamplerAdvanced.model_construct(**common, add_noise="enable", latent_image=empty, start_at_step=0,
                                             end_at_step=3, return_with_leftover_noise="enable").run(stub())[0]
    second = KSamplerAdvanced.model_construct(**common, add_noise="disable", latent_image=first, start_at_step=3,
                                              end_at_step=10000, return_with_leftover_noise="disable"
                                              ).run(stub())[0]
    scale = full["samples"].abs().max().item()
    assert torch.allclose(second["samples"], full["samples"], atol=1e-5 * scale)
    assert (first["samples"] - full["samples"]).abs().max() > 5.0  # still noisy (σ ≈ 3) after 3 of 8 steps
    past_end = KSamplerAdvanced.model_construct(**common, add_noise="enable", latent_image=source,
                                                start_at_step=8, end_at_step=10000,
                                                return_with_leftover_noise="disable").run(stub())[0]
    assert torch.equal(past_end["samples"], source["samples"])


@pytest.mark.slow
def test_custom_sampling_equals_ksampler(tiny_model, prompts):
    positive, negative = prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ksampler = KSampler.model_construct(model=tiny_model, seed=5, steps=5, cfg=4.0, sampler_name="heun",
                                        scheduler="exponential", positive=positive, negative=negative,
                                        latent_image=latent, denoise=0.7).run(stub())[0]
    noise = RandomNoise.model_construct(noise_seed=5).run(None)[0]
    guider = CFGGuider.model_construct(model=tiny_model, positive=positive, negative=negative, cfg=4.0).run(None)[0]
    sampler = KSamplerSelect.model_construct(sampler_name="heun").run(None)[0]
    sigmas = BasicScheduler.model_construct(model=tiny_model, scheduler="exponential", steps=5,
                                            denoise=0.7).run(None)[0]
    ctx = stub()
    output, denoised = SamplerCustomAdvanced.model_construct(noise=noise, guider=guider, sampler=sampler,
                                                             sigmas=sigmas, latent_image=latent).run(ctx)
    assert torch.equal(output["samples"], ksampler["samples"])
    assert len(ctx.reports) == 5
    assert torch.allclose(denoised["samples"], output["samples"], atol=0.5)
    custom, custom_denoised = SamplerCustom.model_construct(
        model=tiny_model, add_noise=True, noise_seed=5, cfg=4.0, positive=positive, negative=negative,
        sampler=sampler, sigmas=sigmas, latent_image=latent).run(stub())
    assert torch.equal(custom["samples"], ksampler["samples"])
    assert torch.equal(custom_denoised["samples"], denoised["samples"])


def test_basic_guider_and_disabled_noise(tiny_model, prompts):
    positive, _ = prompts
    source = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))}
    guider = BasicGuider.model_construct(model=tiny_model, conditioning=positive).run(None)[0]
    sigmas = calculate_sigmas(SCHEDULE, "normal", 10)[6:]
    noise = DisableNoise.model_construct().run(None)[0]
    sampler = sampler_for_name("euler")
    out = SamplerCustomAdvanced.model_construct(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                                latent_image=source).run(stub())[0]
    # Same as a CFG guider at cfg 1 (which never evaluates the negative).
    cfg_one = Guider(tiny_model, {"positive": positive, "negative": [[torch.zeros(1, 77, 32), {}]]}, 1.0)
    direct = cfg_one.sample(torch.zeros(1, 4, 8, 8), source["samples"], sampler, sigmas, seed=0)
    assert torch.equal(out["samples"], direct)


def test_v_prediction_model_runs(tiny_unet, prompts):
    positive, negative = prompts
    model = DiffusionModel(unet=tiny_unet, family="sd2", sampling=SamplingConfig(prediction="v"))
    out = KSampler.model_construct(model=model, seed=1, steps=3, cfg=5.0, sampler_name="uni_pc",
                                   scheduler="simple", positive=positive, negative=negative,
                                   latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0
                                   ).run(stub())[0]
    assert torch.isfinite(out["samples"]).all()


def test_bad_inputs_name_node_and_input(tiny_model, prompts):
    positive, negative = prompts
    good = dict(model=tiny_model, seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=positive, negative=negative, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'sampler_name': is 'magic', not one of"):
        run_node(KSampler, stub(), **{**good, "sampler_name": "magic"})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'scheduler': is 'magic'"):
        run_node(KSampler, stub(), **{**good, "scheduler": "magic"})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'latent_image': must be a LATENT"):
        run_node(KSampler, stub(), **{**good, "latent_image": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'latent_image': has 3 channels, but this sd1"):
        run_node(KSampler, stub(), **{**good, "latent_image": {"samples": torch.zeros(1, 3, 8, 8)}})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'positive': must be CONDITIONING"):
        run_node(KSampler, stub(), **{**good, "positive": "a cat"})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'negative': holds 16-wide text embeddings"):
        run_node(KSampler, stub(), **{**good, "negative": [[torch.zeros(1, 77, 16), {}]]})
    with pytest.raises(ValueError, match=r"KSampler \(#1\): input 'model': must be a MODEL \(got NoneType\)"):
        run_node(KSampler, stub(), **{**good, "model": None})


def test_catalogue_shape_of_ksampler():
    specs = KSampler.input_specs()
    assert list(specs) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                           "latent_image", "denoise"]
    assert specs["seed"].max == 0xFFFFFFFFFFFFFFFF and specs["seed"].extra["control_after_generate"] is True
    assert (specs["cfg"].min, specs["cfg"].max, specs["cfg"].step, specs["cfg"].round) == (0.0, 100.0, 0.1, 0.01)
    assert (specs["steps"].min, specs["steps"].max) == (1, 10000)
    assert KSampler.input_default("steps") == 20 and KSampler.input_default("cfg") == 8.0
    assert KSampler.input_default("denoise") == 1.0
    assert list(KSamplerAdvanced.input_specs())[-3:] == ["start_at_step", "end_at_step", "return_with_leftover_noise"]
