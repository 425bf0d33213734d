"""A new method is one class and one registry line, and then runs on every target.

The toy method here rounds each weight to the neighbouring grid integer whose value is smaller in magnitude
("toward zero"). It is written only against the Grid interface (llmq/core/interfaces.py), so the same class
writes a compressed-tensors checkpoint (integer groups) and a GGUF file (k-quant blocks, symmetric and
asymmetric). On a grid that holds 0 exactly (integer groups, Q8_0) no weight grows in magnitude; an
asymmetric block with an fp16 min (Q5_1) usually cannot hold 0, so there a weight between the two values
around 0 may cross it. The checks fail if the registry ignored the method (round-to-nearest grows about half
of the weights) or if a target did not carry its integers into the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import quants as gguf_quants
from transformers import AutoModelForCausalLM

import llmq
from llmq import QuantizeConfig, quantize
from llmq.cli import main
from llmq.core.interfaces import Method
from llmq.methods import METHODS
from llmq.runtime.modeling import QuantLinear
from llmq.targets.gguf.writer import gguf_name_map


class TowardZero(Method):
    name = "toward-zero"

    def quantize(self, weight, stats, grid):
        fit = grid.fit(weight)
        columns = torch.arange(weight.shape[1], device=weight.device)
        position = fit.position(weight, columns)
        low, high = fit.clamp(position.floor()), fit.clamp(position.ceil())
        take_low = fit.value(low, columns).abs() <= fit.value(high, columns).abs()
        return fit.result(torch.where(take_low, low, high))


@pytest.fixture
def toward_zero(monkeypatch):
    monkeypatch.setitem(METHODS, TowardZero.name, TowardZero)  # the one registry line


@pytest.fixture(scope="module")
def original(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def _errors_and_outward(pairs):
    """Total squared error and the count of weights whose quantized value is larger in magnitude than the weight."""
    error, outward = 0.0, 0
    for w, w_hat in pairs:
        error += (w_hat - w).pow(2).sum().item()
        outward += int((w_hat.abs() > w.abs() * (1 + 1e-6) + 1e-9).sum())
    return error, outward


def _checkpoint_pairs(directory, original):
    model = llmq.load(directory)
    return [(original.get_submodule(name).weight.detach(), module.dequantized_weight())
            for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def test_toy_method_writes_a_compressed_tensors_checkpoint(toward_zero, tiny_llama_dir, original, tmp_path):
    common = ["--group-size", "32", "--asym", "--device", "cpu"]
    assert main(["quantize", str(tiny_llama_dir), "--method", "toward-zero", *common, "--out", str(tmp_path / "toy")]) == 0
    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", *common, "--out", str(tmp_path / "rtn")]) == 0
    toy_error, toy_outward = _errors_and_outward(pairs := _checkpoint_pairs(tmp_path / "toy", original))
    rtn_error, rtn_outward = _errors_and_outward(_checkpoint_pairs(tmp_path / "rtn", original))
    assert len(pairs) == 14 and toy_outward == 0 and rtn_outward > 1000
    assert toy_error > 2 * rtn_error  # rounding toward zero is about 4x worse in squared error
    assert "| method | toward-zero |" in (tmp_path / "toy" / "README.md").read_text()


def _gguf_pairs(path, original, type_name: str):
    """(original, decoded) for every Linear of that GGUF type that llama.cpp keeps in its HF row order (attn_q
    and attn_k are permuted)."""
    name_of = gguf_name_map(original.config)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    pairs = []
    for name, module in original.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            tensor = tensors[name_of(f"{name}.weight")]
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")) or tensor.tensor_type.name != type_name:
                continue
            decoded = gguf_quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(module.weight.shape)
            pairs.append((module.weight.detach(), torch.from_numpy(np.ascontiguousarray(decoded))))
    return pairs


def test_toy_method_writes_a_gguf_file_llamacpp_runs(toward_zero, tiny_llama_dir, original, tmp_path):
    from llmq.eval.llamacpp import open_llama

    # Q5_K_M on 64/128-wide rows: Q5_1 (asymmetric, with a min) and Q8_0 (symmetric) blocks
    for name in ("toward-zero", "rtn"):
        quantize(str(tiny_llama_dir), tmp_path / f"{name}.gguf",
                 QuantizeConfig.of(method=name, format="gguf", gguf_type="Q5_K_M", device="cpu"))
    toy, rtn, weights = {}, {}, {}
    for type_name in ("Q8_0", "Q5_1"):
        toy[type_name] = _errors_and_outward(pairs := _gguf_pairs(tmp_path / "toward-zero.gguf", original, type_name))
        rtn[type_name] = _errors_and_outward(_gguf_pairs(tmp_path / "rtn.gguf", original, type_name))
        weights[type_name] = sum(w.numel() for w, _ in pairs)
        assert pairs and toy[type_name][0] > 2 * rtn[type_name][0], (type_name, toy, rtn)
    assert toy["Q8_0"][1] == 0 and rtn["Q8_0"][1] > 0.3 * weights["Q8_0"]
    assert toy["Q5_1"][1] < 0.05 * weights["Q5_1"] < 0.1 * rtn["Q5_1"][1]
    with open_llama(tmp_path / "toward-zero.gguf", n_ctx=64) as llm:
        assert len(llm("Hello", max_tokens=4, temperature=0)["choices"][0]["text"]) > 0


def test_unknown_method_lists_the_registry(capsys, tiny_llama_dir, tmp_path):
    listed = r"rtn, gptq, awq, bitnet, smoothquant, rotate, awq\+gptq, smoothquant\+gptq, rotate\+gptq"
    with pytest.raises(llmq.LlmqError, match=rf"unknown --method 'nope'; choose one of: {listed}"):
        quantize(str(tiny_llama_dir), tmp_path / "o", QuantizeConfig.of(method="nope"))
    with pytest.raises(llmq.LlmqError, match="only the last of the \\+-joined methods may round"):
        quantize(str(tiny_llama_dir), tmp_path / "o", QuantizeConfig.of(method="gptq+awq"))
