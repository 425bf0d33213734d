"""Safetensors shards written a tensor at a time, so that a checkpoint is never held whole in memory.

A safetensors file is its header (8-byte little-endian length, then JSON naming every tensor's dtype, shape and
byte range) followed by the tensors' bytes. The header comes first but can only be written once every tensor of
the file is known, so each shard's bytes go to a scratch file as they come, and when the shard is full (5 GB,
as transformers shards) the header is written and the bytes copied after it, in the order of the tensors' names
(so a shard's bytes do not depend on the order tensors were added in). When all tensors are in, the
shards get their final names, `model.safetensors` alone or `model-0000k-of-0000n.safetensors` with the index
`model.safetensors.index.json` that transformers and vLLM read. Memory: one tensor and a copy buffer.

    shards = ShardWriter(directory)
    shards.add(name, tensor)   # any number of times, in any order
    shards.close()             # -> total bytes of tensor data
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

MAX_SHARD_BYTES = 5 * 10**9
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_BUFFER = 64 << 20


class _Shard:
    def __init__(self, path: Path):
        self.path, self.data_path = path, path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.data.write(data.numpy().data)
        self.header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + data.numel()]}
        self.size += data.numel()

    def finish(self) -> None:
        """Header, then the tensors' bytes in the order of their names, whatever order they came in: a shard's bytes
        depend only on what it holds (the model-class and model-free paths add tensors in different orders)."""
        self.data.close()
        header, offset = {}, 0
        for name in sorted(self.header):
            entry = self.header[name]
            start, stop = entry["data_offsets"]
            header[name] = {**entry, "data_offsets": [offset, offset + stop - start]}
            offset += stop - start
        encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the tensor bytes start 8-aligned, as safetensors writes them
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for name in header:
                start, stop = self.header[name]["data_offsets"]
                data.seek(start)
                _copy_bytes(data, out, stop - start)
        self.data_path.unlink()


def _copy_bytes(source, destination, count: int) -> None:
    while count > 0:
        chunk = source.read(min(count, _COPY_BUFFER))
        if not chunk:
            raise OSError(f"{source.name} ended {count} bytes early")
        destination.write(chunk)
        count -= len(chunk)


class ShardWriter:
    """See the module's docstring. Writes into `directory`, which the caller stages (llmq/targets/atomic.py)."""

    def __init__(self, directory: Path, max_shard_bytes: int | None = None):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes or MAX_SHARD_BYTES
        self.shards: list[_Shard] = []
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        size = tensor.numel() * tensor.element_size()
        if not self.shards or (self.shards[-1].size and self.shards[-1].size + size > self.max_shard_bytes):
            if self.shards:
                self.shards[-1].finish()
            self.shards.append(_Shard(self.directory / f".shard-{len(self.shards) + 1:05d}.partial"))
        self.shards[-1].add(name, tensor)

    def close(self) -> int:
        """Finish the last shard, give every shard its final name, write the index; returns the data bytes."""
        if not self.shards:
            self.shards.append(_Shard(self.directory / ".shard-00001.partial"))
        self.shards[-1].finish()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{k:05d}-of-{count:05d}.safetensors"
                                                          for k in range(1, count + 1)]
        weight_map = {}
        for shard, name in zip(self.shards, names):
            os.replace(shard.path, self.directory / name)
            weight_map.update(dict.fromkeys(shard.header, name))
        total = sum(shard.size for shard in self.shards)
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return total
