"""tokens: the rare identifier, checked against the real CLIP BPE vocabulary."""
from __future__ import annotations

import re

import pytest

from dreambooth_core.embedded.model import clip_tokenizer
from dreambooth_core.dataset.tokens import (
    COMMON_MAX_ID,
    RARE_MIN_ID,
    TokenError,
    check_token,
    require_single_token,
    suggest_tokens,
)


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


class Picky:
    """A second tokenizer that disagrees with CLIP: it splits any word with an 'a' into letters
    and decodes any word with an 'o' wrongly (as a lossy tokenizer would)."""

    def __init__(self, base):
        self.base = base

    def tokenize(self, text):
        return [p for word in text.split() for p in (list(word) if "a" in word else self.base.tokenize(word))]

    def encode(self, text, add_special_tokens=False):
        return self.base.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        text = self.base.decode(ids)
        return text.upper() if "o" in text else text

    def convert_tokens_to_ids(self, piece):
        return self.base.convert_tokens_to_ids(piece)

    def get_vocab(self):
        return self.base.get_vocab()


def test_known_rare_tokens_are_single_and_not_common(clip):
    for word in ("sks", "ohwx"):
        check = check_token([clip], word)
        assert check.single and not check.common and check.valid
        assert check.pieces == [[f"{word}</w>"]]
        assert "good identifier" in check.message


def test_random_letter_strings_split(clip):
    check = check_token([clip], "zxqv")
    assert not check.single and len(check.pieces[0]) == 4
    assert "splits into 4 tokens" in check.message
    assert not check_token([clip], "xxy5syt00").single  # the paper's own example


def test_common_words_are_flagged(clip):
    for word in ("dog", "photo", "red"):
        check = check_token([clip], word)
        assert check.single and check.common, word
        assert "common word" in check.message
    assert clip.get_vocab()["dog</w>"] < COMMON_MAX_ID <= clip.get_vocab()["sks</w>"]


def test_empty_spaced_and_odd_words_get_clear_messages(clip):
    empty = check_token([clip], "   ")
    assert not empty.single and not empty.valid and "empty" in empty.message
    spaced = check_token([clip], "my dog")
    assert spaced.common and not spaced.valid and "whitespace" in spaced.message
    accented = check_token([clip], "caf\u00e9")
    assert not accented.valid and "non-ASCII" in accented.message
    punct = check_token([clip], "<sks>")
    assert not punct.valid and "other than letters" in punct.message
    assert check_token([clip], " sks ").word == "sks"


def test_require_single_token_raises_unless_single(clip):
    assert require_single_token([clip], "sks").single
    with pytest.raises(TokenError, match="splits into"):
        require_single_token([clip], "zxqv")
    with pytest.raises(TokenError, match="whitespace"):
        require_single_token([clip], "my dog")
    forced = require_single_token([clip], "zxqv", force=True)
    assert not forced.single and forced.message.startswith("Warning (forced)")
    # a single common word passes, but says why it is a poor choice
    assert "common word" in require_single_token([clip], "dog").message


def test_multiple_tokenizers_must_all_agree(clip):
    check = check_token([clip, Picky(clip)], "aab")
    assert not check.single and len(check.pieces) == 2 and check.pieces[0] == ["aab</w>"]
    assert "tokenizer 2 of 2" in check.message


def test_suggestions_are_rare_single_and_deterministic(clip):
    vocab = clip.get_vocab()
    picks = suggest_tokens([clip], n=8, seed=0)
    assert len(picks) == 8 and picks == suggest_tokens([clip], n=8, seed=0)
    assert picks != suggest_tokens([clip], n=8, seed=1)
    for word in picks:
        assert re.fullmatch(r"[a-z]{3,4}", word)
        assert vocab[f"{word}</w>"] >= RARE_MIN_ID
        assert clip.decode(clip.encode(word, add_special_tokens=False)).strip() == word
        check = check_token([clip], word)
        assert check.single and not check.common


def test_suggestions_are_single_and_round_trip_in_every_tokenizer(clip):
    alone = suggest_tokens([clip], n=20, seed=3)
    assert any("a" in w for w in alone) and any("o" in w for w in alone)  # the filters below matter
    both = suggest_tokens([clip, Picky(clip)], n=20, seed=3)
    assert len(both) == 20
    assert not any("a" in w or "o" in w for w in both)


def test_no_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="tokenizers"):
        check_token([], "sks")


class MarkedVocab:
    """A long-context encoder's tokenizer in miniature: whole words carry a space marker (SentencePiece's
    '▁', byte-level BPE's 'Ġ'), ids grow with rarity, and a word not in the vocabulary splits into the
    marker and its letters, as T5 splits 'sks' (▁ + s + k + s)."""

    def __init__(self, marker, words):
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        self.pieces = [marker] + letters + [marker + w for w in words]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.marker = marker

    def tokenize(self, text):
        out = []
        for word in text.split():
            out += [self.marker + word] if self.marker + word in self.ids else [self.marker, *word]
        return out

    def encode(self, text, add_special_tokens=False):
        return [self.ids[p] for p in self.tokenize(text)]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace(self.marker, " ")

    def convert_tokens_to_ids(self, piece):
        return self.ids[piece]

    def get_vocab(self):
        return dict(self.ids)


@pytest.mark.parametrize("marker", ["\u2581", "\u0120"])
def test_suggestions_come_from_a_long_context_vocabulary_that_splits_the_usual_identifiers(marker):
    """Qwen2, T5 and Gemma split 'sks'; their suggestions come from the rare end of their own vocabulary
    (ids from RARE_SHARE of its size), without everyday English words, and pass the check in a caption."""
    frequent = ["the", "dog", "photo"] * 30  # the frequent start of the vocabulary
    tok = MarkedVocab(marker, [f"{w}{i}" for i, w in enumerate(frequent)] + ["zale", "pony", "vaz", "khu", "dvd"])
    check = check_token([tok], "sks")
    assert not check.single and check.pieces == [[marker, "s", "k", "s"]]
    picks = suggest_tokens([tok], n=5)
    assert sorted(picks) == ["khu", "vaz", "zale"]  # 'pony' and 'dvd' are everyday words
    assert all(check_token([tok], w).single for w in picks)
    assert "'zale'" in check.message or "'vaz'" in check.message or "'khu'" in check.message, check.message
