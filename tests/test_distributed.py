"""torch.distributed (llmq/core/ranks.py): `llmq quantize --nproc 2` runs two gloo ranks on the CPU (torchrun), which
share out the calibration windows, sum the statistics and deal out the solves, and writes what one process writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file

from llmq.cli import main
from llmq.core import ranks


def _tensors(out):
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_two_ranks_write_what_one_process_writes(tmp_path, smollm2_tokenizer_dir, calib_file):
    """A MoE model (8 experts a layer, dealt out by cost) with GPTQ. The statistics are sums over each rank's windows
    added together, one process's over all windows in turn: the same sums in another order, so equal to float
    rounding, not to the bit; on this tiny model at most 1 in 1000 integers may differ (on a real model many
    more do, with the same quality: docs/distributed.md). The FP8 KV-cache scales are maxima over all windows."""
    model = save_tiny_model(tmp_path / "moe", smollm2_tokenizer_dir, "qwen3_moe")
    argv = ["quantize", str(model), "--method", "gptq", "--group-size", "32", "--calib", str(calib_file),
            "--samples", "6", "--seqlen", "64", "--kv-cache", "fp8"]  # KV scales: the maximum over every rank's windows
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "llmq", *argv, "--out", str(tmp_path / "two"), "--nproc", "2"],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("llmq: wrote ") == 1  # rank 0 reports, rank 1 stays quiet
    assert not list(tmp_path.glob(".two.resume*"))  # every rank's checkpoints removed once the output is in place

    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    differing = total = 0
    for name, tensor in one.items():
        if tensor.dtype in (torch.int32, torch.int8, torch.uint8):
            differing += (tensor != two[name]).sum().item()
            total += tensor.numel()
        else:
            assert torch.allclose(tensor.float(), two[name].float(), rtol=1e-2, atol=1e-6), name
    assert differing <= 1e-3 * total, (differing, total)
    config = lambda out: json.loads((out / "config.json").read_text())
    assert config(tmp_path / "one") == config(tmp_path / "two")


def test_a_method_that_searches_the_windows_as_a_whole_is_refused_before_any_process_starts(capsys):
    assert main(["quantize", "--method", "awq", "--nproc", "2", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "awq" in err and "one process" in err


def test_solves_are_dealt_costliest_first_to_the_least_loaded_rank(monkeypatch):
    monkeypatch.setattr(ranks, "world", lambda: (0, 2))
    assert ranks.deal_by_cost([1.0, 8.0, 3.0, 3.0, 2.0]) == [0, 0, 1, 1, 1]  # loads: rank 0 8+1, rank 1 3+3+2
    assert ranks.deal_by_cost([5.0]) == [0]


def test_windows_are_shared_out_whole_and_too_few_are_refused(monkeypatch):
    samples = torch.arange(5 * 3).reshape(5, 3)
    monkeypatch.setattr(ranks, "world", lambda: (1, 2))
    assert torch.equal(ranks.shard(samples), samples[[1, 3]])
    monkeypatch.setattr(ranks, "world", lambda: (0, 8))
    with pytest.raises(Exception, match="5 calibration windows cannot be shared by 8 processes"):
        ranks.shard(samples)


RANK_DIES_BEFORE_SAVING = """
import os, signal, time
from llmq.calib.resume import LayerCheckpoints
save_layer = LayerCheckpoints.save_layer
def die_before_saving(self, index, *args, **kwargs):
    if os.environ.get("RANK") == "1" and index == 2:
        time.sleep(2)  # rank 0 saves layer 2 meanwhile: the ranks' checkpoints end at different layers
        os.kill(os.getpid(), signal.SIGKILL)
    save_layer(self, index, *args, **kwargs)
LayerCheckpoints.save_layer = die_before_saving
"""


def test_ranks_whose_checkpoints_end_at_different_layers_agree_on_the_least(tmp_path, smollm2_tokenizer_dir,
                                                                             calib_file):
    """Serious: one rank SIGKILLed while the other saved layer 2 left checkpoints ending at layers 3 and 2; each
    rank resumed from its own count, so statistics of different layers were summed (15% of codes wrong), the output
    was written, and rank 0 then hung in a barrier for torch's 30-minute timeout. The ranks now agree on the least
    resume point: the rerun continues at layer 2 on both, ends promptly and writes an uninterrupted run's bytes."""
    model = save_tiny_model(tmp_path / "model", smollm2_tokenizer_dir, num_hidden_layers=4)
    argv = [sys.executable, "-m", "llmq", "quantize", str(model), "--method", "gptq", "--group-size", "32",
            "--calib", str(calib_file), "--samples", "4", "--seqlen", "64", "--nproc", "2"]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_DIES_BEFORE_SAVING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    killed = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, check=False,
                            env={**env, "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])})
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-3000:]
    assert (tmp_path / ".out.resume" / "layer-00002.json").is_file()
    assert not (tmp_path / ".out.resume-rank1" / "layer-00002.json").exists()

    resumed = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, check=False,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at layer 2, the last layer every process finished" in resumed.stderr
    assert "resuming: 2 of 4 layers" in resumed.stderr
    whole = tmp_path / "whole"
    run = subprocess.run([*argv, "--out", str(whole)], capture_output=True, text=True, timeout=300, check=False, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".out.resume*"))


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


SLOW_LAYERS = """
import time
from llmq.calib.resume import LayerCheckpoints
save_layer = LayerCheckpoints.save_layer
def slowly(self, *args, **kwargs):
    time.sleep(5)  # a run long enough to be killed in the middle
    save_layer(self, *args, **kwargs)
LayerCheckpoints.save_layer = slowly
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_no_rank_outlives_a_launcher_killed_outright(tmp_path, smollm2_tokenizer_dir, calib_file):
    """`--nproc` ranks ran on as orphans after their launcher was SIGKILLed (28 of them slept on): each rank now
    asks the kernel to kill it when its launcher dies (SIGKILL: a rank blocked in a collective runs no handler), and
    nothing is written."""
    import time

    model = save_tiny_model(tmp_path / "model", smollm2_tokenizer_dir, num_hidden_layers=4)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_LAYERS)
    out = tmp_path / "orphan-check-out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen([sys.executable, "-m", "llmq", "quantize", str(model), "--method", "gptq",
                                     "--group-size", "32", "--calib", str(calib_file), "--samples", "4", "--seqlen",
                                     "64", "--nproc", "2", "--out", str(out)], stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=env)
    deadline = time.monotonic() + 300
    while not (tmp_path / f".{out.name}.resume-rank1").exists():  # both ranks are at work
        assert launcher.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.1)
    assert len(_processes_naming(str(out))) == 3  # the launcher and its two ranks
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 15  # the ranks sleep 5 s a layer: 4 layers would take 20 s more
    while _processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(str(out)) == []
    assert not out.exists()


def test_more_ranks_than_the_machine_runs_are_refused_before_any_starts(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written; if it were, not here
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["quantize", "--nproc", "99", "--method", "rtn", "--out", "unused"]) == 2
    assert "--nproc 99 is more than this machine's 2 CPU cores" in capsys.readouterr().err
    monkeypatch.setattr(ranks, "available_memory", lambda: 512 << 20)
    assert main(["quantize", "--nproc", "2", "--method", "rtn", "--out", "unused"]) == 2
    assert "needs at least 0.8 GiB before any weight is read, and 0.5 GiB are available" in capsys.readouterr().err
    monkeypatch.setattr(ranks, "available_memory", lambda: 64 << 30)
    assert main(["quantize", "--nproc", "2", "--samples", "1", "--calib", "x.txt", "--out", "unused"]) == 2
    assert "1 calibration windows cannot be shared by 2 processes" in capsys.readouterr().err
