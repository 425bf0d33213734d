"""Write a Hugging Face model as a GGUF file llama.cpp loads, with llama.cpp's own `gguf` package.

What goes in: architecture metadata (sizes, rope, norm epsilon), the tokenizer (BPE or SentencePiece-style
vocabulary, merges, token types, special tokens, chat template) and every tensor under llama.cpp's name
(gguf-py's tensor-name map), already encoded by the caller or stored as F32/F16 here.

Conversions llama.cpp expects and HF checkpoints do not have:
- Row orders (row_permutation): Llama-style q/k rows (rotary pairs as halves in HF, interleaved in llama.cpp)
  and GPT-NeoX's fused qkv (per head in HF, q/k/v blocks in llama.cpp); whole rows only, so lossless.
- Gemma RMSNorm weights: HF computes x * (1 + w), llama.cpp x * w, so 1 is added.
- Experts: one Linear per expert in llmq, one 3-D tensor per projection and layer in llama.cpp.

The caller stages the file (a temporary name, renamed when complete: llmq/targets/atomic.py).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGUFWriter,
    LlamaHfVocab,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
)
from gguf import GGMLQuantizationType as T

from llmq.core.errors import LlmqError

# HF model_type -> llama.cpp architecture, where the names differ; every other model_type is looked up in
# gguf-py's MODEL_ARCH_NAMES (qwen3_moe -> qwen3moe, gpt_neox -> gptneox, ...)
_ALIASES = {
    "mistral": MODEL_ARCH.LLAMA,
    "mixtral": MODEL_ARCH.LLAMA,
    "gemma3_text": MODEL_ARCH.GEMMA3,
    "phi": MODEL_ARCH.PHI2,
    "cohere": MODEL_ARCH.COMMAND_R,
    "deepseek_v3": MODEL_ARCH.DEEPSEEK2,  # (DeepSeek-V2's softmax routing is not verified: deepseek_v2 is refused)
    "llama4_text": MODEL_ARCH.LLAMA4,  # (the text model of a Llama 4 checkpoint)
    "qwen2_5_vl_text": MODEL_ARCH.QWEN2VL,  # (Qwen2.5-VL's language model: Qwen2 with multi-axis rope)
    "bitnet": MODEL_ARCH.BITNET,  # transformers' BitNetForCausalLM (ternary Linears, attention/FFN sub-norms)
}
# Architectures whose files llama.cpp has loaded and run with transformers' logits (tests/test_gguf.py
# test_llamacpp_runs_our_file_with_transformers_logits); others are refused in one line rather than written
# with metadata nobody checked.
VERIFIED = {MODEL_ARCH.LLAMA, MODEL_ARCH.QWEN2, MODEL_ARCH.QWEN3, MODEL_ARCH.PHI3, MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3,
            MODEL_ARCH.BITNET, MODEL_ARCH.OLMO2, MODEL_ARCH.EXAONE4, MODEL_ARCH.STABLELM, MODEL_ARCH.STARCODER2,
            MODEL_ARCH.PHI2, MODEL_ARCH.GRANITE, MODEL_ARCH.SMOLLM3, MODEL_ARCH.COMMAND_R,
            MODEL_ARCH.QWEN2MOE, MODEL_ARCH.QWEN3MOE, MODEL_ARCH.GPTNEOX, MODEL_ARCH.GLM4,
            MODEL_ARCH.DEEPSEEK2, MODEL_ARCH.LLAMA4, MODEL_ARCH.GPT_OSS, MODEL_ARCH.QWEN2VL}
# (Mixtral: LLAMA with experts; Gemma 3 and Qwen2.5-VL image-text checkpoints: their language model)
# llama.cpp graphs that rotate interleaved pairs (HF rotates halves): q/k rows are permuted for them
_INTERLEAVED_ROPE = {MODEL_ARCH.LLAMA, MODEL_ARCH.GRANITE, MODEL_ARCH.SMOLLM3}
_BY_NAME = {name.replace("-", "").replace("_", ""): arch for arch, name in MODEL_ARCH_NAMES.items()}
_GEMMA = (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3)

@dataclass
class EncodedTensor:
    """One GGUF tensor: `data` is float32/float16 values or uint8 block bytes [rows, row_bytes]."""

    qtype: T
    data: np.ndarray


class SpilledTensors(Mapping):
    """GGUF name -> EncodedTensor, kept in a scratch file as they are made and read back memory-mapped when
    written: gguf-py's writer needs every tensor's shape and type before the first byte of data, and a
    Llama-3-8B's Q4_K_M tensors alone are 4.9 GB. Each read maps its own bytes, let go once written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._entries: dict[str, tuple[T, np.dtype, tuple[int, ...], int]] = {}

    def add(self, name: str, tensor: EncodedTensor) -> None:
        data = np.ascontiguousarray(tensor.data)
        self._entries[name] = (tensor.qtype, data.dtype, data.shape, self._file.tell())
        data.tofile(self._file)

    def __getitem__(self, name: str) -> EncodedTensor:
        qtype, dtype, shape, offset = self._entries[name]
        if self._file is not None:
            self._file.close()
            self._file = None
        if not np.prod(shape):
            return EncodedTensor(qtype, np.empty(shape, dtype))
        return EncodedTensor(qtype, np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape))

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def remove(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


def gguf_arch(config) -> MODEL_ARCH:
    model_type = config.model_type
    arch = _ALIASES.get(model_type) or _BY_NAME.get(model_type.replace("_", "").replace("-", ""))
    if arch is None:
        raise LlmqError(f"GGUF export: llama.cpp has no architecture for {model_type!r}; use --format "
                        "compressed-tensors")
    if arch not in VERIFIED:
        raise LlmqError(f"GGUF export of {model_type!r} (llama.cpp's {MODEL_ARCH_NAMES[arch]}) is not verified "
                        "against llama.cpp yet; use --format compressed-tensors")
    if arch == MODEL_ARCH.BITNET:
        _check_bitnet(config)
    if arch in (MODEL_ARCH.QWEN2MOE, MODEL_ARCH.QWEN3MOE):
        _check_qwen_moe(config, arch)
    if arch == MODEL_ARCH.DEEPSEEK2:
        _check_deepseek2(config)
    if arch == MODEL_ARCH.LLAMA4:
        _check_llama4(config)
    if arch == MODEL_ARCH.GPT_OSS:
        _check_gpt_oss(config)
    return arch


def _check_gpt_oss(config) -> None:
    """llama.cpp's gpt-oss graph alternates sliding and full attention from layer 0 and clamps its SwiGLU at 7."""
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != alternating or float(config.swiglu_limit) != 7.0:
        raise LlmqError("llama.cpp's gpt-oss graph fixes the layer types (sliding, full, sliding, ...) and the SwiGLU "
                        "limit (7.0) and this model differs; its GGUF would run wrongly, so it is not written")


# What llama.cpp's llama4 graph hard-codes (its chunked-attention mode, the one Llama 4 Scout/Maverick use):
# every 4th layer global without rope and with attention temperature tuning, the others rope + chunked attention
_LLAMA4_FIXED = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1, "attn_temperature_tuning": True}
_LLAMA4_NO_ROPE_STEP = 4


def _check_llama4(config) -> None:
    rope_layers = [int((i + 1) % _LLAMA4_NO_ROPE_STEP != 0) for i in range(config.num_hidden_layers)]
    differs = [name for name, value in _LLAMA4_FIXED.items() if getattr(config, name, value) != value]
    if list(config.no_rope_layers) != rope_layers:
        differs.append("no_rope_layers")
    if bool(config.use_qk_norm) != (config.num_local_experts != 128):  # llama.cpp: qk-norm unless 128 experts
        differs.append("use_qk_norm")
    step = config.interleave_moe_layer_step
    if list(config.moe_layers) != [i for i in range(config.num_hidden_layers) if (i + 1) % step == 0]:
        differs.append("moe_layers")
    if config.num_hidden_layers < _LLAMA4_NO_ROPE_STEP:
        raise LlmqError(f"llama.cpp's llama4 graph makes every {_LLAMA4_NO_ROPE_STEP}th layer global and aborts on a "
                        f"model without one; this model has {config.num_hidden_layers} layers, so it is not written")
    if differs:
        raise LlmqError(f"llama.cpp's llama4 graph fixes {', '.join(differs)} to Llama 4's released values and this "
                        "model differs; its GGUF would run wrongly, so it is not written")


# llama.cpp's deepseek2 graph picks its query path by layer count, not by the file: the "lite" layer counts
# (DeepSeek-V2-Lite and kin) have one attn_q, every other count the low-rank attn_q_a / attn_q_b pair.
_DEEPSEEK2_LITE_LAYERS = (26, 27)


def _check_deepseek2(config) -> None:
    lite = config.num_hidden_layers in _DEEPSEEK2_LITE_LAYERS
    if bool(config.q_lora_rank) == lite:
        raise LlmqError(f"llama.cpp's deepseek2 graph expects {'no' if lite else 'a'} low-rank query projection for "
                        f"{config.num_hidden_layers} layers but this model's q_lora_rank is {config.q_lora_rank}; "
                        "its GGUF would not run, so it is not written")
    if getattr(config, "scoring_func", None) not in (None, "sigmoid") or getattr(config, "topk_method", None) not in (
            None, "noaux_tc"):
        raise LlmqError(f"llama.cpp's deepseek2 graph is written here for DeepSeek-V3's sigmoid routing, not "
                        f"scoring_func={config.scoring_func!r} / topk_method={config.topk_method!r}")


def _check_qwen_moe(config, arch: MODEL_ARCH) -> None:
    """llama.cpp's qwen2moe / qwen3moe graphs fix what the HF config leaves open: every layer is MoE, and the
    top-k routing weights are renormalized by qwen3moe and not by qwen2moe."""
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise LlmqError(f"llama.cpp's {MODEL_ARCH_NAMES[arch]} graph makes every layer MoE but this model has dense "
                        "layers (mlp_only_layers / decoder_sparse_step); its GGUF would run wrongly, so it is not written")
    renormalizes = arch == MODEL_ARCH.QWEN3MOE
    if bool(getattr(config, "norm_topk_prob", renormalizes)) != renormalizes:
        raise LlmqError(f"llama.cpp's {MODEL_ARCH_NAMES[arch]} graph {'always' if renormalizes else 'never'} "
                        f"renormalizes the top-k routing weights but this model's norm_topk_prob is "
                        f"{config.norm_topk_prob}; its GGUF would run wrongly, so it is not written")


def _check_bitnet(config) -> None:
    """llama.cpp's bitnet graph hard-codes a SiLU-gated FFN and reads the output matrix from token_embd."""
    if config.hidden_act != "silu":
        raise LlmqError(f"llama.cpp's bitnet graph computes SiLU in the FFN but this model uses {config.hidden_act}; "
                        "its GGUF would run wrongly, so it is not written")
    if not getattr(config, "tie_word_embeddings", False):
        raise LlmqError("llama.cpp's bitnet graph has no separate output matrix but this model's lm_head is not tied "
                        "to its embeddings; it cannot be written as GGUF")


# HF names -> the names gguf-py's tensor map knows: BitNet's sub-norms (as the original 1bitLLM code named them)
# and DeepSeek-V3's router bias (a buffer named without the dot gguf-py's map expects)
_NAME_ALIASES = {".self_attn.attn_sub_norm.": ".self_attn.inner_attn_ln.", ".mlp.ffn_sub_norm.": ".mlp.ffn_layernorm.",
                 ".gate.e_score_correction_bias": ".gate.e_score_correction.bias"}
# whole-name endings gguf-py's map knows with a suffix: GPT-OSS's attention sinks are a bare parameter
_SUFFIX_ALIASES = {".self_attn.sinks": ".self_attn.sinks.weight"}


def gguf_name_map(config):
    """A function: HF tensor name -> llama.cpp's GGUF tensor name (one-line error when there is none)."""
    name_map = get_tensor_name_map(gguf_arch(config), config.num_hidden_layers)

    def name_of(hf_name: str) -> str:
        for alias, known in _NAME_ALIASES.items():
            hf_name = hf_name.replace(alias, known)
        for ending, known in _SUFFIX_ALIASES.items():
            if hf_name.endswith(ending):
                hf_name = hf_name.removesuffix(ending) + known
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LlmqError(f"GGUF export: no llama.cpp name for tensor {hf_name}; this model variant is not supported")
        return name

    return name_of


# One expert's parameter: `<prefix>.experts.<e>.<projection>.weight` (experts unfused by llmq.calib.experts, or a
# checkpoint's own per-expert Linears). llama.cpp holds each projection of all a layer's experts as one 3-D tensor.
_EXPERT_PARAM = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<name>[^.]+\.(?:weight|bias))$")


def expert_slot(hf_name: str) -> tuple[str, int] | None:
    """(the HF name of all experts' stacked tensor, this expert's index) for an expert's parameter, else None."""
    match = _EXPERT_PARAM.match(hf_name)
    return None if match is None else (f"{match['prefix']}.{match['name']}", int(match["index"]))


def language_config(config):
    """The config llama.cpp's graph is made from: an image-text model's text config, else the config itself."""
    return config.get_text_config()


def language_prefix(model) -> str | None:
    """Where an image-text model's language model lives (`model.language_model`); None for a causal LM."""
    if language_config(model.config) is model.config:
        return None
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def exported_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """What the GGUF file holds: the language model's parameters (a tied lm_head is not one) and persistent
    buffers (checkpoint tensors too: DeepSeek-V3's router score-correction bias). An image-text model's vision
    tower and projector are not among them: llama.cpp reads those from a separate mmproj file."""
    saved = set(model.state_dict())
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in saved]
    prefix = language_prefix(model)
    if prefix is None:
        return tensors
    head = {id(p) for p in (model.get_output_embeddings() or torch.nn.Module()).parameters()}
    return [(name, t) for name, t in tensors if name.startswith(prefix + ".") or id(t) in head]


def model_name_map(model):
    """A function: the model's HF tensor name -> GGUF tensor name. Every expert's tensor maps to its layer's
    stacked `ffn_*_exps` tensor (its index: expert_slot); an image-text model's language tensors are looked up
    as the text model's own (`model.language_model.` read as `model.`)."""
    name_of = gguf_name_map(language_config(model.config))
    prefix = f"{language_prefix(model)}."

    def gguf_name(hf_name: str) -> str:
        hf_name = (expert_slot(hf_name) or (hf_name,))[0]
        return name_of("model." + hf_name.removeprefix(prefix) if hf_name.startswith(prefix) else hf_name)

    return gguf_name


def gguf_names(model) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name (model_name_map), for every exported tensor (exported_tensors)."""
    gguf_name = model_name_map(model)
    return {hf_name: gguf_name(hf_name) for hf_name, _ in exported_tensors(model)}


def assemble_tensors(encoded) -> dict[str, EncodedTensor]:
    """(HF name, GGUF name, encoded tensor) triples -> the file's tensors by GGUF name, each layer's experts
    (expert_slot) stacked into llama.cpp's one 3-D tensor per projection."""
    tensors: dict[str, EncodedTensor] = {}
    experts: dict[str, dict[int, EncodedTensor]] = {}
    for hf_name, gguf_name, tensor in encoded:
        slot = expert_slot(hf_name)
        if slot is None:
            tensors[gguf_name] = tensor
        else:
            experts.setdefault(gguf_name, {})[slot[1]] = tensor
    for gguf_name, by_index in experts.items():
        parts = [by_index[e] for e in range(len(by_index))]  # a missing expert is a KeyError, not a shifted stack
        if len({part.qtype for part in parts}) != 1:
            raise ValueError(f"{gguf_name}: experts encoded in different types")
        tensors[gguf_name] = EncodedTensor(parts[0].qtype, np.stack([part.data for part in parts]))
    return tensors


def stacked_shapes(model, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """GGUF name -> the tensor's torch-order shape ([experts, rows, cols] for stacked experts)."""
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[str, int] = {}
    for hf_name, param in exported_tensors(model):
        slot = expert_slot(hf_name)
        if slot is not None:
            experts[names[hf_name]] = max(experts.get(names[hf_name], 0), slot[1] + 1)
        shapes[names[hf_name]] = tuple(param.shape)
    return {name: ((experts[name],) if name in experts else ()) + shape for name, shape in shapes.items()}


def expert_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Routed experts per MoE layer, from the stacked expert tensors' shapes (stacked_shapes); 0 for a dense model."""
    return max((shape[0] for name, shape in shapes.items() if "_exps." in name), default=0)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def row_permutation(config, gguf_name: str, rows: int) -> torch.Tensor | None:
    """Row order llama.cpp's graph wants where it differs from HF's (None: keep HF's order). Rows are permuted
    whole, so an already-quantized tensor permutes losslessly.

    - attn_q / attn_k of the graphs that rotate interleaved pairs: HF keeps each head's rotary pairs as two
      halves [x0, x1, ..., y0, y1, ...], llama.cpp as [x0, y0, x1, y1, ...].
    - GPT-NeoX's fused attn_qkv (weight and bias): HF interleaves per head [q_h, k_h, v_h], llama.cpp's gptneox
      graph reads [all q, all k, all v].
    - DeepSeek-V3 with rope_interleave false: the rotary part of each head's query rows and of kv_a's key rows
      as halves in HF; llama.cpp's deepseek2 graph rotates interleaved pairs (rope_interleave true: as stored).
    """
    arch = gguf_arch(config)
    head_dim = _head_dim(config)
    if arch in _INTERLEAVED_ROPE and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        return _halves_to_pairs(torch.arange(rows).reshape(rows // head_dim, head_dim), head_dim).reshape(rows)
    if arch == MODEL_ARCH.DEEPSEEK2 and not getattr(config, "rope_interleave", True):
        rope = config.qk_rope_head_dim
        if gguf_name.endswith(("attn_q.weight", "attn_q_b.weight")):
            index = torch.arange(rows).reshape(config.num_attention_heads, -1)
            return torch.cat([index[:, :-rope], _halves_to_pairs(index[:, -rope:], rope)], dim=1).reshape(rows)
        if gguf_name.endswith("attn_kv_a_mqa.weight"):
            index = torch.arange(rows)
            return torch.cat([index[:-rope], _halves_to_pairs(index[-rope:], rope)])
    if arch == MODEL_ARCH.GPTNEOX and gguf_name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
        index = torch.arange(rows).reshape(rows // (3 * head_dim), 3, head_dim)
        return index.transpose(0, 1).reshape(rows)
    return None


def _halves_to_pairs(index: torch.Tensor, width: int) -> torch.Tensor:
    """The last dimension's `width` entries reordered from [x0 .. x(n-1), y0 .. y(n-1)] to [x0, y0, x1, y1, ...]."""
    return index.reshape(*index.shape[:-1], 2, width // 2).transpose(-1, -2).reshape(index.shape)


def prepare_float(config, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """HF tensor -> the float32 values llama.cpp expects under gguf_name (before any quantization)."""
    t = tensor.detach().to("cpu", torch.float32)
    if gguf_arch(config) in _GEMMA and gguf_name.endswith("norm.weight"):
        t = t + 1
    perm = row_permutation(config, gguf_name, t.shape[0])
    return t[perm] if perm is not None else t


def encode_float(values: torch.Tensor, qtype: T) -> EncodedTensor:
    if qtype == T.F32:
        return EncodedTensor(T.F32, values.numpy().astype(np.float32))
    if qtype == T.F16:
        return EncodedTensor(T.F16, values.numpy().astype(np.float16))
    if qtype == T.BF16:
        from gguf import quants

        return EncodedTensor(T.BF16, quants.quantize(values.numpy().astype(np.float32), T.BF16))
    raise ValueError(qtype)


# ---- metadata -------------------------------------------------------------------------------------------------


def _first(config, *names, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def _add_hparams(writer: GGUFWriter, config, arch: MODEL_ARCH) -> None:
    """The hyper-parameters llama.cpp's graphs read, from whichever of transformers' config names the model uses."""
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(_first(config, "intermediate_size_mlp", "intermediate_size",
                                          default=4 * config.hidden_size))
    writer.add_head_count(config.num_attention_heads)
    if arch != MODEL_ARCH.DEEPSEEK2:  # (its heads: _add_deepseek2_hparams)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # LayerNorm models (StableLM, StarCoder2, GPT-NeoX, Phi, Cohere)
        writer.add_layer_norm_eps(_first(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))
    writer.add_vocab_size(config.vocab_size)
    rope_theta = getattr(config, "rope_theta", None) or _rope_parameters(config).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    partial = _first(config, "partial_rotary_factor", "rotary_pct", default=None)
    partial = partial if partial is not None else _rope_parameters(config).get("partial_rotary_factor", 1.0)
    rotary_dims = config.qk_rope_head_dim if arch == MODEL_ARCH.DEEPSEEK2 else int(head_dim * partial)
    writer.add_rope_dimension_count(rotary_dims)
    if arch == MODEL_ARCH.QWEN2VL:  # multi-axis rope: the rotary dims of time, height, width (text: all one position)
        sections = list(_rope_parameters(config).get("mrope_section", []))
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    if arch == MODEL_ARCH.LLAMA4:  # (feed_forward_length: the dense layers' width, intermediate_size_mlp)
        writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
    if arch == MODEL_ARCH.DEEPSEEK2:
        _add_deepseek2_hparams(writer, config)
    elif head_dim != config.hidden_size // config.num_attention_heads or arch in _GEMMA + (MODEL_ARCH.QWEN3,):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in _GEMMA or arch in (MODEL_ARCH.PHI3, MODEL_ARCH.GPT_OSS):
        window = getattr(config, "sliding_window", None)
        if window:
            writer.add_sliding_window(window)
    if arch == MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if getattr(config, "use_parallel_residual", None) is not None:  # GPT-NeoX
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    # Granite's multipliers and Cohere's logit scale
    for name, add in (("embedding_multiplier", writer.add_embedding_scale),
                      ("residual_multiplier", writer.add_residual_scale),
                      ("attention_multiplier", writer.add_attention_scale)):
        if getattr(config, name, None) is not None:
            add(float(getattr(config, name)))
    logit_scale = _first(config, "logits_scaling", "logit_scale")
    if logit_scale is not None:
        writer.add_logit_scale(float(logit_scale))


def _add_deepseek2_hparams(writer: GGUFWriter, config) -> None:
    """Multi-head latent attention written whole (one attn_kv_b, llama.cpp's non-absorbed path: every head's key
    and value are decompressed and cached, as in transformers) and DeepSeek-V3's routing: sigmoid scores plus a
    correction bias, top-k within the best expert groups, renormalized, scaled by routed_scaling_factor."""
    from gguf import ExpertGatingFuncType

    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_key_length(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length(config.v_head_dim)
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_shared_count(config.n_shared_experts or 0)
    writer.add_expert_weights_scale(float(config.routed_scaling_factor))
    writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if (config.n_group or 1) > 1:
        writer.add_expert_group_count(config.n_group)
        writer.add_expert_group_used_count(config.topk_group)
    mscale_all_dim = _rope_parameters(config).get("mscale_all_dim")
    if mscale_all_dim:  # (llama.cpp divides the stored value by 0.1 again: its convert script's convention)
        writer.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)


def _add_expert_hparams(writer: GGUFWriter, config, tensors: dict[str, EncodedTensor]) -> None:
    """Experts per layer and expert widths from the tensors written (a config's moe_intermediate_size is not always
    the experts' width: Mixtral's experts use intermediate_size); experts used per token from the config. Rows of
    the up projections give the widths whether a tensor holds floats or block bytes."""
    ups = [t.data.shape for name, t in tensors.items() if name.endswith("ffn_up_exps.weight")]
    if not ups:
        return
    writer.add_expert_count(expert_count({name: t.data.shape for name, t in tensors.items()}))
    writer.add_expert_used_count(int(config.num_experts_per_tok))
    writer.add_expert_feed_forward_length(ups[0][1])
    shared = [t.data.shape for name, t in tensors.items() if name.endswith("ffn_up_shexp.weight")]
    if shared:
        writer.add_expert_shared_feed_forward_length(shared[0][0])


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params:  # per attention type (Gemma 3): the global layers' parameters
        params = params["full_attention"]
    return params


def rope_scaling_tensors(writer: GGUFWriter, config) -> dict[str, EncodedTensor]:
    """Rope scaling as llama.cpp reads it: metadata keys, or a per-frequency factor tensor for Llama 3."""
    from gguf import RopeScalingType

    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return {}
    if rope_type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        return {}
    if rope_type == "llama3":
        # llama.cpp divides each rotary frequency by a stored factor: base / scaled, from transformers' own maths
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        dim = 2 * scaled.shape[0]
        base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        return {"rope_freqs.weight": EncodedTensor(T.F32, (base / scaled.float()).numpy().astype(np.float32))}
    raise LlmqError(f"GGUF export does not support rope scaling {rope_type!r} yet (model {config.model_type})")


def _pretokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer regex of a byte-level BPE tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    patterns = " ".join(str(p.get("pattern", {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    if "Digits" in kinds and "ByteLevel" in kinds and not patterns:
        return "smollm"
    if r"\p{N}{1,3}" in patterns:
        return "llama-bpe"
    if r"\p{N}" in patterns and "(?i:'s" in patterns:
        return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def _add_bpe_vocab(writer: GGUFWriter, tokenizer_json: dict, vocab_size: int) -> set[str] | None:
    """The vocabulary's first vocab_size tokens (the model's embedding rows); returns them where the tokenizer
    has more tokens than that (None: none were cut)."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    for text, item in added.items():
        vocab.setdefault(text, item["id"])
    by_id = {i: text for text, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(TokenType.CONTROL if added[text].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pretokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return set(tokens) if max(vocab.values(), default=-1) >= vocab_size else None


def _add_spm_vocab(writer: GGUFWriter, directory: Path, vocab_size: int) -> None:
    vocab = LlamaHfVocab(directory)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def add_tokenizer(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges, special tokens and chat template of a transformers tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        directory = Path(tmp)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.exists():
            raise LlmqError("GGUF export needs a fast tokenizer (tokenizer.json); this model only has a slow one")
        tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        model = tokenizer_json.get("model", {})
        spm_like = model.get("type") == "BPE" and model.get("byte_fallback", False)
        kept = None
        if spm_like:
            _add_spm_vocab(writer, directory, vocab_size)
        elif model.get("type") == "BPE":
            kept = _add_bpe_vocab(writer, tokenizer_json, vocab_size)
        else:
            raise LlmqError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE only)")
        special = SpecialVocab(directory, load_merges=not spm_like, n_vocab=vocab_size)
        if not spm_like and kept is not None:  # fewer embedding rows than tokens: only the merges within them
            special.merges = [m for m in special.merges if all(t in kept for t in (*m.split(" "), m.replace(" ", "")))]
        special.add_to_gguf(writer, quiet=True)
        if not spm_like:
            writer.add_add_space_prefix(False)


def model_name(model, fallback: str) -> str:
    """The name a GGUF file shows for this model (general.name): its own, never the output file's (llama.cpp
    switches tokenizer rules on names; a file called phi3.Q8_0.gguf made it expect Phi-3's special tokens)."""
    return (getattr(model.config, "_name_or_path", "") or "").rstrip("/").rpartition("/")[2] or fallback


# ---- writing --------------------------------------------------------------------------------------------------


RECIPE_KEY = "llmq.recipe"  # the run's recipe (llmq.json's fields, as JSON) inside a GGUF file llmq wrote


def write_gguf(path: str | Path, model, tokenizer, tensors: Mapping[str, EncodedTensor], file_type: int,
               name: str, recipe: str | None = None) -> int:
    """Write `tensors` (GGUF name -> encoded) with the model's metadata to `path`; returns the file size in bytes.

    `name` is the model name llama.cpp shows (general.name); `recipe`, JSON stored under RECIPE_KEY (`llmq
    inspect` shows it, `llmq quantize --recipe FILE.gguf` repeats the run).
    """
    writer = _with_metadata(path, model, tokenizer, tensors, file_type, name, recipe)
    tensors = {**rope_scaling_tensors(writer, language_config(model.config)), **tensors}
    for tensor_name, tensor in tensors.items():
        data = tensor.data
        if tensor.qtype in (T.F32, T.F16):
            writer.add_tensor(tensor_name, np.ascontiguousarray(data))
        else:
            writer.add_tensor(tensor_name, np.ascontiguousarray(data), raw_dtype=tensor.qtype)
    # the writer alone holds the data now, and lets go of each tensor once written (spilled ones are mapped)
    tensors = tensor = data = None
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path).stat().st_size


def _with_metadata(path, model, tokenizer, tensors: Mapping[str, EncodedTensor], file_type: int, name: str,
                   recipe: str | None) -> GGUFWriter:
    """A writer for `path` holding the file's metadata: architecture, sizes, tokenizer, recipe."""
    config = language_config(model.config)
    arch = gguf_arch(config)
    writer = GGUFWriter(str(path), MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _add_hparams(writer, config, arch)
    _add_expert_hparams(writer, config, tensors)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(2)
    if recipe is not None:
        writer.add_string(RECIPE_KEY, recipe)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    return writer


def metadata_bytes(model, tokenizer, file_type: int, name: str, recipe: str | None = None) -> int:
    """The bytes a GGUF file of this model spends before its tensor table: header, metadata and tokenizer (a
    size target subtracts them from the file's budget). Measured by writing them to a scratch file."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "metadata.gguf"
        writer = _with_metadata(path, model, tokenizer, {}, file_type, name, recipe)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path.stat().st_size
