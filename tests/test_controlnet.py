"""ControlNet: file layouts, parity with diffusers' StableDiffusionControlNetPipeline, σ-window gating, chaining,
hint preparation, nodes and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from adapter_support import save_safetensors, tiny_controlnet, tiny_objects, write_controlnet
from node_context import StubContext, make_env, run_node

from latentloom.nodes.controlnet import ControlNetApply, ControlNetApplyAdvanced, ControlNetLoader, DiffControlNetLoader
from latentloom.nodes.diffusion import convert
from latentloom.nodes.diffusion.controlnet import broadcast_hint, controlnet_to_ldm, load_controlnet
from latentloom.nodes.diffusion.denoiser import Guider, ModelCall
from latentloom.nodes.diffusion.samplers import SAMPLERS
from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env):
    return StubContext(env)


def controlnet_dir(env):
    return env.model_dirs["controlnet"][0]


def hint_image(seed=0, height=64, width=64, batch=1):
    return torch.rand((batch, height, width, 3), generator=torch.Generator().manual_seed(seed))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# Loading -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ldm", "bare", "diffusers"])
def test_every_layout_loads_the_same_weights(env, layout):
    net = tiny_controlnet("sd1")
    path = write_controlnet(controlnet_dir(env) / f"cn_{layout}.safetensors", net, layout)
    loaded = load_controlnet(path)
    assert loaded.family == "sd1" and loaded.context_dim == 32
    assert same_state(net, loaded.module)


def test_sdxl_controlnet_loads_and_asks_for_size_conditioning(env):
    net = tiny_controlnet("sdxl")
    loaded = load_controlnet(write_controlnet(controlnet_dir(env) / "xl.safetensors", net))
    assert loaded.family == "sdxl" and loaded.needs_added_conditioning
    assert same_state(net, loaded.module)


def test_shuffle_file_name_turns_on_global_pooling(env):
    path = write_controlnet(controlnet_dir(env) / "style_shuffle.safetensors", tiny_controlnet("sd1"))
    assert load_controlnet(path).module.config.global_pool_conditions


def test_diff_controlnet_adds_the_base_unet(env, ctx):
    model, _ = tiny_objects("sd1")
    net = tiny_controlnet("sd1")
    full = controlnet_to_ldm(net.state_dict())
    base = convert.unet_to_ldm(model.unet.state_dict(), model.unet.config.layers_per_block)
    diff = {k: (v - base[k] if k in base else v) for k, v in full.items()}
    diff["difference"] = torch.tensor([0.0])
    save_safetensors({"control_model." + k if k != "difference" else k: v for k, v in diff.items()},
                     controlnet_dir(env) / "diff.safetensors")
    (loaded,) = DiffControlNetLoader.model_construct(model=model, control_net_name="diff.safetensors").run(ctx)
    expected = net.state_dict()
    for key, value in loaded.module.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    with pytest.raises(ValueError, match=r"ControlNetLoader \(#1\): input 'control_net_name': .*DiffControlNetLoader"):
        run_node(ControlNetLoader, ctx, control_net_name="diff.safetensors")


def test_loader_goes_through_the_memory_manager(env, ctx):
    write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1"))
    (first,) = ControlNetLoader.model_construct(control_net_name="cn.safetensors").run(ctx)
    (second,) = ControlNetLoader.model_construct(control_net_name="cn.safetensors").run(ctx)
    stats = env.models.stats()
    assert first is second and stats.loads == 1 and stats.hits == 1
    assert any("controlnet" in entry["key"] and entry["bytes"] > 0 for entry in stats.entries)


def test_wrong_files_give_clear_node_errors(env, ctx):
    model, clip = tiny_objects("sd1")
    save_safetensors({"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "lora_unet_x.lora_down.weight":
                      torch.zeros(2, 2)}, controlnet_dir(env) / "a_lora.safetensors")
    with pytest.raises(ValueError, match=r"ControlNetLoader \(#1\): input 'control_net_name': a_lora.*LoRA"):
        run_node(ControlNetLoader, ctx, control_net_name="a_lora.safetensors")
    # An SD1-shaped ControlNet on SDXL-wide conditioning: reported by the apply node, naming its input.
    write_controlnet(controlnet_dir(env) / "sd1.safetensors", tiny_controlnet("sd1"))
    (net,) = ControlNetLoader.model_construct(control_net_name="sd1.safetensors").run(ctx)
    xl_cond = [[torch.zeros(1, 77, 64), {}]]
    with pytest.raises(ValueError, match=r"ControlNetApplyAdvanced \(#1\): input 'control_net': .*another model "
                                         r"architecture"):
        run_node(ControlNetApplyAdvanced, ctx, positive=xl_cond, negative=xl_cond, control_net=net,
                 image=hint_image(), strength=1.0, start_percent=0.0, end_percent=1.0)
    with pytest.raises(ValueError, match=r"ControlNetApplyAdvanced \(#1\): input 'image': must be an IMAGE "
                                         r"\[batch, height, width, channels\] \(got a 3-D tensor\)"):
        run_node(ControlNetApplyAdvanced, ctx, positive=xl_cond, negative=xl_cond, control_net=net,
                 image=hint_image()[0], strength=1.0, start_percent=0.0, end_percent=1.0)


# Parity with diffusers -----------------------------------------------------------------------------------------

def test_residuals_and_unet_call_match_the_diffusers_pipeline(env):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from tiny_models import tiny_components

    parts = tiny_components("sd1")
    net = tiny_controlnet("sd1")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionControlNetPipeline(vae=parts.vae, text_encoder=parts.text_encoders["l"], tokenizer=None,
                                             unet=parts.unet, controlnet=net, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    captured = {"x": [], "control": [], "unet": []}
    original_scale = scheduler.scale_model_input

    def record_scale(sample, timestep):
        captured["x"].append((sample.clone(), scheduler.sigmas[scheduler.step_index or 0].clone()))
        return original_scale(sample, timestep)

    scheduler.scale_model_input = record_scale
    net.register_forward_hook(lambda m, a, kw, out: captured["control"].append((a, kw, out)), with_kwargs=True)
    parts.unet.register_forward_hook(lambda m, a, kw, out: captured["unet"].append(out[0].clone()), with_kwargs=True)
    generator = torch.Generator().manual_seed(1)
    context = torch.randn((1, 77, 32), generator=generator)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    image = hint_image(2)
    pipe(prompt_embeds=context, image=image.movedim(-1, 1), num_inference_steps=3, guidance_scale=1.0,
         controlnet_conditioning_scale=0.7, output_type="latent", latents=latents, height=64, width=64)
    assert len(captured["control"]) == 3

    path = write_controlnet(controlnet_dir(env) / "cn.safetensors", net)
    applied = load_controlnet(path).applied(image, 0.7)
    model, _ = tiny_objects("sd1")
    schedule = DiscreteSchedule(model.sampling)
    for (x, sigma), (args, _kwargs, (down_ref, mid_ref)), eps_ref in zip(captured["x"], captured["control"],
                                                                        captured["unet"], strict=False):
        sigma = sigma.reshape(1)
        x_in, t_ref = args[0], args[1]
        timestep = schedule.timestep(sigma)
        assert float(timestep) == float(t_ref)
        down, mid = applied.residuals(x_in, sigma, timestep, context, model)
        assert len(down) == len(down_ref) == 12
        for ours, theirs in zip(down + (mid,), tuple(down_ref) + (mid_ref,), strict=False):
            assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        assert float(mid.abs().max()) > 1e-3  # the ControlNet really contributes
        denoised = ModelCall(model, model.unet, schedule)(x, sigma, context, control=applied)
        assert torch.equal(denoised, x - eps_ref * sigma)


def test_two_chained_controlnets_equal_the_sum(env):
    first, second = tiny_controlnet("sd1", seed=1), tiny_controlnet("sd1", seed=2)
    a = load_controlnet(write_controlnet(controlnet_dir(env) / "a.safetensors", first))
    b = load_controlnet(write_controlnet(controlnet_dir(env) / "b.safetensors", second, "diffusers"))
    model, _ = tiny_objects("sd1")
    h1, h2 = hint_image(3), hint_image(4)
    chained = b.applied(h2, 0.5, previous=a.applied(h1, 0.3))
    g = torch.Generator().manual_seed(0)
    x_in, context = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 32), generator=g)
    sigma, timestep = torch.tensor([3.0, 3.0]), torch.tensor([600.0, 600.0])
    down, mid = chained.residuals(x_in, sigma, timestep, context, model)
    with torch.no_grad():
        d1, m1 = first(x_in, timestep, context, h1.movedim(-1, 1).expand(2, -1, -1, -1), conditioning_scale=0.3,
                       return_dict=False)
        d2, m2 = second(x_in, timestep, context, h2.movedim(-1, 1).expand(2, -1, -1, -1), conditioning_scale=0.5,
                        return_dict=False)
    for ours, r1, r2 in zip(down + (mid,), tuple(d1) + (m1,), tuple(d2) + (m2,), strict=False):
        assert torch.allclose(ours, r1 + r2, atol=1e-6)


# σ window --------------------------------------------------------------------------------------------------------

def reference_percent_to_sigma(percent: float) -> float:
    """Independent: σ at timestep (1 − p)·999 on the scaled-linear schedule, log-linear between integers."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    sigmas = np.sqrt((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas))
    t = (1 - percent) * 999
    low, frac = int(np.floor(t)), t - np.floor(t)
    return float(np.exp((1 - frac) * np.log(sigmas[low]) + frac * np.log(sigmas[min(low + 1, 999)])))


def test_sigma_window_gates_each_controlnet_on_its_own(env):
    net = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1")))
    other = load_controlnet(write_controlnet(controlnet_dir(env) / "cn2.safetensors", tiny_controlnet("sd1", 5)))
    model, _ = tiny_objects("sd1")
    start, end = 0.25, 0.6
    high, low = reference_percent_to_sigma(start), reference_percent_to_sigma(end)
    windowed = net.applied(hint_image(), 1.0, start, end)
    always = other.applied(hint_image(), 1.0)
    chained = net.applied(hint_image(), 1.0, start, end, previous=always)
    x_in, context = torch.randn((1, 4, 8, 8)), torch.randn((1, 77, 32))

    def call(control, sigma):
        s = torch.tensor([sigma])
        return control.residuals(x_in, s, DiscreteSchedule().timestep(s), context, model)

    for sigma, inside in ((high * 1.002, False), (high * 0.998, True), (low * 1.002, True), (low * 0.998, False)):
        assert (call(windowed, sigma) is not None) == inside, sigma
        alone = call(always, sigma)
        both = call(chained, sigma)
        if inside:
            own = call(windowed, sigma)
            assert torch.allclose(both[1], alone[1] + own[1], atol=1e-6)
        else:
            assert torch.equal(both[1], alone[1])


def test_sampling_calls_the_controlnet_only_inside_its_window(env):
    loaded = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1")))
    model, _ = tiny_objects("sd1")
    seen: list[float] = []
    loaded.module.register_forward_pre_hook(lambda m, args: seen.append(float(args[1][0])))
    schedule = DiscreteSchedule(model.sampling)
    sigmas = calculate_sigmas(schedule, "normal", 8)
    cond = [[torch.randn((1, 77, 32)), {}]]
    positive, negative = ControlNetApplyAdvanced.model_construct(
        positive=cond, negative=[[torch.zeros((1, 77, 32)), {}]], control_net=loaded, image=hint_image(),
        strength=0.8, start_percent=0.3, end_percent=0.7).run(None)
    assert positive[0][1]["control"] is negative[0][1]["control"]
    Guider(model, {"positive": positive, "negative": negative}, 4.0).sample(
        torch.randn((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8)), SAMPLERS["euler"], sigmas)
    high, low = reference_percent_to_sigma(0.3), reference_percent_to_sigma(0.7)
    expected = [float(schedule.timestep(s.reshape(1))) for s in sigmas[:-1] if low <= float(s) <= high]
    assert 0 < len(expected) < len(sigmas) - 1
    assert seen == expected  # one batched call (positive + negative) per step inside the window


# Hint preparation and nodes --------------------------------------------------------------------------------------

def test_hint_is_center_cropped_nearest_exact_and_broadcast(env):
    net = load_controlnet(write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1")))
    image = hint_image(7, height=40, width=100)
    applied = net.applied(image, 1.0)
    x_in = torch.zeros((2, 4, 8, 8))
    hint = applied.prepared_hint(x_in, torch.float32, None)
    cropped = image.movedim(-1, 1)[:, :, :, 30:70]   # centre 40x40 of 40x100
    expected = F.interpolate(cropped, size=(64, 64), mode="nearest-exact")
    assert hint.shape == (2, 3, 64, 64) and torch.equal(hint[0], expected[0]) and torch.equal(hint[1], expected[0])
    two = torch.arange(2.0).reshape(2, 1, 1, 1)
    assert broadcast_hint(two, 4, 2).flatten().tolist() == [0, 1, 0, 1]
    assert broadcast_hint(two, 6, 2).flatten().tolist() == [0, 1, 0, 0, 1, 0]
    assert broadcast_hint(torch.arange(3.0).reshape(3, 1, 1, 1), 4, 2).flatten().tolist() == [0, 1, 0, 1]


def test_apply_nodes_chain_share_and_pass_through(env, ctx):
    write_controlnet(controlnet_dir(env) / "cn.safetensors", tiny_controlnet("sd1"))
    (net,) = ControlNetLoader.model_construct(control_net_name="cn.safetensors").run(ctx)
    positive = [[torch.randn((1, 77, 32)), {"strength": 1.0}], [torch.randn((1, 77, 32)), {}]]
    negative = [[torch.zeros((1, 77, 32)), {}]]
    inputs = dict(control_net=net, image=hint_image(), start_percent=0.1, end_percent=0.9)
    p1, n1 = ControlNetApplyAdvanced.model_construct(positive=positive, negative=negative, strength=0.5,
                                                     **inputs).run(ctx)
    p2, n2 = ControlNetApplyAdvanced.model_construct(positive=p1, negative=n1, strength=0.7, **inputs).run(ctx)
    first, second = p1[0][1]["control"], p2[0][1]["control"]
    assert first is p1[1][1]["control"] is n1[0][1]["control"]
    assert second is n2[0][1]["control"] and second.previous is first and second.strength == 0.7
    assert "control" not in positive[0][1] and p1[0][1]["strength"] == 1.0   # inputs untouched, options kept
    assert (p1[0][1]["control_apply_to_uncond"], second.start_percent, second.end_percent) == (False, 0.1, 0.9)
    same = ControlNetApplyAdvanced.model_construct(positive=positive, negative=negative, strength=0.0,
                                                   **inputs).run(ctx)
    assert same[0] is positive and same[1] is negative
    (old,) = ControlNetApply.model_construct(conditioning=p1, control_net=net, image=hint_image(),
                                             strength=0.9).run(ctx)
    assert old[0][1]["control_apply_to_uncond"] is True and old[0][1]["control"].previous is first
    assert ControlNetApply.model_construct(conditioning=p1, control_net=net, image=hint_image(),
                                           strength=0.0).run(ctx)[0] is p1


def test_sdxl_controlnet_receives_the_size_conditioning(env):
    net = tiny_controlnet("sdxl")
    loaded = load_controlnet(write_controlnet(controlnet_dir(env) / "xl.safetensors", net))
    model, _ = tiny_objects("sdxl")
    g = torch.Generator().manual_seed(0)
    x_in, context = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 64), generator=g)
    added = {"text_embeds": torch.randn((2, 32), generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
    sigma, timestep = torch.tensor([2.0, 2.0]), torch.tensor([500.0, 500.0])
    image = hint_image(9)
    down, mid = loaded.applied(image, 0.6).residuals(x_in, sigma, timestep, context, model, added_cond_kwargs=added)
    with torch.no_grad():
        ref_down, ref_mid = net(x_in, timestep, context, image.movedim(-1, 1).expand(2, -1, -1, -1).contiguous(),
                                conditioning_scale=0.6, added_cond_kwargs=added, return_dict=False)
    for ours, theirs in zip(down + (mid,), tuple(ref_down) + (ref_mid,), strict=False):
        assert torch.equal(ours, theirs)
    sd1_model, _ = tiny_objects("sd1")
    with pytest.raises(ValueError, match="SDXL ControlNet"):
        loaded.applied(image, 0.6).residuals(x_in, sigma, timestep, context, sd1_model)
