"""Rotating the residual stream (llmq/methods/rotate.py): the float model computes the same function afterwards,
loud input channels are spread, the quantized checkpoint is a plain one that loaders run as the original, and
architectures whose stream is not rotation-invariant are refused in one line."""

import pytest
import torch
from conftest import save_tiny_model, tiny_config
from torch import nn

from llmq import QuantizeConfig, quantize
from llmq.calib.experts import unfuse_experts
from llmq.calib.models import causal_lm_class
from llmq.cli import main
from llmq.core.errors import LlmqError
from llmq.methods.rotate import random_rotation, rotate_model

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(5))


def _float_model(model_type="llama", loud=1.0, **overrides):
    """A tiny float32 model whose every norm has weights of its own, as trained models have (at init they are all
    equal, which would hide a norm left unfolded), a few of them `loud` times the rest; experts unfused."""
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    model = causal_lm_class(config).from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(weight, torch.Tensor) and weight.dim() == 1:
                weight.add_(0.3 * torch.randn(weight.shape, generator=g))
                weight[torch.randperm(weight.numel(), generator=g)[:4]] *= loud
                if isinstance(getattr(module, "bias", None), torch.Tensor):  # LayerNorm's
                    module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=g))
    unfuse_experts(model)
    return model


def _rotate(model):
    return rotate_model(model)


def test_random_rotation_is_orthogonal_and_seeded():
    Q = random_rotation(96)
    assert torch.allclose(Q @ Q.T, torch.eye(96, dtype=Q.dtype), atol=1e-12)
    assert torch.equal(Q, random_rotation(96)) and not torch.equal(Q, random_rotation(96, seed=1))
    kept = random_rotation(96, keep_mean=True)  # for LayerNorm: the all-ones direction maps to itself
    ones = torch.ones(96, dtype=kept.dtype)
    assert torch.allclose(kept @ kept.T, torch.eye(96, dtype=Q.dtype), atol=1e-12)
    assert torch.allclose(ones @ kept, ones, atol=1e-12) and torch.allclose(kept @ ones, ones, atol=1e-12)
    x = torch.randn(5, 96, dtype=kept.dtype)
    assert (x @ kept - x).abs().mean() > 0.5  # and it does rotate the rest


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(tie_word_embeddings=True)),  # the reference model's case: the head gets its own weight
    ("qwen2", {}),  # biases on q/k/v (readers: unchanged)
    *[(model_type, {}) for model_type in ("mistral", "qwen3", "phi3", "granite", "smollm3", "qwen2_5_vl")],
    ("qwen3_moe", {}),  # the router (its weight outside nn.Linear) and every expert's gate/up read the norm
    ("qwen2_moe", {}),  # a shared expert and its one-output gate read it too
    ("mixtral", dict(num_experts_per_tok=1)),  # experts that see only the tokens routed to them
    ("gpt_oss", {}),  # biases on the router and the experts (down's: rotated as a writer's)
    ("llama4_text", dict(num_experts_per_tok=1)),  # experts reading every token scaled by its router score
    ("deepseek_v3", {}),  # MLA (q_b_proj as wide as the stream here: inside the branch, not a writer), then MoE
    ("phi", {}),  # LayerNorm (a rotation keeping the ones direction), its bias kept in the norm as (b / w) Q
    ("gpt_neox", {}),  # LayerNorm, attention and MLP in parallel on two norms of one stream
    ("starcoder2", {}),  # LayerNorm, biases everywhere
    ("stablelm", {}),  # LayerNorm with a bias, Linears without: the bias must stay in the norm
    ("cohere", {}),  # LayerNorm without a bias, one norm for both branches
])
def test_rotation_leaves_the_float_model_unchanged(model_type, overrides):
    model = _float_model(model_type, loud=30.0, **overrides)
    with torch.no_grad():
        before = model(IDS).logits
        embeddings = model.get_input_embeddings().weight.clone()
        _rotate(model)
        after = model(IDS).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-4
    assert not torch.allclose(model.get_input_embeddings().weight, embeddings)  # it did rotate
    hidden = model.config.get_text_config().hidden_size
    for name, module in model.named_modules():
        if (name.endswith("layernorm") or name == "model.norm") and module.weight.shape == (hidden,):
            assert torch.all(module.weight == 1), name  # each stream norm's weight went into the Linears
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False


def test_rotation_spreads_loud_input_channels():
    """q/k/v's weights with the norm folded in: a few columns 30x the rest before; spread over all after."""
    model = _float_model(loud=30.0)
    attention, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    folded = attention.q_proj.weight.detach() * norm.weight.detach()
    peak = lambda W: (W.abs().amax() / W.pow(2).mean().sqrt()).item()
    _rotate(model)
    assert peak(attention.q_proj.weight.detach()) < peak(folded) / 2  # 11.9 -> 5.0 (a Gaussian matrix: ~4)


def test_gemma_norms_fold_with_their_offset():
    """Gemma computes x_hat * (1 + w): the multiplier 1 + w goes into the readers and w becomes 0 (gemma3_text's
    sandwich norms are the only thing refused in it, so they are given equal weights here, which do commute)."""
    model = _float_model("gemma3_text", loud=30.0)
    sandwich = [m for n, m in model.named_modules() if n.endswith(("post_attention_layernorm", "feedforward_layernorm"))]
    with torch.no_grad():
        for norm in sandwich:
            norm.weight.fill_(0.5)
        before = model(IDS).logits
        _rotate(model)
        after = model(IDS).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-4
    assert torch.all(model.model.layers[0].input_layernorm.weight == 0) and torch.all(model.model.norm.weight == 0)


@pytest.mark.parametrize("model_type, why", [
    ("gemma3_text", "a tensor no Linear reads"),  # sandwich norms on each branch's output
    ("glm4", "a tensor no Linear reads"),  # the same
    ("olmo2", "a tensor no Linear reads"),  # post-norm: its norms sit on the branch outputs
])
def test_streams_that_do_not_rotate_are_refused(model_type, why):
    model = _float_model(model_type)
    with pytest.raises(LlmqError, match=f"--method rotate: .*{why}"):
        _rotate(model)


def test_rotated_checkpoint_is_plain_and_runs_as_the_original(tmp_path, smollm2_tokenizer_dir, calib_file):
    """rotate+gptq writes a standard checkpoint (norms 1, the head untied) that transformers' config reads and
    llmq.load runs: at 8 bits its logits are the original model's within rounding, so every rotated tensor
    (embeddings, head, norms, the quantized Linears) reached the file. At 3 bits on a model with loud channels
    the rotation lowers the output error against plain GPTQ."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import llmq

    model_dir = save_tiny_model(tmp_path / "tied", smollm2_tokenizer_dir, loud_channels=20.0, tie_word_embeddings=True)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(IDS).logits
    errors = {}
    for method, bits in (("rotate+gptq", 8), ("rotate+gptq", 3), ("gptq", 3)):
        out = tmp_path / f"{method}-{bits}"
        quantize(str(model_dir), out, QuantizeConfig.of(method=method, bits=bits, group_size=32, symmetric=False,
                                                        calib=str(calib_file), samples=8, seqlen=64, device="cpu"))
        with torch.no_grad():
            logits = llmq.load(out, dtype=torch.float32)(IDS).logits
        errors[method, bits] = ((logits - reference).norm() / reference.norm()).item()
        if method.startswith("rotate") and bits == 8:
            assert AutoConfig.from_pretrained(out).tie_word_embeddings is False
            with safe_open(str(out / "model.safetensors"), "pt") as f:
                assert "lm_head.weight" in f.keys()
                assert torch.all(f.get_tensor("model.norm.weight") == 1)
                assert torch.all(f.get_tensor("model.layers.1.post_attention_layernorm.weight") == 1)
            assert "rotated" in (out / "README.md").read_text()
    assert errors["rotate+gptq", 8] < 0.02, errors
    assert errors["rotate+gptq", 3] < 0.8 * errors["gptq", 3], errors


def test_rotated_moe_checkpoint_runs_as_the_original(tmp_path, smollm2_tokenizer_dir, calib_file):
    """A MoE model through rotate+gptq at 8 bits: the rotated router (kept in 16 bits) and every expert reach the
    file, and llmq.load runs it as the original within rounding."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import llmq

    model_dir = save_tiny_model(tmp_path / "moe", smollm2_tokenizer_dir, model_type="qwen3_moe", loud_channels=20.0)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(IDS).logits
    out = tmp_path / "rotated"
    quantize(str(model_dir), out, QuantizeConfig.of(method="rotate+gptq", bits=8, group_size=32, symmetric=False,
                                                    calib=str(calib_file), samples=8, seqlen=64, device="cpu"))
    with torch.no_grad():
        logits = llmq.load(out, dtype=torch.float32)(IDS).logits
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02
    router = "model.layers.0.mlp.gate.weight"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as before, safe_open(str(out / "model.safetensors"), "pt") as after:
        assert after.get_tensor(router).dtype == torch.bfloat16
        assert not torch.allclose(after.get_tensor(router).float(), before.get_tensor(router).float(), atol=1e-3)


def test_rotate_refusal_is_one_line(tmp_path, smollm2_tokenizer_dir, capsys):
    model_dir = save_tiny_model(tmp_path / "olmo2", smollm2_tokenizer_dir, model_type="olmo2")  # q/k/v read the raw stream
    code = main(["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--method", "rotate+gptq", "--bits", "4",
                 "--group-size", "32", "--device", "cpu", "--samples", "4", "--seqlen", "32"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--method rotate" in lines[-1] and "not rotation-invariant" in lines[-1], lines
    assert not (tmp_path / "o").exists()
