"""--target-bpw / --target-size: a GGUF type per tensor from measured sensitivity (llmq/targets/gguf/sizing.py)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from llmq import QuantizeConfig, quantize
from llmq.calib.arch import decoder_layout, quantizable_linears
from llmq.core.errors import LlmqError
from llmq.inspect import inspect
from llmq.methods.grids.kquant import BlockTensor
from llmq.methods.grids.kquant_search import encode
from llmq.targets.gguf.mixtures import get_mixture, is_quantizable
from llmq.targets.gguf.sizing import Option, choose_types, measure_sensitivity, parse_size, sample_rows, tensor_options
from llmq.targets.gguf.target import tensor_plan
from llmq.targets.gguf.writer import RECIPE_KEY, gguf_names, stacked_shapes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# 256-wide rows, so that every k-quant and i-quant type is a candidate; a short vocabulary keeps the embedding small
_SIZES = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
              head_dim=64, vocab_size=1024, pad_token_id=None)


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("4.2GB") == 4_200_000_000
    assert parse_size("800MB") == 800_000_000
    assert parse_size("3.5GiB") == int(3.5 * 2**30)
    assert parse_size("1.5 m") == 1_500_000
    assert parse_size("1024") == 1024
    with pytest.raises(LlmqError, match="write it like 4.2GB"):
        parse_size("4.2 parsecs")


def test_a_sampled_tensor_cost_holds_the_heavy_rows_of_a_skewed_vocabulary():
    """A vocabulary's row weights (token frequencies, the head's G) fall off as a power law and the rows' errors
    vary: the sample's estimate is within 5% of the whole tensor's sum, where evenly spaced rows scaled up (the
    first version) are far off on the same rows."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 32768, 256
    zipf = 1.0 / torch.arange(1, rows + 1, dtype=torch.float32) ** 1.1
    weights = [zipf[torch.randperm(rows, generator=generator)], torch.rand(rows, generator=generator) ** 4]
    errors = torch.rand(rows, generator=generator) * 2 + 0.5
    sample = sample_rows(rows, cols, weights)
    assert sample is not None and len(sample.rows) == (1 << 20) // cols
    assert sample_rows(1024, cols, weights) is None  # small enough to measure whole
    for term, weight in enumerate(weights):
        exact = float((weight * errors).sum())
        assert sample.cost(term, weight, errors[sample.rows]) == pytest.approx(exact, rel=0.05)
    evenly = torch.linspace(0, rows - 1, len(sample.rows)).round().long()
    scaled = float((weights[0][evenly] * errors[evenly]).sum()) * rows / len(evenly)
    assert abs(scaled / float((weights[0] * errors).sum()) - 1) > 0.2


def _exact_knapsack(options: dict[str, list[Option]], budget: int) -> float:
    """The least summed cost within `budget` (dynamic programming over integer bytes)."""
    best = np.zeros(budget + 1)
    for opts in options.values():
        new = np.full(budget + 1, np.inf)
        for option in opts:
            if option.bytes <= budget:
                new[option.bytes:] = np.minimum(new[option.bytes:], best[: budget + 1 - option.bytes] + option.cost)
        best = new
    return float(best.min())


@pytest.mark.parametrize("seed", range(6))
def test_type_choice_is_within_a_percent_of_the_exact_knapsack(seed):
    """Convex costs (each type down costs more than the last), as rounding errors are: the greedy hull walk then
    lands within 1% of the exact optimum, never over the budget."""
    rng = random.Random(seed)
    options = {}
    for i in range(24):
        sizes = sorted(rng.sample(range(2, 40), 5))
        sensitivity = rng.uniform(0.1, 10)
        options[f"t{i}"] = [Option(T.Q4_K, size, sensitivity * 2.0 ** (-size / 4)) for size in sizes]
    low = sum(min(o.bytes for o in opts) for opts in options.values())
    high = sum(max(o.bytes for o in opts) for opts in options.values())
    for budget in np.linspace(low, high, 7).astype(int):
        chosen = choose_types(options, int(budget))
        assert sum(o.bytes for o in chosen.values()) <= budget
        cost = sum(o.cost for o in chosen.values())
        assert cost <= _exact_knapsack(options, int(budget)) * 1.01 + 1e-12


def _float_model(tmp_path, tokenizer_dir, seed=0):
    source = save_tiny_model(tmp_path / f"src{seed}", tokenizer_dir, "llama", seed=seed, loud_channels=8.0, **_SIZES)
    return source, AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False).eval()


def _spearman(a, b) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_predicted_cost_ranks_tensors_as_their_measured_kl(tmp_path, smollm2_tokenizer_dir):
    """Each tensor alone rounded to Q3_K: the predicted KL increase against the measured one on other windows.
    (On the reference model: scripts/bench_gguf_size.py --proxy.)"""
    _, model = _float_model(tmp_path, smollm2_tokenizer_dir)
    g = torch.Generator().manual_seed(0)
    sensitivity = measure_sensitivity(model, torch.randint(0, 1024, (8, 64), generator=g))
    names = gguf_names(model)
    shapes = {n: s for n, s in stacked_shapes(model, names).items() if is_quantizable(n, s)}
    weighted = set(quantizable_linears(model, decoder_layout(model, torch.device("cpu"), folds=False)))
    options = tensor_options(model, names, shapes, sensitivity, weighted)
    test = torch.randint(0, 1024, (8, 64), generator=g)
    with torch.no_grad():
        base = torch.log_softmax(model(test).logits, -1)
    params = dict(model.named_parameters())
    predicted, measured = [], []
    for hf_name, gguf_name in names.items():
        if gguf_name not in options:
            continue
        param, original = params[hf_name], params[hf_name].data.clone()
        importance = sensitivity.input_squares.get(hf_name.removesuffix(".weight"))
        if hf_name.removesuffix(".weight") not in weighted:
            importance = None
        param.data = BlockTensor(T.Q3_K, encode(original, T.Q3_K, importance), tuple(original.shape)).dequantize()
        with torch.no_grad():
            logp = torch.log_softmax(model(test).logits, -1)
        param.data = original
        measured.append(float((base.exp() * (base - logp)).sum(-1).mean()))
        predicted.append(next(o.cost for o in options[gguf_name] if o.qtype == T.Q3_K))
    ratios = sorted(p / m for p, m in zip(predicted, measured))
    assert _spearman(predicted, measured) > 0.8, list(zip(predicted, measured))
    assert 0.2 < ratios[len(ratios) // 2] < 5  # the right size too, not only the right order


def test_chosen_types_cost_less_than_llamacpp_mixtures_of_the_same_size(tmp_path, smollm2_tokenizer_dir):
    """On one model's measured costs: at the bytes of each fixed mixture, the chosen types' summed cost is no more
    than the mixture's (the mixture is one of the choices the knapsack had)."""
    _, model = _float_model(tmp_path, smollm2_tokenizer_dir, seed=1)
    sensitivity = measure_sensitivity(model, torch.randint(0, 1024, (4, 64)))
    names = gguf_names(model)
    shapes = {n: s for n, s in stacked_shapes(model, names).items() if is_quantizable(n, s)}
    weighted = set(quantizable_linears(model, decoder_layout(model, torch.device("cpu"), folds=False)))
    options = tensor_options(model, names, shapes, sensitivity, weighted)
    for mixture in ("Q2_K", "IQ2_XS", "IQ3_XXS", "Q3_K_M", "IQ3_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K"):
        _, types = tensor_plan(model, get_mixture(mixture), has_imatrix=True)
        fixed = {name: next(o for o in options[name] if o.qtype == types[name]) for name in options}
        budget = sum(o.bytes for o in fixed.values())
        chosen = choose_types(options, budget)
        assert sum(o.bytes for o in chosen.values()) <= budget
        assert sum(o.cost for o in chosen.values()) <= sum(o.cost for o in fixed.values()), mixture


@pytest.mark.parametrize("goal", [dict(target_bpw=2.5), dict(target_bpw=4.0), dict(target_size="600kB")])
def test_sized_file_lands_on_its_target_and_runs_in_llamacpp(goal, tmp_path, smollm2_tokenizer_dir):
    from test_gguf import logits_three_ways

    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, "llama", loud_channels=8.0, **_SIZES)
    out = tmp_path / "sized.gguf"
    quantize(str(source), out, QuantizeConfig.of(format="gguf", device="cpu", samples=4, seqlen=64, **goal))
    reader = GGUFReader(out)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    target = parse_size(goal["target_size"]) if "target_size" in goal else goal["target_bpw"] * weights / 8
    assert abs(out.stat().st_size / target - 1) < 0.03
    card = json.loads(bytes(reader.get_field(RECIPE_KEY).parts[-1]).decode())["sizing"]
    written = {t.name: t.tensor_type.name for t in reader.tensors if t.name in card["tensors"]}
    assert written == {name: entry[0] for name, entry in card["tensors"].items()}
    assert len(set(written.values())) > 1  # a mixture, not one type everywhere
    assert abs(card["planned_bytes"] / out.stat().st_size - 1) < 0.01  # the metadata estimate holds
    assert any(line.startswith("  sized to ") for line in inspect(out).lines())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False).eval()
    original, expected, got = logits_three_ways(model, out)
    # llama.cpp computes with the file's weights (the gap left: its 8-bit rounding of activations in quantized dot
    # products, which grows to ~4% of the largest logit when most matrices are IQ1_S), far from the original's
    gap, quantization = (np.abs(got - expected).max(), np.abs(original - expected).max())
    assert gap / np.abs(expected).max() < 0.05
    assert gap < 0.3 * quantization


@pytest.mark.parametrize(("flags", "message"), [
    (dict(target_bpw=4.0, target_size="1MB"), "pass one of them"),
    (dict(target_bpw=4.0, gguf_type="Q4_K_M"), "drop --type Q4_K_M"),
    (dict(target_bpw=0.5), "out of range"),
    (dict(target_size="10kB"), "below the smallest file"),
    (dict(target_size="4.2 parsecs"), "write it like 4.2GB"),
    (dict(target_bpw=4.0, format="compressed-tensors"), "add --format gguf"),
])
def test_size_flags_are_one_line_errors(flags, message, tiny_llama_dir, tmp_path):
    options = {"format": "gguf", "device": "cpu", **flags}
    out = tmp_path / ("out.gguf" if options["format"] == "gguf" else "out")
    with pytest.raises(LlmqError, match=message):
        quantize(str(tiny_llama_dir), out, QuantizeConfig.of(**options))
    assert not out.exists()


def test_size_targets_refuse_moe_models_and_imatrix(smollm2_tokenizer_dir, tiny_llama_dir, tmp_path):
    moe = save_tiny_model(tmp_path / "moe", smollm2_tokenizer_dir, "qwen3_moe", vocab_size=1024, pad_token_id=None)
    with pytest.raises(LlmqError, match="dense models"):
        quantize(str(moe), tmp_path / "moe.gguf", QuantizeConfig.of(format="gguf", target_bpw=4.0, device="cpu"))
    with pytest.raises(LlmqError, match="instead of --imatrix"):
        quantize(str(tiny_llama_dir), tmp_path / "x.gguf",
                 QuantizeConfig.of(format="gguf", target_bpw=4.0, imatrix=str(tmp_path / "m.gguf"), device="cpu"))


def test_a_killed_sized_run_resumes_to_the_same_file(tmp_path, smollm2_tokenizer_dir):
    """The sizing pass is deterministic on the checkpointed windows, so a resumed run chooses the same types and
    writes the same bytes as one never interrupted."""
    from test_resume import KILL_AFTER_LAYER

    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, "llama", loud_channels=8.0, **_SIZES)
    options = dict(format="gguf", device="cpu", samples=4, seqlen=64, target_bpw=3.5)
    quantize(str(source), tmp_path / "whole.gguf", QuantizeConfig.of(**options))
    out = tmp_path / "out.gguf"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER, str(source), str(out), "0", json.dumps(options)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    quantize(str(source), out, QuantizeConfig.of(**options))
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_tensors_no_type_fits_stay_f16_and_count_in_the_budget(tmp_path, smollm2_tokenizer_dir):
    """48-wide rows take no quantized type (every block is 32 or 256 wide): ffn_down stays F16, as llama.cpp leaves
    it, and the other tensors still land the file on its size."""
    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, "llama", **dict(_SIZES, intermediate_size=48))
    out = tmp_path / "sized.gguf"
    quantize(str(source), out, QuantizeConfig.of(format="gguf", device="cpu", samples=4, seqlen=64, target_bpw=5.0))
    reader = GGUFReader(out)
    assert {t.tensor_type for t in reader.tensors if "ffn_down" in t.name} == {T.F16}
    weights = sum(int(t.n_elements) for t in reader.tensors)
    assert abs(out.stat().st_size * 8 / weights / 5.0 - 1) < 0.03
