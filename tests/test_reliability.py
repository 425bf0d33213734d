"""Nothing lost, nothing silently wrong, nothing written where it should not be.

Each test is a case a careful user or a hostile checkpoint can produce; the victims (the input model, foreign
files, files behind symbolic links) are checked byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file, save_file

import llmq
from llmq.cli import main
from llmq.core.errors import LlmqError

RTN = ["--method", "rtn", "--group-size", "32", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def snapshot(directory: Path) -> dict:
    """Every entry under `directory`: file bytes, link targets, directories."""
    found = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_dir():
            found[key] = ("dir",)
        else:
            found[key] = ("file", path.read_bytes())
    return found


@pytest.fixture
def source(tmp_path, smollm2_tokenizer_dir) -> Path:
    """A tiny model of this test's own, free to damage."""
    return save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir)


def _edit_state(directory: Path, edit) -> None:
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---- --overwrite replaces only what llmq wrote ----------------------------------------------------------------


def test_overwrite_refuses_a_directory_holding_the_input_model(capsys, tmp_path, smollm2_tokenizer_dir):
    models = tmp_path / "models"
    model = save_tiny_model(models / "tiny", smollm2_tokenizer_dir)
    (models / "notes.txt").write_text("mine")
    before = snapshot(models)
    code, line = run_cli(capsys, "quantize", model, *RTN, "--out", models, "--overwrite")
    assert code == 2 and "holds the input model" in line, line
    assert snapshot(models) == before


def test_overwrite_refuses_what_llmq_did_not_write(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *RTN, "--out", out, "--overwrite")
    assert code == 2 and "replaces only what llmq wrote" in line, line
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    foreign = tmp_path / "x.gguf"
    foreign.write_bytes(b"not a gguf file")
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, "--format", "gguf", "--type", "Q8_0", "--device", "cpu",
                         "--out", foreign, "--overwrite")
    assert code == 2 and "replaces only what llmq wrote" in line, line
    assert foreign.read_bytes() == b"not a gguf file"


def test_overwrite_replaces_an_llmq_output(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(out)]) == 0
    assert json.loads((out / "llmq.json").read_text())["written_by"] == "llmq"
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--bits", "3", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_overwrite_refuses_an_llmq_output_holding_a_foreign_file(capsys, tmp_path, tiny_llama_dir):
    """Serious: --overwrite deleted files a user had put inside an llmq output. llmq.json lists the files llmq wrote;
    a file it does not list is named and the run refused. A hand-written marker (no list) makes nothing deletable."""
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(out)]) == 0
    assert "model.safetensors" in json.loads((out / "llmq.json").read_text())["files"]
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("mine")
    before = snapshot(out)
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *RTN, "--out", out, "--overwrite")
    assert code == 2 and "also holds notes/mine.txt; move it out or choose another --out" in line, line
    assert snapshot(out) == before

    handmade = tmp_path / "handmade"
    handmade.mkdir()
    (handmade / "llmq.json").write_text('{"written_by": "llmq"}')
    (handmade / "thesis.tex").write_text("mine")
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *RTN, "--out", handmade, "--overwrite")
    assert code == 2 and "lists its files" in line, line
    assert (handmade / "thesis.tex").read_text() == "mine"


def test_an_evaluated_output_can_still_be_overwritten(tmp_path, tiny_llama_dir, calib_file):
    """`llmq eval --card` appends to the output's README.md: a file llmq listed, so --overwrite still replaces it."""
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(out)]) == 0
    assert main(["eval", str(out), "--ppl", str(calib_file), "--windows", "1", "--seqlen", "32", "--card"]) == 0
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--bits", "3", "--out", str(out), "--overwrite"]) == 0


def _fake_stage(parent: Path, name: str, pid: int, nonce: str = "0123456789abcdef", started="1") -> Path:
    stage = parent / f".{name}.partial-{pid}-{nonce}"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"half")
    (stage / ".llmq-stage").write_text(json.dumps({"nonce": nonce, "pid": pid, "started": started}))
    return stage


def test_stale_run_cleanup_removes_only_what_llmq_staged(monkeypatch, tmp_path, tiny_llama_dir):
    """Serious: the clean-up of killed runs deleted every sibling named `.NAME.partial-*` / `.NAME.old-*`, the
    user's own included. Only a directory whose record (nonce and pid, the name's) says llmq made it is removed;
    a dead process's stage goes, and so does one whose pid now belongs to another process (another start time)."""
    out = tmp_path / "o"
    mine = [tmp_path / ".o.partial-backup", tmp_path / ".o.old-1-0123456789abcdef", tmp_path / ".o.partial-7-notes"]
    for path in mine:
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    forged = _fake_stage(tmp_path, "o", 99999999, started=None)
    (forged / ".llmq-stage").write_text(json.dumps({"nonce": "ffffffffffffffff", "pid": 99999999}))  # not the name's
    dead = _fake_stage(tmp_path, "o", 99999998, nonce="00000000000000aa")  # no such process
    reused = _fake_stage(tmp_path, "o", 1, nonce="00000000000000bb", started="-1")  # pid 1 lives, started otherwise
    messages = []
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(out)]) == 0
    assert all((path / "keep.txt").read_text() == "mine" for path in mine) and forged.is_dir()
    assert not dead.exists() and not reused.exists()
    assert sum("llmq did not make it" in m for m in messages) == 2  # the old-named one and the forged one, once each


def test_a_live_run_writing_the_same_output_is_refused(capsys, tmp_path, tiny_llama_dir):
    from llmq.targets.atomic import _start_time

    parent = os.getppid()
    live = _fake_stage(tmp_path, "o", parent, nonce="00000000000000cc", started=_start_time(parent))
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *RTN, "--out", tmp_path / "o")
    assert code == 2 and f"another llmq run (process {parent}) is writing" in line, line
    assert live.is_dir()


def test_out_inside_the_input_model_is_refused(capsys, source):
    before = snapshot(source)
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", source / "quantized")
    assert code == 2 and "inside the input model's directory" in line, line
    assert snapshot(source) == before


# ---- nothing written through links, nothing written into an input -------------------------------------------------


@pytest.fixture
def rtn_checkpoint(tmp_path, tiny_llama_dir) -> Path:
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(out)]) == 0
    return out


def test_eval_writes_nothing_into_what_it_evaluates(rtn_checkpoint, calib_file):
    before = snapshot(rtn_checkpoint)
    assert main(["eval", str(rtn_checkpoint), "--ppl", str(calib_file), "--seqlen", "32", "--windows", "1"]) == 0
    assert snapshot(rtn_checkpoint) == before


def test_eval_card_never_follows_a_symbolic_link(capsys, rtn_checkpoint, calib_file, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (rtn_checkpoint / ".README.md.partial").symlink_to(victim)  # the fixed name llmq once wrote its card through
    eval_card = ["eval", rtn_checkpoint, "--ppl", calib_file, "--seqlen", "32", "--windows", "1", "--card"]
    assert run_cli(capsys, *eval_card)[0] == 0
    assert victim.read_text() == "precious" and "perplexity" in (rtn_checkpoint / "README.md").read_text()
    card = rtn_checkpoint / "README.md"
    card.unlink()
    card.symlink_to(victim)
    code, line = run_cli(capsys, *eval_card)
    assert code == 2 and "symbolic link" in line, line
    assert victim.read_text() == "precious"


def test_loss_curve_beside_a_gguf_never_overwrites_or_follows_links(capsys, tmp_path, tiny_llama_dir, calib_file):
    out = tmp_path / "t.gguf"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    curve_json = tmp_path / "t.qat_loss.json"
    curve_json.symlink_to(victim)
    args = ["quantize", tiny_llama_dir, "--method", "bitnet", "--format", "gguf", "--qat-steps", "2", "--qat-batch", "1",
            "--qat-seqlen", "32", "--calib", calib_file, "--device", "cpu", "--out", out]
    code, line = run_cli(capsys, *args, "--overwrite")
    assert code == 2 and "symbolic link" in line, line
    curve_json.unlink()
    curve_png = tmp_path / "t.qat_loss.png"
    curve_png.write_text("mine")
    code, line = run_cli(capsys, *args)
    assert code == 2 and "already exists" in line, line
    assert victim.read_text() == "precious" and curve_png.read_text() == "mine" and not out.exists()
    curve_png.unlink()
    assert run_cli(capsys, *args)[0] == 0
    assert curve_png.read_bytes()[:4] == b"\x89PNG" and curve_json.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf", "t.qat_loss.json", "t.qat_loss.png", "victim.txt"]


# ---- silently wrong results become errors naming the problem ---------------------------------------------------------


def test_missing_tensor_is_named(capsys, source, tmp_path):
    _edit_state(source, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    assert code == 2 and "missing (first: model.layers.1.mlp.up_proj.weight)" in line, line


def test_renamed_tensor_is_named(capsys, source, tmp_path):
    _edit_state(source, lambda state: state.update({"model.layers.1.mlp.up.weight":
                                                    state.pop("model.layers.1.mlp.up_proj.weight")}))
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in line and "model.layers.1.mlp.up.weight" in line, line


def test_config_without_num_hidden_layers_is_refused(capsys, source, tmp_path):
    _edit_json(source / "config.json", lambda config: config.pop("num_hidden_layers"))
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    # transformers' default is 32 layers, more than the checkpoint's 2: said before the model is built
    assert code == 2 and "says num_hidden_layers 32, but the checkpoint holds 2 decoder layers" in line, line


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda weights: weights.update(num_bits=2), "weight_packed is torch.int32"),
    (lambda weights: weights.update(symmetric=True), "has zero points but the config says symmetric"),
    (lambda weights: weights.update(group_size=64), "weight_scale is"),
    (lambda weights: weights.update(group_size="many"), "quantization_config is not one llmq reads"),
])
def test_quantized_checkpoint_whose_config_disagrees_with_its_tensors(capsys, edit, expect, rtn_checkpoint, calib_file,
                                                                      tmp_path):
    _edit_json(rtn_checkpoint / "config.json",
               lambda config: edit(config["quantization_config"]["config_groups"]["group_0"]["weights"]))
    with pytest.raises(LlmqError, match=expect):
        llmq.load(rtn_checkpoint)
    code, line = run_cli(capsys, "eval", rtn_checkpoint, "--ppl", calib_file, "--seqlen", "32", "--windows", "1")
    assert code == 2 and line.startswith("llmq: error:"), line
    code, line = run_cli(capsys, "export-gguf", rtn_checkpoint, "--out", tmp_path / "x.gguf")
    assert code == 2 and line.startswith("llmq: error:") and not (tmp_path / "x.gguf").exists(), line


# ---- NaN and Inf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight"])
@pytest.mark.parametrize("how", [["--method", "rtn", "--group-size", "32"], ["--method", "awq", "--group-size", "32"],
                                 ["--format", "gguf", "--type", "Q8_0"]], ids=["rtn", "awq", "gguf"])
def test_nan_anywhere_is_refused_before_any_work(capsys, tensor, how, source, calib_file, tmp_path):
    def poison(state):
        state[tensor].view(-1)[3] = float("nan")

    _edit_state(source, poison)
    out = tmp_path / ("o.gguf" if "gguf" in how else "o")
    code, line = run_cli(capsys, "quantize", source, *how, "--calib", calib_file, "--samples", "2", "--seqlen", "32",
                         "--device", "cpu", "--out", out)
    assert code == 2 and f"tensor {tensor} contains NaN or Inf" in line, line
    assert not out.exists()


def test_nan_scale_in_a_checkpoint_is_refused_not_measured(capsys, rtn_checkpoint, calib_file):
    _edit_state(rtn_checkpoint, lambda state: state["model.layers.0.mlp.down_proj.weight_scale"].view(-1).__setitem__(
        0, float("nan")))
    card = (rtn_checkpoint / "README.md").read_text()
    with pytest.raises(LlmqError, match="down_proj.weight_scale holds non-finite"):
        llmq.load(rtn_checkpoint)
    code, line = run_cli(capsys, "eval", rtn_checkpoint, "--ppl", calib_file, "--seqlen", "32", "--windows", "1", "--card")
    assert code == 2 and "non-finite" in line, line
    assert (rtn_checkpoint / "README.md").read_text() == card


def test_float16_overflow_is_named_as_such(capsys, source, tmp_path):
    _edit_state(source, lambda state: state["model.layers.0.mlp.up_proj.weight"].view(-1).__setitem__(0, 1e5))
    code, line = run_cli(capsys, "quantize", source, *RTN, "--dtype", "float16", "--out", tmp_path / "o")
    assert code == 2 and "does not fit float16" in line and "bfloat16" in line, line
    assert main(["quantize", str(source), *RTN, "--out", str(tmp_path / "o")]) == 0  # bf16 holds it


# ---- kills ------------------------------------------------------------------------------------------------------


def _start_and_wait_for_stage(tiny_llama_dir, calib_file, out: Path) -> subprocess.Popen:
    """A quantize run in its own process, returned once it has staged its output (work is under way)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "llmq.cli", "quantize", str(tiny_llama_dir), "--method", "gptq", "--group-size", "32",
         "--calib", str(calib_file), "--samples", "256", "--seqlen", "64", "--device", "cpu", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir()):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run never staged its output"
        time.sleep(0.05)
    return process


def test_sigterm_leaves_nothing_and_the_next_run_succeeds(tmp_path, tiny_llama_dir, calib_file):
    work = tmp_path / "work"
    work.mkdir()
    process = _start_and_wait_for_stage(tiny_llama_dir, calib_file, work / "o")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; no output was written" in process.stderr.read()
    # nothing but the checkpoints of the layers it finished, if any (tests/test_resume.py), kept to resume from
    assert [p.name for p in work.iterdir() if p.name != ".o.resume"] == []
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(work / "o")]) == 0


def test_sigkill_leaves_a_stage_that_the_next_run_removes(monkeypatch, tmp_path, tiny_llama_dir, calib_file):
    work = tmp_path / "work"
    work.mkdir()
    process = _start_and_wait_for_stage(tiny_llama_dir, calib_file, work / "o")
    process.kill()
    process.wait(timeout=60)
    left = [p.name for p in work.iterdir() if p.name != ".o.resume"]  # layer checkpoints may stay, to resume from
    assert len(left) == 1 and left[0].startswith(".o.partial-")  # what SIGKILL leaves: never a finished-looking output
    messages = []
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    assert main(["quantize", str(tiny_llama_dir), *RTN, "--out", str(work / "o")]) == 0
    assert [p.name for p in work.iterdir()] == ["o"]
    assert any(f"removed {left[0]}, left by an interrupted run" in m for m in messages)


def test_unwritable_or_wrong_outputs_are_refused_before_loading(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    loaded = []
    monkeypatch.setattr("llmq.run.load_model", lambda *args, **kwargs: loaded.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(["--out", blocker / "o"], "which is a file"),
             (["--format", "gguf", "--out", tmp_path / "model"], "name it *.gguf"),
             (["--out", tmp_path / "model.gguf"], "names a GGUF file"),
             (["--out", blocker], "is a file, but this format writes a directory")]
    (tmp_path / "d.gguf").mkdir()
    (tmp_path / "d.gguf" / "x").write_text("x")
    cases.append((["--format", "gguf", "--out", tmp_path / "d.gguf"], "is a directory, but this output is one file"))
    for flags, expect in cases:
        code, line = run_cli(capsys, "quantize", tiny_llama_dir, "--device", "cpu", *flags)
        assert code == 2 and expect in line, (flags, line)
    real_access = os.access
    monkeypatch.setattr("os.access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *RTN, "--out", tmp_path / "o")
    assert code == 2 and "permission denied" in line, line
    assert not loaded


# ---- one clear line instead of a traceback ------------------------------------------------------------------------


def test_damaged_input_checkpoint_is_one_line(capsys, source, tmp_path):
    weights = source / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + weights.read_bytes()[24:])
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    # read lazily: the header is the first thing read (a whole-model load says "cannot load the weights")
    assert code == 2 and "model.safetensors" in line and "damaged" in line and "re-download" in line, line


def test_missing_tokenizer_is_one_line(capsys, source, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink(missing_ok=True)
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    assert code == 2 and "has no usable tokenizer" in line, line


def test_config_without_vocab_size_is_one_line(capsys, source, tmp_path):
    _edit_json(source / "config.json", lambda config: config.pop("vocab_size"))
    code, line = run_cli(capsys, "quantize", source, *RTN, "--out", tmp_path / "o")
    # the config's default vocabulary is another size: the embeddings are named with both shapes
    assert code == 2 and "2 tensors of the wrong shape (first: lm_head.weight, [49152, 64] in the checkpoint, [32000, 64] by the config" in line, line


@pytest.mark.parametrize("flags", [["--seqlen", "0"], ["--seqlen", "1"], ["--windows", "0"], ["--device", "cuda"]])
def test_bad_eval_arguments_are_one_line(capsys, flags, tiny_llama_dir, calib_file):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, line = run_cli(capsys, "eval", tiny_llama_dir, "--ppl", calib_file, *flags)
    assert code == 2 and line.startswith("llmq: error:") and flags[0] in line, line


@pytest.mark.parametrize("config", ["{not json", json.dumps({"hidden_size": 64})])
def test_eval_of_a_broken_config_is_one_line(capsys, config, source, calib_file):
    (source / "config.json").write_text(config)
    code, line = run_cli(capsys, "eval", source, "--ppl", calib_file, "--seqlen", "32", "--windows", "1")
    assert code == 2 and "config" in line, line


def test_jsonl_text_that_is_not_a_string(capsys, tmp_path, tiny_llama_dir):
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "fine"}\n{"text": 5}\n')
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, "--group-size", "32", "--calib", calib, "--device", "cpu",
                         "--out", tmp_path / "o")
    assert code == 2 and "c.jsonl:2" in line and '"text" string' in line, line


def test_qat_rate_that_is_not_a_number(capsys, tmp_path, tiny_llama_dir, calib_file):
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "bitnet", "--qat-steps", "1", "--qat-lr", "nan",
                         "--calib", calib_file, "--out", tmp_path / "o")
    assert code == 2 and "--qat-lr" in line and not (tmp_path / "o").exists(), line


@pytest.mark.parametrize(("flags", "expect"), [
    (["--type", "Q4_K_M"], "--type picks a GGUF mixture"),
    (["--format", "gguf", "--bits", "3"], "--bits set compressed-tensors' integer grid"),
    (["--format", "gguf", "--sym", "--group-size", "64"], "--group-size, --sym set"),
    (["--format", "gguf", "--mse"], "--mse set"),
    (["--qat-steps", "5"], "--qat-steps apply to --method bitnet only"),
    (["--method", "bitnet", "--bits", "3"], "--bits do not apply to transformers' BitNet layout"),
])
def test_flags_that_do_not_apply_are_refused(capsys, flags, expect, tmp_path, tiny_llama_dir):
    code, line = run_cli(capsys, "quantize", tiny_llama_dir, *flags, "--device", "cpu", "--out", tmp_path / "o.gguf"
                         if "gguf" in flags else tmp_path / "o")
    assert code == 2 and expect in line, line


def test_data_free_windows_are_capped_at_the_context(offline_messages, tmp_path, tiny_llama_dir):
    messages = offline_messages
    result = llmq.quantize(str(tiny_llama_dir), tmp_path / "o",
                           llmq.QuantizeConfig.of(group_size=32, samples=1, seqlen=100_000, device="cpu"))
    assert any("capped at the model's context, 256 tokens" in m for m in messages)
    assert "data-free (model-generated), 1 x 256 tokens" in result.calibration


def test_calibration_windows_longer_than_the_context_are_warned(monkeypatch, tmp_path, tiny_llama_dir, calib_file):
    messages = []
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    llmq.quantize(str(tiny_llama_dir), tmp_path / "o.gguf", llmq.QuantizeConfig.of(
        method="rtn", format="gguf", gguf_type="Q8_0", calib=str(calib_file), samples=2, seqlen=512, device="cpu"))
    assert any("--seqlen 512 is longer than the model's context (256 positions)" in m for m in messages)
    assert (tmp_path / "o.gguf").read_bytes()[:4] == b"GGUF"


def test_a_tokenizer_larger_than_the_embedding_is_one_line(tmp_path, tiny_llama_short_vocab_dir, calib_file):
    """The tiny model keeps 1024 embedding rows beside SmolLM2's 49152-token tokenizer: the calibration text's
    ids run past the embedding, which used to end in an IndexError deep inside the first forward pass."""
    with pytest.raises(LlmqError, match=r"the model's embedding has 1024 rows: tokenizer and model do not belong"):
        llmq.quantize(str(tiny_llama_short_vocab_dir), tmp_path / "o", llmq.QuantizeConfig.of(
            method="gptq", group_size=32, calib=str(calib_file), samples=2, seqlen=32, device="cpu"))
    assert not (tmp_path / "o").exists()


def test_embedded_default_is_converted_once_and_a_damaged_copy_is_converted_again(tmp_path, monkeypatch,
                                                                                   tiny_llama_short_vocab_dir):
    """The embedded default's conversion (about 90 s for the real file) is kept under $LLMQ_CACHE and read back
    exactly; a damaged copy is noticed and replaced. A tiny GGUF stands in for the package's file here."""
    from llmq.calib import models

    package = tmp_path / "package"
    package.mkdir()
    llmq.quantize(str(tiny_llama_short_vocab_dir), package / models._EMBEDDED_GGUF,
                  llmq.QuantizeConfig.of(format="gguf", gguf_type="Q8_0", device="cpu"))
    monkeypatch.setattr(models, "embedded_directory", lambda: str(package))
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    converted, tokenizer = models.load_embedded_default(torch.float32)
    cached = models.embedded_cache(package / models._EMBEDDED_GGUF)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cached.name]  # no staging folder left

    real_convert = models._convert_embedded
    monkeypatch.setattr(models, "_convert_embedded", lambda *a: pytest.fail("converted although a copy is cached"))
    again, tokenizer_again = models.load_embedded_default(torch.float32)
    expected = converted.state_dict()
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    assert again.config._name_or_path == models.EMBEDDED_BASE_ID
    text = "The 2023 Tour de France <|im_start|>user\nHi!<|im_end|>"
    assert tokenizer_again(text)["input_ids"] == tokenizer(text)["input_ids"]

    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    monkeypatch.setattr(models, "_convert_embedded", real_convert)
    repaired, _ = models.load_embedded_default(torch.bfloat16)
    assert all(torch.equal(repaired.state_dict()[k], expected[k].bfloat16()) for k in expected)
    assert models._load_cached(cached, torch.float32)[0].state_dict().keys() == expected.keys()


def test_package_files_live_inside_the_package():
    """Every file the package reads at run time ships from inside llmq/: a wheel force-include of a file from
    elsewhere (the card template once came from model_cards/) made `pip install -e .` write a real
    site-packages/llmq/ directory, which Python then imported as an empty namespace package in place of the
    editable source (`import llmq.calib` failed everywhere but the repository root)."""
    from llmq.targets.card import TEMPLATE, render_card

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package = Path(llmq.__file__).parent
    assert TEMPLATE.is_file() and TEMPLATE.parent.parent == package
    wheel = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert "force-include" not in wheel and wheel["packages"] == ["llmq"]
    fields = dict.fromkeys(["name", "base_model", "method", "calibration", "size_before", "size_after", "seconds",
                            "device", "dtype", "bits", "group_size", "symmetric", "act_order", "mse", "format_tag",
                            "summary", "layout", "usage", "license_line"], "x")
    fields["name"] = "card-name"
    assert "card-name" in render_card(**fields)


# ---- a model's own code --------------------------------------------------------------------------------------------


def test_code_in_a_model_directory_never_runs_unasked(tmp_path, tiny_llama_dir, calib_file, capsys):
    """A directory whose config names its own code (auto_map + configuration_*.py): every entry point passes
    trust_remote_code=False to transformers, so nothing of it runs (transformers would otherwise ask on stdin and
    run it on "y"); an architecture transformers does not know is one line naming the code, not a prompt."""
    import shutil

    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evilx'\n"
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "evilx", "architectures": ["EvilModel"],
                                                     "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (unknown / "configuration_evil.py").write_text(code)
    known = tmp_path / "known"  # a Llama whose config also names code: the built-in class is used, the code is not
    shutil.copytree(tiny_llama_dir, known)
    _edit_json(known / "config.json", lambda config: config.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"}))
    (known / "configuration_evil.py").write_text(code)
    for argv in (["eval", str(unknown), "--ppl", str(calib_file)], ["export-gguf", str(unknown), "--out", str(tmp_path / "x.gguf")],
                 ["quantize", str(unknown), "--out", str(tmp_path / "q")]):
        code_, line = run_cli(capsys, *argv)
        assert code_ == 2 and "wants to run its own code (config.json's auto_map)" in line, (argv, line)
    with pytest.raises(LlmqError, match="wants to run its own code"):
        llmq.load(unknown)
    assert main(["quantize", str(known), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "k")]) == 0
    assert main(["eval", str(tmp_path / "k"), "--ppl", str(calib_file), "--seqlen", "32", "--windows", "1",
                 "--kl", str(known)]) == 0
    assert not marker.exists()


# ---- unbounded reads -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "directory"])
def test_a_text_source_that_is_not_a_regular_file_is_refused_before_any_work(kind, tmp_path, tiny_llama_dir, capsys):
    """--calib /dev/zero grew to 4.4 GB in 5.5 s and a FIFO without a writer blocked forever: both are refused
    before the model loads, for quantize and eval alike."""
    source = {"device": Path("/dev/zero"), "fifo": tmp_path / "fifo", "directory": tmp_path / "dir"}[kind]
    if kind == "fifo":
        os.mkfifo(source)
    elif kind == "directory":
        source.mkdir()
    started = time.monotonic()
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--calib", str(source), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{source} is not a regular file" in line, line
    code, line = run_cli(capsys, "eval", str(tiny_llama_dir), "--ppl", str(source))
    assert code == 2 and f"{source} is not a regular file" in line, line
    assert time.monotonic() - started < 60  # neither read nor blocked (a loose bound: only a hang exceeds it)


def test_a_long_text_file_is_read_up_to_the_bound_and_said(tmp_path, monkeypatch):
    from llmq.calib import text

    messages = []
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    path = tmp_path / "long.txt"
    path.write_text("line of text\n" * 1000)
    read = text.read_text_file(path, max_chars=1000)
    assert read == "line of text\n" * (1000 // 13) and len(messages) == 1 and "reading its first" in messages[0]
    assert text.read_text_file(path) == "line of text\n" * 1000


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_an_oversized_model_file_is_refused_before_it_is_parsed(name, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import shutil

    from llmq.calib import models

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    monkeypatch.setitem(models.MODEL_FILE_LIMITS, name, 1024)  # the real bounds are 16-128 MB
    with open(model / name, "a") as f:
        f.write(" " * 2048)
    for argv in (["quantize", str(model), "--method", "rtn", "--out", str(tmp_path / "o")],
                 ["eval", str(model), "--ppl", str(tmp_path / "t.txt")]):
        (tmp_path / "t.txt").write_text("some text " * 100)
        code, line = run_cli(capsys, *argv)
        assert code == 2 and f"{name} is " in line and f"MB, more than any real {name}" in line, line


# ---- small ones ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out, expect", [("", "--out is empty"), ("x" * 240, "is 240 bytes long; names of at most")])
def test_an_empty_or_too_long_out_is_refused_before_loading(out, expect, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = run_cli(capsys, "quantize", str(tiny_llama_dir), "--method", "rtn", "--out", out)
    assert code == 2 and expect in line, line
    assert list(tmp_path.iterdir()) == []  # no default-named output, no staging directory


@pytest.mark.parametrize("edit, expect", [
    (lambda weights: weights.update(strategy="unknown"), "weight strategy 'unknown' is not read"),
    (lambda weights: weights.update(num_bits=4.7), "num_bits 4.7 is not an integer"),
])
def test_a_config_llmq_does_not_read_is_one_line(edit, expect, rtn_checkpoint, tmp_path):
    _edit_json(rtn_checkpoint / "config.json",
               lambda config: edit(config["quantization_config"]["config_groups"]["group_0"]["weights"]))
    with pytest.raises(LlmqError, match=expect):
        llmq.load(rtn_checkpoint)


def test_a_card_cannot_point_the_kl_base_outside(rtn_checkpoint, calib_file, tmp_path, capsys):
    """`--kl auto` takes the base model a card names only as a hub id or a directory name beside the checkpoint:
    `../..` or an absolute path in a downloaded card must not make llmq load a model from elsewhere."""
    card = rtn_checkpoint / "README.md"
    for named in ("../../..", "/somewhere"):
        card.write_text(card.read_text().replace(card.read_text().split("base_model: ")[1].split("\n")[0], named, 1))
        assert main(["eval", str(rtn_checkpoint), "--ppl", str(calib_file), "--seqlen", "32", "--windows", "1"]) == 0
        captured = capsys.readouterr()
        assert "is neither a hub id nor a directory name; pass --kl BASE" in captured.err and "KL vs" not in captured.out


def test_an_nf4_checkpoint_is_not_exported_as_gguf(tmp_path, tiny_llama_dir, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "nf4", "--method", "rtn", "--out", str(out)]) == 0
    code, line = run_cli(capsys, "export-gguf", str(out), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "is NF4 (bitsandbytes), which no GGUF type holds exactly" in line
    assert not (tmp_path / "x.gguf").exists()


# ---- sharded indexes -----------------------------------------------------------------------------------------------


@pytest.fixture
def sharded_dir(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, trust_remote_code=False)
    model.save_pretrained(directory, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(tiny_llama_dir, trust_remote_code=False).save_pretrained(directory)
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    return directory


@pytest.mark.parametrize("damage, expect", [
    ("parent", "names shard '../outside.safetensors'"),
    ("absolute", "which is not a file name beside the index"),
    ("not a string", "names shard 123"),
    ("missing shard", "cannot read"),
])
def test_a_sharded_index_cannot_point_outside_the_model_or_crash(damage, expect, sharded_dir, tmp_path, capsys):
    """A checkpoint's index names its shards: an absolute path or ../ made llmq read any file on the machine, and a
    missing shard or a non-string entry was a traceback (unguarded safe_open)."""
    index_path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = next((k, v) for k, v in index["weight_map"].items() if "layers.1." in k)
    if damage == "parent":
        index["weight_map"][key] = "../outside.safetensors"
        (tmp_path / "outside.safetensors").write_bytes((sharded_dir / shard).read_bytes())  # a readable file there
    elif damage == "absolute":
        index["weight_map"][key] = str(sharded_dir / shard)
    elif damage == "not a string":
        index["weight_map"][key] = 123
    else:
        (sharded_dir / shard).unlink()
    index_path.write_text(json.dumps(index))
    code, line = run_cli(capsys, "quantize", str(sharded_dir), "--method", "rtn", "--group-size", "32",
                         "--out", str(tmp_path / "o"))
    assert code == 2 and expect in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, expect", [
    (dict(num_hidden_layers=200000), "config.json says num_hidden_layers 200000, but the checkpoint holds 2 decoder"),
    (dict(hidden_size=4194304), "config.json says hidden_size 4194304, but model.embed_tokens.weight is [49152, 64]"),
])
def test_a_config_its_checkpoint_contradicts_is_refused_before_building(edit, expect, sharded_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """`num_hidden_layers: 200000` ran 101 s into 5.3 GB, `hidden_size: 4194304` asked for 412 GB: the config is
    checked against the shards' headers before any model is built (sharded and single-file checkpoints)."""
    from llmq.calib import lazy

    built = []
    monkeypatch.setattr(lazy, "build_lazy", lambda *args: built.append(args))
    for model in (sharded_dir, _single_file_copy(sharded_dir, tmp_path)):
        _edit_json(model / "config.json", lambda config: config.update(edit))
        for argv in (["quantize", str(model), "--method", "rtn", "--out", str(tmp_path / "o")],
                     ["quantize", str(model), "--method", "rtn", "--format", "gguf", "--type", "Q8_0",
                      "--out", str(tmp_path / "o.gguf")]):
            code, line = run_cli(capsys, *argv)
            assert code == 2 and expect in line, line
    assert not built


def _single_file_copy(sharded: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for path in sorted(sharded.glob("model-*.safetensors")):
        tensors.update(load_file(path))
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    for path in sharded.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            (single / path.name).write_bytes(path.read_bytes())
    return single


def test_an_integer_weight_in_a_float_checkpoint_is_refused(sharded_dir, tmp_path, capsys):
    """An int32 weight was accepted (cast to the model's float type): a float checkpoint holds float weights."""
    from safetensors.torch import load_file, save_file

    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    key, shard = next((k, v) for k, v in index["weight_map"].items() if k.endswith("layers.1.mlp.up_proj.weight"))
    tensors = load_file(sharded_dir / shard)
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, sharded_dir / shard, metadata={"format": "pt"})
    code, line = run_cli(capsys, "quantize", str(sharded_dir), "--method", "rtn", "--out", str(tmp_path / "o"))
    assert code == 2 and f"stores {key} as I32; an unquantized checkpoint holds float weights" in line, line


def test_a_full_disk_while_writing_the_output_is_one_line(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """ENOSPC while the output is written (after the layers): one line naming the file, nothing left at --out."""
    import errno

    from llmq.targets import shards

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "model.safetensors"))

    monkeypatch.setattr(shards.ShardWriter, "add", full)
    assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--group-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llmq: error: No space left on device writing ") and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _break_truncated(tokenizer: dict, path: Path) -> None:
    path.write_text(json.dumps(tokenizer)[:1000])


def _break_model_type(tokenizer: dict, path: Path) -> None:
    tokenizer["model"]["type"] = "Nonsense"
    path.write_text(json.dumps(tokenizer))


def _break_vocabulary(tokenizer: dict, path: Path) -> None:
    del tokenizer["model"]["vocab"]
    path.write_text(json.dumps(tokenizer))


def _id_past_the_embedding(tokenizer: dict, path: Path) -> None:
    tokenizer["model"]["vocab"]["hello"] = 10**6
    path.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("damage, expect", [
    (_break_truncated, "has no usable tokenizer (JSONDecodeError"),
    (_break_model_type, "has no usable tokenizer (Exception: data did not match"),
    (_break_vocabulary, "has no usable tokenizer (Exception: Missing vocab"),
    (_id_past_the_embedding, "the tokenizer gives token id 1000000 but the model's embedding has 49152 rows"),
])
def test_eval_with_a_broken_tokenizer_is_one_line(damage, expect, tmp_path, tiny_llama_dir, rtn_checkpoint, capsys):
    """`llmq eval` on a malformed tokenizer.json or one giving ids past the embedding was a traceback (quantize gave
    one line): one line for a float model and for a quantized one."""
    import shutil

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    for source in (tiny_llama_dir, rtn_checkpoint):
        model = tmp_path / f"broken-{source.name}"
        shutil.copytree(source, model)
        damage(json.loads((model / "tokenizer.json").read_text()), model / "tokenizer.json")
        code, line = run_cli(capsys, "eval", model, "--ppl", text, "--windows", "1", "--seqlen", "32")
        assert code == 2 and expect in line, line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_all_finite_finds_a_nan_or_inf_anywhere(dtype):
    """The finite check of every layer read (llmq/core/device.py: one aminmax per chunk): a NaN, +Inf or -Inf in
    any chunk, the last value included, is found; finite tensors (and an empty one) pass."""
    from llmq.core.device import all_finite

    values = torch.randn(1000).to(dtype)
    assert all_finite(values, chunk=64) and all_finite(values[:0])
    bad = [float("nan")] if dtype == torch.float8_e4m3fn else [float("nan"), float("inf"), -float("inf")]
    for value in bad:
        for where in (0, 500, 999):
            spoiled = values.clone()
            spoiled[where] = value
            assert not all_finite(spoiled, chunk=64), (value, where)
