"""The code blocks of docs/recipes.md run (each where its libraries import: timm and
torchvision in the requirements/models.txt environment)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
# ```python blocks run in the main environment (tests/test_readme.py runs them too),
# ```py blocks need torchvision / timm / nanoGPT's model.py.
BLOCKS = re.findall(r"```py(?:thon)?\n(.*?)```", DOC.read_text(), flags=re.S)
NEEDS = ("timm", "torchvision", "transformers")


def test_recipes_have_the_four_models():
    text = "\n".join(BLOCKS)
    for name in (
        "torchvision.models.resnet18",
        "timm.create_model",
        "GPT2LMHeadModel",
        "GPTConfig",
    ):
        assert name in text, name


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_recipe_block_runs(i, tmp_path, monkeypatch):
    code = BLOCKS[i].replace("from model import", "from nanogpt_model import")
    for lib in NEEDS:
        if re.search(rf"\bimport [\w, ]*\b{lib}\b", code) and importlib.util.find_spec(lib) is None:
            pytest.skip(f"{lib} runs in the requirements/models.txt environment")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/recipes.md block {i}", "exec"), {})
