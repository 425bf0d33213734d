"""Every architecture in the layer map quantizes end to end, and loads back packed with the same outputs."""

import pytest
import torch
from conftest import save_tiny_model

import llmq
from llmq.calib.arch import LAYER_MAPS, layer_map_for, quantizable_linears
from llmq.core.errors import LlmqError
from llmq.runtime.modeling import QuantLinear
from llmq import QuantizeConfig, quantize


@pytest.mark.parametrize("model_type", sorted(LAYER_MAPS))
def test_architecture_quantizes_and_reloads(model_type, tmp_path, smollm2_tokenizer_dir, calib_file):
    source = save_tiny_model(tmp_path / "src", smollm2_tokenizer_dir, model_type)
    out = tmp_path / "out"
    config = QuantizeConfig.of(method="gptq", group_size=32, symmetric=False, calib=str(calib_file), samples=4,
                            seqlen=32, device="cpu")
    result = quantize(str(source), out, config)
    assert result.size_after < result.size_before

    from transformers import AutoModelForCausalLM

    packed = llmq.load(out, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    expected = set(quantizable_linears(dense, layer_map_for(model_type)))
    found = {name for name, module in packed.named_modules() if isinstance(module, QuantLinear)}
    assert found == expected and len(found) == 2 * sum(len(g.linears) for g in LAYER_MAPS[model_type].groups)

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = dense(ids).logits
        for name in found:
            dense.get_submodule(name).weight.data = packed.get_submodule(name).dequantized_weight()
        after_dense, after_packed = dense(ids).logits, packed(ids).logits
    assert torch.allclose(after_packed, after_dense, atol=1e-4)
    # Quantization changed the model, but not beyond recognition (4-bit on a random model).
    change = ((after_dense - before).norm() / before.norm()).item()
    assert 0 < change < 0.5


def test_unknown_architecture_names_itself_and_the_supported_ones():
    with pytest.raises(LlmqError, match=r"architecture 'mamba' is not supported \(supported: gemma2, .*llama"):
        layer_map_for("mamba")
