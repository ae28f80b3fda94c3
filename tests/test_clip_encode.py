"""Prompt -> conditioning with tiny random CLIP encoders: layers, weights, chunks, SDXL, embeddings, patches."""

from __future__ import annotations

import contextlib
import copy
import socket

import pytest
import torch
from tiny_clip import LAYERS, PROJECTION, WIDTH, text_encoder, tiny_clip

from latentloom.nodes.diffusion import tokenizer as tk
from latentloom.nodes.diffusion.clip import ClipModel, run_text_encoder
from latentloom.nodes.diffusion.tokenizer import EOS_ID, bpe_ids, chunk_ids, tokenize_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd1():
    return tiny_clip("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_clip("sdxl", seed=3)


def ids_tensor(prompt: str, pad: int = EOS_ID) -> torch.Tensor:
    ids = [49406, *bpe_ids(prompt), 49407]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


def reference(module: torch.nn.Module, ids: torch.Tensor):
    """transformers' own forward pass: the ground truth for our layer-by-layer run."""
    with torch.no_grad():
        return module(ids, output_hidden_states=True)


# ---------------------------------------------------------------------------------------------------------------


def test_layer_by_layer_run_matches_transformers_forward(sd1):
    module = sd1.encoders["l"]
    out = reference(module, ids_tensor("a photo of a cat"))
    chunks = tokenize_prompt("a photo of a cat")
    with torch.no_grad():
        for layer in (-1, -2, -3):
            selected, last = run_text_encoder(module, chunks, layer, norm_hidden=False)
            torch.testing.assert_close(selected, out.hidden_states[layer], rtol=0, atol=1e-6)
        torch.testing.assert_close(last, out.last_hidden_state, rtol=0, atol=1e-6)


def test_sd1_default_is_last_layer_and_pooled_at_first_eos(sd1):
    module = sd1.encoders["l"]
    out = reference(module, ids_tensor("a photo of a cat"))
    cond, pooled = sd1.encode("a photo of a cat")
    assert cond.shape == (1, 77, WIDTH["l"]) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, out.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-6)   # unprojected for SD1
    torch.testing.assert_close(pooled[0], out.last_hidden_state[0, 6], rtol=0, atol=1e-6)


def test_weights_move_tokens_away_from_the_empty_prompt(sd1):
    module = sd1.encoders["l"]
    z = reference(module, ids_tensor("a cat dog")).last_hidden_state
    z_empty = reference(module, ids_tensor("")).last_hidden_state
    cond, _ = sd1.encode("a (cat:1.5) (dog:0.25)")
    expected = z.clone()
    expected[0, 2] = (z[0, 2] - z_empty[0, 2]) * 1.5 + z_empty[0, 2]
    expected[0, 3] = (z[0, 3] - z_empty[0, 3]) * 0.25 + z_empty[0, 3]
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(cond[0, 2], z[0, 2], atol=1e-4)
    # Unweighted positions (BOS, "a", EOS, padding) are exactly the plain encoding.
    for position in (0, 1, 4, 40):
        torch.testing.assert_close(cond[0, position], z[0, position], rtol=0, atol=1e-6)


def test_weight_zero_gives_the_empty_prompt_state(sd1):
    z_empty = reference(sd1.encoders["l"], ids_tensor("")).last_hidden_state
    cond, _ = sd1.encode("a (cat:0)")
    torch.testing.assert_close(cond[0, 2], z_empty[0, 2], rtol=0, atol=1e-5)


def test_long_prompt_chunks_are_encoded_separately_and_concatenated(sd1):
    prompt = "cat, " * 100
    cond, pooled = sd1.encode(prompt)
    assert cond.shape == (1, 3 * 77, WIDTH["l"])
    chunks = tokenize_prompt(prompt)
    for index, chunk in enumerate(chunks):
        ids = torch.tensor([chunk_ids(chunk)])
        out = reference(sd1.encoders["l"], ids)
        torch.testing.assert_close(cond[:, 77 * index:77 * (index + 1)], out.last_hidden_state, rtol=0, atol=1e-6)
        if index == 0:
            torch.testing.assert_close(pooled, out.last_hidden_state[:, 76], rtol=0, atol=1e-6)


def test_clip_skip_selects_hidden_layer_with_final_norm_for_sd1(sd1):
    module = sd1.encoders["l"]
    out = reference(module, ids_tensor("a photo of a cat"))
    norm = module.final_layer_norm
    for layer in range(-1, -LAYERS - 1, -1):
        cond, pooled = sd1.clone_with_layer(layer).encode("a photo of a cat")
        with torch.no_grad():
            torch.testing.assert_close(cond, norm(out.hidden_states[layer]), rtol=0, atol=1e-6)
        # The pooled output always comes from the last layer.
        torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-6)
    penultimate, _ = sd1.clone_with_layer(-2).encode("a photo of a cat")
    assert not torch.allclose(penultimate, out.last_hidden_state, atol=1e-3)
    # Beyond the depth: the last layer (ComfyUI's fallback for CLIPSetLastLayer values past the model's layers).
    torch.testing.assert_close(sd1.clone_with_layer(-LAYERS - 1).encode("a photo")[0],
                               sd1.encode("a photo")[0], rtol=0, atol=0)


def test_clone_with_layer_shares_weights_and_leaves_original(sd1):
    skipped = sd1.clone_with_layer(-2)
    assert skipped.encoders is sd1.encoders
    assert sd1.layer_idx is None and skipped.layer_idx == -2
    assert sd1.cache_nbytes() == 0 and skipped.cache_nbytes() == 0


def test_sd2_defaults_to_penultimate_with_norm_and_projected_pooled():
    clip = tiny_clip("sd2", seed=5)
    module = clip.encoders["h"]
    ids = ids_tensor("a photo of a cat", pad=0)
    out = reference(module, ids)
    [chunk] = clip.tokenize("a photo of a cat")["h"]
    assert chunk_ids(chunk) == ids[0].tolist()                  # SD2 pads with "!" (id 0)
    cond, pooled = clip.encode("a photo of a cat")
    with torch.no_grad():
        torch.testing.assert_close(cond, module.text_model.final_layer_norm(out.hidden_states[-2]), rtol=0,
                                   atol=1e-6)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=1e-6)
    assert pooled.shape == (1, PROJECTION["h"])


def test_sdxl_concatenates_l_and_g_penultimate_without_norm(sdxl):
    cond, pooled = sdxl.encode("a photo of a cat")
    assert cond.shape == (1, 77, WIDTH["l"] + WIDTH["g"])
    assert pooled.shape == (1, PROJECTION["g"])
    out_l = reference(sdxl.encoders["l"], ids_tensor("a photo of a cat", pad=EOS_ID))
    out_g = reference(sdxl.encoders["g"], ids_tensor("a photo of a cat", pad=0))
    torch.testing.assert_close(cond[..., :WIDTH["l"]], out_l.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[..., WIDTH["l"]:], out_g.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, out_g.text_embeds, rtol=0, atol=1e-6)


def test_sdxl_clip_skip_applies_to_both_encoders_without_norm(sdxl):
    cond, _ = sdxl.clone_with_layer(-1).encode("a cat")
    out_l = reference(sdxl.encoders["l"], ids_tensor("a cat", pad=EOS_ID))
    out_g = reference(sdxl.encoders["g"], ids_tensor("a cat", pad=0))
    torch.testing.assert_close(cond[..., :WIDTH["l"]], out_l.hidden_states[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[..., WIDTH["l"]:], out_g.hidden_states[-1], rtol=0, atol=1e-6)


def test_refiner_uses_g_only():
    clip = tiny_clip("sdxl_refiner", seed=3)
    cond, pooled = clip.encode("a cat")
    out_g = reference(clip.encoders["g"], ids_tensor("a cat", pad=0))
    torch.testing.assert_close(cond, out_g.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, out_g.text_embeds, rtol=0, atol=1e-6)


def test_embedding_vectors_are_injected_as_tokens(sd1):
    # An embedding made of the token vectors of "cat" must encode exactly like the word itself.
    table = sd1.encoders["l"].embeddings.token_embedding.weight.detach()
    cat_vectors = table[bpe_ids("cat")].clone()
    resolver = {"kitty": cat_vectors}.get
    with_embedding, pooled_e = sd1.encode("a photo of embedding:kitty", resolve_embedding=resolver)
    plain, pooled_p = sd1.encode("a photo of cat")
    torch.testing.assert_close(with_embedding, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled_e, pooled_p, rtol=0, atol=1e-6)
    other, _ = sd1.encode("a photo of embedding:kitty", resolve_embedding={"kitty": cat_vectors * 3}.get)
    assert not torch.allclose(other, plain, atol=1e-4)


def test_sdxl_embedding_file_feeds_each_encoder_its_own_vectors(sdxl):
    l_vectors = sdxl.encoders["l"].embeddings.token_embedding.weight.detach()[bpe_ids("dog")]
    g_vectors = sdxl.encoders["g"].text_model.embeddings.token_embedding.weight.detach()[bpe_ids("dog")]
    resolver = {"pet": {"clip_l": l_vectors, "clip_g": g_vectors}}.get
    torch.testing.assert_close(sdxl.encode("a embedding:pet", resolve_embedding=resolver)[0],
                               sdxl.encode("a dog")[0], rtol=0, atol=1e-6)


class RecordingManager:
    def __init__(self):
        self.used: list[torch.nn.Module] = []

    @contextlib.contextmanager
    def use(self, module):
        self.used.append(module)
        yield module


class ScaleFinalNorm:
    """A stand-in weight patch (LoRA-like): scales one parameter, restores it exactly."""

    def __init__(self, name: str, factor: float):
        self.name, self.factor = name, factor

    def apply(self, modules):
        parameter = dict(modules.named_parameters())[self.name]
        saved = parameter.detach().clone()
        with torch.no_grad():
            parameter.mul_(self.factor)

        def restore():
            with torch.no_grad():
                parameter.copy_(saved)

        return restore


def test_encoding_goes_through_the_memory_manager_and_patches(sd1):
    manager = RecordingManager()
    plain, _ = sd1.encode("a cat", manager=manager)
    assert manager.used == [sd1.encoders]
    patched_clip = sd1.with_patches(ScaleFinalNorm("l.final_layer_norm.weight", 2.0))
    assert patched_clip.encoders is sd1.encoders and sd1.patches == ()
    patched, _ = patched_clip.encode("a cat")
    module = sd1.encoders["l"]
    torch.testing.assert_close(patched - module.final_layer_norm.bias.detach(),
                               2 * (plain - module.final_layer_norm.bias.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sd1.encode("a cat")[0], plain, rtol=0, atol=0)   # restored after the block


def test_half_precision_weights_are_computed_in_float32(sd1):
    # ComfyUI keeps text encoders in half precision on GPUs but computes in float32: the result must equal a
    # float32 run of the rounded weights, not a bfloat16 run.
    half = ClipModel({"l": copy.deepcopy(sd1.encoders["l"]).to(torch.bfloat16)}, "sd1")
    rounded = ClipModel({"l": copy.deepcopy(half.encoders["l"]).float()}, "sd1")
    cond, pooled = half.encode("a (photo:1.2) of a cat")
    assert cond.dtype == torch.float32 and half.encoders["l"].final_layer_norm.weight.dtype == torch.bfloat16
    expected, expected_pooled = rounded.encode("a (photo:1.2) of a cat")
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    with torch.no_grad():
        ids = ids_tensor("a photo of a cat")
        in_bf16 = half.encoders["l"](ids).last_hidden_state.float()
    assert not torch.allclose(half.encode("a photo of a cat")[0], in_bf16, atol=1e-3)


def test_family_and_encoder_keys_are_checked():
    with pytest.raises(ValueError, match="needs encoders"):
        ClipModel({"l": text_encoder("l", 0)}, "sdxl")
    with pytest.raises(ValueError, match="unknown CLIP family"):
        ClipModel({"l": text_encoder("l", 0)}, "sd3")
    with pytest.raises(ValueError, match="negative"):
        ClipModel({"l": text_encoder("l", 0)}, "sd1", layer_idx=1)


def test_nothing_touches_the_network(sd1, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tk.clip_tokenizer.cache_clear()
    try:
        cond, _ = sd1.encode("a (photo:1.2) of a cat")
    finally:
        tk.clip_tokenizer.cache_clear()
    assert torch.isfinite(cond).all()
