"""Damaged files, byte by byte: every llmq path that reads a model file ends in one clean line or a correct result.

Bounded and seeded (16 cases for each of three readers, 8 for the embedded-default loader, whose every
successful read parses the 49k-token vocabulary four times: 56 in all): byte flips in the header (where a flip changes what the file *means*)
and truncations anywhere. A case passes when the reader raises LlmqError (one line for the user) or returns
exactly what the undamaged file holds; any other exception, a hang or different weights fail it.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from llmq import QuantizeConfig, quantize
from llmq.calib.models import load_embedded_default, load_model
from llmq.core.errors import LlmqError

CASES = 16


def damaged_copies(data: bytes, header_end: int, seed: int, cases: int = CASES):
    """(description, bytes): two of three flip 1-3 header bytes, one in three truncates the file."""
    rng = random.Random(seed)
    for case in range(cases):
        if case % 3 == 2:
            cut = rng.randrange(1, len(data))
            yield f"truncated at {cut}", data[:cut]
        else:
            damaged = bytearray(data)
            positions = sorted(rng.randrange(0, header_end) for _ in range(rng.randint(1, 3)))
            for position in positions:
                damaged[position] ^= 1 << rng.randrange(8)
            yield f"bits flipped at {positions}", bytes(damaged)


def _same_state(model, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[key], value) for key, value in reference.items() if key in state)


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")  # safetensors: a u64 header length, then the JSON header


def read_damaged_copies(tmp_path: Path, original: Path, file_name: str, cases, read, reference) -> list[str]:
    """Copy the directory `original` once per case with `file_name` replaced by the damaged bytes and `read` it:
    each case must be refused (LlmqError) or give exactly the `reference` tensors. Returns the outcomes."""
    outcomes = []
    for case, (what, damaged) in enumerate(cases):
        copy = tmp_path / f"case{case}"
        shutil.copytree(original, copy)
        (copy / file_name).write_bytes(damaged)
        try:
            model = read(copy)
        except LlmqError:
            outcomes.append("refused")
            continue
        assert _same_state(model, reference), f"{what}: loaded weights that differ from the file's"
        outcomes.append("read")
    return outcomes


def test_damaged_safetensors_is_refused_or_read_exactly(tmp_path, tiny_llama_dir):
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    cases = damaged_copies(data, _header_end(data), seed=0)
    outcomes = read_damaged_copies(tmp_path, tiny_llama_dir, "model.safetensors", cases,
                                   lambda copy: load_model(str(copy))[0], load_file(tiny_llama_dir / "model.safetensors"))
    assert outcomes.count("refused") >= CASES // 2, outcomes  # most damage is caught, none slips through as different weights


def test_damaged_quantized_checkpoint_is_refused_or_read_exactly(tmp_path, tiny_llama_dir):
    """llmq.load (what eval and export-gguf read) on damaged copies of a packed checkpoint's safetensors."""
    import llmq

    checkpoint = tmp_path / "ckpt"
    quantize(str(tiny_llama_dir), checkpoint, QuantizeConfig.of(method="rtn", group_size=32, device="cpu"))
    data = (checkpoint / "model.safetensors").read_bytes()
    reference = {k: v.clone() for k, v in llmq.load(checkpoint).state_dict().items()}
    outcomes = read_damaged_copies(tmp_path, checkpoint, "model.safetensors",
                                   damaged_copies(data, _header_end(data), seed=3), llmq.load, reference)
    assert outcomes.count("refused") >= CASES // 2, outcomes


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama_short_vocab_dir) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    quantize(str(tiny_llama_short_vocab_dir), out, QuantizeConfig.of(format="gguf", gguf_type="Q8_0", device="cpu"))
    return out


def _gguf_cases(tiny_gguf: Path, seed: int, cases: int = CASES):
    data = tiny_gguf.read_bytes()
    return list(damaged_copies(data, GGUFReader(tiny_gguf).data_offset, seed, cases))


def test_damaged_gguf_is_refused_or_read_exactly_by_the_embedded_loader(tmp_path, tiny_gguf):
    """The embedded-default loader (transformers' GGUF reader) on damaged copies of a GGUF file."""
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file name the loader looks for
    (tmp_path / "ok").mkdir()
    shutil.copy(tiny_gguf, tmp_path / "ok" / name)
    read = lambda directory: load_embedded_default(torch.float32, str(directory))[0]  # noqa: E731
    reference = {k: v.clone() for k, v in read(tmp_path / "ok").state_dict().items()}
    outcomes = read_damaged_copies(tmp_path, tmp_path / "ok", name, _gguf_cases(tiny_gguf, seed=1, cases=CASES // 2),
                                   read, reference)
    assert outcomes.count("refused") >= CASES // 4, outcomes


_LLAMACPP_CASES = r"""
import json, sys
from llmq.core.errors import LlmqError
from llmq.eval.llamacpp import open_llama
for path in sys.argv[1:]:
    print(json.dumps({"case": path, "started": True}), flush=True)
    try:
        with open_llama(path, n_ctx=32, logits_all=True) as llm:
            llm.eval([1, 2, 3, 4])
            scores = [float(x) for x in llm.scores[3][:8]]
        print(json.dumps({"case": path, "outcome": "ran", "scores": scores}), flush=True)
    except LlmqError as error:
        print(json.dumps({"case": path, "outcome": "refused", "line": str(error)}), flush=True)
"""


def test_damaged_gguf_is_refused_or_run_by_llamacpp(tmp_path, tiny_gguf):
    """llmq's llama.cpp path (open_llama, as llamacpp_perplexity uses it) on damaged copies, in a child process:
    a crash inside llama.cpp's C code would take the test runner with it."""
    pytest.importorskip("llama_cpp")
    paths = []
    for case, (_, damaged) in enumerate(_gguf_cases(tiny_gguf, seed=2)):
        paths.append(tmp_path / f"case{case}.gguf")
        paths[-1].write_bytes(damaged)
    done = subprocess.run([sys.executable, "-c", _LLAMACPP_CASES, str(tiny_gguf), *map(str, paths)],
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if "outcome" in line]
    assert done.returncode == 0, (lines[-1] if lines else None, done.stderr[-2000:])
    assert len(results) == CASES + 1, lines
    reference, cases = results[0], results[1:]
    assert reference["outcome"] == "ran"
    for case in cases:  # a file llama.cpp runs must run as the undamaged one does
        if case["outcome"] == "ran":
            assert np.allclose(case["scores"], reference["scores"]), case
    assert sum(case["outcome"] == "refused" for case in cases) >= CASES // 2, cases


def test_damaged_sharded_index_is_refused_or_read_exactly(tmp_path, tiny_llama_dir):
    """The index of a sharded checkpoint, damaged (flipped bytes anywhere in its JSON, truncated): refused in one
    line or read into exactly the undamaged weights, lazily or whole."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, trust_remote_code=False)
    model.save_pretrained(sharded, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(tiny_llama_dir, trust_remote_code=False).save_pretrained(sharded)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    data = (sharded / "model.safetensors.index.json").read_bytes()
    for lazy, seed in ((False, 5), (True, 6)):
        def read(copy, lazy=lazy):
            loaded = load_model(str(copy), lazy=lazy)[0]
            weights = getattr(loaded, "llmq_lazy", None)
            if weights is not None:  # a lazy model's layers are on disk until asked for: read them all
                weights.load_all()
            return loaded

        outcomes = read_damaged_copies(tmp_path / f"lazy{lazy}", sharded, "model.safetensors.index.json",
                                       damaged_copies(data, len(data), seed=seed), read, reference)
        assert "refused" in outcomes, outcomes


KILL_AFTER_LAYER_1 = r"""
import os, signal, sys, json
import llmq
from llmq.calib.resume import LayerCheckpoints
from llmq.core import log
log.quiet = True
save_layer = LayerCheckpoints.save_layer
def save_then_die(self, index, *args, **kwargs):
    save_layer(self, index, *args, **kwargs)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
LayerCheckpoints.save_layer = save_then_die
llmq.quantize(sys.argv[1], sys.argv[2], llmq.QuantizeConfig.of(**json.loads(sys.argv[3])))
"""


def test_damaged_resume_checkpoints_are_refused_or_resumed_exactly(tmp_path, smollm2_tokenizer_dir, calib_file):
    """A killed run's checkpoints, one file damaged per case (flipped bytes in a safetensors header or anywhere in a
    JSON file, or truncated): the rerun either refuses in one line or writes exactly an uninterrupted run's bytes
    (having continued from the last good layer or started over); never a traceback, never other weights."""
    import signal

    from conftest import save_tiny_model

    from llmq.calib.resume import resume_directory

    model = save_tiny_model(tmp_path / "model", smollm2_tokenizer_dir, num_hidden_layers=3)
    options = dict(method="gptq", group_size=32, calib=str(calib_file), samples=8, seqlen=64, device="cpu")
    whole = tmp_path / "whole"
    quantize(str(model), whole, QuantizeConfig.of(**options))
    killed = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER_1, str(model), str(killed), json.dumps(options)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    left = resume_directory(killed)
    names = ["layer-00000.safetensors", "layer-00001.json", "inputs-00002.safetensors", "samples.safetensors",
             "run.json", "layer-00001.safetensors", "inputs-00001.safetensors", "layer-00000.json"]
    rng_seed, outcomes = 11, []
    for case, name in enumerate(names * 2):
        data = (left / name).read_bytes()
        end = _header_end(data) if name.endswith(".safetensors") else len(data)
        what, damaged = list(damaged_copies(data, end, seed=rng_seed + case, cases=case % 3 + 1))[-1]
        out = tmp_path / f"case{case}"
        shutil.copytree(left, resume_directory(out))
        (resume_directory(out) / name).write_bytes(damaged)
        try:
            quantize(str(model), out, QuantizeConfig.of(**options))
        except LlmqError:
            outcomes.append("refused")
            continue
        assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes(), \
            f"{name}, {what}: wrote other weights"
        outcomes.append("written")
    assert outcomes.count("written") >= len(outcomes) // 2, outcomes  # damage is mostly recovered from
