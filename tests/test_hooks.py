"""Hooks (ComfyUI's comfy/hooks.py + comfy_extras/nodes_hooks.py): keyframe maths against the formulas, LoRA and
model-as-LoRA hooks against the same weights loaded the ordinary way, per-conditioning weights, keyframe switches
against a two-stage split, default conds, CLIP hooks, and a graph through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_support import kohya_lora_for_all, save_safetensors, tiny_objects
from node_context import StubContext, make_env, run_node

from latentloom.engine.inputs import InputError
from latentloom.nodes.conditioning import CLIPTextEncode, ConditioningSetMask, ConditioningSetTimestepRange
from latentloom.nodes.diffusion import hooks as hook_api
from latentloom.nodes.diffusion.denoiser import Guider
from latentloom.nodes.diffusion.samplers import sampler_for_name
from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for
from latentloom.nodes.hooks import (
    CombineHooks4,
    ConditioningSetDefaultCombine,
    ConditioningSetProperties,
    ConditioningSetPropertiesAndCombine,
    ConditioningTimestepsRange,
    CreateHookKeyframe,
    CreateHookKeyframesFromFloats,
    CreateHookKeyframesInterpolated,
    CreateHookLora,
    CreateHookLoraModelOnly,
    CreateHookModelAsLoraModelOnly,
    PairConditioningSetProperties,
    SetClipHooks,
    SetHookKeyframes,
)
from latentloom.nodes.lora import LoraLoader, LoraLoaderModelOnly

LATENT = (1, 4, 16, 16)
EULER = sampler_for_name("euler")


# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def objects():
    return tiny_objects("sd1")


@pytest.fixture(scope="module")
def root(tmp_path_factory, objects):
    root = tmp_path_factory.mktemp("hooks")
    model, clip = objects
    save_safetensors(kohya_lora_for_all(model, clip, seed=1), root / "models" / "loras" / "a.safetensors")
    save_safetensors(kohya_lora_for_all(model, clip, seed=2), root / "models" / "loras" / "b.safetensors")
    return root


@pytest.fixture
def ctx(root):
    return StubContext(make_env(models_dir=root / "models"))


def conds(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn((1, 77, 32), generator=g), {}]]


def denoised(model, positive, negative=None, cfg=1.0, latent=None, sigma=4.0):
    """One Euler step from σ to 0 returns the denoiser's estimate D(x, σ) (latent scale undone)."""
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(7))
    latent = torch.zeros(LATENT) if latent is None else latent
    guider = Guider(model, {"positive": positive, "negative": negative}, cfg)
    return guider.sample(noise, latent, EULER, torch.tensor([sigma, 0.0]))


def sample(model, positive, negative, sigmas, noise=None, latent=None, cfg=4.0):
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(3)) if noise is None else noise
    latent = torch.zeros(LATENT) if latent is None else latent
    return Guider(model, {"positive": positive, "negative": negative}, cfg).sample(noise, latent, EULER, sigmas)


# Keyframe maths -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, shape", [
    ("linear", lambda t: t), ("ease_in", lambda t: t * t), ("ease_out", lambda t: 1 - (1 - t) ** 2),
    ("ease_in_out", lambda t: (1 - math.cos(math.pi * t)) / 2)])
def test_interpolation_methods_follow_their_formulas(method, shape):
    values = hook_api.interpolated(0.5, 2.0, 7, method)
    expected = [0.5 + 1.5 * shape(i / 6) for i in range(7)]
    assert values == pytest.approx(expected, abs=1e-6)


def test_interpolated_keyframes_node_spreads_percents_and_guarantees_the_first(ctx):
    (kf,) = run_node(CreateHookKeyframesInterpolated, ctx, strength_start=0.0, strength_end=1.0,
                     interpolation="ease_in", start_percent=0.2, end_percent=0.6, keyframes_count=5,
                     print_keyframes=False)
    assert [k.start_percent for k in kf.keyframes] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert [k.strength for k in kf.keyframes] == pytest.approx([(i / 4) ** 2 for i in range(5)], abs=1e-6)
    assert [k.guarantee_steps for k in kf.keyframes] == [1, 0, 0, 0, 0]


def test_keyframes_from_floats(ctx):
    (kf,) = run_node(CreateHookKeyframesFromFloats, ctx, floats_strength=[0.2, 0.5, 0.9], start_percent=0.1,
                     end_percent=0.7, print_keyframes=True)
    assert [(k.strength, k.guarantee_steps) for k in kf.keyframes] == [(0.2, 1), (0.5, 0), (0.9, 0)]
    assert [k.start_percent for k in kf.keyframes] == pytest.approx([0.1, 0.4, 0.7])
    # A single float is one keyframe at start_percent; added to earlier keyframes in percent order.
    (more,) = run_node(CreateHookKeyframesFromFloats, ctx, floats_strength=0.3, start_percent=0.25,
                       end_percent=1.0, print_keyframes=False, prev_hook_kf=kf)
    assert [k.strength for k in more.keyframes] == [0.2, 0.3, 0.5, 0.9]
    with pytest.raises(InputError, match="floats_strength"):
        run_node(CreateHookKeyframesFromFloats, ctx, floats_strength="1,2", start_percent=0.0, end_percent=1.0,
                 print_keyframes=False)


def _strengths(keyframes, sigmas):
    # σ(p) = 10·(1 − p): keyframes at 0.25 and 0.35 start at σ 7.5 and 6.5.
    cursor = hook_api.KeyframeCursor(keyframes, lambda p: 1e9 if p <= 0 else 10 * (1 - p), max(sigmas))
    found = []
    for sigma in sigmas:
        cursor.advance(sigma)
        cursor.advance(sigma)  # a second model call in the same step changes nothing
        found.append(cursor.strength)
    return found


def test_keyframe_schedule_follows_start_sigmas_and_guarantee_steps():
    sigmas = [10.0 - i for i in range(10)]
    held = hook_api.HookKeyframes().with_keyframe(hook_api.HookKeyframe(1.0, 0.0)) \
        .with_keyframe(hook_api.HookKeyframe(0.5, 0.25, guarantee_steps=3)) \
        .with_keyframe(hook_api.HookKeyframe(0.0, 0.35))
    # Without guarantees, each step uses the last keyframe whose start σ is ≥ the step's σ.
    free = hook_api.HookKeyframes(tuple(hook_api.HookKeyframe(k.strength, k.start_percent, 0)
                                        for k in held.keyframes))
    starts = [1e9, 7.5, 6.5]
    formula = [[k.strength for k, s in zip(free.keyframes, starts, strict=True) if s >= sigma][-1]
               for sigma in sigmas]
    assert _strengths(free, sigmas) == formula == [1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0]
    # The 0.5 keyframe holds for its 3 guaranteed steps although the next one starts a step later.
    assert _strengths(held, sigmas) == [1, 1, 1, 0.5, 0.5, 0.5, 0, 0, 0, 0]
    # No keyframes: multiplier 1; a first keyframe that starts late is current from the first step (ComfyUI).
    assert _strengths(hook_api.HookKeyframes(), sigmas[:2]) == [1.0, 1.0]
    late = hook_api.HookKeyframes((hook_api.HookKeyframe(0.3, 0.5, 0),))
    assert _strengths(late, sigmas[:2]) == [0.3, 0.3]


# Hooks in the sampler -------------------------------------------------------------------------------------------

def _pair(ctx, positive, negative, hooks):
    return run_node(PairConditioningSetProperties, ctx, positive_NEW=positive, negative_NEW=negative, strength=1.0,
                    set_cond_area="default", hooks=hooks)


def test_lora_hook_on_all_conds_equals_the_lora_loaded_into_the_model(ctx, objects):
    model, _ = objects
    (hooks,) = run_node(CreateHookLoraModelOnly, ctx, lora_name="a.safetensors", strength_model=0.6)
    positive, negative = _pair(ctx, conds(1), conds(2), hooks)
    assert positive[0][1]["hooks"] is hooks and negative[0][1]["hooks"] is hooks
    (loaded,) = run_node(LoraLoaderModelOnly, ctx, model=model, lora_name="a.safetensors", strength_model=0.6)
    sigmas = calculate_sigmas(schedule_for(model.sampling), "normal", 3)
    hooked = sample(model, positive, negative, sigmas)
    reference = sample(loaded, conds(1), conds(2), sigmas)
    plain = sample(model, conds(1), conds(2), sigmas)
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-6)
    assert (hooked - plain).abs().max() > 1e-3
    # The UNet carries its own weights again after the run.
    assert torch.equal(sample(model, conds(1), conds(2), sigmas), plain)


def test_each_conditioning_gets_its_own_hook_weights(ctx, objects):
    model, _ = objects
    (hooks_a,) = run_node(CreateHookLoraModelOnly, ctx, lora_name="a.safetensors", strength_model=1.0)
    (hooks_b,) = run_node(CreateHookLoraModelOnly, ctx, lora_name="b.safetensors", strength_model=0.7)
    (positive,) = run_node(ConditioningSetProperties, ctx, cond_NEW=conds(1), strength=1.0,
                           set_cond_area="default", hooks=hooks_a)
    (negative,) = run_node(ConditioningSetProperties, ctx, cond_NEW=conds(2), strength=1.0,
                           set_cond_area="default", hooks=hooks_b)
    (model_a,) = run_node(LoraLoaderModelOnly, ctx, model=model, lora_name="a.safetensors", strength_model=1.0)
    (model_b,) = run_node(LoraLoaderModelOnly, ctx, model=model, lora_name="b.safetensors", strength_model=0.7)
    cond_a = denoised(model_a, conds(1))
    uncond_b = denoised(model_b, conds(2))
    cfg = 3.0
    torch.testing.assert_close(denoised(model, positive, negative, cfg), uncond_b + cfg * (cond_a - uncond_b),
                               rtol=1e-5, atol=1e-5)
    # Hooks on the positive only: the negative sees the model's own weights.
    uncond_plain = denoised(model, conds(2))
    torch.testing.assert_close(denoised(model, positive, conds(2), cfg),
                               uncond_plain + cfg * (cond_a - uncond_plain), rtol=1e-5, atol=1e-5)


def test_a_keyframe_switch_equals_a_two_stage_split(ctx, objects):
    model, _ = objects
    (hooks,) = run_node(CreateHookLoraModelOnly, ctx, lora_name="a.safetensors", strength_model=1.0)
    (kf,) = run_node(CreateHookKeyframe, ctx, strength_mult=0.8, start_percent=0.0)
    (kf,) = run_node(CreateHookKeyframe, ctx, strength_mult=0.0, start_percent=0.5, prev_hook_kf=kf)
    (scheduled,) = run_node(SetHookKeyframes, ctx, hooks=hooks, hook_kf=kf)
    positive, negative = _pair(ctx, conds(1), conds(2), scheduled)
    schedule = schedule_for(model.sampling)
    sigmas = calculate_sigmas(schedule, "normal", 6)
    switch = next(i for i, s in enumerate(sigmas.tolist()) if s <= schedule.percent_to_sigma(0.5))
    assert 0 < switch < 6
    (lora_model,) = run_node(LoraLoaderModelOnly, ctx, model=model, lora_name="a.safetensors", strength_model=0.8)
    first = sample(lora_model, conds(1), conds(2), sigmas[:switch + 1])
    expected = sample(model, conds(1), conds(2), sigmas[switch:], noise=torch.zeros(LATENT), latent=first)
    torch.testing.assert_close(sample(model, positive, negative, sigmas), expected, rtol=1e-4, atol=1e-4)


def test_model_as_lora_hook_turns_the_model_into_the_other_checkpoint(tmp_path, objects):
    from tiny_models import write_tiny_checkpoint

    from latentloom.nodes.loaders import CheckpointLoaderSimple

    write_tiny_checkpoint(tmp_path / "models" / "checkpoints" / "a.safetensors", family="sd1", seed=0)
    write_tiny_checkpoint(tmp_path / "models" / "checkpoints" / "b.safetensors", family="sd1", seed=5)
    ctx = StubContext(make_env(models_dir=tmp_path / "models"))
    model_a = run_node(CheckpointLoaderSimple, ctx, ckpt_name="a.safetensors")[0]
    model_b = run_node(CheckpointLoaderSimple, ctx, ckpt_name="b.safetensors")[0]
    (hooks,) = run_node(CreateHookModelAsLoraModelOnly, ctx, ckpt_name="b.safetensors", strength_model=1.0)
    positive, negative = _pair(ctx, conds(1), conds(2), hooks)
    sigmas = torch.tensor([6.0, 2.0, 0.0])
    hooked = sample(model_a, positive, negative, sigmas)
    # W_a + (W_b − W_a) is W_b up to float32 rounding (~1e-8), which three steps at cfg 4 amplify to ~1e-4.
    torch.testing.assert_close(hooked, sample(model_b, conds(1), conds(2), sigmas), rtol=0, atol=1e-3)
    assert (hooked - sample(model_a, conds(1), conds(2), sigmas)).abs().max() > 0.1


def test_default_conds_fill_what_the_masked_conds_leave(ctx, objects):
    model, _ = objects
    mask = torch.zeros((1, 16, 16))
    mask[:, :, :8] = 1.0
    (masked,) = run_node(ConditioningSetProperties, ctx, cond_NEW=conds(1), strength=1.0, set_cond_area="default",
                         mask=mask)
    (combined,) = run_node(ConditioningSetDefaultCombine, ctx, cond=masked, cond_DEFAULT=conds(3))
    assert combined[1][1]["default"] is True and "default" not in combined[0][1]
    left, right = denoised(model, conds(1)), denoised(model, conds(3))
    both = denoised(model, combined)
    # (one batched UNet call against two single ones: float32 noise, scaled up by the latent format)
    torch.testing.assert_close(both[..., :8], left[..., :8], rtol=0, atol=1e-4)
    torch.testing.assert_close(both[..., 8:], right[..., 8:], rtol=0, atol=1e-4)
    assert (left - right)[..., 8:].abs().max() > 0.1
    # A cond covering everything leaves no room: the default cond is not used.
    (covered,) = run_node(ConditioningSetDefaultCombine, ctx, cond=conds(1), cond_DEFAULT=conds(3))
    torch.testing.assert_close(denoised(model, covered), left, rtol=0, atol=1e-4)


# Conditioning properties ---------------------------------------------------------------------------------------

def test_set_properties_writes_what_set_mask_and_set_timestep_range_write(ctx):
    mask = torch.rand((16, 16))
    (timesteps, before, after) = run_node(ConditioningTimestepsRange, ctx, start_percent=0.2, end_percent=0.7)
    assert (before, after) == ((0.0, 0.2), (0.7, 1.0))
    (props,) = run_node(ConditioningSetProperties, ctx, cond_NEW=conds(1), strength=0.4, set_cond_area="mask bounds",
                        mask=mask, timesteps=timesteps)
    (masked,) = run_node(ConditioningSetMask, ctx, conditioning=conds(1), mask=mask, strength=0.4,
                         set_cond_area="mask bounds")
    (expected,) = run_node(ConditioningSetTimestepRange, ctx, conditioning=masked, start=0.2, end=0.7)
    assert props[0][1].keys() == expected[0][1].keys()
    for key, value in expected[0][1].items():
        assert torch.equal(props[0][1][key], value) if torch.is_tensor(value) else props[0][1][key] == value
    (appended,) = run_node(ConditioningSetPropertiesAndCombine, ctx, cond=conds(5), cond_NEW=conds(1), strength=0.4,
                           set_cond_area="mask bounds", mask=mask, timesteps=timesteps)
    assert len(appended) == 2 and appended[0][1] == {} and appended[1][1]["start_percent"] == 0.2
    with pytest.raises(InputError, match="timesteps"):
        run_node(ConditioningSetProperties, ctx, cond_NEW=conds(1), strength=1.0, set_cond_area="default",
                 timesteps="later")


def test_hooks_add_to_those_a_cond_has_and_combine_without_duplicates(ctx):
    (a,) = run_node(CreateHookLora, ctx, lora_name="a.safetensors", strength_model=1.0, strength_clip=1.0)
    (b,) = run_node(CreateHookLora, ctx, lora_name="b.safetensors", strength_model=1.0, strength_clip=1.0)
    (first,) = run_node(ConditioningSetProperties, ctx, cond_NEW=conds(1), strength=1.0, set_cond_area="default",
                        hooks=a)
    (second,) = run_node(ConditioningSetProperties, ctx, cond_NEW=first, strength=1.0, set_cond_area="default",
                         hooks=b)
    assert [h.ref for h in second[0][1]["hooks"].hooks] == [a.hooks[0].ref, b.hooks[0].ref]
    (combined,) = run_node(CombineHooks4, ctx, hooks_A=a, hooks_B=None, hooks_C=b, hooks_D=a)
    assert [h.ref for h in combined.hooks] == [a.hooks[0].ref, b.hooks[0].ref]
    assert run_node(CombineHooks4, ctx)[0] is None
    # Strength 0 for both: the previous hooks unchanged.
    assert run_node(CreateHookLora, ctx, lora_name="b.safetensors", strength_model=0.0, strength_clip=0.0,
                    prev_hooks=a)[0] is a


# CLIP hooks ----------------------------------------------------------------------------------------------------

def test_set_clip_hooks_encodes_with_the_clip_lora_and_marks_the_conds(ctx, objects):
    model, clip = objects
    (hooks,) = run_node(CreateHookLora, ctx, lora_name="a.safetensors", strength_model=1.0, strength_clip=0.5)
    (hooked_clip,) = run_node(SetClipHooks, ctx, clip=clip, apply_to_conds=True, schedule_clip=False, hooks=hooks)
    (_, lora_clip) = run_node(LoraLoader, ctx, model=model, clip=clip, lora_name="a.safetensors",
                              strength_model=0.0, strength_clip=0.5)
    (encoded,) = run_node(CLIPTextEncode, ctx, clip=hooked_clip, text="a red square")
    (expected,) = run_node(CLIPTextEncode, ctx, clip=lora_clip, text="a red square")
    (plain,) = run_node(CLIPTextEncode, ctx, clip=clip, text="a red square")
    torch.testing.assert_close(encoded[0][0], expected[0][0], rtol=0, atol=1e-6)
    assert (encoded[0][0] - plain[0][0]).abs().max() > 1e-4
    assert encoded[0][1]["hooks"] is hooks and "hooks" not in plain[0][1]
    (unmarked,) = run_node(SetClipHooks, ctx, clip=clip, apply_to_conds=False, schedule_clip=False, hooks=hooks)
    assert "hooks" not in run_node(CLIPTextEncode, ctx, clip=unmarked, text="a red square")[0][0][1]
    assert run_node(SetClipHooks, ctx, clip=clip, apply_to_conds=True, schedule_clip=False)[0] is clip


# Through the engine --------------------------------------------------------------------------------------------

def test_hook_graph_through_the_engine_matches_the_lora_loader_graph(tmp_path_factory, objects):
    from branch_graphs import probe_engine, probed_latents

    engine = probe_engine(tmp_path_factory, "hooks_graph")
    model, clip = objects
    save_safetensors(kohya_lora_for_all(model, clip, seed=1),
                     engine.env.model_dirs["loras"][0] / "a.safetensors")
    sampler = {"seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "latent_image": ["latent", 0]}
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red square"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "hook": {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": "a.safetensors",
                                                                     "strength_model": 1.0}},
        "kf": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.5, "start_percent": 0.0}},
        "scheduled": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["hook", 0], "hook_kf": ["kf", 0]}},
        "props": {"class_type": "PairConditioningSetProperties", "inputs": {
            "positive_NEW": ["pos", 0], "negative_NEW": ["neg", 0], "strength": 1.0, "set_cond_area": "default",
            "hooks": ["scheduled", 0]}},
        "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": "a.safetensors",
                                                                 "strength_model": 0.5}},
        "hooked": {"class_type": "KSampler", "inputs": {**sampler, "model": ["ckpt", 0], "positive": ["props", 0],
                                                        "negative": ["props", 1]}},
        "loaded": {"class_type": "KSampler", "inputs": {**sampler, "model": ["lora", 0], "positive": ["pos", 0],
                                                        "negative": ["neg", 0]}},
        "plain": {"class_type": "KSampler", "inputs": {**sampler, "model": ["ckpt", 0], "positive": ["pos", 0],
                                                       "negative": ["neg", 0]}},
    }
    for name in ("hooked", "loaded", "plain"):
        graph[f"probe_{name}"] = {"class_type": "LatentProbe", "inputs": {"samples": [name, 0], "label": name}}
    found = probed_latents(engine.run(graph))
    torch.testing.assert_close(found["hooked"], found["loaded"], rtol=0, atol=1e-5)
    assert (found["hooked"] - found["plain"]).abs().max() > 1e-3


def test_clip_schedule_ranges_follow_keyframe_changes():
    def hook(*keyframes):
        group = hook_api.HookKeyframes()
        for strength, start in keyframes:
            group = group.with_keyframe(hook_api.HookKeyframe(strength, start))
        return hook_api.WeightHook(hook_api.HookRef(), keyframes=group)

    a = hook((1.0, 0.0), (0.5, 0.4), (0.5, 0.6), (0.0, 0.8))  # 0.6 repeats 0.5: no new range
    b = hook()
    c = hook((2.0, 0.3))  # no keyframe before 0.3: multiplier 1 there
    schedule = hook_api.clip_schedule(hook_api.HookGroup((a, b, c)))
    assert [(span, [m[h.ref] for h in (a, b, c)]) for span, m in schedule] == [
        ((0.0, 0.3), [1.0, 1.0, 1.0]), ((0.3, 0.4), [1.0, 1.0, 2.0]), ((0.4, 0.8), [0.5, 1.0, 2.0]),
        ((0.8, 1.0), [0.0, 1.0, 2.0])]


def test_scheduled_clip_hooks_encode_once_per_range_and_gate_the_sampler(ctx, objects):
    from latentloom.nodes.diffusion.sampling_conds import prepare_conditioning

    model, clip = objects
    (hooks,) = run_node(CreateHookLora, ctx, lora_name="a.safetensors", strength_model=0.0, strength_clip=0.5)
    (kf,) = run_node(CreateHookKeyframe, ctx, strength_mult=1.0, start_percent=0.0)
    (kf,) = run_node(CreateHookKeyframe, ctx, strength_mult=0.0, start_percent=0.5, prev_hook_kf=kf)
    (scheduled,) = run_node(SetHookKeyframes, ctx, hooks=hooks, hook_kf=kf)
    (hooked_clip,) = run_node(SetClipHooks, ctx, clip=clip, apply_to_conds=True, schedule_clip=True, hooks=scheduled)
    (encoded,) = run_node(CLIPTextEncode, ctx, clip=hooked_clip, text="a red square")
    (_, lora_clip) = run_node(LoraLoader, ctx, model=model, clip=clip, lora_name="a.safetensors",
                              strength_model=0.0, strength_clip=0.5)
    (with_lora,) = run_node(CLIPTextEncode, ctx, clip=lora_clip, text="a red square")
    (plain,) = run_node(CLIPTextEncode, ctx, clip=clip, text="a red square")
    assert [(c[1]["clip_start_percent"], c[1]["clip_end_percent"]) for c in encoded] == [(0.0, 0.5), (0.5, 1.0)]
    torch.testing.assert_close(encoded[0][0], with_lora[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded[1][0], plain[0][0], rtol=0, atol=1e-6)
    assert all(c[1]["hooks"] is scheduled for c in encoded)
    # Each encoding is used within its range, intersected with the cond's own timestep range.
    (limited,) = run_node(ConditioningSetTimestepRange, ctx, conditioning=encoded, start=0.2, end=0.7)
    schedule = schedule_for(model.sampling)
    entries = prepare_conditioning({"positive": limited}, torch.Size(LATENT), schedule, torch.device("cpu"),
                                   model.unet.config, model.family)["positive"]
    assert [(e.sigma_start, e.sigma_end) for e in entries] == [
        (schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.5)),
        (schedule.percent_to_sigma(0.5), schedule.percent_to_sigma(0.7))]
