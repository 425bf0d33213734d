"""AWQ: folding keeps the float model unchanged; scaling and clipping lower the error of plain rounding."""

import pytest
import torch
from conftest import save_tiny_model, tiny_config
from torch import nn

from llmq import QuantizeConfig, quantize
from llmq.core.scheme import QuantScheme
from llmq.methods.awq import AWQ


def test_grouped_query_v_to_o_is_not_folded_but_multi_head_is():
    """Discovery tries v_proj -> o_proj and keeps it only where v makes one channel per o_proj input."""
    from transformers import AutoModelForCausalLM

    from llmq.calib.arch import decoder_layout

    for kv_heads, expected in ((2, None), (4, "self_attn.v_proj")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(num_key_value_heads=kv_heads), dtype=torch.float32)
        groups = decoder_layout(model.eval(), torch.device("cpu"), folds=True).maps[0].groups
        o_proj = next(g for g in groups if g.linears == ("self_attn.o_proj",))
        assert o_proj.prev == expected


def _llm_like_tiny_model(directory, tokenizer_dir):
    """A tiny Llama whose norms make a few input channels loud, as trained LLMs have."""
    from safetensors.torch import load_file, save_file

    save_tiny_model(directory, tokenizer_dir, seed=3)
    state = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for key in state:
        if key.endswith("layernorm.weight"):
            loud = torch.ones(state[key].shape)
            loud[torch.randperm(loud.numel(), generator=g)[:4]] = 30.0
            state[key] = (state[key].float() * loud).to(state[key].dtype)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_beats_round_to_nearest_on_a_model_with_loud_channels(method, tmp_path, smollm2_tokenizer_dir, calib_file):
    from transformers import AutoModelForCausalLM

    import llmq

    source = _llm_like_tiny_model(tmp_path / "src", smollm2_tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(5))
    errors = {}
    for name in ("rtn", method):
        config = QuantizeConfig.of(method=name, bits=3, group_size=32, symmetric=False, calib=str(calib_file),
                                samples=8, seqlen=64, device="cpu")
        quantize(str(source), tmp_path / name, config)
        with torch.no_grad():
            reference = base(ids).logits
            errors[name] = ((llmq.load(tmp_path / name)(ids).logits - reference).norm() / reference.norm()).item()
    assert errors[method] < 0.8 * errors["rtn"], errors


def test_clip_search_lowers_partial_output_error():
    scheme = QuantScheme(3, 32, True)
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    linear.weight.data = torch.randn(16, 64, generator=g) ** 3  # heavy tails: clipping pays
    x = torch.randn(256, 64, generator=g)
    original = linear.weight.data.clone()
    AWQ._clip(linear, x, scheme)
    from llmq.methods.awq import fake_quantize

    error = lambda w: (x @ (fake_quantize(w, scheme) - original).T).pow(2).sum().item()
    assert error(linear.weight.data) < 0.95 * error(original)
    assert (linear.weight.data.abs() <= original.abs() + 1e-6).all()


def test_stacked_candidate_errors_do_not_depend_on_chunking(monkeypatch):
    from llmq.methods import awq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    candidates = [w + 0.1 * torch.randn(8, 32, generator=g) for _ in range(5)]
    calls = [((), {}, torch.randn(2, 16, 32, generator=g))]
    whole = awq._linear_block_errors(w, candidates, calls)
    monkeypatch.setattr(awq, "STACKED_WEIGHTS", w.numel() * 2)  # two candidates per matmul
    chunked = awq._linear_block_errors(w, candidates, calls)
    expected = [((calls[0][2] @ (c - w).T) ** 2).sum().item() for c in candidates]
    assert whole == pytest.approx(chunked, rel=1e-5) and whole == pytest.approx(expected, rel=1e-4)
