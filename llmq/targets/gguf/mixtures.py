"""llama.cpp's quantization mixtures (`--type Q4_K_M` ...): which GGML type each tensor gets.

The rules follow llama.cpp's src/llama-quant.cpp (llama_tensor_get_type) for the dense-model cases:
a default type per mixture, more bits for attn_v / ffn_down in chosen layers, Q6_K (or Q8_0) for the output
matrix and for tied embeddings, and a fallback to a 32-wide type when a row length is not a multiple of
256 (Q2_K/Q3_K/TQ1_0/TQ2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when not even 32 divides it).
Not reproduced: the Falcon, MoE and "70B" special cases (llmq supports none of those models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as T

from llmq.core.errors import LlmqError


@dataclass(frozen=True)
class Mixture:
    name: str
    default: T
    file_type: LlamaFileType

    @property
    def ternary(self) -> bool:
        """Its main type holds ternary weights only (BitNet b1.58)."""
        return self.default in (T.TQ1_0, T.TQ2_0)


MIXTURES = {m.name: m for m in [
    Mixture("Q2_K", T.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    Mixture("Q3_K_S", T.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    Mixture("Q3_K_M", T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    Mixture("Q3_K_L", T.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    Mixture("Q4_K_S", T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    Mixture("Q4_K_M", T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    Mixture("Q5_K_S", T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    Mixture("Q5_K_M", T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    Mixture("Q6_K", T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    Mixture("Q8_0", T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    Mixture("Q4_0", T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    Mixture("TQ1_0", T.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),  # ternary (BitNet b1.58) weights only
    Mixture("TQ2_0", T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
    Mixture("F16", T.F16, LlamaFileType.MOSTLY_F16),
    Mixture("BF16", T.BF16, LlamaFileType.MOSTLY_BF16),
    Mixture("F32", T.F32, LlamaFileType.ALL_F32),
]}

_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.TQ1_0: T.Q4_0,
             T.TQ2_0: T.Q4_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def get_mixture(name: str) -> Mixture:
    try:
        return MIXTURES[name.upper()]
    except KeyError:
        raise LlmqError(f"--type {name} is not supported; use one of: {', '.join(MIXTURES)}") from None


def _use_more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's choice of "important" layers: the first and last eighth, and every third one between
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(name: str, ndim: int) -> bool:
    """llama.cpp quantizes 2-D (and expert 3-D) weights, never norms or biases."""
    return ndim >= 2 and name.endswith(".weight") and "_norm.weight" not in name


def _mixture_type(mix: str, qtype: T, name: str, n_layers: int, n_gqa: int, tied: bool, has_imatrix: bool,
                  v_index: int) -> T:
    layer_match = _LAYER.match(name)
    layer = int(layer_match.group(1)) if layer_match else -1
    kind = name.split(".")[-2] if layer_match else name.removesuffix(".weight")
    if kind == "output" or (tied and kind == "token_embd"):
        return T.Q8_0 if qtype == T.Q8_0 else T.Q6_K  # the row-length check happens in the caller
    if kind == "token_embd" and mix in ("TQ1_0", "TQ2_0"):
        return T.Q4_K
    if kind in ("attn_v", "attn_qkv"):
        if mix == "Q2_K":
            return T.Q4_K if n_gqa >= 4 else T.Q3_K
        if mix == "Q3_K_M":
            return T.Q5_K if v_index < 2 else T.Q4_K
        if mix == "Q3_K_L":
            return T.Q5_K
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(v_index, n_layers):
            return T.Q6_K
        if mix == "Q4_K_S" and v_index < 4:
            return T.Q5_K
        return qtype
    if kind == "ffn_down":
        if mix == "Q2_K":
            return T.Q3_K
        if mix == "Q3_K_M":
            return T.Q5_K if layer < n_layers // 16 else T.Q4_K
        if mix == "Q3_K_L":
            return T.Q5_K
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
            return T.Q6_K
        if mix == "Q4_K_S" and layer < n_layers // 8:
            return T.Q5_K
        if mix == "Q4_0" and has_imatrix and layer < n_layers // 8:
            return T.Q4_1
        return qtype
    if kind == "attn_output":
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix, qtype)
    return qtype


def fallback(qtype: T, row_length: int) -> T:
    """A type whose block fits the row: the 32-wide stand-in for a k-quant, or F16."""
    if qtype in (T.F32, T.F16, T.BF16):
        return qtype
    block = GGML_QUANT_SIZES[qtype][0]
    if row_length % block == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def plan_types(mixture: Mixture, tensors: dict[str, tuple[int, ...]], n_layers: int, n_gqa: int, tied: bool,
               has_imatrix: bool = False) -> dict[str, T]:
    """GGUF tensor name -> type, for every tensor (shapes in GGUF order reversed, i.e. torch's [rows, cols])."""
    plan: dict[str, T] = {}
    v_index = 0
    for name, shape in tensors.items():
        if not is_quantizable(name, len(shape)) or mixture.default in (T.F32,):
            plan[name] = T.F32
            continue
        if mixture.default in (T.F16, T.BF16):
            plan[name] = mixture.default
            continue
        qtype = _mixture_type(mixture.name, mixture.default, name, n_layers, n_gqa, tied, has_imatrix, v_index)
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):
            v_index += 1
        kind = name.removesuffix(".weight")
        if (kind == "output" or (tied and kind == "token_embd")) and shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            qtype = T.Q8_0
        plan[name] = fallback(qtype, shape[-1])
    return plan
