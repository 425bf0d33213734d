"""The model card (README.md) of a quantized checkpoint, from the template in model_cards/."""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = (
    Path(__file__).parent / "model_card_template.md",  # installed wheel (force-included)
    Path(__file__).parents[1] / "model_cards" / "template.md",  # source checkout / editable install
)
EVAL_MARKER = "<!-- llmq eval appends its measurements below -->"


def render_card(**fields) -> str:
    template = next((p for p in _CANDIDATES if p.exists()), None)
    if template is None:
        return f"# {fields['name']}\n\nQuantized with llmq: {fields}\n\n## Evaluation\n\n{EVAL_MARKER}\n"
    return template.read_text().format(**fields)


def append_evaluation(directory: str | os.PathLike, line: str) -> bool:
    """Add one measurement line to an llmq card; False when the directory has no llmq card."""
    card = Path(directory) / "README.md"
    if not card.exists() or EVAL_MARKER not in (text := card.read_text()):
        return False
    tmp = card.with_name(".README.md.partial")
    tmp.write_text(text.rstrip("\n") + f"\n- {line}\n")
    os.replace(tmp, card)
    return True


def human_size(n_bytes: float) -> str:
    """Decimal units, as file browsers and the hub show sizes."""
    for unit in ("B", "KB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"
