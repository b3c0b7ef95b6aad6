"""The rare identifier that DreamBooth binds the subject to.

The paper (Ruiz et al. 2022, §3.2) warns that a random letter string such as "xxy5syt00" is
split by the tokenizer into several tokens, each with a strong prior of its own, and binds
poorly; a common word ("dog", "red") already means something the model must unlearn. It looks
up *rare* tokens in the vocabulary instead. This module checks a proposed identifier against the
model's own tokenizer(s) and proposes rare single tokens the same way.

CLIP's BPE vocabulary is ordered by merge rank: a lower id was merged earlier, i.e. is more
frequent in CLIP's training text. That is what `COMMON_MAX_ID` and `RARE_MIN_ID` rely on. The
long-context encoders of flow models (T5 and Gemma's SentencePiece, Qwen2's byte-level BPE) order
theirs by frequency or merge rank as well, and split CLIP's usual identifiers ("sks" is s + k + s in
T5, sk + s in Qwen2): suggestions for them come from the rare end of their own vocabulary.

An identifier is checked as it stands in a caption, after another word ("a photo of sks dog"): a
byte-level BPE tokenizes a word after a space differently from the same word alone.
"""
from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

#: Whole-word CLIP tokens made of letters with an id below this are everyday words or names
#: ("red" 736, "photo" 1125, "dog" 1929, "purple" 5496, "backpack" 14894): poor identifiers.
COMMON_MAX_ID = 20000
#: Suggestions come from ids at or above this: the last ~9k merges of CLIP's 49408-token
#: vocabulary, where "sks" (48136) and "ohwx" (47993) also sit.
RARE_MIN_ID = 40000
#: The same rare end in another vocabulary: ids at or above this share of its size.
RARE_SHARE = RARE_MIN_ID / 49408
_WORD_END = "</w>"
#: A whole word of 3-4 lowercase letters, as one piece of each kind of vocabulary: CLIP's BPE marks a
#: word's end, SentencePiece (T5, Gemma) and byte-level BPE (Qwen2, Llama 3) the space before it.
_CLIP_WORD = re.compile(r"([a-z]{3,4})" + re.escape(_WORD_END))
_OTHER_WORDS = (re.compile("\u2581([a-z]{3,4})"), re.compile("\u0120([a-z]{3,4})"))


class TokenError(ValueError):
    """The proposed identifier would not work as one rare token."""


@dataclass
class TokenCheck:
    word: str  # the identifier checked (surrounding whitespace removed)
    pieces: List[List[str]]  # per tokenizer, how it splits (without start/end tokens)
    single: bool  # one token in every tokenizer
    common: bool  # a frequent whole word (a poor identifier: it already means something)
    message: str  # one line a user can act on
    valid: bool = True  # only ASCII letters/digits, no whitespace, not empty


def _piece_text(piece: str) -> str:
    return piece[: -len(_WORD_END)] if piece.endswith(_WORD_END) else piece.lstrip("\u2581\u0120")


def _in_caption(tokenizer, word: str) -> List[str]:
    """The pieces of `word` where it stands in a caption, after another word: the pieces of "a <word>"
    past those of "a" (a SentencePiece without whitespace folding reads a leading space as a piece)."""
    lead, pieces = list(tokenizer.tokenize("a")), list(tokenizer.tokenize("a " + word))
    return pieces[len(lead):] if pieces[:len(lead)] == lead else pieces


def _token_id(tokenizer, piece: str):
    try:
        return tokenizer.convert_tokens_to_ids(piece)
    except Exception:
        return tokenizer.get_vocab().get(piece)


@functools.lru_cache(maxsize=1)
def _english_words() -> frozenset:
    """The everyday English words (CLIP whole-word letter tokens below COMMON_MAX_ID, from the CLIP
    vocabulary the package ships): what "common" means in a vocabulary not ordered like CLIP's."""
    from ..embedded.model import CLIP_TOKENIZER_DIR

    vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    return frozenset(m.group(1) for t, i in vocab.items() if i < COMMON_MAX_ID and (m := _CLIP_WORD.fullmatch(t)))


def _is_common(tokenizer, pieces: Sequence[str]) -> bool:
    """A CLIP whole-word letter token merged early (see COMMON_MAX_ID). Tokenizers without
    CLIP's '</w>' word ends are not judged."""
    if len(pieces) != 1 or not pieces[0].endswith(_WORD_END):
        return False
    stem = _piece_text(pieces[0])
    if not (stem.isascii() and stem.isalpha()):
        return False
    ident = _token_id(tokenizer, pieces[0])
    return isinstance(ident, int) and 0 <= ident < COMMON_MAX_ID


def _name(i: int, n: int) -> str:
    return f" in tokenizer {i + 1} of {n}" if n > 1 else ""


def _examples(tokenizers: list) -> str:
    try:
        picks = suggest_tokens(tokenizers, 3)
    except Exception:
        picks = []
    return ", ".join(repr(p) for p in (picks or ["sks", "ohwx"]))


def check_token(tokenizers: list, word: str) -> TokenCheck:
    """How `word` tokenizes in each tokenizer and whether it makes a good identifier."""
    if not tokenizers:
        raise ValueError("tokenizers: none given; pass the model's tokenizer(s), e.g. backend.tokenizers()")
    word = (word if isinstance(word, str) else "").strip()
    n = len(tokenizers)
    if not word:
        return TokenCheck("", [[] for _ in tokenizers], False, False,
                          f"The identifier is empty: use a rare single token such as {_examples(tokenizers)}.", False)
    pieces = [_in_caption(t, word) for t in tokenizers]
    single = all(len(p) == 1 for p in pieces)
    spaced = any(c.isspace() for c in word)
    common = spaced or any(_is_common(t, p) for t, p in zip(tokenizers, pieces))
    odd = sorted({c for c in word if not (c.isascii() and c.isalnum())} - {" ", "\t", "\n"})
    valid = not spaced and not odd
    if spaced:
        message = (f"{word!r} contains whitespace: the identifier must be one word; use a rare single token "
                   f"such as {_examples(tokenizers)}.")
    elif any(not c.isascii() for c in odd):
        message = (f"{word!r} contains non-ASCII characters ({''.join(c for c in odd if not c.isascii())}): "
                   f"use plain ASCII letters, e.g. {_examples(tokenizers)}.")
    elif odd:
        message = (f"{word!r} contains characters other than letters and digits ({''.join(odd)}): the tokenizer "
                   f"splits on them; use letters only, e.g. {_examples(tokenizers)}.")
    elif not single:
        i, split = next((i, p) for i, p in enumerate(pieces) if len(p) != 1)
        message = (f"{word!r} splits into {len(split)} tokens ({' + '.join(_piece_text(p) for p in split)})"
                   f"{_name(i, n)}: a multi-token identifier binds poorly. Use a rare single token such as "
                   f"{_examples(tokenizers)}.")
    elif common:
        i = next(i for i, (t, p) in enumerate(zip(tokenizers, pieces)) if _is_common(t, p))
        message = (f"{word!r} is a common word (token id {_token_id(tokenizers[i], pieces[i][0])}{_name(i, n)}): "
                   f"the model already knows what it means and training must overwrite that; prefer a rare "
                   f"token such as {_examples(tokenizers)}.")
    else:
        message = f"{word!r} is a single, rare token{' in every tokenizer' if n > 1 else ''}: a good identifier."
    return TokenCheck(word, pieces, single, common, message, valid)


def require_single_token(tokenizers: list, word: str, force: bool = False) -> TokenCheck:
    """Check `word`; raise TokenError unless it is one valid token in every tokenizer.

    `force=True` returns instead, with the message turned into a warning. A single but common
    word passes, its message saying why it is a poor choice."""
    check = check_token(tokenizers, word)
    if check.single and check.valid:
        return check
    if force:
        return replace(check, message=f"Warning (forced): {check.message}")
    raise TokenError(check.message)


def _round_trips(tokenizer, word: str) -> bool:
    try:
        ids = tokenizer.encode(word, add_special_tokens=False)
        return tokenizer.decode(ids).strip() == word
    except Exception:
        return False


def _rare_words(vocab: Dict[str, int]) -> List[Tuple[int, str]]:
    """(id, word) of the whole-word pieces of 3-4 lowercase letters at the rare end of `vocab`:
    CLIP's from RARE_MIN_ID; another vocabulary's from RARE_SHARE of its size, everyday English words
    left out (a small vocabulary such as T5's has "pony" and "dvd" there)."""
    clip = [(i, m.group(1)) for t, i in vocab.items() if i >= RARE_MIN_ID and (m := _CLIP_WORD.fullmatch(t))]
    if clip:
        return sorted(clip)
    floor, common = int(RARE_SHARE * len(vocab)), _english_words()
    return sorted((i, m.group(1)) for t, i in vocab.items() if isinstance(i, int) and i >= floor
                  for rule in _OTHER_WORDS if (m := rule.fullmatch(t)) and m.group(1) not in common)


def suggest_tokens(tokenizers: list, n: int = 5, seed: int = 0) -> List[str]:
    """Rare single tokens, as in the paper: whole-word tokens of 3-4 lowercase ASCII letters from
    the rare end of the first tokenizer's vocabulary (_rare_words), not common, that stay one token
    in a caption and decode back to themselves in every tokenizer given.

    Deterministic for a seed. May return fewer than `n` if the vocabulary has too few."""
    if not tokenizers:
        raise ValueError("tokenizers: none given; pass the model's tokenizer(s), e.g. backend.tokenizers()")
    if n <= 0:
        return []
    candidates = _rare_words(tokenizers[0].get_vocab())
    random.Random(seed).shuffle(candidates)
    out: List[str] = []
    for _, word in candidates:
        if all(len(pieces := _in_caption(t, word)) == 1 and not _is_common(t, pieces) and _round_trips(t, word)
               for t in tokenizers):
            out.append(word)
            if len(out) == n:
                break
    return out


def require_distinct_identifiers(subjects: Sequence[Tuple[str, str]]) -> None:
    """Several subjects in one run, as (identifier, class noun) pairs: raise TokenError naming the
    clash when two subjects share an identifier (one token cannot call up two subjects), or when an
    identifier is a word of a subject's class noun (prior preservation trains the class noun to mean
    the whole class, which pulls that subject back to it)."""
    def phrase(i: int) -> str:
        token, noun = subjects[i]
        return f"subject {i + 1} ('{f'{token} {noun}'.strip()}')"

    seen: Dict[str, int] = {}
    for i, (token, _) in enumerate(subjects):
        key = token.strip().lower()  # CLIP lowercases: 'SKS' and 'sks' are one token
        if key in seen:
            raise TokenError(f"identifier {token!r} is used by {phrase(seen[key])} and {phrase(i)}: each subject "
                             "needs its own rare token (e.g. sks, ohwx)")
        seen[key] = i
    nouns = {word.lower(): i for i, (_, noun) in enumerate(subjects) for word in noun.split()}
    for i, (token, _) in enumerate(subjects):
        j = nouns.get(token.strip().lower())
        if j is not None:
            whose = "its own class noun" if j == i else f"the class noun of {phrase(j)}"
            raise TokenError(f"identifier {token!r} of {phrase(i)} is {whose}: the class images train that word "
                             "to mean the whole class; give the subject a rare token (e.g. sks, ohwx)")
