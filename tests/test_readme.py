"""The README and docs/ stay true: every ```python block runs, the commands they name
exist, every relative link resolves, and the README stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Markdown files whose links must resolve: the README, docs/, the changelog and the
# generated results index.
LINKED = [ROOT / "README.md", *DOCS, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "results" / "README.md"]
DOC_BLOCKS = [(p.name, i, b) for p in DOCS
              for i, b in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S))]
README_MAX_LINES = 300


def _run_block(code: str, tmp_path: Path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python example"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    """Each example runs in a fresh interpreter (CPU; Triton in interpreter mode)."""
    r = _run_block(BLOCKS[i], tmp_path)
    assert r.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_docs_have_python_examples():
    assert DOCS, "docs/ has no Markdown file"
    assert DOC_BLOCKS, "docs/*.md have no ```python example"


@pytest.mark.parametrize("name,i,code", DOC_BLOCKS, ids=[f"{n}-{i}" for n, i, _ in DOC_BLOCKS])
def test_docs_python_block_runs(name, i, code, tmp_path):
    """Each example of docs/*.md runs in a fresh interpreter (tiny shapes, CPU)."""
    r = _run_block(code, tmp_path)
    assert r.returncode == 0, f"docs/{name} block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_commands_exist():
    for script in re.findall(r"bash (scripts/[\w./-]+\.sh)", README):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci, ".ci/run must call the README's test command"


def test_named_scripts_exist():
    """``bash scripts/X.sh`` and ``python scripts|benchmarks/X.py`` in the README and docs."""
    for p in [ROOT / "README.md", *DOCS]:
        text = p.read_text()
        named = re.findall(r"bash ((?:scripts|benchmarks)/[\w./-]+\.sh)", text)
        named += re.findall(r"python3? ((?:scripts|benchmarks)/[\w./-]+\.py)", text)
        for path in named:
            assert (ROOT / path).is_file(), f"{p.relative_to(ROOT)} names {path}, which does not exist"


def _search_flags() -> set[str]:
    """Every option string of ``tangle-search`` and its ``train`` and ``pareto`` commands."""
    from tangle_kernels.search import cli

    flags: set[str] = set()
    for parser in (cli.build_parser(), cli.build_train_parser(), cli.build_pareto_parser()):
        for action in parser._actions:
            flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


def test_search_commands_use_existing_flags():
    """Every ``--flag`` of a ``tangle-search`` command line in the README and docs, and
    every ``--flag`` in inline code of the README and docs/search.md, is a flag of
    tangle-search (the docs follow the CLI)."""
    flags = _search_flags()
    for p in (ROOT / "README.md", ROOT / "docs" / "search.md"):
        prose = re.sub(r"```.*?```", "", p.read_text(), flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span):
                if flag != "--help":
                    assert flag in flags, f"{p.relative_to(ROOT)}: tangle-search has no {flag}: `{span}`"
    for p in [ROOT / "README.md", *DOCS]:
        for line in p.read_text().splitlines():
            cmd = re.search(r"(?:tangle-search|-m tangle_kernels\.search)\b(.*)", line)
            if not cmd:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", cmd.group(1)):
                if flag in ("--nproc_per_node", "--help"):
                    continue
                assert flag in flags, f"{p.relative_to(ROOT)}: tangle-search has no {flag}: {line.strip()}"


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", LINKED, ids=[str(p.relative_to(ROOT)) for p in LINKED])
def test_relative_links_resolve(path):
    """Every relative link (and image) of the README, docs/, the changelog and the
    results index points to a file or folder that exists."""
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    bad = []
    for target in _links(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of this page
        file, _, anchor = target.partition("#")
        dest = path.parent / file
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)  # the page exists, the heading does not
    assert not bad, f"{path.relative_to(ROOT)}: broken relative links {bad}"


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation other than
    '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_short_and_links_the_docs():
    n = len(README.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"
    linked = {t.split("#", 1)[0] for t in _links(README)}
    for p in DOCS:
        assert f"docs/{p.name}" in linked, f"README.md does not link docs/{p.name}"
    assert "benchmarks/results/README.md" in linked and "CHANGELOG.md" in linked
