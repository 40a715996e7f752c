"""keye-nano's tokenizer holds the world's words whole (keye.data.world.vocab, and
keye.processing.add_whole_words). The shipped files equal a rebuild: tests/processing."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from keye.data.world import QUESTION_KINDS, SceneConfig
from keye.models.variants import NANO_SPECIAL_BASE
from keye.processing import SPECIAL_TOKENS, add_whole_words, load_nano_processor


def test_every_answer_of_every_kind_is_one_token():
    """A one-word answer is one token as the assistant turn starts it (no leading space), so exact
    match needs one right prediction, not four."""
    tokenizer = load_nano_processor().tokenizer
    for name, kind in QUESTION_KINDS.items():
        for answer in kind.answer_space(SceneConfig()):
            ids = tokenizer(answer)["input_ids"]
            assert len(ids) == 1, (name, answer, tokenizer.convert_ids_to_tokens(ids))


def test_special_tokens_keep_their_ids_and_text_round_trips():
    tokenizer = load_nano_processor().tokenizer
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(NANO_SPECIAL_BASE, NANO_SPECIAL_BASE + len(SPECIAL_TOKENS)))
    text = "Quantised 4.5 s clips — naïve zebras, 漢字, and a magenta triangle moving left."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def _toy_bpe(words: list[str], merges: list[list[str]]) -> dict:
    alphabet = sorted({c for w in words for c in w} | {c for m in merges for c in "".join(m)})
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def test_add_whole_words_swaps_the_last_merges_at_equal_size():
    merges = [["a", "b"], ["ab", "c"], ["x", "y"], ["q", "r"], ["qr", "s"], ["u", "v"], ["uv", "w"]]
    base = _toy_bpe(["tri"], merges)
    out, added = add_whole_words(base, ["tri", "abc"])
    assert added == 2  # (t r), (tr i); "abc" is already whole
    assert out["model"]["merges"] == merges[:5] + [["t", "r"], ["tr", "i"]]  # the least frequent two give way
    assert len(out["model"]["vocab"]) == len(base["model"]["vocab"])
    tok = Tokenizer.from_str(json.dumps(out))
    assert tok.encode("tri").tokens == ["tri"] and tok.encode("abc").tokens == ["abc"]
    assert tok.encode("uvw").tokens == ["u", "v", "w"]
    with pytest.raises(ValueError, match="need"):
        add_whole_words(base, ["abcdefghij"])
