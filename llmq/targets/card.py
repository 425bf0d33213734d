"""The model card (README.md) of a quantized checkpoint, rendered from a run's report and the template beside
this file (model_card_template.md); and `llmq eval`'s line appended to it."""

from __future__ import annotations

import os
from pathlib import Path

from llmq.core.device import human_size
from llmq.core.errors import LlmqError
from llmq.targets.atomic import write_new_file
from llmq.targets.base import RunReport

# inside the package, so wheel, editable install and source checkout all find it (a wheel force-include of a file
# from outside the package made the editable install create a stray site-packages/llmq/ that shadowed llmq)
TEMPLATE = Path(__file__).parent / "model_card_template.md"
EVAL_MARKER = "<!-- llmq eval appends its measurements below -->"


def render_card(**fields) -> str:
    return TEMPLATE.read_text().format(**fields)


# How each client loads an output, by the card's format tag (the README's snippets, which tests/test_readme.py runs)
_TRANSFORMERS = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer  # {note}
model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```"""
_VLLM = """```bash
vllm serve {name}
```

```python
from vllm import LLM
llm = LLM("{name}")
```"""
_LLMQ = """```python
import llmq  # the weights kept packed (CPU int4 / CUDA W4A16 kernels), for evaluation
model = llmq.load("{name}", device="cpu")
```"""
USAGE = {
    "compressed-tensors": (_TRANSFORMERS, _VLLM, _LLMQ),
    "bitsandbytes": (_TRANSFORMERS, _LLMQ),
    "ternary": (_TRANSFORMERS, _LLMQ, "For llama.cpp: `llmq export-gguf {name} --out {name}.gguf`, then "
                                      "`llama-cli -m {name}.gguf`."),
    "safetensors": (_TRANSFORMERS, _VLLM),
}


def model_card(report: RunReport, size_after: int, **target_fields) -> str:
    """The card of a run: what every run reports, plus what the target says about its layout
    (bits, group_size, symmetric, act_order, mse, format_tag, summary, layout, loader_note). It follows the Hub's
    conventions for quantized models: base_model, base_model_relation, license (the base model's, when known),
    pipeline_tag, tags; usage for every client that loads the format."""
    name, note = report.out.name, target_fields.pop("loader_note")
    usage = "\n\n".join(part.format(name=name, note=note) for part in USAGE[target_fields["format_tag"]])
    return render_card(
        name=name, base_model=report.base_model, method=report.method, calibration=report.calibration,
        size_before=human_size(report.size_before), size_after=human_size(size_after),
        seconds=f"{report.seconds:.0f} s", device=report.device, dtype=report.dtype, usage=usage,
        license_line=f"license: {report.license}\n" if report.license else "", **target_fields)


def append_evaluation(directory: str | os.PathLike, line: str) -> bool:
    """Add one measurement line to an llmq card; False when the directory has no llmq card.

    The card is rewritten under a fresh name and renamed over the old one; a card that is a symbolic link is
    refused, never followed (a downloaded checkpoint must not make llmq write elsewhere).
    """
    card = Path(directory) / "README.md"
    if card.is_symlink():
        raise LlmqError(f"{card} is a symbolic link; llmq does not write through links")
    if not card.is_file() or EVAL_MARKER not in (text := card.read_text()):
        return False
    write_new_file(card, text.rstrip("\n") + f"\n- {line}\n")
    return True


def recorded_base_model(directory: str | os.PathLike) -> str | None:
    """The `base_model` an llmq model card names (a hub id, or the local checkpoint's directory name); None when the
    directory has no such card."""
    card = Path(directory) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---\n"):
        return None
    front = text[4:].split("\n---", 1)[0]
    for line in front.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "base_model" and value.strip():
            return value.strip()
    return None
