"""SmoothQuant: its folding leaves the float model unchanged, its scales follow the paper's formula, and it lowers
the output error of static per-tensor W8A8 on a model with loud input channels."""

import pytest
import torch
from conftest import save_tiny_model, tiny_config

from llmq import QuantizeConfig, quantize
from llmq.cli import main
from llmq.core.config import MethodOptions
from llmq.methods.smoothquant import SmoothQuant, smoothing_scales


def _loud_float_model(seed=0):
    """A float32 tiny Llama whose norms make a few input channels 30x louder, as trained LLMs' are."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.weight.data[torch.randperm(module.weight.numel(), generator=g)[:4]] *= 30
    return model


def _smooth(model, alpha):
    """SmoothQuant's layer transform on every decoder layer, fed as the harness feeds it."""
    from llmq.calib.arch import decoder_layout
    from llmq.calib.capture import layer_output
    from llmq.calib.harness import capture_layer_inputs

    layout = decoder_layout(model, torch.device("cpu"), folds=True)
    samples = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(1))
    inputs = capture_layer_inputs(model, model.model.layers, samples, torch.device("cpu"), 2, progress=False)
    method = SmoothQuant(MethodOptions(smoothquant=alpha))
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for item in inputs:
                item.for_layer(index)
            method.prepare_layer(layer, layout.maps[index], inputs, None)
            for item in inputs:
                item.hidden = layer_output(layer(item.hidden, **item.kwargs))


def test_folding_leaves_the_float_model_unchanged():
    model = _loud_float_model()
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(2))
    norms_before = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    mlp_before = [{name: getattr(layer.mlp, name).weight.clone() for name in ("gate_proj", "up_proj", "down_proj")}
                  for layer in model.model.layers]
    with torch.no_grad():
        before = model(ids).logits
    _smooth(model, 0.5)
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4
    # and something was moved: the loud channels' norm weights were divided by their (large) scales
    moved = [(layer.input_layernorm.weight - before).abs().max().item()
             for layer, before in zip(model.model.layers, norms_before)]
    assert min(moved) > 1.0
    # down_proj's input was smoothed too, through up_proj's rows: gate and up share the norm's column scales, so
    # up's rows alone were divided by s (down's channel scales), and down's columns multiplied by the same s
    for layer, before in zip(model.model.layers, mlp_before):
        s = (layer.mlp.gate_proj.weight / before["gate_proj"]) / (layer.mlp.up_proj.weight / before["up_proj"])
        assert torch.allclose(s, s[:, :1].expand_as(s), rtol=1e-4)
        assert torch.allclose(layer.mlp.down_proj.weight / before["down_proj"], s[:, 0][None, :], rtol=1e-4)
        assert (s[:, 0].log().std() > 0.1).item()


def test_scales_are_the_papers_formula():
    x = torch.tensor([4.0, 0.25, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(x, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.25, 1.0, 1.0]))  # sqrt(x / w); 1 where either max is 0
    # with alpha 0.5 the input's and the weight's maxima meet: max|x| / s = max|w| * s
    assert torch.allclose((x / s)[:2], (w * s)[:2])


def test_smoothing_lowers_static_w8a8_output_error(tmp_path, smollm2_tokenizer_dir, calib_file):
    """On a model with loud channels, static per-tensor W8A8 loses less with SmoothQuant than without."""
    from safetensors.torch import load_file, save_file

    import llmq

    model_dir = save_tiny_model(tmp_path / "loud", smollm2_tokenizer_dir)
    state = load_file(model_dir / "model.safetensors")  # 4 channels of every norm 30x louder
    g = torch.Generator().manual_seed(0)
    for key in [key for key in state if key.endswith("layernorm.weight")]:
        state[key][torch.randperm(state[key].numel(), generator=g)[:4]] *= 30
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(3))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    errors = {}
    for alpha in (None, 0.5):
        out = tmp_path / f"sq-{alpha}"
        quantize(str(model_dir), out, QuantizeConfig.of(scheme="w8a8", act_dynamic=False, method="rtn",
                                                        smoothquant=alpha, calib=str(calib_file), samples=8,
                                                        seqlen=64, device="cpu"))
        with torch.no_grad():
            logits = llmq.load(out, dtype=torch.float32)(ids).logits
        errors[alpha] = ((logits - reference).norm() / reference.norm()).item()
    assert errors[0.5] < 0.8 * errors[None], errors


@pytest.mark.parametrize("argv, expect", [
    (["--smoothquant", "0.5"], "SmoothQuant moves activation outliers into the weights"),
    (["--scheme", "w8a8", "--smoothquant", "1.5"], "--smoothquant 1.5 is out of range"),
])
def test_bad_smoothquant_flags_are_one_line(argv, expect, capsys, tmp_path, tiny_llama_dir):
    code = main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expect in lines[-1], lines
