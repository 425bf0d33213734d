"""Every architecture llmq claims, on a tiny random-weight model of it: discovery finds its Linears and exact folds,
GPTQ and AWQ W4 g32 quantize it, the output loads in a fresh process with the input's own Auto class, and its
logits are closer to the float model's than round-to-nearest's are. (Random weights: logic, never quality.)"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TEST_TEXT, save_tiny_model, tiny_config

from llmq import QuantizeConfig, quantize
from llmq.calib.arch import decoder_layout, quantizable_linears
from llmq.calib.discover import apply_fold, find_decoder_layers, is_router
from llmq.calib.models import causal_lm_class
from llmq.core.errors import LlmqError

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "phi", "olmo2", "granite", "cohere",
         "stablelm", "starcoder2", "gpt_neox", "smollm3", "glm4", "exaone4"]
MOE = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text"]
IMAGE_TEXT = ["gemma3", "qwen2_5_vl"]
ARCHITECTURES = DENSE + MOE + IMAGE_TEXT
METHODS = ("rtn", "gptq", "awq")
LOUD = 20.0  # the matrix models' loud embedding channels (conftest.save_tiny_model)


def _float_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    return causal_lm_class(config).from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_discovery_covers_every_linear_and_its_folds_are_exact(model_type):
    model = _float_model(model_type)
    for param in model.parameters():  # random norms too, so the Gemma (1 + w) convention matters
        param.data.normal_(0, 0.3)
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(1))
    layout = decoder_layout(model, torch.device("cpu"), folds=True)
    with torch.no_grad():
        before = model(ids).logits
        # every Linear of the decoder layers is quantized, except routers and gates
        _, layers = find_decoder_layers(model)
        linears = {name for name, module in layers.named_modules() if isinstance(module, torch.nn.Linear)
                   and not is_router(name, module)}
        found = {name.removeprefix(layout.layers + ".") for name in quantizable_linears(model, layout)}
        assert found == linears
        folds = 0
        for layer, layer_map in zip(layers, layout.maps):
            for group in layer_map.groups:
                if group.prev is not None:
                    scales = torch.rand(layer.get_submodule(group.linears[0]).in_features) * 4 + 0.25
                    apply_fold(layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears],
                               scales, group.prev_rows, group.norm_offset)
                    folds += 1
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item())
    assert folds >= len(layers)  # a pre-norm's norm into q/k/v, or (post-norm) up_proj into down_proj
    if model_type.startswith("gemma"):
        assert {g.norm_offset for m in layout.maps for g in m.groups if g.prev and "norm" in g.prev} == {1.0}


def test_parallel_blocks_and_post_norms_are_seen_as_they_are():
    """Cohere runs attention and MLP on one norm's output: one group; OLMo 2's q/k/v read the raw residual."""
    cohere = decoder_layout(_float_model("cohere"), torch.device("cpu"), folds=True).maps[0].groups[0]
    assert cohere.linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                              "mlp.up_proj") and cohere.prev == "input_layernorm" and cohere.block is None
    olmo = decoder_layout(_float_model("olmo2"), torch.device("cpu"), folds=True).maps[0].groups[0]
    assert olmo.prev is None and olmo.block == "self_attn"


def test_layers_differ_and_routers_stay_in_the_model_dtype():
    """DeepSeek-V3: layer 0 dense, layer 1 MoE; the router is not quantized."""
    model = _float_model("deepseek_v3")
    layout = decoder_layout(model, torch.device("cpu"), folds=False)
    assert "mlp.gate_proj" in layout.maps[0].linears and not any("experts" in n for n in layout.maps[0].linears)
    assert sum(g.expert for g in layout.maps[1].groups) == 2 * 4  # 4 experts: gate/up, then down
    assert not any(name.endswith(".gate") for name in layout.maps[1].linears)


def test_conv1d_models_are_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()
    with pytest.raises(LlmqError, match=r"decoder layer 0 \(GPT2Block\) keeps 100% of its weights outside nn.Linear"):
        decoder_layout(model, torch.device("cpu"), folds=False)


def test_encoder_decoder_models_are_refused_before_loading(tmp_path):
    from transformers import T5Config

    from llmq.calib.arch import check_config

    with pytest.raises(LlmqError, match="t5 is an encoder-decoder model"):
        check_config(T5Config())


# A fresh interpreter per architecture would cost ~10 s each: one process loads every output, each with the Auto
# class of its input, and reports relative logit errors against the float model on real text.
FRESH_PROCESS = r"""
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
import llmq
from llmq.calib.models import causal_lm_class
from llmq.core import log
log.quiet = True
jobs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
report = {}
for model_type, (source, outputs) in jobs.items():
    config = transformers.AutoConfig.from_pretrained(source)
    auto = causal_lm_class(config)
    with torch.no_grad():
        reference = auto.from_pretrained(source, dtype=torch.float32)(ids).logits
        report[model_type] = {"auto": auto.__name__}
        for method, out in outputs.items():
            model = auto.from_pretrained(out, dtype=torch.float32)
            logits = model(ids).logits
            packed = llmq.load(out, dtype=torch.float32)(ids).logits
            report[model_type][method] = ((logits - reference).norm() / reference.norm()).item()
            report[model_type][method + "_llmq_load"] = ((packed - logits).norm() / logits.norm()).item()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, smollm2_tokenizer_dir, calib_file):
    """Quantize every architecture with each method, then load every output in one fresh process."""
    root = tmp_path_factory.mktemp("architectures")
    jobs, failures, summaries = {}, {}, {}
    for model_type in ARCHITECTURES:
        # a few loud channels in the residual stream, as trained LLMs have: on plain random weights AWQ's scales
        # have nothing to protect, its choices between near-equal candidates are decided by rounding noise, and
        # it lands 5% above or below RTN from one thread count to the next
        source = save_tiny_model(root / model_type, smollm2_tokenizer_dir, model_type, loud_channels=LOUD)
        outputs = {}
        try:
            for method in METHODS:
                # random weights have no attention sink to protect: GPTQ's sink weighting (made for trained
                # models, llmq/calib/statistics.py) only thins the data here, so it is off
                extra = {"sink_weight": 1.0} if method == "gptq" else {}
                config = QuantizeConfig.of(method=method, group_size=32, symmetric=False, calib=str(calib_file),
                                           samples=16, seqlen=64, device="cpu", **extra)
                result = quantize(str(source), root / f"{model_type}-{method}", config)
                outputs[method] = str(result.out)
                summaries[(model_type, method)] = result
        except Exception as error:  # reported by that architecture's test, not by every test
            failures[model_type] = error
            continue
        jobs[model_type] = (str(source), outputs)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    # 16 windows of held-out text: the error of a few short windows is too noisy to rank methods by
    ids = tokenizer(TEST_TEXT.read_text()[:40_000], return_tensors="pt").input_ids[:, :1024].reshape(16, 64)
    torch.save(ids, root / "ids.pt")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs), str(root / "ids.pt")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), failures, summaries


@pytest.mark.xdist_group("architecture-matrix")  # one worker builds the matrix fixture, once
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_outputs_load_in_a_fresh_process_and_gptq_and_awq_beat_rtn(model_type, matrix):
    report, failures, _ = matrix
    if model_type in failures:
        raise failures[model_type]
    errors = report[model_type]
    print(model_type, json.dumps(errors))
    expected_auto = "AutoModelForImageTextToText" if model_type == "qwen2_5_vl" else "AutoModelForCausalLM"
    assert errors["auto"] == expected_auto
    assert errors["gptq"] < errors["rtn"], errors
    assert errors["awq"] < errors["rtn"], errors
    assert max(errors[m] for m in METHODS) < 0.5  # changed, not destroyed
    # llmq's own packed loader computes what transformers does (CPU int4 kernel vs dequantized float32)
    assert max(errors[m + "_llmq_load"] for m in METHODS) < 2e-2, errors


EXPERT_TENSOR = {  # what the hub checkpoints of each MoE model call one expert's gate projection
    "qwen2_moe": "mlp.experts.0.gate_proj", "qwen3_moe": "mlp.experts.0.gate_proj",
    "deepseek_v3": "mlp.experts.0.gate_proj", "mixtral": "block_sparse_moe.experts.0.w1",
    "llama4_text": "feed_forward.experts.0.gate_proj",  # fused on the hub; transformers unfuses it for this format
}


@pytest.mark.xdist_group("architecture-matrix")  # one worker builds the matrix fixture, once
@pytest.mark.parametrize("model_type", MOE)
def test_moe_checkpoints_name_experts_as_the_hub_does(model_type, matrix):
    """Per-expert packed tensors under the hub's names, written symmetric (what transformers and vLLM load for
    experts); a model whose checkpoints keep experts fused and which transformers does not unfuse for
    compressed-tensors (GPT-OSS) keeps them unquantized."""
    from safetensors import safe_open

    _, failures, summaries = matrix
    if model_type in failures:
        raise failures[model_type]
    out = summaries[(model_type, "gptq")].out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    if model_type in EXPERT_TENSOR:
        assert config["config_groups"]["group_0"]["weights"]["symmetric"] is True
        assert f"model.layers.1.{EXPERT_TENSOR[model_type]}.weight_packed" in names
        assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    else:
        assert any(n.endswith("experts.gate_up_proj") for n in names)
        assert not any(".experts.0." in n for n in names)
    # the router stays in the model's dtype, as a plain tensor, and is listed in `ignore`: vLLM builds routers as
    # Linear layers under the checkpoint's scheme (its Qwen3-MoE refused our files until they were listed)
    routers = [n.removesuffix(".weight") for n in names if n.endswith((
        "mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight", "feed_forward.router.weight"))]
    assert routers and set(routers) <= set(config["ignore"]), (routers, config["ignore"])
    # the summary's share of the decoder's matrix weights stored quantized: all but the routers where experts are
    # written per expert; GPT-OSS's fused experts stay in bfloat16 and its run says so (llmq/calib/coverage.py)
    fraction = summaries[(model_type, "gptq")].quantized_fraction
    print(f"{model_type}: {fraction:.2%} of the decoder's matrix weights stored quantized")  # pytest -s shows it
    assert fraction >= 0.95 if model_type in EXPERT_TENSOR else fraction < 0.5, (model_type, fraction)


def test_a_run_that_leaves_most_weights_unquantized_says_which_and_why(tmp_path, smollm2_tokenizer_dir, capsys,
                                                                        monkeypatch):
    """GPT-OSS into compressed-tensors came out with its experts in bfloat16 and nothing in the summary said how
    much: the summary gives the share, and above 5% left unquantized one line names them and the reason."""
    monkeypatch.setattr("llmq.core.log.quiet", False)
    source = save_tiny_model(tmp_path / "gpt_oss", smollm2_tokenizer_dir, "gpt_oss")
    result = quantize(str(source), tmp_path / "o", QuantizeConfig.of(method="rtn", group_size=32, device="cpu"))
    err = capsys.readouterr().err
    assert result.quantized_fraction == pytest.approx(0.111, abs=0.01)
    assert ("88.9% of the decoder's matrix weights stay unquantized: 88.7% in a layout this format cannot store "
            "quantized (mlp.experts.<e>.gate_proj.weight") in err, err
    assert "11.1% of the decoder's matrix weights stored quantized" in err
    gguf = quantize(str(source), tmp_path / "o.gguf", QuantizeConfig.of(method="rtn", format="gguf", device="cpu"))
    assert gguf.quantized_fraction > 0.99


def test_experts_without_routed_tokens_are_calibrated_on_every_token(tmp_path, smollm2_tokenizer_dir, calib_file):
    """DeepSeek-V3 with expert 3 never selected (its routing bias pushed down): without the floor GPTQ would see an
    empty Hessian and zero that expert; with it, the expert is calibrated on every token and lands near RTN."""
    from safetensors.torch import load_file, save_file

    import llmq

    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, "deepseek_v3")
    state = load_file(source / "model.safetensors")
    state["model.layers.1.mlp.gate.e_score_correction_bias"][3] = -1e4
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    original = {proj: state[f"model.layers.1.mlp.experts.3.{proj}.weight"].float()
                for proj in ("gate_proj", "up_proj", "down_proj")}

    def expert_error(out):
        packed = llmq.load(out, dtype=torch.float32)
        return max(((packed.get_submodule(f"model.layers.1.mlp.experts.3.{proj}").dequantized_weight() - w).norm()
                    / w.norm()).item() for proj, w in original.items())

    errors, results = {}, {}
    for name, method, floor in (("rtn", "rtn", 64), ("gptq", "gptq", 64), ("no-floor", "gptq", 0)):
        config = QuantizeConfig.of(method=method, group_size=32, calib=str(calib_file), samples=16, seqlen=64,
                                   device="cpu", expert_min_tokens=floor)
        results[name] = quantize(str(source), tmp_path / name, config)
        errors[name] = expert_error(tmp_path / name)
    assert "of 8 expert Linear groups were routed fewer than 64 calibration tokens and were calibrated on every " \
           "token instead" in results["gptq"].calibration
    assert errors["gptq"] < 1.5 * errors["rtn"], errors  # GPTQ trades a little weight error for output error
    assert errors["no-floor"] > 0.9, errors  # what the floor prevents: an uncalibrated expert zeroed


def test_route_all_experts_gives_every_expert_every_token(tmp_path, smollm2_tokenizer_dir, calib_file):
    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, "qwen3_moe")
    config = QuantizeConfig.of(method="gptq", group_size=32, calib=str(calib_file), samples=4, seqlen=32,
                               device="cpu", route_all_experts=True)
    result = quantize(str(source), tmp_path / "out", config)
    assert "fewer than" not in result.calibration  # nothing falls back: every expert saw all 128 tokens
