"""AWQ: folding keeps the float model unchanged; scaling and clipping lower the error of plain rounding."""

import pytest
import torch
from conftest import save_tiny_model, tiny_config
from torch import nn

from llmq import QuantizeConfig, quantize
from llmq.calib.arch import LAYER_MAPS, layer_map_for
from llmq.core.scheme import QuantScheme
from llmq.methods.awq import AWQ, _can_fold, fold_scales


@pytest.mark.parametrize("model_type", sorted(LAYER_MAPS))
def test_folding_alone_leaves_logits_unchanged(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    for param in model.parameters():  # random norms too, so the Gemma (1 + w) convention matters
        param.data.normal_(0, 0.3)
    layer_map = layer_map_for(model_type)
    ids = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        before = model(ids).logits
        folded = 0
        for layer in model.get_submodule(layer_map.layers):
            for group in layer_map.groups:
                linears = [layer.get_submodule(name) for name in group.linears]
                prev = layer.get_submodule(group.prev) if group.prev else None
                if _can_fold(prev, linears[0].in_features, group.prev_rows):
                    scales = torch.rand(linears[0].in_features) * 4 + 0.25
                    fold_scales(prev, linears, scales, layer_map.norm_offset, group.prev_rows)
                    folded += 1
        after = model(ids).logits
    assert folded >= 2 * 2  # at least the two norm-fed groups and down_proj in each of the 2 layers
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


def test_grouped_query_v_to_o_is_not_folded():
    v = nn.Linear(64, 32, bias=False)  # 2 kv heads of 16 feed 4 query heads: o_proj reads 64 channels
    assert not _can_fold(v, 64, "all")
    assert _can_fold(nn.Linear(64, 64), 64, "all")
    assert _can_fold(nn.Linear(64, 128), 64, "second_half")


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
