"""The CLI end to end on a tiny random Llama: quantize, load in a fresh transformers process, load packed, eval."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_eval_measures_kl_against_the_base_model_its_card_names(tmp_path, tiny_llama_dir, calib_file, capsys):
    """KL is `llmq eval`'s default second number: the base model is the one the checkpoint's card names, found as
    a directory of that name beside the checkpoint; `--kl none` turns it off; a base not found here is said in one
    line on stderr and perplexity is still reported."""
    (tmp_path / tiny_llama_dir.name).symlink_to(tiny_llama_dir)
    out = tmp_path / "rtn"
    assert main(["quantize", str(tmp_path / tiny_llama_dir.name), "--out", str(out), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    window = ["--ppl", str(calib_file), "--seqlen", "32", "--windows", "1"]
    assert main(["eval", str(out), *window]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"KL vs {tmp_path / tiny_llama_dir.name}" in line and "perplexity" in line, line
    assert main(["eval", str(out), *window, "--kl", "none"]) == 0
    assert "KL" not in capsys.readouterr().out
    (tmp_path / tiny_llama_dir.name).unlink()
    assert main(["eval", str(out), *window]) == 0
    captured = capsys.readouterr()
    assert "KL" not in captured.out and "perplexity" in captured.out
    assert f"the card's base model {tiny_llama_dir.name!r} is not found here; pass --kl BASE" in captured.err


def test_kl_over_the_first_windows_and_perplexity_of_the_first(gptq_dir, tiny_llama_dir):
    """bench_quality.py's KL column (the first --kl-windows windows, against the unquantized model) and the
    perplexity of the first windows it sets beside a served client's score: each equals the same number measured
    on those windows alone."""
    from llmq.eval import evaluate, load_for_eval

    model, base = llmq.load(gptq_dir), load_for_eval(str(tiny_llama_dir))[0]
    windows = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    whole = evaluate(model, windows, base, kl_windows=2)
    first = evaluate(model, windows[:2], base)
    assert whole.kl_windows == 2 and whole.kl_divergence == pytest.approx(first.kl_divergence, rel=1e-6)
    assert whole.kl_divergence > 0 and evaluate(base, windows, base).kl_divergence == pytest.approx(0, abs=1e-6)
    assert whole.perplexity_of_first(2) == pytest.approx(first.perplexity, rel=1e-6)
    assert whole.perplexity_of_first(4) == pytest.approx(whole.perplexity, rel=1e-9)


def toy_choice_task(directory: Path, name: str, docs: list[dict]) -> None:
    """An lm-eval multiple-choice task over a local JSONL file (lm-eval's own task format, readable offline)."""
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / name}.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")


def test_eval_tasks_scores_the_packed_model_through_lm_eval(gptq_dir, tmp_path, capsys):
    """`llmq eval --tasks` hands lm-eval the packed model itself: on choices built from that model's own next-token
    log-probabilities (its likeliest word against its least likely one), accuracy is exactly 1 when the likeliest
    is the answer and 0 when the least likely is."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    model, tokenizer = llmq.load(gptq_dir), AutoTokenizer.from_pretrained(gptq_dir)
    words = [w for w in ["the", "of", "and", "river", "music", "war", "king", "city", "game", "film", "year", "team"]
             if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]
    ids = torch.tensor([tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words])
    likeliest, least = [], []
    for context in ["The history of the", "In the early years", "She walked into", "After the season ended",
                    "The album was released"]:
        with torch.no_grad():
            logp = model(torch.tensor([tokenizer(context, add_special_tokens=False).input_ids])).logits[0, -1]
        ranked = [words[i] for i in torch.argsort(logp.log_softmax(-1)[ids], descending=True)]
        likeliest.append({"context": context, "choices": [ranked[-1], ranked[0]], "label": 1})
        least.append({"context": context, "choices": [ranked[-1], ranked[0]], "label": 0})
    toy_choice_task(tmp_path, "llmq_toy_likeliest", likeliest)
    toy_choice_task(tmp_path, "llmq_toy_least", least)
    assert main(["eval", str(gptq_dir), "--tasks", "llmq_toy_likeliest,llmq_toy_least", "--task-dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "llmq_toy_likeliest: acc 1.0000" in out and "llmq_toy_least: acc 0.0000" in out


def test_eval_needs_something_to_measure(gptq_dir, capsys):
    assert main(["eval", str(gptq_dir)]) == 2
    assert "nothing to evaluate: pass --ppl" in capsys.readouterr().err


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


def test_ignore_leaves_the_named_linears_as_they_were(tmp_path, tiny_llama_dir, calib_file, capsys, monkeypatch):
    """--ignore (a module name's trailing part, or re:EXPRESSION from the start of the full name): those Linears
    keep their weights bit for bit, are listed in the config's ignore, and the rest are quantized as without it.
    A pattern that names nothing is said; a bad expression, or --ignore into GGUF, is one line before any work."""
    from safetensors.torch import load_file

    monkeypatch.setattr("llmq.core.log.quiet", False)
    out = tmp_path / "o"
    code = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--calib", str(calib_file), "--samples", "4",
                 "--seqlen", "32", "--group-size", "32", "--ignore", "mlp.down_proj", "--ignore",
                 r"re:model\.layers\.0\.self_attn\.[qk]_proj$", "--ignore", "no_such_module", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    source, written = load_file(tiny_llama_dir / "model.safetensors"), load_file(out / "model.safetensors")
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    kept = [f"model.layers.{i}.mlp.down_proj" for i in range(layers)]
    kept += ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    for name in kept:
        assert torch.equal(written[f"{name}.weight"], source[f"{name}.weight"]), name
        assert f"{name}.weight_packed" not in written
    assert "model.layers.1.self_attn.q_proj.weight_packed" in written  # only layer 0's q/k were named
    assert "model.layers.0.self_attn.v_proj.weight_packed" in written
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(kept) <= set(ignore)
    assert f"--ignore leaves {len(kept)} Linears unquantized" in err
    assert "--ignore no_such_module names no Linear of this model" in err
    for flags, message in ((["--ignore", "re:(unclosed"], "--ignore 're:(unclosed' is not a regular expression"),
                           (["--format", "gguf", "--ignore", "lm_head"], "a GGUF file's tensor types come from")):
        code = main(["quantize", str(tiny_llama_dir), *flags, "--out", str(tmp_path / "x.gguf")])
        assert code == 2 and message in capsys.readouterr().err
