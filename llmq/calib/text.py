"""Calibration and evaluation text: local files, hub datasets, or text the model writes itself.

Calibration samples are `samples` non-overlapping windows of `seqlen` tokens, drawn at random (fixed seed)
from the tokenized text, so no token is seen twice.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from llmq.core import log
from llmq.core.config import DATA_FREE_WINDOWS, TEXT_WINDOWS
from llmq.core.errors import LlmqError
from llmq.core.timing import stage_clock

# Hub datasets reachable by a short name: (path, config, split, text field).
HUB_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "pile-val": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
}
HUB_EVAL_DATASETS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")}


# What a run reads of a text file at most: 64 M characters are ~16 M tokens, hundreds of times what calibration
# (128 x 512 tokens) or an evaluation (wikitext2 test: 0.3 M tokens) uses. A larger file is cut there, said in a line.
MAX_TEXT_CHARS = 64 << 20


def read_text_file(path: str | os.PathLike, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A .txt file's text, or a .jsonl file's "text" fields joined by blank lines; at most `max_chars` of it.

    Only a regular file is read: a device (/dev/zero never ends) or a FIFO (blocks until a writer comes) is refused
    before it is opened. Line ends are read as "\n" (Python's text mode): on a CRLF file this is not the token
    stream llama.cpp's tools score (they read bytes), so llmq's perplexity of such a file is not comparable with
    llama-perplexity's.
    """
    path = Path(path)
    check_text_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read(max_chars + 1)
        if len(raw) > max_chars:
            raw = raw[: raw.rfind("\n", 0, max_chars) + 1 or max_chars]
            log.info(f"llmq: {path} is longer than {max_chars >> 20} M characters; reading its first "
                     f"{len(raw) >> 20} M (far more than calibration or evaluation uses)")
    except FileNotFoundError:
        raise LlmqError(f"text file {path} does not exist; pass an existing .txt or .jsonl file") from None
    except (UnicodeDecodeError, OSError) as error:
        raise LlmqError(f"cannot read text file {path} ({error.__class__.__name__}); pass a UTF-8 .txt or .jsonl file") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise LlmqError(f'{path}:{number} is not a JSON object with a "text" string; fix that line')
        texts.append(text)
    return "\n\n".join(texts)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: checked once up front, so being offline costs 3 s, not minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_text(name: str, table: dict = HUB_DATASETS, max_chars: int | None = None) -> str:
    """Text of a named hub dataset, through the `datasets` library (needs network access)."""
    if not hub_reachable():
        raise LlmqError(f"dataset {name!r} cannot be downloaded: the Hugging Face hub is unreachable; pass a local text file")
    try:
        import datasets
    except ImportError:
        raise LlmqError(
            f"dataset {name!r} needs the `datasets` package: pip install datasets, or pass a local text file"
        ) from None
    path, config, split, field = table[name]
    try:
        if name == "c4":  # one shard is plenty and avoids downloading the whole corpus
            rows = datasets.load_dataset(path, data_files={split: "en/c4-validation.00000-of-00008.json.gz"}, split=split)
        else:
            rows = datasets.load_dataset(path, config, split=split)
    except Exception as error:  # network, auth, missing dataset: all mean "cannot use this source"
        raise LlmqError(f"could not load dataset {name!r} ({error.__class__.__name__}); pass a local text file instead") from None
    texts, total = [], 0
    for text in rows[field]:
        texts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(texts)


def check_text_file(path: Path) -> None:
    """Refuse, before anything opens it, a path that is not a regular file: a device (/dev/zero never ends), a FIFO
    (blocks until a writer comes) or a directory."""
    if os.path.lexists(path) and not path.is_file():
        raise LlmqError(f"{path} is not a regular file (a directory, device or pipe); pass a .txt or .jsonl file")


def check_text_source(source: str, datasets: dict, flag: str) -> None:
    """Fail before any model is loaded when a text source names neither a readable file nor a known dataset."""
    if source in datasets and not os.path.lexists(source):
        return
    if not os.path.lexists(source):
        names = ", ".join(datasets)
        raise LlmqError(f"{flag} {source!r} is neither a file nor a dataset name ({names}); pass a .txt/.jsonl file")
    check_text_file(Path(source))


def check_calib_source(source: str) -> None:
    """Fail before any model is loaded when --calib names neither a file nor a known dataset."""
    check_text_source(source, HUB_DATASETS, "--calib")


def calibration_text(source: str) -> str:
    """`source` is a path to a .txt/.jsonl file or a dataset name from HUB_DATASETS."""
    check_calib_source(source)
    if source in HUB_DATASETS and not Path(source).exists():
        return load_hub_text(source, max_chars=20_000_000)
    return read_text_file(source)


def evaluation_text(source: str) -> str:
    if source in HUB_EVAL_DATASETS and not Path(source).exists():
        return load_hub_text(source, HUB_EVAL_DATASETS)
    return read_text_file(source)


def sample_windows(token_ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` distinct non-overlapping windows of `seqlen` tokens, chosen at random: [samples, seqlen]."""
    available = token_ids.numel() // seqlen
    if available < samples:
        raise LlmqError(
            f"calibration text has {token_ids.numel():,} tokens, too few for {samples} samples of {seqlen} "
            f"tokens ({samples * seqlen:,} needed); give more text or lower --samples/--seqlen"
        )
    windows = token_ids[: available * seqlen].reshape(available, seqlen)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:samples]
    return windows[chosen.sort().values]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added between documents)."""
    if not text.strip():
        raise LlmqError("the text is empty; pass a file with text in it")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


class _TokenProgress(BaseStreamer):
    """A generation streamer that only moves a progress bar: generate() hands it the prompt, then the new tokens
    of every sequence ([batch] per step, or [batch, steps] when it defers)."""

    def __init__(self, bar):
        self.bar, self.prompt_seen = bar, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.bar.update(value.numel())

    def end(self) -> None:
        self.bar.close()


@torch.no_grad()
def self_generated_samples(model, tokenizer, samples: int, seqlen: int, device, seed: int = 0,
                           cache: str = "static") -> torch.Tensor:
    """Data-free calibration: let the model write `samples` sequences of `seqlen` tokens from its BOS token.

    cache "static": transformers' preallocated KV cache of `seqlen` positions (no growing tensors: each step
    attends over the same shapes); "dynamic": the growing default (scripts/first_run_options.py times both)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    model.to(device)
    bar = log.progress(total=samples * (seqlen - 1), desc=f"data-free calibration: {samples} texts", unit="token")
    try:
        start = torch.full((samples, 1), bos, dtype=torch.long, device=device)
        out = model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=True, top_k=50,
            max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=tokenizer.eos_token_id,
            streamer=_TokenProgress(bar), cache_implementation=None if cache == "dynamic" else cache,
        )
    finally:
        bar.close()
        model.to("cpu")
    return out[:, :seqlen].cpu()


def check_token_ids(ids: torch.Tensor, rows: int, model: str = "model") -> None:
    """Token ids the embedding has no row for (a tokenizer from another model, or a damaged tokenizer.json) are one
    line, before any forward pass."""
    if ids.numel() and int(ids.max()) >= rows:
        raise LlmqError(f"the tokenizer gives token id {int(ids.max())} but the {model}'s embedding has {rows} rows: "
                        "tokenizer and model do not belong together; give the model's own tokenizer")


def calibration_samples(model, tokenizer, source: str | None, samples: int | None, seqlen: int | None,
                        device) -> tuple[torch.Tensor, str]:
    """Token windows for calibration and a one-line description of where they came from.

    With no source, try the wikitext2 training split from the hub; when it cannot be had (offline, no
    `datasets`), fall back to text the model samples itself, and say so. samples / seqlen None: the defaults of
    each (TEXT_WINDOWS, DATA_FREE_WINDOWS).
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if context and seqlen is not None and seqlen > context:
        log.info(f"calibration: --seqlen {seqlen} is longer than the model's context ({context} positions); "
                 "positions past it are ones the model was never trained on")
    if source is None:
        try:
            text = calibration_text("wikitext2")
            description = "wikitext2 (train)"
        except LlmqError:
            samples, seqlen = samples or DATA_FREE_WINDOWS[0], seqlen or DATA_FREE_WINDOWS[1]
            if context and seqlen > context:  # generating past the context would take long and mean little
                log.info(f"calibration: data-free windows capped at the model's context, {context} tokens")
                seqlen = context
            log.info(f"calibration: no --calib given and no dataset reachable; calibrating on {samples} x {seqlen} "
                     "tokens sampled from the model itself (data-free)")
            with stage_clock("data-free text"):
                made = self_generated_samples(model, tokenizer, samples, seqlen, device)
            return made, "data-free (model-generated)"
    else:
        text = calibration_text(source)
        description = source if source in HUB_DATASETS else Path(source).name
    samples, seqlen = samples or TEXT_WINDOWS[0], seqlen or TEXT_WINDOWS[1]
    ids = tokenize_text(tokenizer, text)
    rows = model.get_input_embeddings().num_embeddings
    check_token_ids(ids, rows)
    return sample_windows(ids, samples, seqlen), description
