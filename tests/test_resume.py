"""Resumable runs (llmq/calib/resume.py): a run killed with SIGKILL after some layers continues from the last
finished layer and writes exactly the bytes an uninterrupted run writes; checkpoints of other settings are not
reused; quantized weights survive the trip through safetensors + JSON bit for bit."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_model

from llmq import QuantizeConfig, quantize
from llmq.calib.resume import resume_directory
from llmq.core.records import flatten, unflatten

KILL_AFTER_LAYER = r"""
import os, signal, sys
import llmq
from llmq.calib.resume import LayerCheckpoints
from llmq.core import log
log.quiet = True
save_layer = LayerCheckpoints.save_layer
def save_then_die(self, index, *args, **kwargs):
    save_layer(self, index, *args, **kwargs)
    if index == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no clean-up: what a power cut or the OOM killer does
LayerCheckpoints.save_layer = save_then_die
config = llmq.QuantizeConfig.of(**__import__("json").loads(sys.argv[4]))
llmq.quantize(sys.argv[1], sys.argv[2], config)
"""


def _weights_file(out):
    return out if out.suffix == ".gguf" else out / "model.safetensors"


@pytest.fixture(scope="module")
def three_layer_model(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tmp_path_factory.mktemp("three-layers"), smollm2_tokenizer_dir, num_hidden_layers=3)


# AWQ into compressed-tensors (folded norms must come back from the checkpoint), GPTQ into GGUF (another target,
# another kind of quantized record); both need the saved inputs of the next layer
@pytest.mark.parametrize("options, name", [
    (dict(method="awq", group_size=32), "awq"),
    (dict(method="gptq", format="gguf", gguf_type="Q4_K_M"), "gptq.gguf"),
    # a whole-model step redone on resume (the seeded rotation), and scale tuning after the restored layers
    (dict(method="rotate+gptq", group_size=32, bits=3, tune_steps=3), "rotate-tuned"),
    # a microscaling record (NVFP4's E2M1 values, FP8 group scales and global scale) through the checkpoints
    (dict(method="awq+gptq", scheme="NVFP4A16"), "nvfp4"),
    # int4 with FP8 inputs, and the layers' KV-cache scales (attention buffers) through the checkpoints
    (dict(method="gptq", scheme="W4AFP8", kv_cache="fp8"), "w4afp8-kv"),
])
def test_a_killed_run_resumes_and_writes_what_an_uninterrupted_run_writes(options, name, three_layer_model, tmp_path,
                                                                           calib_file, capsys):
    from llmq.core import log

    options = dict(options, calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    whole = tmp_path / f"whole-{name}"
    quantize(str(three_layer_model), whole, QuantizeConfig.of(**options))
    assert not resume_directory(whole).exists()  # removed once the output is in place

    out = tmp_path / name
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER, str(three_layer_model), str(out), "1",
                             json.dumps(options)], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    left = resume_directory(out)
    assert sorted(p.name for p in left.iterdir() if p.suffix == ".json") == ["layer-00000.json", "layer-00001.json",
                                                                            "run.json"]
    inputs = sorted(p.name for p in left.glob("inputs-*"))
    assert inputs == ["inputs-00001.safetensors", "inputs-00002.safetensors"]  # the last two layers' inputs

    log.quiet = False
    try:
        result = quantize(str(three_layer_model), out, QuantizeConfig.of(**options))
    finally:
        log.quiet = True
    assert "resuming: 2 of 3 layers were finished by an interrupted run" in capsys.readouterr().err
    assert _weights_file(out).read_bytes() == _weights_file(whole).read_bytes()
    assert not left.exists()
    assert result.relative_weight_error > 0  # the restored layers' errors count in the summary


def test_checkpoints_of_other_settings_are_not_reused(three_layer_model, tmp_path, calib_file, capsys):
    from llmq.core import log

    options = dict(method="gptq", calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER, str(three_layer_model), str(out), "0",
                             json.dumps(dict(options, group_size=64))], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    log.quiet = False
    try:
        quantize(str(three_layer_model), out, QuantizeConfig.of(**options, group_size=32))
    finally:
        log.quiet = True
    err = capsys.readouterr().err
    assert "left by a run with other settings, model or data; starting over" in err and "resuming" not in err
    whole = tmp_path / "whole"
    quantize(str(three_layer_model), whole, QuantizeConfig.of(**options, group_size=32))
    assert _weights_file(out).read_bytes() == _weights_file(whole).read_bytes()


def test_quantized_weights_survive_a_checkpoint_bit_for_bit():
    from gguf import GGMLQuantizationType as T

    from llmq.core.scheme import QuantScheme
    from llmq.methods.grids.integer import IntegerGrid
    from llmq.methods.grids.kquant import KQuantGrid
    from llmq.methods.grids.ternary import TernaryGrid, TernaryScheme

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    grids = [IntegerGrid(QuantScheme(4, 32, False), torch.bfloat16), KQuantGrid(T.Q4_K),
             TernaryGrid(TernaryScheme("channel"), torch.bfloat16)]
    for grid in grids:
        fit = grid.fit(w)
        quantized = fit.result(fit.nearest())
        tensors = {}
        description = json.loads(json.dumps(flatten(quantized, "w", tensors)))  # what the .json file holds
        rebuilt = unflatten(description, tensors)
        assert type(rebuilt) is type(quantized)
        assert torch.equal(rebuilt.dequantize(), quantized.dequantize())
        assert max(t.element_size() for n, t in tensors.items() if not t.is_floating_point()) == 1  # a byte per code


def test_only_registered_records_are_rebuilt():
    from dataclasses import dataclass

    @dataclass
    class Unregistered:
        x: int

    with pytest.raises(TypeError, match="not a checkpointable record"):
        flatten(Unregistered(1), "u", {})
    with pytest.raises(ValueError, match="not a checkpointable record"):
        unflatten({"record": "Popen", "fields": {}}, {})


def _nan_scale(left):
    from safetensors.torch import load_file, save_file

    tensors = load_file(left / "layer-00000.safetensors")
    key = next(k for k in tensors if k.endswith(".scale"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, left / "layer-00000.safetensors")


def _code_of_100(left):
    from safetensors.torch import load_file, save_file

    tensors = load_file(left / "layer-00000.safetensors")
    key = next(k for k in tensors if k.endswith(".qweight"))
    tensors[key][0, 0] = 100
    save_file(tensors, left / "layer-00000.safetensors")


def _rerun(model, out, options, capsys) -> str:
    """Quantize again with the log on; what it said."""
    from llmq.core import log

    capsys.readouterr()
    log.quiet = False
    try:
        quantize(str(model), out, QuantizeConfig.of(**options))
    finally:
        log.quiet = True
    return capsys.readouterr().err


def _assert_writes_the_uninterrupted_bytes(model, out, options, tmp_path):
    whole = tmp_path / "whole"
    quantize(str(model), whole, QuantizeConfig.of(**options))
    assert _weights_file(out).read_bytes() == _weights_file(whole).read_bytes()


def _kill_after_layer(model, out, layer, options):
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER, str(model), str(out), str(layer),
                             json.dumps(options)], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


@pytest.mark.parametrize("damage, named, then", [
    (lambda left: (left / "layer-00000.safetensors").write_bytes(b""), "layer-00000", "starting over"),
    (lambda left: (left / "layer-00001.json").write_text('{"others": [], "quan'), "layer-00001", "continuing at layer 1"),
    (lambda left: (left / "inputs-00002.safetensors").unlink(), "inputs-00002.safetensors", "continuing at layer 1"),
    (lambda left: (left / "inputs-00002.safetensors").write_bytes(b"\xff" * 9), "inputs-00002.safetensors",
     "continuing at layer 1"),
    (lambda left: (left / "samples.safetensors").write_bytes(b"\0" * 16), "samples.safetensors", "starting over"),
    (_nan_scale, "holds NaN or Inf", "starting over"),
    (_code_of_100, "4-bit codes outside [-8, 7]", "starting over"),
])
def test_a_damaged_checkpoint_is_named_and_the_run_continues_from_the_last_good_layer(
        damage, named, then, three_layer_model, tmp_path, calib_file, capsys):
    """Truncated, empty or altered checkpoint files were a traceback on every rerun (or, with a NaN scale or a 4-bit
    code of 100, written into the output with rc 0): each is read back and checked, named in one line, and the run
    continues at the last good layer whose inputs are on disk (the last two layers' inputs are kept), or starts
    over, and writes what an uninterrupted run writes."""
    options = dict(method="gptq", group_size=32, calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    out = tmp_path / "out"
    _kill_after_layer(three_layer_model, out, 1, options)
    damage(resume_directory(out))
    err = _rerun(three_layer_model, out, options, capsys)
    assert "holds a damaged checkpoint (" in err and named in err and then in err, err
    assert ("resuming: 1 of 3 layers" in err) == (then == "continuing at layer 1"), err
    _assert_writes_the_uninterrupted_bytes(three_layer_model, out, options, tmp_path)


def test_a_layer_of_another_group_size_is_not_trusted(three_layer_model, tmp_path, calib_file, capsys):
    """A checkpointed layer copied from a run with other settings (its fingerprint cannot tell) was written into the
    output with rc 0: every restored weight is checked against the grid this run's plan gives it."""
    options = dict(method="gptq", group_size=32, calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    out, other = tmp_path / "out", tmp_path / "other"
    _kill_after_layer(three_layer_model, out, 1, options)
    _kill_after_layer(three_layer_model, other, 1, dict(options, group_size=64))
    for name in ("layer-00001.json", "layer-00001.safetensors"):
        (resume_directory(out) / name).write_bytes((resume_directory(other) / name).read_bytes())
    err = _rerun(three_layer_model, out, options, capsys)
    assert "in layer-00001 is quantized as W4A16 g64 asym, not W4A16 g32 asym; continuing at layer 1" in err, err
    _assert_writes_the_uninterrupted_bytes(three_layer_model, out, options, tmp_path)


def test_a_linked_resume_directory_is_refused(three_layer_model, tmp_path, calib_file):
    from llmq.core.errors import LlmqError

    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resume_directory(out).symlink_to(elsewhere)
    with pytest.raises(LlmqError, match="is a symbolic link; llmq keeps a run's checkpoints in a directory of its own"):
        quantize(str(three_layer_model), out, QuantizeConfig.of(method="gptq", group_size=32, calib=str(calib_file),
                                                                samples=8, seqlen=64, device="cpu"))
    assert list(elsewhere.iterdir()) == [] and not out.exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(1, "Operation not permitted")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_finished_layers(error, three_layer_model,
                                                                                       tmp_path, calib_file, monkeypatch,
                                                                                       capsys):
    """A full disk or an immutable resume directory was a traceback: one line naming where and why, the finished
    layers stay, and the same command continues from them once there is room."""
    from llmq.calib import resume
    from llmq.core.errors import LlmqError

    options = dict(method="gptq", group_size=32, calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    out = tmp_path / "out"
    save_file = resume.save_file

    def full_at_layer_1(tensors, path):
        if "layer-00001" in str(path):
            raise error
        save_file(tensors, path)

    monkeypatch.setattr(resume, "save_file", full_at_layer_1)
    with pytest.raises(LlmqError, match=rf"cannot write the run's checkpoints in \S+\.out\.resume \({error.strerror}\); "
                                        r"the 1 finished layers stay for the next run"):
        quantize(str(three_layer_model), out, QuantizeConfig.of(**options))
    left = resume_directory(out)
    assert sorted(p.name for p in left.iterdir() if p.name.startswith("layer")) == ["layer-00000.json",
                                                                                    "layer-00000.safetensors"]
    assert not list(left.glob(".*.tmp")) and not out.exists()
    monkeypatch.setattr(resume, "save_file", save_file)
    assert "resuming: 1 of 3 layers" in _rerun(three_layer_model, out, options, capsys)
    _assert_writes_the_uninterrupted_bytes(three_layer_model, out, options, tmp_path)
