"""The CLI end to end on a tiny random Llama: quantize, load in a fresh transformers process, load packed, eval."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import llmq
from llmq.cli import main
from llmq.runtime.modeling import QuantLinear

# Loaded in the checkpoint's own dtype (bf16): every loader then holds exactly the same weights.
FRESH_PROCESS_CHECK = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_llama_dir, calib_file):
    out = tmp_path_factory.mktemp("out") / "tiny-gptq"
    code = main([
        "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym",
        "--act-order", "--calib", str(calib_file), "--samples", "8", "--seqlen", "64", "--device", "cpu",
        "--out", str(out),
    ])
    assert code == 0
    return out


def test_checkpoint_layout(gptq_dir):
    names = {p.name for p in gptq_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not [p for p in gptq_dir.parent.iterdir() if ".partial-" in p.name]
    config = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["format"], weights["num_bits"], weights["group_size"], weights["symmetric"], weights["actorder"]) == (
        "pack-quantized", 4, 32, False, "weight")
    assert config["ignore"] == ["lm_head"]
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(config)  # what vLLM and transformers parse it with
    assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].weights.actorder == "weight"
    with safe_open(gptq_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        zero = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 * 4 // 32)
    assert zero.dtype == torch.int32 and zero.shape == (64 * 4 // 32, 128 // 32)
    card = (gptq_dir / "README.md").read_text()
    assert "| method | gptq |" in card and "| group size | 32 |" in card and "calib.txt, 8 x 64 tokens" in card
    assert "first token of each window x16 in GPTQ's Hessian" in card


def assert_fresh_transformers_process_matches(directory, tmp_path):
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(directory), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    transformers_logits = torch.load(tmp_path / "logits.pt").float()
    model = llmq.load(directory, device="cpu", dtype=torch.bfloat16)
    assert isinstance(model.model.layers[1].self_attn.k_proj, QuantLinear)
    with torch.no_grad():
        ours = model(ids).logits.float()
        exact = llmq.load(directory, device="cpu", dtype=torch.float32)(ids).logits
    # Both run in bf16 but round differently: transformers dequantizes and runs a bf16 GEMM, llmq's CPU path
    # (<= 128 rows) is torch's int4 kernel. llmq must be at least as close to the float32 result as
    # transformers is, and the two within bf16 noise of each other.
    error = lambda logits: ((logits - exact).norm() / exact.norm()).item()
    assert error(ours) <= 1.25 * error(transformers_logits) + 1e-4, (error(ours), error(transformers_logits))
    assert ((ours - transformers_logits).norm() / transformers_logits.norm()).item() <= 1e-2


def test_fresh_transformers_process_matches_llmq_logits(gptq_dir, tmp_path):
    assert_fresh_transformers_process_matches(gptq_dir, tmp_path)


def test_packed_model_equals_dequantized_dense_model(gptq_dir, tiny_llama_dir):
    """QuantLinear computes exactly what a dense Linear holding the dequantized weight computes."""
    from transformers import AutoModelForCausalLM

    packed = llmq.load(gptq_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for name, module in packed.named_modules():
        if isinstance(module, QuantLinear):
            dense.get_submodule(name).weight.data = module.dequantized_weight()
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, dense(ids).logits, atol=1e-5)


def test_quantized_weights_stay_close_to_original(gptq_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    packed = llmq.load(gptq_dir)
    w = original.model.layers[0].mlp.up_proj.weight
    w_hat = packed.model.layers[0].mlp.up_proj.dequantized_weight()
    assert 0 < ((w - w_hat).norm() / w.norm()).item() < 0.15


def test_eval_cli_reports_perplexity_and_kl(gptq_dir, tiny_llama_dir, calib_file, capsys):
    assert main(["eval", str(gptq_dir), "--ppl", str(calib_file), "--seqlen", "64", "--windows", "3",
                 "--kl", str(tiny_llama_dir), "--card"]) == 0
    out = capsys.readouterr().out
    assert "3 windows x 64 tokens: perplexity" in out and "KL vs" in out
    assert "perplexity" in (gptq_dir / "README.md").read_text().split("## Evaluation")[1]


def test_rtn_needs_no_calibration_and_writes_symmetric_layout(tmp_path, tiny_llama_dir):
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "3", "--group-size", "-1", "--sym",
                 "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" not in keys
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "channel" and weights["group_size"] is None and weights["num_bits"] == 3
    assert weights["actorder"] is None  # act-order means nothing to round-to-nearest
    model = llmq.load(out)
    assert model.model.layers[0].self_attn.q_proj.weight_scale.shape == (64, 1)
    assert_fresh_transformers_process_matches(out, tmp_path)  # symmetric: transformers keeps it packed


def test_data_free_calibration_when_no_text_can_be_had(offline_messages, tmp_path, tiny_llama_dir):
    """No --calib and no hub: the model writes its own calibration text, and the card says so."""
    messages = offline_messages
    out = tmp_path / "df"
    assert main(["quantize", str(tiny_llama_dir), "--group-size", "32", "--samples", "2", "--seqlen", "16",
                 "--out", str(out)]) == 0
    assert any("data-free" in m for m in messages)
    assert "data-free (model-generated), 2 x 16 tokens" in (out / "README.md").read_text()
