"""Model-free quantization (llmq/model_free.py): a checkpoint rounded tensor by tensor from its safetensors, no model
built; the tensors and the config are those of the model-class path, and transformers loads the result."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file

from llmq import QuantizeConfig, quantize
from llmq.cli import main


def _tensors(out):
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _groups(out):
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return {name: group for name, group in config["config_groups"].items()}, sorted(config["ignore"])


@pytest.mark.parametrize("model_type, options", [
    ("llama", dict(group_size=32)),
    ("llama", dict(group_size=32, ignore=("mlp.down_proj", r"re:.*layers\.0\.self_attn\.[qk]_proj"))),
    ("llama", dict(scheme="W8A16")),
    ("llama", dict(scheme="FP8_DYNAMIC")),
    ("llama", dict(scheme="MXFP4A16")),
    ("llama", dict(scheme="MXFP8")),  # inputs quantized at run time: still data-free
    ("llama", dict(scheme="W4AFP8")),  # int4 in int-quantized tensors, the same group fallback
    ("llama_128", dict(scheme="FP8_BLOCK")),  # 128-wide Linears (FP8_BLOCK's input groups), partial row blocks
    ("llama", dict()),  # the default group of 128 does not divide the 64-wide Linears: the same fallback
    ("qwen3_moe", dict(group_size=32)),  # per-expert tensors, the router left out and listed in `ignore`
])
def test_model_free_writes_the_model_class_paths_tensors(model_type, options, tmp_path, smollm2_tokenizer_dir):
    sizes = dict(hidden_size=128, intermediate_size=256, head_dim=32) if model_type == "llama_128" else {}
    model = save_tiny_model(tmp_path / model_type, smollm2_tokenizer_dir, model_type.removesuffix("_128"), **sizes)
    with_class = quantize(str(model), tmp_path / "class", QuantizeConfig.of(method="rtn", device="cpu", **options))
    free = quantize(str(model), tmp_path / "free", QuantizeConfig.of(model_free=True, **options))
    one, other = _tensors(with_class.out), _tensors(free.out)
    assert one.keys() == other.keys()
    for name in one:
        assert one[name].dtype == other[name].dtype and torch.equal(one[name], other[name]), name
    files = sorted(path.name for path in with_class.out.glob("*.safetensors"))
    assert files == sorted(path.name for path in free.out.glob("*.safetensors"))
    assert all((with_class.out / name).read_bytes() == (free.out / name).read_bytes() for name in files)
    assert _groups(with_class.out) == _groups(free.out)
    assert free.quantized_fraction == pytest.approx(with_class.quantized_fraction, abs=1e-9)
    assert json.loads((free.out / "llmq.json").read_text())["model_free"] is True


def test_a_model_type_transformers_does_not_know_is_quantized_model_free(tmp_path, smollm2_tokenizer_dir, capsys,
                                                                        monkeypatch):
    """Day 0: a model_type transformers has no class for could not be quantized at all. A data-free scheme is
    rounded from the safetensors (said in one line); the files are a Llama's under another name, so once the
    model_type is put back, transformers loads them (in a fresh process) with the model-class output's logits."""
    model = save_tiny_model(tmp_path / "llama", smollm2_tokenizer_dir)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, model_type="brand_new_lm", architectures=["BrandNewForCausalLM"])))
    monkeypatch.setattr("llmq.core.log.quiet", False)
    capsys.readouterr()
    assert main(["quantize", str(model), "--group-size", "32", "--out", str(tmp_path / "free")]) == 0
    assert "transformers has no class for model_type 'brand_new_lm': quantizing it model-free" in capsys.readouterr().err
    code = main(["quantize", str(model), "--method", "gptq", "--calib", "x.txt", "--out", str(tmp_path / "no")])
    assert code == 2 and "a run without the model rounds each weight alone" in capsys.readouterr().err

    config_path.write_text(json.dumps(config))
    for path in (tmp_path / "free" / "config.json",):
        written = json.loads(path.read_text())
        path.write_text(json.dumps(dict(written, model_type=config["model_type"], architectures=config["architectures"])))
    quantize(str(model), tmp_path / "class", QuantizeConfig.of(method="rtn", group_size=32, device="cpu"))
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=False)\n"
              "torch.save(model(torch.arange(100, 164).reshape(2, 32)).logits, sys.argv[2])\n")
    for out in ("free", "class"):  # each in a fresh process, as a user loads it
        subprocess.run([sys.executable, "-c", script, str(tmp_path / out), str(tmp_path / f"{out}.pt")], check=True)
    logits = [torch.load(tmp_path / f"{out}.pt", weights_only=True) for out in ("free", "class")]
    assert torch.equal(logits[0], logits[1])


def test_model_free_refuses_what_needs_the_model(tmp_path, tiny_llama_dir, capsys):
    for flags in (["--method", "gptq"], ["--format", "gguf"], ["--scheme", "FP8"], ["--calib", "x.txt"]):
        code = main(["quantize", str(tiny_llama_dir), "--model-free", *flags, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "--model-free: a run without the model rounds each weight alone" in err, (flags, err)
    assert main(["quantize", str(tiny_llama_dir), "--model-free", "--scheme", "NVFP4A16", "--out", str(tmp_path / "o")]) == 2
    assert "NVFP4A16's global scale is shared by the Linears that read one input" in capsys.readouterr().err
    assert main(["quantize", "--model-free", "--out", str(tmp_path / "o")]) == 2
    assert "--model-free reads a local checkpoint directory" in capsys.readouterr().err
    # the group-size rule is the model-class path's own (compressed_tensors.fitted_scheme): --strict-groups holds
    assert main(["quantize", str(tiny_llama_dir), "--model-free", "--strict-groups", "--out", str(tmp_path / "o")]) == 2
    assert "--strict-groups is set" in capsys.readouterr().err and not (tmp_path / "o").exists()
