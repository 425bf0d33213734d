"""llama.cpp's quantization mixtures (`--type Q4_K_M` ...): which GGML type each tensor gets.

The rules follow llama.cpp's src/llama-quant.cpp (llama_tensor_get_type): a default type per mixture, more
bits for attn_v / ffn_down in chosen layers, Q6_K (or Q8_0) for the output matrix and for tied embeddings, and
a fallback to a 32-wide type when a row length is not a multiple of 256 (Q2_K/Q3_K/TQ1_0/TQ2_0 -> Q4_0, Q4_K
-> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; F16 when not even 32 divides it). IQ4_NL / IQ4_XS give
attn_v Q5_K under grouped-query attention (4+ query heads per KV head) and, without an importance matrix, the
first eighth of ffn_down Q5_K; MXFP4_MOE puts routed experts in MXFP4 and every other matrix in Q8_0. The lattice
mixtures (IQ1_*, IQ2_*: llama.cpp's "low-bit" branch; IQ3_*) give attn_v, the first eighth of ffn_down,
attn_output, attn_q/k and the embeddings their richer types, and fall back to IQ4_NL.
Mixture-of-experts files: expert tensors (ffn_*_exps, 3-D) and shared experts (ffn_*_shexp) follow the rule of
their projection by layer; routers (ffn_gate_inp) are never quantized; models with exactly 8 experts (the
Mixtral case) get Q8_0 attn_k / attn_v and a Q5_K attn_output in the low mixtures.
Not reproduced: the Falcon and "70B" special cases (llmq writes neither). The low-bit branch counts ffn_down
tensors where llmq counts layers: the same for dense models, not for MoE layers with shared experts.
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
    Mixture("Q4_1", T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    Mixture("Q5_0", T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    Mixture("Q5_1", T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    Mixture("IQ4_NL", T.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    Mixture("IQ4_XS", T.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
    Mixture("MXFP4_MOE", T.MXFP4, LlamaFileType.MOSTLY_MXFP4_MOE),  # MXFP4 experts, Q8_0 for everything else
    Mixture("IQ1_S", T.IQ1_S, LlamaFileType.MOSTLY_IQ1_S),
    Mixture("IQ1_M", T.IQ1_M, LlamaFileType.MOSTLY_IQ1_M),
    Mixture("IQ2_XXS", T.IQ2_XXS, LlamaFileType.MOSTLY_IQ2_XXS),
    Mixture("IQ2_XS", T.IQ2_XS, LlamaFileType.MOSTLY_IQ2_XS),
    Mixture("IQ2_S", T.IQ2_XS, LlamaFileType.MOSTLY_IQ2_S),  # (llama.cpp's IQ2_S mixture is mostly IQ2_XS)
    Mixture("IQ2_M", T.IQ2_S, LlamaFileType.MOSTLY_IQ2_M),
    Mixture("IQ3_XXS", T.IQ3_XXS, LlamaFileType.MOSTLY_IQ3_XXS),
    Mixture("IQ3_XS", T.IQ3_S, LlamaFileType.MOSTLY_IQ3_XS),
    Mixture("IQ3_S", T.IQ3_S, LlamaFileType.MOSTLY_IQ3_S),
    Mixture("IQ3_M", T.IQ3_S, LlamaFileType.MOSTLY_IQ3_M),
    Mixture("TQ1_0", T.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),  # ternary (BitNet b1.58) weights only
    Mixture("TQ2_0", T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
    Mixture("F16", T.F16, LlamaFileType.MOSTLY_F16),
    Mixture("BF16", T.BF16, LlamaFileType.MOSTLY_BF16),
    Mixture("F32", T.F32, LlamaFileType.ALL_F32),
]}

_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.TQ1_0: T.Q4_0,
             T.TQ2_0: T.Q4_0, T.IQ4_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
             T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL}
# mixtures llama.cpp's rules take apart from the rest (its "low-bit" branch)
_LOW_BIT = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
# types llama-quantize refuses to make without an importance matrix (tensor_requires_imatrix), and the mixtures
# that put some decoder tensor in one of them
NEEDS_IMATRIX = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS)
IMATRIX_MIXTURES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def get_mixture(name: str) -> Mixture:
    try:
        return MIXTURES[name.upper()]
    except KeyError:
        raise LlmqError(f"--type {name} is not supported; use one of: {', '.join(MIXTURES)}") from None


def _use_more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's choice of "important" layers: the first and last eighth, and every third one between
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D (and expert 3-D) weights, never norms, biases or routers. A [1, n] matrix (Qwen2-MoE's
    shared-expert gate) counts as 1-D, as ggml counts dimensions (trailing sizes of 1 do not count)."""
    dims = max((i + 1 for i, size in enumerate(reversed(shape)) if size > 1), default=0)
    return (dims >= 2 and name.endswith(".weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _kind(name: str) -> str:
    """attn_v, ffn_down, ... for blk.N.* tensors, counting experts and shared experts as their projection."""
    kind = name.split(".")[-2]
    return kind.removesuffix("_exps").removesuffix("_shexp")


def _mixture_type(mix: str, qtype: T, name: str, n_layers: int, n_gqa: int, tied: bool, has_imatrix: bool,
                  v_index: int, n_expert: int) -> T:
    layer_match = _LAYER.match(name)
    layer = int(layer_match.group(1)) if layer_match else -1
    kind = _kind(name) if layer_match else name.removesuffix(".weight")
    if kind == "output" or (tied and kind == "token_embd"):
        if mix in _LOW_BIT + ("IQ3_XXS",):
            return T.Q5_K
        return T.Q8_0 if qtype in (T.Q8_0, T.MXFP4) else T.Q6_K  # the row-length check happens in the caller
    if mix == "MXFP4_MOE":  # routed experts (3-D) in MXFP4, as GPT-OSS ships them; every other matrix Q8_0
        return T.MXFP4 if name.endswith("_exps.weight") else T.Q8_0
    if kind == "token_embd" and mix in ("TQ1_0", "TQ2_0"):
        return T.Q4_K
    if kind == "token_embd":
        return {"IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K, "IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K, "IQ2_S": T.IQ3_S,
                "IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S}.get(mix, qtype)
    if mix in _LOW_BIT:
        return _low_bit_type(mix, qtype, kind, layer, n_layers, n_gqa, n_expert)
    if n_expert == 8 and kind in ("attn_v", "attn_qkv", "attn_kv_b", "attn_k"):
        return T.Q8_0  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if n_expert == 8 and kind == "attn_output":
        return T.Q5_K if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS", "IQ3_XS",
                                 "IQ3_XXS", "IQ3_S", "IQ3_M") else qtype
    if kind in ("attn_v", "attn_qkv", "attn_kv_b"):
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
        if mix in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            return T.Q5_K
        if mix == "IQ3_XXS":
            return T.Q4_K if n_gqa >= 4 else T.IQ3_XXS if has_imatrix else T.IQ3_S
        if (mix in ("IQ3_XS", "IQ3_S") and n_gqa >= 4) or mix == "IQ3_M":
            return T.Q4_K
        return qtype
    if kind in ("attn_k", "attn_q") and mix in ("IQ3_XS", "IQ3_XXS"):
        return T.IQ3_XXS if mix == "IQ3_XS" else T.IQ2_S
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
        if mix in ("IQ4_NL", "IQ4_XS") and not has_imatrix and layer < n_layers // 8:
            return T.Q5_K
        if mix in ("Q4_0", "Q5_0") and has_imatrix and layer < n_layers // 8:  # llama.cpp: Q4_0/Q5_0 "go crazy" there
            return T.Q4_1 if mix == "Q4_0" else T.Q5_1
        if mix == "IQ3_XXS" and not has_imatrix:
            return T.Q4_K if layer < n_layers // 8 else T.Q3_K
        if mix == "IQ3_M" and (layer < n_layers // 8 or (n_expert == 8 and _use_more_bits(layer, n_layers))):
            return T.Q4_K
        return qtype
    if kind == "attn_output":
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_XXS": T.IQ3_S, "IQ3_M": T.Q4_K}.get(mix, qtype)
    if kind in ("ffn_gate", "ffn_up") and mix == "IQ3_XS" and n_layers // 8 <= layer < 7 * n_layers // 8:
        return T.IQ3_XXS
    return qtype


def _low_bit_type(mix: str, qtype: T, kind: str, layer: int, n_layers: int, n_gqa: int, n_expert: int) -> T:
    """llama.cpp's rules for IQ1_S, IQ1_M and IQ2_* (apart from the output and embedding rules)."""
    richer = T.IQ3_S if mix in ("IQ2_S", "IQ2_M") else T.Q2_K  # what attn_v and the first ffn_down get
    if kind in ("attn_v", "attn_qkv", "attn_kv_b"):
        return T.Q4_K if n_gqa >= 4 or n_expert >= 4 else richer
    if n_expert == 8 and kind == "attn_k":
        return T.Q4_K
    if kind == "ffn_down":
        return richer if layer < n_layers // 8 else qtype
    if kind == "attn_output":
        if n_expert == 8:
            return T.Q5_K
        return {"IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S, "IQ1_S": T.IQ2_XXS, "IQ1_M": T.IQ2_XXS}.get(mix, qtype)
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
               has_imatrix: bool = False, n_expert: int = 0) -> dict[str, T]:
    """GGUF tensor name -> type, for every tensor (shapes in GGUF order reversed, i.e. torch's [rows, cols] or
    [experts, rows, cols]); n_expert: the model's routed experts per MoE layer (0: a dense model)."""
    plan: dict[str, T] = {}
    v_index = 0
    for name, shape in tensors.items():
        if not is_quantizable(name, shape) or mixture.default in (T.F32,):
            plan[name] = T.F32
            continue
        if mixture.default in (T.F16, T.BF16):
            plan[name] = mixture.default
            continue
        qtype = _mixture_type(mixture.name, mixture.default, name, n_layers, n_gqa, tied, has_imatrix, v_index,
                              n_expert)
        if name.endswith(("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
            v_index += 1
        kind = name.removesuffix(".weight")
        if (kind == "output" or (tied and kind == "token_embd")) and shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            qtype = T.Q8_0
        plan[name] = fallback(qtype, shape[-1])
    return plan
