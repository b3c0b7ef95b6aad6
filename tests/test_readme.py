"""The READMEs stay true: every command they show parses with the real CLI, every link resolves.

Commands are read from fenced code blocks (continuation lines joined, comments dropped) and parsed
by the same argparse parsers that run them, so a renamed flag or subcommand fails here first.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator, List

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
READMES = [p for p in (ROOT / "README.md", ROOT / "README.ru.md", ROOT / "bench" / "README.md",
                       ROOT / "nodes" / "README.md", ROOT / "js" / "README.md",
                       ROOT / "docs" / "eval_experiments.md", ROOT / "docs" / "eval_experiments.ru.md") if p.is_file()]
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def commands(text: str) -> Iterator[List[str]]:
    """Shell commands of the fenced blocks, split into words (one list per `&&`/`;`-separated part)."""
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            part: List[str] = []
            for w in words + [";"]:
                if w in ("&&", ";", "||", "|"):
                    if part:
                        yield part
                    part = []
                else:
                    part.append(w)


def cli_args(words: List[str], module: str) -> List[str] | None:
    """The arguments after `-m MODULE` (also under `accelerate launch`; `bench/run.py` is `-m bench`), or None."""
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == module:
            return words[i + 2:]
    if module == "bench" and "bench/run.py" in words:
        return words[words.index("bench/run.py") + 1:]
    return None


def _bench_parse(args: List[str]) -> None:
    """`python -m bench memory ...` goes to the memory tool, anything else to bench.run (bench/__main__.py)."""
    if args[:1] == ["memory"]:
        from bench.memory.cli import parse

        parse(args[1:])
    else:
        from bench.run import build_parser

        build_parser().parse_args(args)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(readme: Path):
    text = readme.read_text(encoding="utf-8")
    checked = 0
    for bang, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (readme.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{readme.name}: link to {target} does not resolve"
        if bang:
            with Image.open(path) as im:
                im.verify()
        checked += 1
    if readme.name.startswith("README") and readme.parent == ROOT:
        assert checked >= 3, "the top-level README should link its pictures and docs"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_parse_with_the_real_cli(readme: Path):
    from dreambooth_core.cli.main import parser as core_parser

    for words in commands(readme.read_text(encoding="utf-8")):
        for module, parse in (("dreambooth_core", lambda a: core_parser().parse_args(a)), ("bench", _bench_parse)):
            args = cli_args(words, module)
            if args is not None:
                try:
                    parse(args)
                except SystemExit:
                    pytest.fail(f"{readme.name}: `{' '.join(words)}` does not parse with `python -m {module}`")
        if words[0] in ("bash", "sh") or (len(words) > 1 and words[1].startswith("tools/")):
            script = next((w for w in words[1:] if not w.startswith("-")), None)
            if script and "/" in script:
                assert (ROOT / script).is_file(), f"{readme.name}: `{' '.join(words)}` names a missing script"


def test_the_main_readme_gives_the_two_ci_commands():
    """DEVELOPERS.md: two commands on a fresh machine, and .ci/run runs exactly the test one."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = FENCE.search(text.split("## Quickstart", 1)[1]).group(1).strip().splitlines()
    assert len(first) == 2 and "demo" in first[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1].strip() in ci


def test_the_parser_catches_a_wrong_flag():
    """Guard for the test itself: a misspelt flag must fail to parse."""
    from dreambooth_core.cli.main import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--stepz", "3"])
