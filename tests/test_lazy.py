"""Lazy layers (llmq/calib/lazy.py) and streamed shards (llmq/targets/shards.py): a checkpoint on disk is
quantized a layer at a time and written a tensor at a time, and the output is the very bytes a run that loads
the whole model writes."""

import json
import os

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file

from llmq import QuantizeConfig, quantize
from llmq.calib.lazy import LazyWeights
from llmq.targets.compressed_tensors import CompressedTensorsTarget
from llmq.targets.gguf.target import GGUFTarget
from llmq.targets.shards import ShardWriter


def _files(out):
    """Every file of an output, by name: its bytes."""
    if out.is_file():
        return {"file": out.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".safetensors", ".json")}


def _run(model, out, options, lazy, monkeypatch):
    monkeypatch.setattr("llmq.core.log.quiet", False)
    for target in (CompressedTensorsTarget, GGUFTarget):
        monkeypatch.setattr(target, "lazy_layers", lazy)
    quantize(str(model), out, QuantizeConfig.of(samples=4, seqlen=64, **options))
    return _files(out)


@pytest.mark.parametrize("model_type, options", [
    ("llama", dict(method="gptq", group_size=32)),
    ("mixtral", dict(method="awq", group_size=32)),  # renamed per-expert tensors (block_sparse_moe.experts.<e>.w1)
    ("qwen3_moe", dict(method="gptq", format="gguf", gguf_type="Q4_K_M")),
])
def test_a_lazy_run_writes_the_bytes_a_whole_model_run_writes(model_type, options, tmp_path, smollm2_tokenizer_dir,
                                                               calib_file, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / model_type, smollm2_tokenizer_dir, model_type, loud_channels=20)
    options = dict(options, calib=str(calib_file))
    suffix = ".gguf" if options.get("format") == "gguf" else ""
    lazy = _run(model, tmp_path / f"lazy{suffix}", options, True, monkeypatch)
    assert "each read from its safetensors when the run reaches it" in capsys.readouterr().err
    whole = _run(model, tmp_path / f"whole{suffix}", options, False, monkeypatch)
    assert lazy.keys() == whole.keys()
    for name in lazy:
        assert lazy[name] == whole[name], name


@pytest.mark.parametrize("options", [dict(method="gptq", group_size=32),
                                     dict(method="gptq", format="gguf", gguf_type="Q4_K_M")])
def test_a_model_with_tied_embeddings_is_read_a_layer_at_a_time(options, tmp_path, smollm2_tokenizer_dir, calib_file,
                                                                 monkeypatch, capsys):
    """Tied embeddings (Llama-3.2-1B/3B, Qwen2.5 up to 3B, every Gemma and SmolLM) made the whole model load:
    `lm_head.weight` is not on disk. The skeleton is tied as from_pretrained ties it, the head is read under the
    embedding's name, and the head lets go of the embedding's memory with it once calibration is done."""
    model = save_tiny_model(tmp_path / "tied", smollm2_tokenizer_dir, tie_word_embeddings=True)
    heads = []
    release = LazyWeights.release_globals

    def watching(self):
        release(self)
        heads.append(self.model.get_output_embeddings().weight.is_meta)

    monkeypatch.setattr(LazyWeights, "release_globals", watching)
    options = dict(options, calib=str(calib_file))
    suffix = ".gguf" if options.get("format") == "gguf" else ""
    lazy = _run(model, tmp_path / f"lazy{suffix}", options, True, monkeypatch)
    err = capsys.readouterr().err
    assert "each read from its safetensors when the run reaches it" in err and "whole" not in err, err
    assert heads == [True]
    whole = _run(model, tmp_path / f"whole{suffix}", options, False, monkeypatch)
    assert lazy == whole


def test_a_lazy_run_holds_one_decoder_layer_at_a_time(tmp_path, smollm2_tokenizer_dir, calib_file, monkeypatch):
    model = save_tiny_model(tmp_path / "m", smollm2_tokenizer_dir, num_hidden_layers=4)
    in_memory = []
    load_layer = LazyWeights.load_layer

    def counting(self, index):
        layers = self.model.get_submodule(self.layers_path)
        # a decoder layer counts as held while its attention projections are real tensors
        in_memory.append(sum(not layer.self_attn.q_proj.weight.is_meta for layer in layers))
        load_layer(self, index)

    monkeypatch.setattr(LazyWeights, "load_layer", counting)
    quantize(str(model), tmp_path / "o", QuantizeConfig.of(method="gptq", group_size=32, calib=str(calib_file),
                                                           samples=4, seqlen=64))
    assert len(in_memory) >= 4 and max(in_memory) == 0  # every layer was let go before the next was read


def test_a_checkpoint_without_a_one_to_one_layout_is_loaded_whole(tmp_path, smollm2_tokenizer_dir, capsys,
                                                                  monkeypatch):
    model = save_tiny_model(tmp_path / "gpt_oss", smollm2_tokenizer_dir, "gpt_oss")  # experts fused on disk
    monkeypatch.setattr("llmq.core.log.quiet", False)
    quantize(str(model), tmp_path / "o.gguf", QuantizeConfig.of(format="gguf"))
    err = capsys.readouterr().err
    assert "whole: " in err and "cannot be read one at a time" in err and "opened" not in err


def test_shards_split_at_the_limit_and_read_back_exactly(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(300, 7), "b": torch.randint(-8, 8, (5, 40), dtype=torch.int8),
               "c": torch.randn(1000).to(torch.bfloat16), "d": torch.tensor([3, 4], dtype=torch.int64),
               "e": torch.randn(2, 3, 4).half()}
    shards = ShardWriter(tmp_path, max_shard_bytes=2100)  # [a] (larger than a shard: alone), [b], [c, d, e]
    for name, tensor in tensors.items():
        shards.add(name, tensor)
    assert shards.close() == sum(t.numel() * t.element_size() for t in tensors.values())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    read = {}
    for file in files:
        read.update(load_file(tmp_path / file))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*files, "model.safetensors.index.json"]


def test_a_sharded_output_loads_in_transformers_as_the_single_file_does(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    config = QuantizeConfig.of(method="rtn", group_size=32)
    quantize(str(tiny_llama_dir), tmp_path / "one", config)
    monkeypatch.setattr("llmq.targets.shards.MAX_SHARD_BYTES", 2_000_000)
    quantize(str(tiny_llama_dir), tmp_path / "many", config)
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 2
    tokens = torch.tensor([[1, 5, 9, 200, 3000]])
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)(tokens).logits
              for name in ("one", "many")]
    assert torch.equal(logits[0], logits[1])


def test_a_hub_id_is_fetched_into_the_cache_and_read_a_layer_at_a_time(tmp_path, smollm2_tokenizer_dir):
    """The hub code path, offline: a checkpoint already in the Hugging Face cache (as `huggingface-cli download`
    leaves it) is found by its id and opened lazily from there; its card names the id."""
    import shutil
    import subprocess
    import sys

    model = save_tiny_model(tmp_path / "m", smollm2_tokenizer_dir, num_hidden_layers=2)
    repo = tmp_path / "hub" / "models--llmq-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "o"
    run = subprocess.run([sys.executable, "-m", "llmq", "quantize", "llmq-test/tiny", "--method", "rtn", "--group-size", "32",
                          "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "opened llmq-test/tiny: 2 decoder layers, each read from its safetensors" in run.stderr
    assert "base_model: llmq-test/tiny" in (out / "README.md").read_text()
