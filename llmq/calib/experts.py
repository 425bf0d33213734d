"""Mixture-of-experts layers with fused expert weights, made into one small MLP of Linears per expert.

transformers 5 stores most MoE experts as two 3-D parameters: every expert's gate and up projections in one
tensor (`gate_up_proj`, [experts, 2 * inter, hidden], or transposed) and every down projection in another. The
`use_experts_implementation` decorator records the layout on the module (`is_transposed`, `is_concatenated`:
gate rows then up rows, or interleaved gate/up pairs; `has_bias`). Llama 4's experts are not decorated: they
run every token through every expert with router-scaled inputs (a batched matmul over [experts, tokens]).

`unfuse_experts` replaces, in place, each such module's fused parameters by `experts.<e>.gate_proj / up_proj /
down_proj` Linears and its forward by one that calls them. It is exact (the same products, summed in the same
order) and it is what everything downstream wants:
- the harness and discovery see ordinary Linears; each expert's gate/up Linears see the tokens routed to it,
  so each expert gets its own statistics (and, with `route_all`, every token, for statistics only: the output
  still uses the real routing);
- the per-expert names are those MoE checkpoints on the hub use, which transformers fuses at load and vLLM's
  compressed-tensors MoE loader reads (`experts.<e>.gate_proj.weight_packed`, ...).
The router keeps its own (non-Linear) weight in the model's dtype.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from llmq.core.errors import LlmqError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: gate, up and down Linears (names as in per-expert checkpoints)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding copies of `weight` [out, in] and `bias` (the fused tensor is dropped afterwards)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return linear


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    fused = params.get("gate_up_proj")
    return fused is not None and fused.dim() == 3 and "down_proj" in params and params["down_proj"].dim() == 3


def _layout(module: nn.Module) -> tuple[str, bool, bool]:
    """(routing style, transposed, concatenated) of a fused experts module, or a one-line refusal."""
    name = type(module).__name__
    if hasattr(module, "is_transposed"):  # the use_experts_implementation decorator's record
        if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
            raise LlmqError(f"{name}: experts without a gate projection or with a post-expert norm are not supported yet")
        return "routed", bool(module.is_transposed), bool(module.is_concatenated)
    # Undecorated (Llama 4): [experts, hidden, 2 * inter] weights applied by bmm to [experts, tokens, hidden]
    experts, rows, cols = module.gate_up_proj.shape
    hidden = module.down_proj.shape[2]
    if rows == hidden and module.down_proj.shape[1] * 2 == cols:
        return "dense", True, True
    raise LlmqError(f"{name}: fused experts of an unknown layout {tuple(module.gate_up_proj.shape)}; "
                    "add an override in llmq/calib/arch.py")


def _split_gate_up(fused: torch.Tensor, bias: torch.Tensor | None, transposed: bool, concatenated: bool):
    """One expert's [2 * inter, hidden] gate/up weight (and bias) as (gate weight, up weight, gate bias, up bias)."""
    w = fused.T if transposed else fused
    if concatenated:
        half = w.shape[0] // 2
        rows = (slice(0, half), slice(half, None))
    else:  # interleaved pairs: gate0, up0, gate1, up1, ...
        rows = (slice(0, None, 2), slice(1, None, 2))
    biases = (None, None) if bias is None else (bias[rows[0]], bias[rows[1]])
    return w[rows[0]], w[rows[1]], biases[0], biases[1]


def _join_gate_up(gate: torch.Tensor, up: torch.Tensor, concatenated: bool) -> torch.Tensor:
    """The fused gate/up output layout the module's own `_apply_gate` expects."""
    if concatenated:
        return torch.cat([gate, up], dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
    expert = getattr(self, str(e))
    gate_up = _join_gate_up(expert.gate_proj(x), expert.up_proj(x), self.llmq_concatenated)
    if hasattr(self, "_apply_gate"):
        hidden = self._apply_gate(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = self.act_fn(gate) * up
    return expert.down_proj(hidden)


def _routed_forward(self, hidden_states, top_k_index, top_k_weights):
    """The eager experts loop (transformers' reference), through the per-expert Linears.

    With `route_all`, every expert also runs on every token so that statistics see them all; only the routed
    tokens' outputs are used.
    """
    out = torch.zeros_like(hidden_states)
    for e in range(self.llmq_num_experts):
        token_idx, k_pos = torch.where(top_k_index == e)
        if self.llmq_route_all:  # a copy per expert: its gate/up must not look like another expert's input
            y = _expert_output(self, e, hidden_states.clone())[token_idx]
        elif token_idx.numel() == 0:
            continue
        else:
            y = _expert_output(self, e, hidden_states[token_idx])
        y = y * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _dense_forward(self, hidden_states):
    """Llama 4's experts: input [experts * tokens, hidden] already scaled by each token's router score."""
    per_expert = hidden_states.view(self.llmq_num_experts, -1, hidden_states.shape[-1])
    return torch.cat([_expert_output(self, e, per_expert[e]) for e in range(self.llmq_num_experts)])


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module's 3-D weights by per-expert Linears; returns how many experts were made."""
    made = 0
    for module in list(model.modules()):
        if not is_fused_experts(module):
            continue
        style, transposed, concatenated = _layout(module)
        gate_up, down = module.gate_up_proj, module.down_proj
        gate_up_bias = getattr(module, "gate_up_proj_bias", None)
        down_bias = getattr(module, "down_proj_bias", None)
        for e in range(gate_up.shape[0]):
            gate_w, up_w, gate_b, up_b = _split_gate_up(gate_up[e], None if gate_up_bias is None else gate_up_bias[e],
                                                        transposed, concatenated)
            down_w = down[e].T if transposed else down[e]
            module.add_module(str(e), ExpertMLP(_linear(gate_w, gate_b), _linear(up_w, up_b),
                                                _linear(down_w, None if down_bias is None else down_bias[e])))
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if name in module._parameters:
                del module._parameters[name]
        # how the fused tensors were laid out: what llmq/calib/naming.py needs to name (or re-fuse) the experts
        module.llmq_fused = {"gate_up_proj": tuple(gate_up.shape), "down_proj": tuple(down.shape),
                             "transposed": transposed, "concatenated": concatenated,
                             "biases": gate_up_bias is not None}
        module.llmq_num_experts = gate_up.shape[0]
        module.llmq_concatenated = concatenated
        module.llmq_route_all = False
        module.forward = types.MethodType(_routed_forward if style == "routed" else _dense_forward, module)
        made += gate_up.shape[0]
    return made


def experts_modules(module: nn.Module) -> list[nn.Module]:
    """The unfused experts modules inside `module`."""
    return [m for m in module.modules() if hasattr(m, "llmq_num_experts")]


def set_route_all(module: nn.Module, on: bool) -> None:
    """Route every token through every expert of `module`'s MoE layers (statistics only; outputs unchanged)."""
    for experts in experts_modules(module):
        experts.llmq_route_all = on


def fused_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An unfused experts module's weights put back in their fused layout (for checkpoints that store them so)."""
    layout, experts = module.llmq_fused, module.llmq_num_experts
    first = getattr(module, "0")
    dtype = first.gate_proj.weight.dtype
    gate_up = torch.empty(layout["gate_up_proj"], dtype=dtype)
    down = torch.empty(layout["down_proj"], dtype=dtype)
    gate_up_bias = torch.empty(experts, 2 * first.gate_proj.out_features, dtype=dtype) if layout["biases"] else None
    down_bias = torch.empty(experts, first.down_proj.out_features, dtype=dtype) if layout["biases"] else None
    for e in range(experts):
        expert = getattr(module, str(e))
        gate_w, up_w, gate_b, up_b = _split_gate_up(gate_up[e], None if gate_up_bias is None else gate_up_bias[e],
                                                    layout["transposed"], layout["concatenated"])
        gate_w.copy_(expert.gate_proj.weight)
        up_w.copy_(expert.up_proj.weight)
        (down[e].T if layout["transposed"] else down[e]).copy_(expert.down_proj.weight)
        if gate_up_bias is not None:
            gate_b.copy_(expert.gate_proj.bias)
            up_b.copy_(expert.up_proj.bias)
            down_bias[e].copy_(expert.down_proj.bias)
    tensors = {f"{prefix}gate_up_proj": gate_up, f"{prefix}down_proj": down}
    if gate_up_bias is not None:
        tensors |= {f"{prefix}gate_up_proj_bias": gate_up_bias, f"{prefix}down_proj_bias": down_bias}
    return tensors


def expert_markers(module: nn.Module, prefix: str, code) -> dict[str, torch.Tensor]:
    """The fused tensors of an unfused experts module, each expert projection's block filled with code(e, proj).

    Only the expert dimension and the gate/up rows are ever split or merged by a checkpoint conversion, so the
    hidden dimension is 1 wide: the markers cost nothing whatever the model's size.
    """
    layout, experts = module.llmq_fused, module.llmq_num_experts
    gate_up_shape, down_shape = list(layout["gate_up_proj"]), list(layout["down_proj"])
    hidden_dim = 1 if layout["transposed"] else 2
    gate_up_shape[hidden_dim] = 1
    down_shape[1], down_shape[2] = 1, 1
    gate_up = torch.zeros(gate_up_shape, dtype=torch.float64)
    down = torch.zeros(down_shape, dtype=torch.float64)
    for e in range(experts):
        gate_w, up_w, _, _ = _split_gate_up(gate_up[e], None, layout["transposed"], layout["concatenated"])
        gate_w.fill_(code(e, "gate_proj"))
        up_w.fill_(code(e, "up_proj"))
        down[e].fill_(code(e, "down_proj"))
    return {f"{prefix}gate_up_proj": gate_up, f"{prefix}down_proj": down}
