"""Every bad input gets one clear line naming the problem and the fix; nothing half-written is left behind."""

import pytest
import torch
from conftest import save_tiny_model

import llmq
from llmq import QuantizeConfig, quantize
from llmq.cli import main
from llmq.core.errors import LlmqError


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_model_path(capsys, tmp_path):
    code, line = run_cli(capsys, "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and line.startswith("llmq: error: model path") and "does not exist" in line


def test_directory_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, line = run_cli(capsys, "quantize", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "has no config.json" in line


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    code, line = run_cli(capsys, "quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert code == 2 and "GPT2Block" in line and "Conv1D" in line and "not supported" in line


def test_eval_takes_an_architecture_the_quantizer_does_not_map(capsys, tmp_path, smollm2_tokenizer_dir, calib_file):
    """The float baseline of any causal LM can be measured, even one the quantizer refuses."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(tmp_path / "gpt2")
    assert main(["eval", str(tmp_path / "gpt2"), "--ppl", str(calib_file), "--seqlen", "32", "--windows", "2"]) == 0
    assert "2 windows x 32 tokens: perplexity" in capsys.readouterr().out


def test_group_size_that_does_not_divide_is_refused_only_when_strict(capsys, tmp_path, tiny_llama_dir):
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--group-size", "256", "--method", "rtn",
                         "--strict-groups", "--out", str(tmp_path / "o"))
    assert code == 2 and ("--group-size 256 does not divide model.layers.0.self_attn.q_proj (in_features 64) and "
                          "--strict-groups is set; use --group-size 64") in line
    assert not (tmp_path / "o").exists()


def test_sink_weight_out_of_range(capsys, tmp_path, tiny_llama_dir):
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--sink-weight", "0", "--out", str(tmp_path / "o"))
    assert code == 2 and "--sink-weight 0.0 is out of range" in line and "16" in line
    assert not (tmp_path / "o").exists()


def test_unknown_group_fit_in_the_python_api():
    with pytest.raises(LlmqError, match="--group-fit late is unknown; use one of sweep, upfront"):
        QuantizeConfig.of(group_fit="late").check()


def test_nan_weights(capsys, tmp_path, smollm2_tokenizer_dir):
    from safetensors.torch import load_file, save_file

    directory = save_tiny_model(tmp_path / "nan", smollm2_tokenizer_dir)
    state = load_file(directory / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    code, line = run_cli(capsys, "quantize", str(directory), "--method", "rtn", "--group-size", "32",
                         "--out", str(tmp_path / "o"))
    assert code == 2 and "tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf" in line


def test_too_little_calibration_text(capsys, tmp_path, tiny_llama_dir):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text here.")
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--calib", str(text), "--group-size", "32",
                         "--samples", "4", "--seqlen", "64", "--out", str(tmp_path / "o"))
    assert code == 2 and "too few for 4 samples of 64 tokens" in line and "--samples/--seqlen" in line


def test_missing_calibration_file_fails_before_loading(capsys, tmp_path, tiny_llama_dir):
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--calib", str(tmp_path / "none.txt"),
                         "--out", str(tmp_path / "o"))
    assert code == 2 and "is neither a file nor a dataset name" in line


def test_truncated_checkpoint(tmp_path, tiny_llama_dir):
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32", "--out", str(out)]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LlmqError, match="truncated or damaged"):
        llmq.load(out)


def test_unreadable_calibration_file(capsys, tmp_path, tiny_llama_dir):
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81" * 100)
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--calib", str(bad), "--group-size", "32",
                         "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot read text file" in line


def test_existing_output_is_not_overwritten_silently(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                         "--out", str(out))
    assert code == 2 and "already exists" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_write_leaves_nothing_that_looks_finished(monkeypatch, tmp_path, tiny_llama_dir):
    def explode(directory, state):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("llmq.targets.compressed_tensors.write_weights", explode)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_llama_dir), tmp_path / "o", QuantizeConfig.of(method="rtn", group_size=32))
    # only the finished layers' checkpoints, hidden, for the next run to resume from (tests/test_resume.py)
    assert [p.name for p in tmp_path.iterdir()] == [".o.resume"]


def test_loading_a_plain_model_with_llmq_load_says_so(tiny_llama_dir):
    with pytest.raises(LlmqError, match="is not quantized"):
        llmq.load(tiny_llama_dir)


def test_cuda_requested_without_gpu(capsys, tmp_path, tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--device", "cuda", "--out", str(tmp_path / "o"))
    assert code == 2 and "--device cuda" in line and "--device cpu" in line


def test_named_dataset_when_the_hub_is_unreachable(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.setattr("llmq.calib.text.hub_reachable", lambda timeout=3.0: False)
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--calib", "c4", "--group-size", "32",
                         "--out", str(tmp_path / "o"))
    assert code == 2 and "dataset 'c4' cannot be downloaded" in line and "local text file" in line
