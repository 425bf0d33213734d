"""Rotating the residual stream (llmq/methods/rotate.py): the float model computes the same function afterwards,
loud input channels are spread, the quantized checkpoint is a plain one that loaders run as the original, and
architectures whose stream is not rotation-invariant are refused in one line."""

import pytest
import torch
from conftest import save_tiny_model, tiny_config

from llmq import QuantizeConfig, quantize
from llmq.calib.arch import decoder_layout, quantizable_linears
from llmq.calib.models import causal_lm_class
from llmq.cli import main
from llmq.core.errors import LlmqError
from llmq.methods.rotate import random_rotation, rotate_model

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(5))


def _float_model(model_type="llama", loud=1.0, **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    model = causal_lm_class(config).from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():  # a few loud channels in every norm, as trained LLMs have
        if name.endswith("layernorm") and loud != 1.0:
            module.weight.data[torch.randperm(module.weight.numel(), generator=g)[:4]] *= loud
    return model


def _rotate(model):
    layout = decoder_layout(model, torch.device("cpu"), folds=True)
    layout = layout.only(quantizable_linears(model, layout))
    rotate_model(model, layout, random_rotation(model.config.get_text_config().hidden_size).float())


def test_random_rotation_is_orthogonal_and_seeded():
    Q = random_rotation(96)
    assert torch.allclose(Q @ Q.T, torch.eye(96, dtype=Q.dtype), atol=1e-12)
    assert torch.equal(Q, random_rotation(96)) and not torch.equal(Q, random_rotation(96, seed=1))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(tie_word_embeddings=True)),  # the reference model's case: the head gets its own weight
    ("qwen2", {}),  # biases on q/k/v (readers: unchanged)
    ("gemma3_text", {}),  # norms computing x * (1 + w): folded with offset 1
])
def test_rotation_leaves_the_float_model_unchanged(model_type, overrides):
    model = _float_model(model_type, loud=30.0, **overrides)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        before = model(IDS).logits
        embeddings = model.get_input_embeddings().weight.clone()
        _rotate(model)
        after = model(IDS).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-4
    assert not torch.allclose(model.get_input_embeddings().weight, embeddings)  # it did rotate
    offset = 1.0 if model_type == "gemma3_text" else 0.0
    for name, module in model.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            assert torch.all(module.weight + offset == 1), name  # each norm's weight went into the Linears
    assert tied or model_type == "qwen2"
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


@pytest.mark.parametrize("model_type", ["phi", "qwen3_moe"])
def test_streams_that_do_not_rotate_are_refused(model_type):
    """phi: LayerNorm with a bias; qwen3_moe: the MLP's norm also feeds the (unrotated) router."""
    with pytest.raises(LlmqError, match="--method rotate"):
        _rotate(_float_model(model_type))


def test_rotated_checkpoint_is_plain_and_runs_as_the_original(tmp_path, smollm2_tokenizer_dir, calib_file):
    """rotate+gptq writes a standard checkpoint (norms 1, the head untied) that transformers' config reads and
    llmq.load runs: at 8 bits its logits are the original model's within rounding, so every rotated tensor
    (embeddings, head, norms, the quantized Linears) reached the file. At 3 bits on a model with loud channels
    the rotation lowers the output error against plain GPTQ."""
    import llmq
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

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


def test_rotate_refusal_is_one_line(tmp_path, smollm2_tokenizer_dir, capsys):
    model_dir = save_tiny_model(tmp_path / "phi", smollm2_tokenizer_dir, model_type="phi")
    code = main(["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--method", "rotate+gptq", "--bits", "4",
                 "--group-size", "32", "--device", "cpu", "--samples", "4", "--seqlen", "32"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--method rotate" in lines[-1] and "bias" in lines[-1], lines
    assert not (tmp_path / "o").exists()
