"""BitNet ternary: absmean ternary maths, straight-through fine-tuning, transformers' native BitNet layout
(loaded by transformers in a fresh process), GGUF TQ1_0/TQ2_0 run by llama.cpp, and import of an existing
BitNetForCausalLM checkpoint."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, tiny_config
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmq
from llmq import QuantizeConfig, quantize
from llmq.core.errors import LlmqError
from llmq.export import export_bitnet_gguf
from llmq.methods.bitnet import (
    TernaryLinear,
    quantize_activations,
    ternarize_model,
    ternary_modules,
    trainable_parameters,
)
from llmq.methods.grids.ternary import TernaryScheme, absmean_scale, ternary_codes
from llmq.methods.qat import QATConfig, distill, save_loss_curve, training_windows
from llmq.targets import bitnet as bitnet_hf

PROMPT = "The capital of France is"


def _rows_scaled_weight(rows=64, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    return w * torch.logspace(-1, 1, rows).reshape(rows, 1)  # rows two decades apart, as channels differ


# ---- the ternary maths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_absmean_ternary_follows_the_formula(granularity):
    w = _rows_scaled_weight()
    scheme = TernaryScheme(granularity, group_size=128)
    gamma = absmean_scale(w, scheme)
    codes = ternary_codes(w, gamma)
    # independent computation of BitNet b1.58's formula on one row / group
    if granularity == "tensor":
        expect_gamma = w.abs().mean()
        assert gamma.shape == (1, 1) and torch.allclose(gamma[0, 0], expect_gamma)
    elif granularity == "channel":
        assert torch.allclose(gamma[5, 0], w[5].abs().mean())
    else:
        assert gamma.shape == (64, 4) and torch.allclose(gamma[7, 2], w[7, 256:384].abs().mean())
    g = gamma.repeat_interleave(w.shape[1] // gamma.shape[1], dim=1) if gamma.shape[1] > 1 else gamma
    expected_codes = torch.clamp(torch.round(w / g), -1, 1)
    assert torch.equal(codes.float(), expected_codes)
    assert set(codes.unique().tolist()) == {-1, 0, 1}


def test_finer_scales_reconstruct_better():
    w = _rows_scaled_weight()
    errors = {}
    for granularity in ("tensor", "channel", "group"):
        module = TernaryLinear.from_linear(_linear(w), TernaryScheme(granularity, 64))
        errors[granularity] = ((module.dequantized_weight() - w).norm() / w.norm()).item()
    # per-tensor gamma zeroes the small rows entirely; per channel fits each row (BitNet's ~0.5 error level)
    assert errors["tensor"] > 0.75 and errors["channel"] < 0.6 and errors["group"] <= errors["channel"] + 1e-6


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return linear


def test_activation_quantization_is_per_token_int8_with_straight_through_gradient():
    x = torch.randn(3, 5, 64, requires_grad=True)
    q = quantize_activations(x)
    scale = 127 / x.detach().abs().amax(-1, keepdim=True)
    steps = q.detach() * scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4
    assert (q.detach() - x.detach()).abs().max() <= (0.5 / scale).max() + 1e-6
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_straight_through_gradient_reaches_latent_weight():
    w = _rows_scaled_weight(16, 64)
    module = TernaryLinear.from_linear(_linear(w), TernaryScheme())
    x = torch.randn(4, 64)
    upstream = torch.randn(4, 16)
    (module(x) * upstream).sum().backward()
    # d/dW of (x_q W_q^T) . g with W_q's rounding passed straight through is g^T x_q
    assert torch.allclose(module.weight.grad, upstream.T @ quantize_activations(x), atol=1e-5)


def test_frozen_forward_equals_latent_forward_and_keeps_no_float_weight():
    w = _rows_scaled_weight(16, 64)
    module = TernaryLinear.from_linear(_linear(w), TernaryScheme())
    x = torch.randn(4, 64)
    with torch.no_grad():
        latent = module(x)
        module.freeze()
        frozen = module(x)
    assert module.weight is None and module.codes.dtype == torch.int8
    assert torch.allclose(latent, frozen, rtol=1e-5, atol=1e-6)


# ---- transformers' native layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [64, 12])
def test_pack_matches_transformers_and_round_trips(rows):
    from transformers.integrations.bitnet import pack_weights

    codes = torch.randint(-1, 2, (rows, 40), generator=torch.Generator().manual_seed(rows), dtype=torch.int8)
    ours = bitnet_hf.pack_ternary(codes)
    assert torch.equal(ours, pack_weights(codes.clone().to(torch.int32)))
    assert torch.equal(bitnet_hf.unpack_ternary(ours, rows), codes)


def _make_ternary(model) -> None:
    """Every decoder Linear of an in-memory model ternary (absmean per tensor) and frozen, in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ternarize_model(model, names, TernaryScheme())
    for module in ternary_modules(model).values():
        module.freeze()


def _ternary_results(model) -> dict:
    return {name: module.quantized() for name, module in ternary_modules(model).items()}


def _tiny_ternary(tokenizer_dir, **overrides):
    """A random tiny Llama made ternary (post-training), frozen; and its tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **overrides), dtype=torch.bfloat16)
    _make_ternary(model)
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


_LOAD_IN_TRANSFORMERS = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert type(model.model.layers[0].mlp.down_proj).__name__ == "BitLinear", type(model.model.layers[0].mlp.down_proj)
ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 2536, 30, 378]])
with torch.no_grad():
    save_file({"logits": model(ids).logits[0].contiguous()}, sys.argv[2])
"""


def test_transformers_loads_native_checkpoint_in_fresh_process_with_llmq_logits(smollm2_tokenizer_dir, tmp_path):
    model, tokenizer = _tiny_ternary(smollm2_tokenizer_dir)
    out = tmp_path / "ternary"
    out.mkdir()
    bitnet_hf.write_checkpoint(out, model, tokenizer, _ternary_results(model))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (64 // 4, 128)

    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 2536, 30, 378]])
    with torch.no_grad():
        ours = model.float()(ids).logits[0]
    logits_file = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", _LOAD_IN_TRANSFORMERS, str(out), str(logits_file)], check=True,
                   capture_output=True, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})  # compiling adds 25 s
    theirs = load_file(logits_file)["logits"]
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())
    # llmq reads the same checkpoint back to the same model
    with torch.no_grad():
        again = llmq.load(out)(ids).logits[0]
    assert torch.equal(again, ours)


def test_bitnet_cli_writes_checkpoint_and_refuses_what_the_layout_cannot_hold(tiny_llama_dir, tmp_path):
    result = quantize(str(tiny_llama_dir), tmp_path / "t", QuantizeConfig.of(method="bitnet", device="cpu"))
    state = load_file(tmp_path / "t" / "model.safetensors")
    assert state["model.layers.1.self_attn.q_proj.weight"].dtype == torch.uint8  # 2 bits per weight
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (64 // 4, 64)
    assert state["model.layers.1.self_attn.q_proj.weight_scale"].shape == (1,)
    assert result.size_after < result.size_before
    with pytest.raises(LlmqError, match="one scale per tensor"):
        quantize(str(tiny_llama_dir), tmp_path / "c", QuantizeConfig.of(method="bitnet", ternary_scale="channel"))
    with pytest.raises(LlmqError, match="one scale per 256 weights"):
        quantize(str(tiny_llama_dir), tmp_path / "g.gguf", QuantizeConfig.of(method="bitnet", format="gguf", gguf_type="TQ2_0",
                                                                          ternary_scale="group", group_size=128))
    with pytest.raises(LlmqError, match="not Q4_K_M; pass --type TQ2_0"):
        quantize(str(tiny_llama_dir), tmp_path / "c.gguf", QuantizeConfig.of(method="bitnet", format="gguf",
                                                                             gguf_type="Q4_K_M"))
    with pytest.raises(LlmqError, match="holds ternary weights; quantize with --method bitnet"):
        quantize(str(tiny_llama_dir), tmp_path / "r.gguf", QuantizeConfig.of(method="rtn", format="gguf", gguf_type="TQ2_0"))
    with pytest.raises(LlmqError, match="--qat-steps needs --calib"):
        quantize(str(tiny_llama_dir), tmp_path / "q", QuantizeConfig.of(method="bitnet", qat_steps=2))
    for name in ("c", "c.gguf", "g.gguf", "r.gguf", "q"):
        assert not (tmp_path / name).exists()


# ---- ternary-aware fine-tuning ---------------------------------------------------------------------------------


def test_distillation_recovers_the_teacher(smollm2_tokenizer_dir, calib_file, tmp_path):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ternarize_model(student, names, TernaryScheme())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = tokenizer(calib_file.read_text(), return_tensors="pt").input_ids[0]
    windows = training_windows(ids, 64)
    held_out, train = windows[:4], windows[4:]

    def kl() -> float:
        with torch.no_grad():
            p = torch.log_softmax(teacher(held_out).logits, -1)
            q = torch.log_softmax(student(held_out).logits, -1)
        return torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item() / held_out.shape[1]

    before = kl()
    result = distill(student, teacher, train, QATConfig(steps=40, lr=1.5e-3, batch_size=4, seqlen=64), torch.device("cpu"),
                     trainable_parameters(student))
    after = kl()
    assert after < 0.5 * before, (before, after)
    assert all(p.requires_grad is False for p in student.parameters())
    curve = save_loss_curve(result, tmp_path / "loss.png", "test")
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(curve.with_suffix(".json").read_text())["kl_per_step"]) == 40


def test_qat_through_quantize_saves_loss_curve(tiny_llama_dir, calib_file, tmp_path):
    out = tmp_path / "qat"
    config = QuantizeConfig.of(method="bitnet", qat_steps=3, qat_batch=2, qat_seqlen=32, calib=str(calib_file), device="cpu")
    result = quantize(str(tiny_llama_dir), out, config)
    assert (out / "qat_loss.png").exists() and "3 steps of ternary-aware distillation" in result.calibration


# ---- GGUF TQ1_0 / TQ2_0 in llama.cpp ----------------------------------------------------------------------------

def _greedy_llmq(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def _greedy_llamacpp(path, ids, n):
    from llmq.eval.llamacpp import open_llama

    with open_llama(path, n_ctx=64) as llm:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            out.append(token)
            if len(out) == n:
                return out
    return out


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_tq_files_give_llmq_greedy_tokens_in_llamacpp(qtype, smollm2_tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    # rows of 256 and 512: every ternary matrix is TQ (no fallback); a 0.1 init makes the random logits peaked
    source = save_tiny_model(tmp_path / "float", smollm2_tokenizer_dir, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.1,
                             tie_word_embeddings=True)
    # the same ternary model twice: transformers' layout, run by llmq, and a GGUF file, run by llama.cpp
    quantize(str(source), tmp_path / "ternary", QuantizeConfig.of(method="bitnet", device="cpu"))
    out = tmp_path / f"m-{qtype}.gguf"
    quantize(str(source), out, QuantizeConfig.of(method="bitnet", format="gguf", gguf_type=qtype, device="cpu"))
    model = llmq.load(tmp_path / "ternary", dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(source)(PROMPT, return_tensors="pt").input_ids
    expected = _greedy_llmq(model, ids, 12)
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == T[qtype]
    assert types["token_embd.weight"] == T.Q6_K  # tied: llama.cpp's output rule
    assert len(set(expected)) > 6  # a varied continuation, not one repeated token
    assert _greedy_llamacpp(out, ids[0].tolist(), 12) == expected


def test_tq_fallback_rows_are_q4_0_and_still_ternary(tiny_llama_dir, tmp_path):
    # 64-wide rows: not a multiple of 256, so llama.cpp's fallback (Q4_0) holds them, exactly up to fp16
    out = tmp_path / "t.gguf"
    quantize(str(tiny_llama_dir), out, QuantizeConfig.of(method="bitnet", format="gguf", gguf_type="TQ1_0", device="cpu"))
    reader = GGUFReader(out)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    assert tensor.tensor_type == T.Q4_0
    from gguf import quants

    values = quants.dequantize(np.asarray(tensor.data), T.Q4_0)
    for row in values:
        levels = np.unique(np.abs(row[row != 0]))
        assert np.allclose(levels, levels.max(), rtol=2e-3)  # one magnitude per row: gamma


# ---- importing an existing BitNet b1.58 checkpoint ----------------------------------------------------------------


def _bitnet_checkpoint(directory, tokenizer_dir, hidden_act="silu"):
    """A small random BitNetForCausalLM (sub-norms included) in transformers' packed layout."""
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(1)
    config = BitNetConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act,
                          tie_word_embeddings=True, initializer_range=0.1, max_position_embeddings=256)
    model = BitNetForCausalLM(config).to(torch.bfloat16)
    for norm in [m for n, m in model.named_modules() if n.endswith("sub_norm")]:
        norm.weight.data.uniform_(0.5, 1.5)  # not all ones, so a dropped or misplaced sub-norm shows
    _make_ternary(model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    directory.mkdir()
    bitnet_hf.write_checkpoint(directory, model, tokenizer, _ternary_results(model))
    return directory


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_import_bitnet_checkpoint_to_tq_runs_in_llamacpp_like_transformers(qtype, smollm2_tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from llmq.eval.llamacpp import open_llama

    source = _bitnet_checkpoint(tmp_path / "bitnet", smollm2_tokenizer_dir)
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in load_file(source / "model.safetensors")
    out = tmp_path / "b.gguf"
    export_bitnet_gguf(source, out, qtype)
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "bitnet"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_sub_norm.weight"] == T.F32 and types["blk.1.ffn_sub_norm.weight"] == T.F32
    assert types["blk.0.ffn_down.weight"] == T[qtype]

    # transformers' own BitNet model on the checkpoint (BitLinear: the same int8 activations llama.cpp approximates)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 2536]])
    with torch.no_grad():
        expected = reference(ids).logits[0].numpy()
    with open_llama(out, n_ctx=64, logits_all=True) as llm:
        llm.eval(ids[0].tolist())
        got = np.array(llm.scores[: ids.shape[1]])
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.75
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


def test_import_refuses_what_llamacpp_would_run_wrongly(smollm2_tokenizer_dir, tmp_path):
    source = _bitnet_checkpoint(tmp_path / "relu2", smollm2_tokenizer_dir, hidden_act="relu2")
    with pytest.raises(LlmqError, match="uses relu2"):
        export_bitnet_gguf(source, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_damaged_bitnet_checkpoint_is_one_line_error(smollm2_tokenizer_dir, tmp_path):
    source = _bitnet_checkpoint(tmp_path / "bn", smollm2_tokenizer_dir)
    state = load_file(source / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].float()
    save_file(state, source / "model.safetensors")
    with pytest.raises(LlmqError, match="not a packed ternary tensor"):
        bitnet_hf.load_bitnet(source)


def test_gradient_checkpointing_trains_the_same_weights(smollm2_tokenizer_dir):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    windows = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(2))
    students = []
    for checkpointing in (False, True):
        student = copy.deepcopy(teacher)
        names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        ternarize_model(student, names, TernaryScheme())
        config = QATConfig(steps=3, lr=1e-3, batch_size=2, seqlen=32, autocast=False, gradient_checkpointing=checkpointing)
        students.append((distill(student, teacher, windows, config, torch.device("cpu"), trainable_parameters(student)),
                         student))
    (plain, a), (checkpointed, b) = students
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-5)
    wa = a.model.layers[1].mlp.down_proj.weight
    assert torch.allclose(wa, b.model.layers[1].mlp.down_proj.weight, atol=1e-6)
    assert not torch.equal(wa, teacher.model.layers[1].mlp.down_proj.weight)  # it did train
