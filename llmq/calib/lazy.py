"""Lazy layers: a model whose weights stay in the checkpoint's safetensors files until the harness needs them.

The model is built as a skeleton on the meta device (accelerate's `init_empty_weights`: shapes, no memory); its
fused experts are made per-expert Linears (llmq/calib/experts.py) as for a loaded model. Then:

    load_globals()         the tensors outside the decoder layers that calibration runs (embeddings, final norm);
                           the output head is left on disk, nothing before the write needs it
    load_layer(i)          decoder layer i, read from the shards (memory-mapped) when the harness reaches it
    release_layer(i, ...)  back to the meta device once it is done (what the output needs is checkpointed)
    tensor(name, value)    any tensor for the writer: the model's own when it is in memory, else read from disk

So peak memory is the embeddings, one or two layers and the calibration activations, whatever the depth.

Which file holds which tensor comes from the checkpoint's index; which on-disk name is which model tensor comes
from transformers' own conversion (llmq/calib/naming.py's `model_names`, run on marker tensors), so renamed and
fused-on-load layouts (Mixtral's `block_sparse_moe.experts.<e>.w1`) are read without a table per model. A
checkpoint this cannot map one to one (a conversion that changes values, tensors stored fused on disk with no
per-expert form, keys the model has no place for) is loaded whole instead, with a note saying why.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmq.calib.discover import find_decoder_layers
from llmq.calib.experts import unfuse_experts
from llmq.calib.naming import model_names
from llmq.core.device import all_finite
from llmq.core.errors import LlmqError

# conversions that only stack per-expert tensors, which unfusing undoes exactly (transformers 5's MoE merges)
_STACKING_OPERATIONS = {"MergeModulelist", "Concatenate"}


def index_weight_map(directory: Path) -> dict[str, str] | None:
    """A sharded checkpoint's weight map (on-disk tensor name -> shard file name), None when it has no index."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError):
        raise LlmqError(f"{index} is not a valid safetensors index; re-download or re-export the checkpoint") from None
    for key, shard in weight_map.items():
        # a shard is a file beside the index: an absolute path or ../ would make llmq read any file on the machine
        if not isinstance(key, str) or not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise LlmqError(f"{index} names shard {shard!r} for {key!r}, which is not a file name beside the index; "
                            "a checkpoint's shards live in its directory: re-download or re-export it")
    return weight_map


@contextlib.contextmanager
def open_shard(path: Path):
    """safe_open of one shard, whatever goes wrong in it (a missing file, a damaged header, a missing tensor) one
    line naming the file."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except LlmqError:
        raise
    except Exception as error:  # safetensors' and the OS's own error types
        raise LlmqError(f"cannot read {path} ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                        "the checkpoint is incomplete or damaged: re-download or re-export it") from None


def checkpoint_index(directory: Path) -> dict[str, Path] | None:
    """On-disk tensor name -> the safetensors file holding it; None when the checkpoint has no safetensors."""
    weight_map = index_weight_map(directory)
    if weight_map is not None:
        return {key: directory / file for key, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return None
    with open_shard(single) as f:
        return dict.fromkeys(f.keys(), single)


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")  # a tensor inside a numbered decoder layer
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the float types a model's weights come in
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


def check_config_fits_checkpoint(directory: Path, config) -> None:
    """Refuse, before the model is built, a config its own checkpoint contradicts: more decoder layers or a wider
    embedding than the safetensors hold (a config of 200,000 layers or a hidden size of 4M would build for minutes
    or ask for hundreds of GB), or a float model's weight stored as integers. Only the shards' headers are read."""
    files = checkpoint_index(directory)
    if not files:
        return
    text = getattr(config, "text_config", None) or config
    layers, embedding = set(), None
    quantized = getattr(config, "quantization_config", None) is not None
    for path in sorted(set(files.values())):
        with open_shard(path) as f:
            for key in f.keys():
                if (found := LAYER_INDEX.search(key)) is not None:
                    layers.add(int(found[1]))
                if not (key.endswith(".weight") or key.endswith("_weight")):
                    continue
                tensor = f.get_slice(key)
                if not quantized and tensor.get_dtype() not in (*FLOAT_DTYPES, "F8_E4M3", "F8_E5M2"):
                    raise LlmqError(f"{path.name} stores {key} as {tensor.get_dtype()}; an unquantized checkpoint holds "
                                    "float weights: re-export it")
                if embedding is None and key.endswith(_EMBEDDINGS) and len(tensor.get_shape()) == 2:
                    embedding = (key, tuple(tensor.get_shape()))
    expected = getattr(text, "num_hidden_layers", None)
    if isinstance(expected, int) and layers and expected > len(layers):
        raise LlmqError(f"config.json says num_hidden_layers {expected}, but the checkpoint holds {len(layers)} "
                        "decoder layers; the config and the weights do not belong together")
    hidden = getattr(text, "hidden_size", None)
    if embedding is not None and isinstance(hidden, int) and hidden not in embedding[1]:
        raise LlmqError(f"config.json says hidden_size {hidden}, but {embedding[0]} is {list(embedding[1])}; the "
                        "config and the weights do not belong together")


def _value_changing_conversion(model: nn.Module) -> str | None:
    """The first load-time conversion of this model that changes values (not a rename, not an expert stack)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    for transform in get_model_conversion_mapping(model):
        for operation in getattr(transform, "operations", None) or ():
            if type(operation).__name__ not in _STACKING_OPERATIONS:
                return type(operation).__name__
    return None


class LazyWeights:
    """The on-disk tensors of a skeleton model, read when asked (see the module's docstring)."""

    def __init__(self, model: nn.Module, files: dict[str, Path], disk_names: dict[str, str], dtype: torch.dtype):
        self.model, self.files, self.dtype = model, files, dtype
        self.disk_names = disk_names  # model tensor name -> on-disk name
        self.aliases = _shared_names(model)  # another name of a shared tensor -> the name it is stored under
        self.layers_path, layers = find_decoder_layers(model)
        self.layer_count = len(layers)
        pattern = re.compile(rf"^{re.escape(self.layers_path)}\.(\d+)\.")
        self.by_layer: list[list[str]] = [[] for _ in layers]
        self.outside: list[str] = []
        for name in disk_names:
            match = pattern.match(name)
            (self.by_layer[int(match.group(1))] if match else self.outside).append(name)

    def read(self, names: list[str], own: bool = False) -> dict[str, torch.Tensor]:
        """Model tensors by name, read from their shards in the model's dtype, refused if not finite. `own`: in
        memory of their own, never a view of the shard's memory map (see load_layer)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[self.disk_names[name]], []).append(name)
        tensors = {}
        for path, in_file in by_file.items():
            with open_shard(path) as f:
                for name in in_file:
                    tensors[name] = f.get_tensor(self.disk_names[name])
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                if not all_finite(tensor):
                    raise LlmqError(f"tensor {name} contains NaN or Inf; the checkpoint is damaged: re-download or "
                                    "re-export it")
                cast = tensor.to(self.dtype)
                if cast.dtype != tensor.dtype and not all_finite(cast):
                    raise LlmqError(f"{name} does not fit {str(self.dtype).removeprefix('torch.')} (a value beyond "
                                    "its range became Inf in the cast); use --dtype bfloat16 or float32")
                tensors[name] = cast.clone() if own and cast.data_ptr() == tensor.data_ptr() else cast
            elif own:
                tensors[name] = tensor.clone()
        return tensors

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, value in tensors.items():
            set_module_tensor_to_device(self.model, name, "cpu", value=value)

    def _release(self, names) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def _head(self) -> set[str]:
        """The output head's weight when it is its own tensor (tied heads come with the embeddings)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None or head.weight is self.model.get_input_embeddings().weight:
            return set()
        return {name for name, p in self.model.named_parameters() if p is head.weight}

    def load_globals(self) -> None:
        self._assign(self.read([name for name in self.outside if name not in self._head()]))
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def release_globals(self) -> None:
        self._release(self.outside)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()  # the head too: else it would hold the embedding's memory through the run

    def mismatched(self) -> list[tuple[str, list[int], list[int]]]:
        """(name, shape on disk, shape the config makes) of every tensor whose shapes differ (from the headers)."""
        found, by_file = [], {}
        for name, key in self.disk_names.items():
            by_file.setdefault(self.files[key], []).append(name)
        expected = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        for path, names in by_file.items():
            with open_shard(path) as f:
                for name in names:
                    on_disk = list(f.get_slice(self.disk_names[name]).get_shape())
                    if name in expected and on_disk != list(expected[name].shape):
                        found.append((name, on_disk, list(expected[name].shape)))
        return found

    def layer_tensors(self, index: int) -> list[str]:
        """The model names of decoder layer `index`'s tensors."""
        return list(self.by_layer[index])

    def load_layer(self, index: int) -> None:
        """Decoder layer `index` into memory of its own. Not the shard's memory map: the methods write into a
        layer's weights (the quantized values, AWQ's scales), and a write into a mapped page makes it a private
        copy that lives as long as the mapping, which the embeddings and later layers keep open: each layer's
        weights stayed resident after its release (22 MB a layer of a 1024-wide model, all of it at 8B shape)."""
        self._assign(self.read(self.by_layer[index], own=True))

    def release_layer(self, index: int, keep: set[str] = frozenset()) -> None:
        """Back to the meta device, but for `keep` (small tensors the writer reads from the model: norms)."""
        self._release(name for name in self.by_layer[index] if name not in keep)

    @contextlib.contextmanager
    def layer(self, index: int):
        self.load_layer(index)
        try:
            yield
        finally:
            self.release_layer(index)

    def load_all(self) -> None:
        """Every tensor (what generating calibration text from the model itself needs)."""
        self.load_globals()
        self._assign(self.read([n for n in self.outside if n in self._head()]))
        for index in range(self.layer_count):
            self.load_layer(index)

    def release_layers(self) -> None:
        """Every decoder layer back to the meta device (after load_all)."""
        for index in range(self.layer_count):
            self.release_layer(index)

    def tensor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` (the model's tensor `name`), read from disk when it is not in memory."""
        if not value.is_meta:
            return value
        stored = self.aliases.get(name, name)
        return self.read([stored])[stored]


def lazy_weights(model: nn.Module) -> LazyWeights | None:
    return getattr(model, "llmq_lazy", None)


def tensor_of(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """A model tensor for a writer: itself, or read from the checkpoint when the model left it on disk."""
    weights = lazy_weights(model)
    return value if weights is None else weights.tensor(name, value)


def _shared_names(model: nn.Module) -> dict[str, str]:
    """Every other name of a tensor several modules share (a tied head) -> its first name, the one on disk."""
    first, aliases = {}, {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def build_lazy(directory: Path, config, model_class, dtype: torch.dtype, trust_remote_code: bool):
    """(skeleton model with LazyWeights attached as `model.llmq_lazy`, None) or (None, why it cannot be lazy)."""
    from accelerate import init_empty_weights

    files = checkpoint_index(directory)
    if files is None:
        return None, "the checkpoint has no safetensors files"
    with init_empty_weights():
        model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the head shares the embedding's tensor, as from_pretrained makes it: one on disk
    changing = _value_changing_conversion(model)
    if changing is not None:
        return None, f"transformers converts its tensors on load ({changing})"
    unfuse_experts(model)
    names = model_names(model, ())
    unknown = sorted(key for key in files if key not in names)
    if unknown:
        return None, f"{len(unknown)} on-disk tensors have no one-to-one place in the model (first: {unknown[0]})"
    disk_names = {names[key]: key for key in files}
    if len(disk_names) != len(files):
        return None, "several on-disk tensors fill one model tensor"
    wanted = [name for name, _ in model.named_parameters()]  # a tensor shared by several modules: its first name
    wanted += [name for name, _ in model.named_buffers() if name in model.state_dict()]
    missing = [name for name in wanted if name not in disk_names]
    if missing:
        return None, f"{len(missing)} model tensors are not in the checkpoint as such (first: {missing[0]})"
    model.llmq_lazy = LazyWeights(model, files, disk_names, dtype)
    return model, None
