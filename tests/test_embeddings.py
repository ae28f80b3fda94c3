"""Textual-inversion embeddings: file forms, name lookup, the resolver service, and their effect on conditioning."""

from __future__ import annotations

import pickle

import pytest
import torch
from adapter_support import save_safetensors, tiny_objects
from node_context import StubContext, make_env

from latentloom.nodes.conditioning import CLIPTextEncode
from latentloom.nodes.diffusion.embeddings import EmbeddingLibrary
from latentloom.nodes.diffusion.tokenizer import bpe_ids

# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    environment = make_env(models_dir=tmp_path / "models")
    environment.register(EmbeddingLibrary(environment))
    return environment


@pytest.fixture
def ctx(env):
    return StubContext(env)


def folder(env):
    path = env.model_dirs["embeddings"][0]
    path.mkdir(parents=True, exist_ok=True)
    return path


def encode(ctx, clip, text):
    return CLIPTextEncode.model_construct(text=text, clip=clip).run(ctx)[0][0][0]


def word_vectors(clip, word, slot="l"):
    encoder = clip.encoders[slot]
    inner = getattr(encoder, "text_model", encoder)
    return inner.embeddings.token_embedding.weight.detach()[bpe_ids(word)].clone()


class Exploit:
    def __reduce__(self):
        return (print, ("code from a pickle ran",))


def test_every_file_form_resolves(env):
    vectors = torch.randn((2, 32))
    save_safetensors({"emb_params": vectors}, folder(env) / "st.safetensors")
    torch.save({"string_to_param": {"*": vectors}, "name": "a1111", "step": 100}, folder(env) / "a1111.pt")
    torch.save({"<token>": vectors[0]}, folder(env) / "learned.bin")
    save_safetensors({"clip_l": vectors, "clip_g": vectors * 2}, folder(env) / "sub" / "xl.safetensors")
    (folder(env) / "evil.pt").write_bytes(pickle.dumps({"emb_params": Exploit()}))
    library = env.service(EmbeddingLibrary)
    assert torch.equal(library("st"), vectors) and torch.equal(library("st.safetensors"), vectors)
    assert torch.equal(library("a1111"), vectors)
    assert torch.equal(library("learned"), vectors[0])
    both = library("sub/xl")
    assert torch.equal(both["clip_l"], vectors) and torch.equal(both["clip_g"], vectors * 2)
    assert library("evil") is None            # refused, never executed
    assert library("missing") is None and library("../models/embeddings/st") is None
    assert library.names() == ["a1111", "evil", "learned", "st", "sub/xl"]


def test_embedding_changes_the_conditioning_exactly_where_it_is_used(env, ctx):
    _, clip = tiny_objects("sd1")
    # Vectors equal to the word's own token vectors encode exactly like the word.
    save_safetensors({"emb_params": word_vectors(clip, "cat")}, folder(env) / "same_as_cat.safetensors")
    torch.testing.assert_close(encode(ctx, clip, "a photo of embedding:same_as_cat on a mat"),
                               encode(ctx, clip, "a photo of cat on a mat"), rtol=0, atol=1e-6)
    # Other vectors: the tokens before the embedding see nothing of it (causal attention), its slots and the
    # tokens after it change.
    save_safetensors({"emb_params": torch.randn((2, 32), generator=torch.Generator().manual_seed(0))},
                     folder(env) / "style.safetensors")
    with_embedding = encode(ctx, clip, "a photo of embedding:style on a mat")
    plain = encode(ctx, clip, "a photo of cat dog on a mat")   # "cat", "dog": one token each, like the 2 vectors
    position = 1 + len(bpe_ids("a photo of"))
    assert torch.equal(with_embedding[0, :position], plain[0, :position])
    assert not torch.allclose(with_embedding[0, position], plain[0, position], atol=1e-3)
    assert not torch.allclose(with_embedding[0, position + 2], plain[0, position + 2], atol=1e-3)
    assert ctx.warnings == []


def test_embedding_weights_and_tokens(env, ctx):
    _, clip = tiny_objects("sd1")
    vectors = torch.randn((3, 32))
    save_safetensors({"emb_params": vectors}, folder(env) / "three.safetensors")
    tokens = clip.tokenize("x (embedding:three:1.3) y", resolve_embedding=env.service(EmbeddingLibrary))["l"][0]
    injected = [(position, weight) for position, (token, weight) in enumerate(tokens)
                if isinstance(token, torch.Tensor)]
    assert [p for p, _ in injected] == [2, 3, 4] and all(w == pytest.approx(1.3) for _, w in injected)
    assert torch.equal(torch.stack([tokens[p][0] for p, _ in injected]), vectors)


def test_sdxl_file_gives_each_encoder_its_vectors(env, ctx):
    _, clip = tiny_objects("sdxl")
    save_safetensors({"clip_l": word_vectors(clip, "dog", "l"), "clip_g": word_vectors(clip, "dog", "g")},
                     folder(env) / "pet.safetensors")
    torch.testing.assert_close(encode(ctx, clip, "a embedding:pet"), encode(ctx, clip, "a dog"), rtol=0, atol=1e-6)


def test_missing_embedding_is_warned_and_dropped(env, ctx):
    _, clip = tiny_objects("sd1")
    torch.testing.assert_close(encode(ctx, clip, "a embedding:nowhere cat"), encode(ctx, clip, "a cat"),
                               rtol=0, atol=1e-6)
    assert len(ctx.warnings) == 1 and "nowhere" in ctx.warnings[0]


def test_create_engine_installs_the_resolver(tmp_path):
    from latentloom.nodes import create_engine

    engine = create_engine(models_dir=tmp_path, entry_points=False)
    save_safetensors({"emb_params": torch.ones((1, 4))}, tmp_path / "embeddings" / "ones.safetensors")
    library = engine.env.service(EmbeddingLibrary)
    assert isinstance(library, EmbeddingLibrary) and torch.equal(library("ones"), torch.ones((1, 4)))
    assert library.names() == ["ones"]
