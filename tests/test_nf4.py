"""NF4 (bitsandbytes' pre-quantized 4-bit layout): the tensors are bitsandbytes' own, the grid is the stored one,
GPTQ rounds onto it, and transformers + bitsandbytes load the checkpoint with llmq.load's logits."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as bnb  # noqa: E402

import llmq  # noqa: E402
from llmq import QuantizeConfig, quantize  # noqa: E402
from llmq.core.scheme import PRESETS, QuantScheme  # noqa: E402
from llmq.methods.grids.nf4 import Nf4Grid  # noqa: E402
from llmq.targets.bnb import QUANT_STATE, nf4_tensors  # noqa: E402

FRESH_BNB_LOGITS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit", type(model.model.layers[0].mlp.up_proj)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""


def _weight(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 0, rows)[:, None]


def test_bitsandbytes_decodes_our_tensors_to_our_values():
    w = _weight()
    fit = Nf4Grid(QuantScheme(**PRESETS["nf4"]), torch.bfloat16).fit(w)
    result = fit.result(fit.nearest())
    tensors = nf4_tensors("x", result)
    state = {key.removeprefix("x.weight."): value for key, value in tensors.items() if key != "x.weight"}
    quant_state = bnb.QuantState.from_dict(state, device=torch.device("cpu"))
    theirs = bnb.dequantize_4bit(tensors["x.weight"], quant_state).float()
    assert torch.equal(theirs, result.dequantize().to(torch.bfloat16).float())
    assert torch.equal(result.levels, bnb.get_4bit_type("nf4", device="cpu").float())
    assert json.loads(bytes(tensors[f"x.weight.{QUANT_STATE}"].tolist()))["shape"] == [48, 512]


def test_rounding_on_the_stored_grid_is_never_worse_than_bitsandbytes_own():
    """bitsandbytes picks each code from the exact block absmax, then stores the double-quantized one; llmq picks it
    on the stored grid. Same stored absmax, so every weight's error is at most bitsandbytes' own."""
    w = _weight(seed=1)
    packed, quant_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnb.dequantize_4bit(packed, quant_state).float()
    fit = Nf4Grid(QuantScheme(**PRESETS["nf4"]), torch.float32).fit(w)
    ours = fit.result(fit.nearest())
    assert torch.allclose(ours.absmax(), bnb.dequantize_blockwise(quant_state.absmax, quant_state.state2)
                          + quant_state.offset, rtol=0, atol=1e-7)
    ours_error, their_error = (ours.dequantize() - w).abs(), (theirs - w).abs()
    assert (ours_error <= their_error + 1e-7).all()
    assert ours_error.pow(2).sum() < their_error.pow(2).sum()  # and strictly better overall


def test_gptq_on_nf4_lowers_the_output_error_of_rtn():
    """GPTQ's error feedback on the NF4 grid (static blocks, act-order) against nearest rounding on the same grid."""
    from test_gptq import correlated_inputs, output_error

    from llmq.calib.statistics import HessianCollector
    from llmq.core.config import MethodOptions
    from llmq.methods import build_method

    x = correlated_inputs(features=256)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(2))
    grid = Nf4Grid(QuantScheme(**PRESETS["nf4"]), torch.bfloat16)
    stats = HessianCollector(256, torch.device("cpu"))
    stats.add(x)
    fit = grid.fit(w)
    rtn = output_error(w, fit.result(fit.nearest()).dequantize(), x)
    gptq_result = build_method("gptq", MethodOptions()).quantize(w, stats, grid)
    assert torch.equal(gptq_result.qabsmax, fit.qabsmax)  # the same stored grid: only the codes differ
    assert output_error(w, gptq_result.dequantize(), x) < 0.8 * rtn


def test_checkpoint_loads_in_transformers_with_bitsandbytes(tiny_llama_dir, calib_file, tmp_path):
    out = tmp_path / "nf4"
    quantize(str(tiny_llama_dir), out, QuantizeConfig.of(scheme="nf4", method="gptq", calib=str(calib_file),
                                                         samples=4, seqlen=64, device="cpu"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] and "lm_head" in config["llm_int8_skip_modules"]
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH_BNB_LOGITS, str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ours = llmq.load(out, dtype=torch.bfloat16)(ids).logits.float()
    # both compute in bfloat16 from the same decoded weights: the sums round in another order
    assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-2
