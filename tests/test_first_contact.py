"""What a newcomer meets first: defaults that work on every model (a per-Linear group size where the requested
one does not divide), llm-compressor's preset names, `llmq --version`, the recipe every output records and
`--recipe` repeating it, `llmq inspect`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model, transformers_logits

import llmq
from llmq import QuantizeConfig, quantize
from llmq.cli import main
from llmq.core.errors import LlmqError
from llmq.core.scheme import QuantScheme, scheme_with_preset
from llmq.targets.compressed_tensors import quantization_config


@pytest.mark.parametrize("group, widths, expected", [
    (128, [576, 1536], 64),      # SmolLM2-135M under the default group: 64 throughout (96 divides 576 but not 1536)
    (128, [4096, 14336], 128),   # divides every width: unchanged
    (128, [960, 2560], 64),      # SmolLM2-360M
    (128, [96, 200], 32),        # 200: no power of two from 32 divides it; it stays per channel, the rest take 32
    (96, [576, 1024], 64),       # a requested size that does not divide every width falls to a power of two
    (96, [576, 960], 96),        # ... and one that does is kept, power of two or not
    (16, [200, 64], 8),
    (-1, [100], -1),
])
def test_the_run_takes_the_largest_power_of_two_group_that_divides_every_linear(group, widths, expected):
    scheme = QuantScheme(group_size=group)
    assert scheme.fitting_group_size(widths) == expected
    chosen = QuantScheme(group_size=expected)
    assert [chosen.group_size_for(w) for w in widths] == [w if expected == -1 or w % expected else expected
                                                          for w in widths]


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny Llama whose 96-wide Linears the default group (128) does not divide (they take 32), and whose
    down_proj (200 inputs) no power of two from 32 divides (one scale per channel)."""
    return save_tiny_model(tmp_path_factory.mktemp("odd-width"), smollm2_tokenizer_dir, hidden_size=96, head_dim=24,
                           intermediate_size=200)


@pytest.fixture(scope="module")
def odd_width_out(tmp_path_factory, odd_width_dir, calib_file):
    """Symmetric: transformers keeps such a checkpoint compressed and reads each config group's scheme (it
    dequantizes an asymmetric one with a single group's scheme: test_an_asymmetric_mixed_checkpoint_says_so)."""
    out = tmp_path_factory.mktemp("odd-out") / "w4"
    quantize(str(odd_width_dir), out, QuantizeConfig.of(calib=str(calib_file), samples=4, seqlen=64, device="cpu",
                                                        symmetric=True))
    return out


def test_default_group_size_quantizes_a_model_it_does_not_divide(odd_width_out):
    config = json.loads((odd_width_out / "config.json").read_text())["quantization_config"]
    groups = {json.dumps(g["targets"]): g["weights"] for g in config["config_groups"].values()}
    assert len(groups) == 2
    by_size = {(w["strategy"], w["group_size"]): json.loads(targets) for targets, w in groups.items()}
    assert by_size[("group", 32)] == [rf"re:.*\.{p}$" for p in ("mlp\\.gate_proj", "mlp\\.up_proj", "self_attn\\.k_proj",
                                                                  "self_attn\\.o_proj", "self_attn\\.q_proj",
                                                                  "self_attn\\.v_proj")]
    assert by_size[("channel", None)] == [r"re:.*\.mlp\.down_proj$"]
    from safetensors import safe_open

    with safe_open(odd_width_out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_shape() == [96, 3]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight_scale").get_shape() == [48, 3]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape() == [96, 1]
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_shape() == [200, 3]
    card = (odd_width_out / "README.md").read_text()
    assert ("--group-size 128 does not divide 12 Linears 96 wide (self_attn.q_proj, ...), 2 Linears 200 wide "
            "(mlp.down_proj, ...); using groups of 32 for every Linear, the largest that divides them; Linears 200 wide "
            "take one scale per channel (no group from 32 divides them)) |") in card


def test_per_linear_groups_load_in_transformers_with_llmq_logits(odd_width_out, tmp_path):
    ids, theirs = transformers_logits(odd_width_out, tmp_path, length=24)
    model = llmq.load(odd_width_out, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.scheme.group_size == 32
    assert model.model.layers[0].mlp.down_proj.scheme.group_size == -1
    with torch.no_grad():
        ours = model(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_an_asymmetric_mixed_checkpoint_says_transformers_cannot_read_it(odd_width_dir, tmp_path, offline_messages):
    quantize(str(odd_width_dir), tmp_path / "asym", QuantizeConfig.of(method="rtn", device="cpu"))
    said = [m for m in offline_messages if "does not divide" in m]
    assert len(said) == 1 and "which transformers cannot dequantize on an asymmetric grid" in said[0]
    assert "--sym writes one transformers loads too" in (tmp_path / "asym" / "README.md").read_text()


def test_strict_groups_refuses_before_any_work(odd_width_dir, tmp_path, capsys):
    assert main(["quantize", str(odd_width_dir), "--out", str(tmp_path / "o"), "--method", "rtn",
                 "--strict-groups"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--group-size 128 does not divide" in error[0] and "--strict-groups" in error[0]
    assert not (tmp_path / "o").exists()


def test_group_targets_fall_back_to_exact_names_where_a_suffix_is_shared():
    """Two Linears with one suffix in different groups (a vision tower's and the text model's q_proj) are named
    exactly, so that no pattern matches a Linear of another group."""
    sizes = {"model.layers.0.self_attn.q_proj": 64, "model.layers.1.self_attn.q_proj": 64,
             "visual.blocks.0.self_attn.q_proj": 32, "model.layers.0.mlp.down_proj": 128}
    config = quantization_config(QuantScheme(group_size=128), True, [], "minmax", sizes)
    targets = {g["weights"]["group_size"]: g["targets"] for g in config["config_groups"].values()}
    assert targets == {128: [r"re:.*\.mlp\.down_proj$"],
                       64: ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
                       32: ["visual.blocks.0.self_attn.q_proj"]}


@pytest.mark.parametrize("name, fields", [
    ("W4A16", dict(bits=4, group_size=128, symmetric=True, weight_type="int", act_bits=None)),
    ("w4a16_asym", dict(bits=4, group_size=128, symmetric=False, act_bits=None)),
    ("W8A16", dict(bits=8, group_size=-1, symmetric=True, act_bits=None)),
    ("W8A8", dict(bits=8, group_size=-1, weight_type="int", act_bits=8, act_dynamic=True)),
    ("FP8", dict(bits=8, weight_type="float", act_bits=8, act_dynamic=False)),
    ("FP8_DYNAMIC", dict(bits=8, weight_type="float", act_bits=8, act_dynamic=True)),
])
def test_llm_compressor_preset_names_mean_what_they_mean_there(name, fields):
    scheme = scheme_with_preset(name, {})
    assert {key: getattr(scheme, key) for key in fields} == fields
    assert scheme_with_preset(name.lower(), {}) == scheme


def test_unknown_scheme_and_a_flag_the_preset_fixes_are_one_line(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--scheme", "W5A16"]) == 2
    assert "--scheme W5A16 is unknown; use one of W4A16, W4A16_ASYM" in capsys.readouterr().err
    with pytest.raises(LlmqError, match="--scheme w4a16 fixes --group-size"):
        scheme_with_preset("W4A16", {"group_size": 64})


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"llmq {llmq.__version__}" == f"llmq {version('llmq')}"


def test_the_recipe_repeats_the_run_byte_for_byte(odd_width_dir, odd_width_out, calib_file, tmp_path, capsys):
    recipe = json.loads((odd_width_out / "llmq.json").read_text())
    assert recipe["version"] == llmq.__version__ and recipe["written_by"] == "llmq"
    assert recipe["config"]["run"]["calib"] == str(calib_file) and recipe["config"]["scheme"]["group_size"] == 32  # what ran
    assert len(recipe["calibration_sha256"]) == 64 and recipe["model"] is None  # a local path is never recorded
    assert main(["quantize", "--recipe", str(odd_width_out), "--out", str(tmp_path / "again")]) == 2
    assert "the recipe was made from a local model (odd-width" in capsys.readouterr().err
    assert main(["quantize", str(odd_width_dir), "--recipe", str(odd_width_out), "--bits", "8",
                 "--out", str(tmp_path / "again")]) == 2
    assert "--recipe repeats a recorded run and fixes --bits; drop them" in capsys.readouterr().err
    assert main(["quantize", str(odd_width_dir), "--recipe", str(odd_width_out / "llmq.json"),
                 "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "llmq.json").read_text())
    assert again["calibration_sha256"] == recipe["calibration_sha256"]
    assert again["config"] == {**recipe["config"], "run": {**recipe["config"]["run"], "device": "cpu"}}
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (odd_width_out / name).read_bytes()


def test_inspect_names_the_groups_the_clients_and_the_recipe(odd_width_out, capsys):
    assert main(["inspect", str(odd_width_out)]) == 0
    out = capsys.readouterr().out
    assert "pack-quantized" in out and "4-bit int weights, group of 32, symmetric" in out
    assert "4-bit int weights, channel, symmetric" in out and "14 quantized Linears" in out
    assert "loads in: transformers (with compressed-tensors), vLLM, llmq.load" in out
    assert f"repeat: llmq quantize --recipe {odd_width_out}" in out
    bits = float(out.split("bits per weight of the quantized matrices: ")[1].split()[0])
    # 4-bit codes + a bf16 scale per 32 weights (q..up) or per row (down_proj)
    assert 4.0 + 16 / 200 < bits < 4.0 + 16 / 32


def test_inspect_reads_a_gguf_and_its_recipe(tiny_llama_short_vocab_dir, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    quantize(str(tiny_llama_short_vocab_dir), out, QuantizeConfig.of(format="gguf", gguf_type="Q8_0", device="cpu"))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gguf" in text and "Q8_0: 16 tensors" in text and "8.50 bits per weight" in text
    assert "llama.cpp (llama-cli, llama-server), ollama" in text and "--method rtn" in text
    assert main(["quantize", str(tiny_llama_short_vocab_dir), "--recipe", str(out), "--out",
                 str(tmp_path / "again.gguf"), "--device", "cpu"]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()



def test_the_model_card_follows_the_hubs_conventions(tiny_llama_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a base model\n")
    quantize(str(base), tmp_path / "out", QuantizeConfig.of(method="rtn", group_size=64, device="cpu"))
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---\n")[1]
    assert {"base_model: base", "base_model_relation: quantized", "license: mit", "pipeline_tag: text-generation",
            "- llmq", "- rtn", "- compressed-tensors"} <= set(front.splitlines())
    for usage in ('AutoModelForCausalLM.from_pretrained("out")', "vllm serve out", 'LLM("out")', 'llmq.load("out"'):
        assert usage in card
    (base / "README.md").unlink()  # no card, no license claimed
    quantize(str(base), tmp_path / "out2", QuantizeConfig.of(method="rtn", group_size=64, device="cpu"))
    assert "license:" not in (tmp_path / "out2" / "README.md").read_text()


def test_eval_reports_the_unquantized_perplexity_of_the_same_windows(tiny_llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "rtn"
    quantize(str(tiny_llama_dir), out, QuantizeConfig.of(method="rtn", group_size=64, device="cpu"))
    assert main(["eval", str(out), "--ppl", str(calib_file), "--seqlen", "64", "--windows", "3",
                 "--kl", str(tiny_llama_dir)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    base = main(["eval", str(tiny_llama_dir), "--ppl", str(calib_file), "--seqlen", "64", "--windows", "3", "--kl", "none"])
    base_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert base == 0 and "unquantized perplexity" in line
    ours, theirs = float(line.rsplit("unquantized perplexity ", 1)[1]), float(base_line.rsplit("perplexity ", 1)[1])
    assert abs(ours / theirs - 1) < 1e-4


def test_a_linear_narrower_than_any_group_is_kept_per_channel_not_refused(tmp_path, smollm2_tokenizer_dir):
    """An MLA kv_b_proj 16 wide (a small DeepSeek-V3 config) refused the whole run: it is stored with one scale per
    output channel in a config group of its own, the other Linears in the largest group dividing them, for
    compressed-tensors and GGUF alike."""
    model = save_tiny_model(tmp_path / "mla", smollm2_tokenizer_dir, "deepseek_v3", kv_lora_rank=16)
    out = quantize(str(model), tmp_path / "o", QuantizeConfig.of(method="rtn", device="cpu")).out
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    strategies = {target: group["weights"]["strategy"] for group in groups for target in group["targets"]}
    assert strategies["re:.*\\.self_attn\\.kv_b_proj$"] == "channel"
    assert strategies["re:.*\\.self_attn\\.q_b_proj$"] == "group"
    assert quantize(str(model), tmp_path / "o.gguf", QuantizeConfig.of(method="rtn", format="gguf",
                                                                       device="cpu")).quantized_fraction > 0.9
