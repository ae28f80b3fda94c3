"""CLIP tokenisation: shipped vocabulary, ComfyUI weight syntax, embeddings words, 77-token chunking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentloom.nodes.diffusion import tokenizer as tk
from latentloom.nodes.diffusion.tokenizer import (
    BOS_ID,
    EOS_ID,
    OPENCLIP_CHUNKS,
    SD1_CHUNKS,
    bpe_ids,
    chunk_ids,
    chunk_tokens,
    parse_prompt_weights,
    token_groups,
    tokenize_prompt,
)


def word_id(word: str) -> int:
    """The id of a one-token word (looked up when a test runs: the vocabulary loads transformers)."""
    (token,) = bpe_ids(word)
    return token


def test_shipped_vocabulary_gives_the_known_clip_ids():
    tokenizer = tk.clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer.get_vocab()) == 49408
    assert tokenizer.convert_ids_to_tokens([0, 256, 49406, 49407]) == ["!", "!</w>", "<|startoftext|>",
                                                                       "<|endoftext|>"]
    assert bpe_ids("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_tokenizer_lowercases_and_collapses_whitespace():
    assert bpe_ids("A   PHOTO\n of a\tCat") == bpe_ids("a photo of a cat")


def test_cjk_ideographs_are_separate_words_and_control_characters_vanish():
    # As transformers' Python CLIPTokenizer (ComfyUI's) prepares text: ideographs set apart, controls dropped.
    assert bpe_ids("猫の写真") == bpe_ids("猫") + bpe_ids("の") + bpe_ids("写") + bpe_ids("真")
    assert bpe_ids("猫の写真") != list(tk.clip_tokenizer()("猫の写真", add_special_tokens=False)["input_ids"])
    assert bpe_ids("a\x07cat\u200b") == bpe_ids("acat")
    assert bpe_ids("a\u00a0cat") == bpe_ids("a cat")


WEIGHT_TABLE = [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat:0.5) dog", [("cat", 0.5), (" dog", 1.0)]),
    ("((cat):1.5)", [("cat", 1.5 * 1.1)]),                       # explicit weight sets, nested ×1.1 applies on top
    ("((cat:0.4))", [("cat", 0.4)]),                             # inner explicit weight overrides the outer ×1.1
    ("(a (b:0.5) c)", [("a ", 1.1), ("b", 0.5), (" c", 1.1)]),
    ("x (a (b) c:2) y", [("x ", 1.0), ("a ", 2.0), ("b", 2.2), (" c", 2.0), (" y", 1.0)]),
    ("(cat:1e-1)", [("cat", 0.1)]),
    ("(cat: 2 )", [("cat", 2.0)]),                               # float() accepts surrounding spaces
    ("(a:b:2)", [("a:b", 2.0)]),                                 # the number follows the last ':'
    ("(cat:x)", [("cat:x", 1.1)]),                               # not a number: text kept, ×1.1
    ("(:1.5)", [(":1.5", 1.1)]),                                 # ':' first: no weight
    ("\\(cat\\)", [("(cat)", 1.0)]),                             # escaped parentheses are literal
    ("(\\(cat\\):1.2)", [("(cat)", 1.2)]),
    ("[cat]", [("[cat]", 1.0)]),                                 # no [] de-emphasis
    ("cat AND dog BREAK", [("cat AND dog BREAK", 1.0)]),          # no A1111 keywords
    ("(unclosed cat", [("(unclosed cat", 1.0)]),                 # unbalanced: stays text
    ("stray) (x)", [("stray) (x)", 1.0)]),                       # a stray ')' makes the rest one literal piece
    ("()", []),
    ("a (b) (c:0.5)d", [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 0.5), ("d", 1.0)]),
    ("", []),
]


@pytest.mark.parametrize("prompt,expected", WEIGHT_TABLE)
def test_weight_parser(prompt, expected):
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weight_parser_handles_deep_nesting_without_recursion():
    depth = 1500  # beyond Python's default recursion limit (1000)
    parsed = parse_prompt_weights("(" * depth + "cat" + ")" * depth)
    assert parsed == [("cat", pytest.approx(1.1 ** depth, rel=1e-9))]


def test_segments_are_tokenized_separately():
    # "cats" is one BPE token; split across a weight boundary it becomes two segments, "cat" and "s".
    joined = token_groups("cats")
    split = token_groups("cat(s:1.2)")
    assert [[t for t, _ in g] for g in joined] == [bpe_ids("cats")]
    assert len(bpe_ids("cats")) == 1
    assert [[t for t, _ in g] for g in split] == [[word_id("cat")], bpe_ids("s")]
    assert [w for g in split for _, w in g] == [1.0, 1.2]


def test_short_prompt_is_one_chunk_with_padding():
    [chunk] = tokenize_prompt("a photo of a cat")
    assert len(chunk) == 77
    assert chunk_ids(chunk) == [49406, 320, 1125, 539, 320, 2368, 49407] + [EOS_ID] * 70
    [open_clip_chunk] = tokenize_prompt("a photo of a cat", OPENCLIP_CHUNKS)
    assert chunk_ids(open_clip_chunk) == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70


def test_empty_prompt_is_bos_eos_and_padding():
    assert [chunk_ids(c) for c in tokenize_prompt("")] == [[BOS_ID, EOS_ID] + [EOS_ID] * 75]
    assert [chunk_ids(c) for c in tokenize_prompt("", OPENCLIP_CHUNKS)] == [[BOS_ID, EOS_ID] + [0] * 75]


def test_200_token_prompt_splits_into_chunks_of_75():
    prompt = "cat, " * 100                                      # 200 tokens in one segment
    assert len(bpe_ids(prompt)) == 200
    chunks = tokenize_prompt(prompt)
    assert len(chunks) == 3 and all(len(c) == 77 for c in chunks)
    content = []
    for chunk in chunks:
        ids = chunk_ids(chunk)
        assert ids[0] == BOS_ID
        eos = ids.index(EOS_ID)
        content.extend(ids[1:eos])
        assert all(i == EOS_ID for i in ids[eos:])
    assert [chunk_ids(c).index(EOS_ID) for c in chunks] == [76, 76, 51]
    assert content == bpe_ids(prompt)


def test_short_group_that_overflows_moves_whole_to_next_chunk():
    prompt = "cat " * 74 + "(dog dog dog)"
    chunks = tokenize_prompt(prompt)
    assert len(chunks) == 2
    first, second = chunk_ids(chunks[0]), chunk_ids(chunks[1])
    assert first == [BOS_ID] + [word_id("cat")] * 74 + [EOS_ID, EOS_ID]
    assert second[:5] == [BOS_ID, word_id("dog"), word_id("dog"), word_id("dog"), EOS_ID]
    assert [w for _, w in chunks[1][1:4]] == pytest.approx([1.1] * 3)


def test_long_group_that_overflows_is_split_at_the_boundary():
    prompt = "cat " * 74 + "(" + "dog " * 10 + ")"
    first, second = (chunk_ids(c) for c in tokenize_prompt(prompt))
    assert first == [BOS_ID] + [word_id("cat")] * 74 + [word_id("dog"), EOS_ID]
    assert second[:11] == [BOS_ID] + [word_id("dog")] * 9 + [EOS_ID]


def test_chunk_weights_follow_tokens_and_specials_are_weight_one():
    [chunk] = tokenize_prompt("a (cat:1.5) [dog]")
    weights = {i: w for i, (t, w) in enumerate(chunk) if w != 1.0}
    assert weights == {2: 1.5}
    assert chunk_ids(chunk)[2] == word_id("cat")


# ---------------------------------------------------------------------------------------------------------------
# Embedding words


def vectors(n: int, width: int, fill: float) -> torch.Tensor:
    return torch.full((n, width), fill)


def test_embedding_word_is_replaced_by_its_vectors_with_segment_weight():
    found = {"style": vectors(2, 32, 0.5)}
    groups = token_groups("a (photo embedding:style cat:1.2)", width=32, resolve_embedding=found.get)
    flat = [t for g in groups for t, _ in g]
    assert flat[0] == 320 and flat[1] == 1125
    assert all(isinstance(v, torch.Tensor) and v.shape == (32,) for v in flat[2:4])
    assert flat[4] == word_id("cat")
    assert [w for g in groups for _, w in g] == pytest.approx([1.0, 1.2, 1.2, 1.2, 1.2])


def test_embedding_name_with_trailing_comma():
    found = {"style": vectors(1, 32, 0.5)}
    flat = [t for g in token_groups("embedding:style, cat", width=32, resolve_embedding=found.get) for t, _ in g]
    assert isinstance(flat[0], torch.Tensor)
    assert flat[1:] == bpe_ids(", cat")


def test_unknown_embedding_is_dropped_with_a_warning():
    warnings: list[str] = []
    groups = token_groups("a embedding:missing cat", width=32, resolve_embedding=lambda name: None,
                          warn=warnings.append)
    assert [t for g in groups for t, _ in g] == bpe_ids("a cat")
    assert len(warnings) == 1 and "missing" in warnings[0]


def test_without_resolver_embedding_words_are_text():
    groups = token_groups("a embedding:missing cat")
    assert [t for g in groups for t, _ in g] == bpe_ids("a embedding:missing cat")


def test_embedding_vectors_are_picked_per_encoder_width():
    sdxl_file = {"clip_l": vectors(1, 32, 1.0), "clip_g": vectors(3, 48, 2.0)}
    for key, width, count in (("l", 32, 1), ("g", 48, 3)):
        groups = token_groups("embedding:x", encoder_key=key, width=width, resolve_embedding=lambda n: sdxl_file)
        assert len(groups[0]) == count and groups[0][0][0].shape == (width,)
    warnings: list[str] = []
    groups = token_groups("embedding:x", width=64, resolve_embedding=lambda n: vectors(1, 32, 0.0),
                          warn=warnings.append)
    assert groups == [] and "width 64" in warnings[0]


def test_long_embedding_is_a_group_that_can_split():
    found = {"big": vectors(10, 32, 0.0)}
    chunks = chunk_tokens(token_groups("cat " * 70 + "embedding:big", width=32, resolve_embedding=found.get),
                          SD1_CHUNKS)
    assert sum(isinstance(t, torch.Tensor) for t, _ in chunks[0]) == 5
    assert sum(isinstance(t, torch.Tensor) for t, _ in chunks[1]) == 5


# ---------------------------------------------------------------------------------------------------------------
# Chunking invariants on arbitrary token groups

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=90), max_size=12))
def test_chunking_invariants(group_sizes):
    # Token ids encode (group, position) so order and group splits can be read back.
    groups = [[(1000 * g + i, 1.0) for i in range(size)] for g, size in enumerate(group_sizes)]
    chunks = chunk_tokens(groups, SD1_CHUNKS)
    assert all(len(c) == 77 and chunk_ids(c)[0] == BOS_ID for c in chunks)
    contents = []
    for chunk in chunks:
        ids = chunk_ids(chunk)
        eos = ids.index(EOS_ID)
        assert eos <= 76 and all(i == EOS_ID for i in ids[eos:])
        contents.append(ids[1:eos])
    flat = [t for content in contents for t in content]
    assert flat == [t for g in groups for t, _ in g]                         # nothing lost, order kept
    for g, size in enumerate(group_sizes):
        holders = {n for n, content in enumerate(contents) if any(t // 1000 == g for t in content)}
        if size < 8:
            assert len(holders) == 1                                         # short groups never split
    # A chunk is closed early only when the next (short) group would not fit.
    for n in range(len(contents) - 1):
        next_group = contents[n + 1][0] // 1000 if contents[n + 1] else None
        if len(contents[n]) < 75 and next_group is not None:
            assert len(contents[n]) + group_sizes[next_group] > 75


def test_token_weights_move_away_from_the_empty_prompt_along_the_token_axis():
    from latentloom.nodes.diffusion.tokenizer import apply_token_weights

    def never() -> torch.Tensor:
        raise AssertionError("the empty prompt is encoded only when a weight is not 1")

    z = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)  # [1, layers, tokens, width]
    assert apply_token_weights(z, [(1, 1.0), (2, 1.0), (3, 1.0)], never, token_axis=2) is z
    empty = torch.full_like(z, 10.0)
    out = apply_token_weights(z, [(1, 1.0), (2, 2.0), (3, 1.0)], lambda: empty, token_axis=2)
    expected = z.clone()
    expected[:, :, 1] = (z[:, :, 1] - 10.0) * 2.0 + 10.0
    assert torch.equal(out, expected)
