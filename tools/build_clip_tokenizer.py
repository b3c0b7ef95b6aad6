"""Rebuild the CLIP BPE tokenizer files shipped in dreambooth_core/assets/clip_tokenizer.

Why: nothing can be downloaded from a model hub at run time, yet SD1.x/SD2.x/SDXL and the
embedded model all need the real CLIP tokenizer. OpenAI's BPE table travels inside the
open-clip-torch wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`, MIT licence); this script turns
it into the vocab.json + merges.txt pair that transformers' CLIPTokenizer reads, with ids
identical to open_clip's SimpleTokenizer.

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -o /tmp/oc/*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dreambooth_core" / "assets" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP reversible byte→unicode alphabet, in the order CLIP assigns ids."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build(gz_path: Path, out: Path = OUT) -> None:
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = byte_alphabet()
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    build(args.bpe_gz, args.out)
