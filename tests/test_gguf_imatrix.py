"""llama.cpp's importance matrix files both ways (llmq/targets/gguf/imatrix.py): `--save-imatrix` writes the
run's statistics in llama.cpp's GGUF and legacy layouts, `--imatrix` reads them (and llama-imatrix's) instead of
calibrating. The round trip is exact: a file quantized with `--imatrix` saved by a calibrated run holds the
calibrated run's bytes."""

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from gguf import GGUFReader
from test_resume import KILL_AFTER_LAYER
from transformers import AutoConfig

from llmq import QuantizeConfig, quantize
from llmq.core.errors import LlmqError
from llmq.targets.gguf.imatrix import ImatrixEntry, read_imatrix, write_imatrix

_WIDE = dict(hidden_size=256, intermediate_size=512)  # rows a 256-wide k-quant block fits
TOOLS = Path(__file__).resolve().parents[1] / "bench_out" / "llama.cpp" / "build" / "bin"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tmp_path_factory.mktemp("wide"), smollm2_tokenizer_dir, **_WIDE)


def _run(model, out, **options):
    options = dict(dict(format="gguf", gguf_type="Q4_K_M", device="cpu", samples=8, seqlen=64), **options)
    quantize(str(model), out, QuantizeConfig.of(**options))
    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(out).tensors}


@pytest.fixture(scope="module")
def calibrated(wide_model, calib_file, tmp_path_factory):
    """(the tensors of an imatrix-weighted run, the importance matrix it saved)."""
    directory = tmp_path_factory.mktemp("calibrated")
    saved = directory / "m.imatrix.gguf"
    return _run(wide_model, directory / "calibrated.gguf", calib=str(calib_file), save_imatrix=str(saved)), saved


def _entries(path) -> dict[str, ImatrixEntry]:
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    return {name.removesuffix(".in_sum2"): ImatrixEntry(torch.from_numpy(data.copy()),
                                                        torch.from_numpy(tensors[name.replace("in_sum2", "counts")].reshape(-1).copy()))
            for name, data in tensors.items() if name.endswith(".in_sum2")}


def test_a_saved_imatrix_reproduces_the_calibrated_file(calibrated, wide_model, tmp_path):
    """Both layouts: the saved GGUF imatrix, and the same entries written as a legacy .dat."""
    tensors, saved = calibrated
    legacy = tmp_path / "m.dat"
    write_imatrix(legacy, _entries(saved), "calib", 8, 64)
    assert _run(wide_model, tmp_path / "imported.gguf", imatrix=str(saved)) == tensors  # every type and byte
    assert _run(wide_model, tmp_path / "legacy.gguf", imatrix=str(legacy)) == tensors
    plain = _run(wide_model, tmp_path / "plain.gguf")
    assert sum(plain[name] != tensors[name] for name in plain) >= 8  # the importance changed the rounding


def test_the_saved_file_has_llamacpps_layout(calibrated):
    """What llama.cpp's loader (common/imatrix-loader.cpp) and llama-quantize require: general.type imatrix, the
    three imatrix.* keys, F32 NAME.in_sum2 [n_mat, n_in] and NAME.counts [n_mat, 1], one entry per weight matrix."""
    reader = GGUFReader(calibrated[1])
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 8
    assert reader.get_field("imatrix.chunk_size").contents() == 64
    assert "8 x 64 tokens" in reader.get_field("imatrix.datasets").contents()[0]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 2 * 7  # q k v o gate up down in each of 2 layers
    sums, counts = tensors["blk.1.ffn_down.weight.in_sum2"], tensors["blk.1.ffn_down.weight.counts"]
    assert sums.tensor_type.name == counts.tensor_type.name == "F32"
    assert list(sums.shape) == [512, 1] and list(counts.shape) == [1, 1]  # ggml order: [n_in, n_mat]
    assert float(counts.data.reshape(-1)[0]) == 8 * 64
    assert np.all(sums.data > 0)
    # q, k and v read the same input: the same statistics under each name
    assert np.array_equal(tensors["blk.0.attn_q.weight.in_sum2"].data, tensors["blk.0.attn_v.weight.in_sum2"].data)


def test_moe_imatrix_has_a_row_per_expert_and_round_trips(smollm2_tokenizer_dir, calib_file, tmp_path):
    model = save_tiny_model(tmp_path / "moe", smollm2_tokenizer_dir, "qwen3_moe", hidden_size=256,
                            moe_intermediate_size=256)
    config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    experts, top_k = config.num_experts, config.num_experts_per_tok
    saved = tmp_path / "moe.imatrix.gguf"
    # (every expert on its routed tokens: none falls back to all tokens, so the counts add up to the routings)
    calibrated = _run(model, tmp_path / "calibrated.gguf", calib=str(calib_file), save_imatrix=str(saved),
                      expert_min_tokens=0)
    tensors = {t.name: t for t in GGUFReader(saved).tensors}
    counts = np.asarray(tensors["blk.0.ffn_down_exps.weight.counts"].data).reshape(-1)
    assert list(tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [256, experts]
    assert counts.sum() == top_k * 8 * 64  # each token counted by each expert it was routed to
    assert len(set(counts.tolist())) > 1
    assert _run(model, tmp_path / "imported.gguf", imatrix=str(saved)) == calibrated


def test_legacy_dat_as_llama_imatrix_writes_it(tmp_path):
    """A .dat made byte for byte as llama-imatrix's save_imatrix_legacy: values are mean x² times ncall, an expert
    tensor's rows in one vector; the dataset name and chunk count follow the entries."""
    mean_q, mean_exps = np.arange(1, 5, dtype=np.float32), np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    ncall = 3
    data = struct.pack("<i", 2)
    for name, mean in (("blk.0.attn_q.weight", mean_q), ("blk.0.ffn_up_exps.weight", mean_exps)):
        data += struct.pack("<i", len(name)) + name.encode() + struct.pack("<2i", ncall, mean.size)
        data += (mean.reshape(-1) * ncall).astype("<f4").tobytes()
    data += struct.pack("<i", 7) + struct.pack("<i", 9) + b"calib.txt"
    path = tmp_path / "old.dat"
    path.write_bytes(data)
    imatrix = read_imatrix(path)
    assert imatrix.chunks == 7 and imatrix.datasets == ["calib.txt"]
    assert torch.equal(imatrix.importance("blk.0.attn_q.weight", None, 4), torch.from_numpy(mean_q))
    assert torch.equal(imatrix.importance("blk.0.ffn_up_exps.weight", 1, 4), torch.from_numpy(mean_exps[1]))
    assert imatrix.importance("blk.0.attn_k.weight", None, 4) is None
    with pytest.raises(LlmqError, match="made for another model"):
        imatrix.importance("blk.0.attn_q.weight", None, 8)
    path.write_bytes(data[:40])
    with pytest.raises(LlmqError, match="ends inside an entry"):
        read_imatrix(path)


def test_an_expert_without_tokens_reads_as_no_preference(tmp_path):
    """llama-quantize reads a matrix with zero tokens as importance 1 everywhere; so does llmq, in both layouts."""
    entries = {"blk.0.ffn_down_exps.weight": ImatrixEntry(torch.tensor([[2.0, 4.0], [0.0, 0.0]]),
                                                          torch.tensor([2.0, 0.0]))}
    for name in ("m.gguf", "m.dat"):
        write_imatrix(tmp_path / name, entries, "calib", 1, 2)
        imatrix = read_imatrix(tmp_path / name)
        assert imatrix.importance("blk.0.ffn_down_exps.weight", 0, 2).tolist() == [1.0, 2.0]
        assert imatrix.importance("blk.0.ffn_down_exps.weight", 1, 2).tolist() == [1.0, 1.0]


def test_imatrix_flags_refuse_what_cannot_hold_in_one_line(calibrated, wide_model, tiny_llama_dir, calib_file,
                                                          tmp_path):
    saved = calibrated[1]
    (tmp_path / "model.gguf").write_bytes(saved.with_name("calibrated.gguf").read_bytes())
    cases = [
        (dict(method="gptq", imatrix=str(saved)), "needs the calibration inputs themselves"),
        (dict(imatrix=str(saved), calib=str(calib_file)), "pass one of them"),
        (dict(imatrix=str(saved), save_imatrix=str(tmp_path / "again.gguf")), "collects none"),
        (dict(imatrix=str(tmp_path / "model.gguf")), "not an importance matrix"),  # a model, not an imatrix
        (dict(imatrix=str(tmp_path / "missing.gguf")), "no such file"),
        (dict(imatrix=str(saved), hidden_model=True), "made for another model"),
        (dict(save_imatrix=str(tmp_path / "s.gguf")), "add --calib"),
        (dict(method="awq", calib=str(calib_file), save_imatrix=str(tmp_path / "s.gguf")), "transforms them first"),
        (dict(format="compressed-tensors", gguf_type=None, imatrix=str(saved)), "--format gguf only"),
        (dict(save_imatrix=str(tmp_path / "same.gguf"), calib=str(calib_file)), "is the --out file"),
    ]
    for options, message in cases:
        model = tiny_llama_dir if options.pop("hidden_model", False) else wide_model
        out = tmp_path / ("same.gguf" if "same" in str(options.get("save_imatrix")) else "refused.gguf")
        with pytest.raises(LlmqError, match=message) as refused:
            _run(model, out, **options)
        assert "\n" not in str(refused.value)
        assert not out.exists()


def test_a_lattice_tensor_missing_from_the_imatrix_is_refused(calibrated, wide_model, tmp_path):
    """As llama-quantize: a tensor the mixture makes IQ2_XS with no importance entry is one line, before any work."""
    entries = _entries(calibrated[1])
    del entries["blk.1.ffn_up.weight"]
    partial = tmp_path / "partial.imatrix.gguf"
    write_imatrix(partial, entries, "calib", 8, 64)
    with pytest.raises(LlmqError, match="no entry for blk.1.ffn_up.weight .* makes IQ2_XS") as refused:
        _run(wide_model, tmp_path / "out.gguf", gguf_type="IQ2_XS", imatrix=str(partial))
    assert "\n" not in str(refused.value) and not (tmp_path / "out.gguf").exists()


def test_a_killed_run_saves_the_whole_imatrix_on_resume(wide_model, calib_file, tmp_path):
    """The statistics of the layers an interrupted run finished come back from its checkpoints."""
    options = dict(method="gptq", format="gguf", gguf_type="Q4_K_M", calib=str(calib_file), samples=8, seqlen=64,
                   device="cpu")
    quantize(str(wide_model), tmp_path / "whole.gguf",
             QuantizeConfig.of(**options, save_imatrix=str(tmp_path / "whole.imatrix.gguf")))
    resumed = dict(options, save_imatrix=str(tmp_path / "resumed.imatrix.gguf"))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER, str(wide_model), str(tmp_path / "out.gguf"), "0",
                             json.dumps(resumed)], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    quantize(str(wide_model), tmp_path / "out.gguf", QuantizeConfig.of(**resumed))
    assert (tmp_path / "resumed.imatrix.gguf").read_bytes() == (tmp_path / "whole.imatrix.gguf").read_bytes()


@pytest.mark.skipif(not (TOOLS / "llama-quantize").exists(), reason="llama.cpp's tools are not built "
                    "(scripts/build_llamacpp.sh)")
def test_llama_quantize_and_llmq_read_each_others_imatrix(wide_model, calib_file, tmp_path):
    """llama-quantize --imatrix takes llmq's file (both layouts) and llmq --imatrix takes llama-imatrix's; with the
    same importance matrix both choose the same type for every tensor (llama.cpp's imatrix mixture rules)."""
    f32 = tmp_path / "f32.gguf"
    _run(wide_model, f32, gguf_type="F32")
    for name in ("ours.imatrix.gguf", "ours.dat"):
        _run(wide_model, tmp_path / f"{name}.out.gguf", calib=str(calib_file), save_imatrix=str(tmp_path / name))
        done = subprocess.run([TOOLS / "llama-quantize", "--imatrix", tmp_path / name, f32, tmp_path / f"lq-{name}.gguf",
                               "Q4_K_M"], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "loaded 14 importance matrix entries" in done.stdout + done.stderr
    theirs = tmp_path / "theirs.imatrix.gguf"
    subprocess.run([TOOLS / "llama-imatrix", "-m", f32, "-f", calib_file, "-o", theirs, "-c", "64", "--chunks", "8",
                    "--no-ppl", "-t", "2"], capture_output=True, check=True)
    ours = _run(wide_model, tmp_path / "imported.gguf", imatrix=str(theirs))
    subprocess.run([TOOLS / "llama-quantize", "--imatrix", theirs, f32, tmp_path / "lq.gguf", "Q4_K_M"],
                   capture_output=True, check=True)
    assert {n: t for n, (t, _) in ours.items()} == {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "lq.gguf").tensors}
