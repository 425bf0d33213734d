"""Reading back the recipe an llmq output records (llmq.json in a directory, `llmq.recipe` in a GGUF file):
what `llmq quantize --recipe` repeats and `llmq inspect` shows."""

from __future__ import annotations

import json
from pathlib import Path

from llmq.core.errors import LlmqError, reason
from llmq.targets.atomic import MARKER
from llmq.targets.gguf.writer import RECIPE_KEY

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kB; anything larger is not one


def read_recipe(path: str | Path) -> dict:
    """The recipe of an llmq output: PATH is its directory, its llmq.json, or a GGUF file llmq wrote."""
    path = Path(path)
    if path.is_dir():
        path = path / MARKER
    if not path.is_file():
        raise LlmqError(f"{path} does not exist; pass an llmq output directory, its {MARKER}, or a .gguf llmq wrote")
    if path.suffix == ".gguf":
        text = gguf_recipe_text(path)
        if text is None:
            raise LlmqError(f"{path} holds no llmq recipe (written by another tool, or by llmq before 0.2)")
    else:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise LlmqError(f"{path} is {path.stat().st_size:,} bytes, too large for an llmq recipe")
        text = path.read_text(errors="replace")
    try:
        recipe = json.loads(text)
    except ValueError as error:
        raise LlmqError(f"{path} is not valid JSON ({reason(error)}); pass the llmq.json of an llmq output") from None
    if not isinstance(recipe, dict) or recipe.get("written_by", "llmq") != "llmq" or "config" not in recipe:
        raise LlmqError(f"{path} records no llmq run (no config: written by llmq before 0.2, or not by llmq)")
    return recipe


def gguf_recipe_text(path: Path) -> str | None:
    """The llmq.recipe string of a GGUF file, or None when it has none (the header alone is read)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field(RECIPE_KEY)
    except Exception as error:  # gguf-py raises many kinds on a damaged file
        raise LlmqError(f"{path} is not a readable GGUF file ({reason(error)})") from None
    return None if field is None else field.contents()
