"""The names a model's tensors have on disk, which are not always the names they have in transformers 5.

transformers converts checkpoints at load time (conversion_mapping.py): Mixtral's `block_sparse_moe.experts.<e>.w1`
becomes `mlp.experts.gate_up_proj`, Qwen3-MoE's `mlp.experts.<e>.gate_proj` likewise, and `save_pretrained` reverts
it. A quantized checkpoint must use the on-disk names too: that is what transformers converts from and what
vLLM's loaders (which follow the hub layout, `experts.<e>.<proj>` per expert) read. Rather than a table per
model, llmq asks transformers' own reverse conversion, on marker tensors: every Linear (every expert projection
of a fused experts module) is filled with its own code, the conversion runs, and the code found under each
on-disk name says which Linear it is. A code that comes back mixed with others means the checkpoint stores that
Linear fused with others (GPT-OSS keeps its experts as 3-D tensors on disk). Llama 4's experts are fused on disk
too, but transformers makes them per-expert Linears itself when it loads a compressed-tensors checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.calib.experts import PROJECTIONS, expert_markers, experts_modules, fused_tensors


def _revert(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def _marker(code: float, shape) -> torch.Tensor:
    """A tensor of `shape` holding one code everywhere, without the memory (an expanded scalar)."""
    return torch.tensor(code, dtype=torch.float64).expand(shape)


def _single_code(tensor: torch.Tensor) -> float | None:
    """The one value a marker tensor holds, or None when it holds several. A marker the conversion left as it was
    is still an expanded scalar (every stride 0): read one element rather than materialize it (Llama-3-8B's
    embedding marker would be 4.2 GB of float64 to sort)."""
    if tensor.numel() == 0:
        return None
    if all(stride == 0 for stride in tensor.stride()):
        return tensor[(0,) * tensor.dim()].item()
    values = torch.unique(tensor)
    return values.item() if values.numel() == 1 else None


def _decode(model: nn.Module, state: dict[str, torch.Tensor], code_of: dict[float, str]):
    """Run the reverse conversion on marker tensors; yields (on-disk key, name) for every key holding one code."""
    for key, tensor in _revert(model, state).items():
        code = _single_code(tensor)
        if code in code_of:
            yield key, code_of[code]


def _unfused_by_transformers(module: nn.Module) -> bool:
    """Experts transformers itself turns into per-expert Linears when it loads a compressed-tensors checkpoint
    (its MODULES_TO_PATCH_FOR_QUANTIZATION: Llama 4's), whose names are then ours: `experts.<e>.<proj>`."""
    try:
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
        from transformers.utils.quantization_config import QuantizationMethod
    except ImportError:
        return False
    entry = MODULES_TO_PATCH_FOR_QUANTIZATION.get(type(module).__name__)
    return entry is not None and QuantizationMethod.COMPRESSED_TENSORS in entry["quantization_methods"]


def checkpoint_names(model: nn.Module, linears: list[str]) -> dict[str, str | None]:
    """Linear name in the (unfused) model -> its module name in a compressed-tensors checkpoint on disk; None
    where the checkpoint stores it fused with others."""
    state, code_of = {}, {}

    def code(name: str) -> float:
        code_of[float(len(code_of) + 1)] = name
        return float(len(code_of))

    wanted = set(linears)
    experts, as_is = set(), set()
    for path, module in model.named_modules():
        if hasattr(module, "llmq_fused"):
            names = {f"{path}.{e}.{proj}" for e in range(module.llmq_num_experts) for proj in PROJECTIONS}
            if _unfused_by_transformers(module):
                as_is |= names
                continue
            state.update(expert_markers(module, f"{path}.", lambda e, proj: code(f"{path}.{e}.{proj}")))
            experts |= names
    for name in linears:
        if name not in experts | as_is:
            weight = model.get_submodule(name).weight
            state[f"{name}.weight"] = _marker(code(name), weight.shape)
    names: dict[str, str | None] = {name: (name if name in as_is else None) for name in linears}
    for key, name in _decode(model, state, code_of):
        if key.endswith(".weight") and name in wanted:
            names[name] = key.removesuffix(".weight")
    return names


def checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unquantized tensors under their on-disk names; experts kept as floats go back to their fused tensors."""
    state = dict(state)
    for path, module in model.named_modules():
        if hasattr(module, "llmq_fused") and f"{path}.0.gate_proj.weight" in state:
            for key in [k for k in state if k.startswith(f"{path}.") and k[len(path) + 1].isdigit()]:
                del state[key]
            state.update(fused_tensors(module, f"{path}."))
    return _revert(model, state)


def model_names(model: nn.Module, packed_suffixes: tuple[str, ...]) -> dict[str, str]:
    """On-disk tensor name -> the (unfused) model's name, for every tensor a checkpoint of this model may hold:
    each Linear's weight or packed tensors (`<linear>.<suffix>`) and every other parameter and buffer."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    renamed = {}
    for name, disk in checkpoint_names(model, list(linears)).items():
        disk = disk or name
        renamed.update({f"{disk}.{suffix}": f"{name}.{suffix}" for suffix in ("weight", *packed_suffixes)})
    state, code_of = {}, {}
    weights = {f"{name}.weight" for name in linears}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in weights:
            code_of[float(len(code_of) + 1)] = name
            state[name] = _marker(float(len(code_of)), tensor.shape)
    renamed.update(_decode(model, state, code_of))
    return renamed


def has_per_expert_checkpoint(model: nn.Module) -> bool:
    """Whether this model's checkpoints store routed experts one Linear per projection (not fused)."""
    modules = experts_modules(model)
    if not modules:
        return False
    path = next(name for name, m in model.named_modules() if m is modules[0])
    names = checkpoint_names(model, [f"{path}.0.gate_proj"])
    return names[f"{path}.0.gate_proj"] is not None
