"""llama.cpp's importance matrix files, both ways: `--imatrix FILE` reads one instead of calibrating,
`--save-imatrix FILE` writes llmq's own activation statistics for `llama-quantize --imatrix`.

An importance matrix holds, per weight matrix (by its GGUF tensor name) and per input channel, the mean of x²
over the calibration tokens; an expert tensor holds one row per expert. Two layouts exist (llama.cpp's
tools/imatrix and common/imatrix-loader.cpp):

- GGUF (what llama-imatrix writes by default): `general.type = "imatrix"`, `imatrix.datasets` (strings),
  `imatrix.chunk_count`, `imatrix.chunk_size`; per matrix NAME two F32 tensors, `NAME.in_sum2` [n_mat, n_in]
  (sums of x²) and `NAME.counts` [n_mat, 1] (tokens). Mean = in_sum2 / counts; a matrix with no tokens reads
  as 1 (no preference), as llama-quantize does.
- legacy `.dat`: int32 n_entries; per entry int32 name length, the name, int32 ncall, int32 n_values, then
  n_values float32 = mean x² * ncall; after the entries int32 chunk count, int32 length and the dataset name.

Both are plain numbers; nothing is unpickled. A file is read whole (its size is checked first).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmq.core.errors import LlmqError
from llmq.targets.atomic import atomic_output_file

_MAX_BYTES = 16 << 30  # far above any real imatrix (an 8B model's is ~30 MB; a 671B MoE's a few GB)
_SUM, _COUNT = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Mean x² per input channel for each GGUF weight name: a [n_mat, n_in] float32 tensor (one row per expert)."""

    means: dict[str, torch.Tensor]
    datasets: list[str] = field(default_factory=list)
    chunks: int = 0
    legacy: bool = False  # read from a .dat file: an expert tensor's rows arrive as one vector

    def importance(self, gguf_name: str, slot: int | None, in_features: int) -> torch.Tensor | None:
        """The importance of one Linear (an expert: its row `slot`), or None when the file has no entry for it."""
        mean = self.means.get(gguf_name)
        if mean is None:
            return None
        row = 0 if slot is None else slot
        if self.legacy and slot is not None and mean.shape[1] % in_features == 0:
            mean = mean.reshape(-1, in_features)  # a legacy file's expert tensor: every expert's row in one vector
        if mean.shape[1] != in_features or row >= mean.shape[0]:
            raise LlmqError(f"--imatrix: {gguf_name} holds {mean.shape[0]} x {mean.shape[1]} values, this model's has "
                            f"{in_features} inputs{'' if slot is None else f' and expert {slot}'}: the file was made "
                            "for another model; make one for this model (llama-imatrix, or llmq --save-imatrix)")
        return mean[row]


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read llama.cpp's imatrix file (GGUF or legacy .dat); one line on a file that is neither."""
    path = Path(path)
    if not os.path.lexists(path):
        raise LlmqError(f"--imatrix {path}: no such file; make one with llama-imatrix or llmq --save-imatrix")
    if not path.is_file():
        raise LlmqError(f"--imatrix {path} is not a regular file (a directory, device or pipe); pass the imatrix file")
    size = path.stat().st_size
    if size > _MAX_BYTES:
        raise LlmqError(f"--imatrix {path}: {size / 1e9:.1f} GB is larger than any importance matrix; pass the "
                        "imatrix file, not a model")
    with open(path, "rb") as f:
        magic = f.read(4)
    imatrix = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not imatrix.means:
        raise LlmqError(f"--imatrix {path}: the file holds no importance entries")
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a damaged header: gguf-py raises ValueError, struct errors, IndexError
        raise LlmqError(f"--imatrix {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise LlmqError(f"--imatrix {path}: a GGUF file, but not an importance matrix (general.type is "
                        f"{None if kind is None else kind.contents()!r}); pass the file llama-imatrix wrote")
    tensors = {t.name: t for t in reader.tensors}
    means = {}
    for name, tensor in tensors.items():
        if not name.endswith(_SUM):
            continue
        base = name.removesuffix(_SUM)
        counts = tensors.get(base + _COUNT)
        if counts is None or tensor.tensor_type.name != "F32" or counts.tensor_type.name != "F32":
            raise LlmqError(f"--imatrix {path}: {base} lacks F32 {_SUM} and {_COUNT} tensors; the file is damaged")
        n_mat = int(counts.n_elements)
        sums = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if n_mat < 1 or sums.size % n_mat:
            raise LlmqError(f"--imatrix {path}: {base} holds {sums.size} sums for {n_mat} matrices; the file is damaged")
        sums = torch.from_numpy(sums.copy()).reshape(n_mat, -1)
        count = torch.from_numpy(np.asarray(counts.data, dtype=np.float32).reshape(n_mat, 1).round())
        means[base] = torch.where(count > 0, sums / count.clamp_min(1), torch.ones_like(sums))
    datasets = reader.get_field("imatrix.datasets")
    chunks = reader.get_field("imatrix.chunk_count")
    return Imatrix(means, [] if datasets is None else list(datasets.contents()),
                   0 if chunks is None else int(chunks.contents()))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise LlmqError(f"--imatrix {path}: the file ends inside an entry; it is neither a GGUF imatrix nor a "
                            "complete legacy .dat one")
        values = struct.unpack_from(fmt, data, at)
        at += size
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1 << 24:
        raise LlmqError(f"--imatrix {path}: not an importance matrix (neither GGUF nor llama.cpp's legacy .dat)")
    means = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 1024:
            raise LlmqError(f"--imatrix {path}: an entry's name is {length} bytes long; the file is damaged")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, n_values = take("<2i")
        if not 0 < n_values < 1 << 30:
            raise LlmqError(f"--imatrix {path}: {name} holds {n_values} values; the file is damaged")
        take(f"<{4 * n_values}x")
        values = torch.tensor(np.frombuffer(data, dtype="<f4", count=n_values, offset=at - 4 * n_values).astype(np.float32))
        means[name] = (values / ncall if ncall > 0 else values).reshape(1, -1)  # experts: reshaped when read
    chunks, datasets = 0, []
    if at + 4 <= len(data):
        (chunks,) = take("<i")
        if at + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - at:
                datasets = [take(f"<{length}s")[0].decode("utf-8", "replace")]
    return Imatrix(means, datasets, chunks, legacy=True)


@dataclass
class ImatrixEntry:
    """Statistics of one GGUF weight: sums of x² and token counts, one row per matrix (expert)."""

    sums: torch.Tensor  # float32 [n_mat, n_in]
    counts: torch.Tensor  # float32 [n_mat]


def imatrix_entries(statistics: dict[str, tuple[torch.Tensor, float]], names: dict[str, str],
                    expert_slot) -> dict[str, ImatrixEntry]:
    """llmq's per-Linear statistics ({HF Linear name: (mean x², tokens)}) by GGUF weight name, a layer's experts
    stacked in slot order (an expert with no statistics: zero tokens, which llama-quantize reads as no preference)."""
    grouped: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}
    for linear, (mean, tokens) in statistics.items():
        hf_name = f"{linear}.weight"
        slot = expert_slot(hf_name)
        grouped.setdefault(names[hf_name], {})[0 if slot is None else slot[1]] = (mean.float().cpu(), tokens)
    entries = {}
    for gguf_name, rows in sorted(grouped.items()):
        n_mat, n_in = max(rows) + 1, next(iter(rows.values()))[0].numel()
        sums, counts = torch.zeros(n_mat, n_in), torch.zeros(n_mat)
        for slot, (mean, tokens) in rows.items():
            counts[slot] = round(tokens)
            sums[slot] = mean * counts[slot]
        entries[gguf_name] = ImatrixEntry(sums, counts)
    return entries


def write_imatrix(path: str | os.PathLike, entries: dict[str, ImatrixEntry], dataset: str, chunks: int,
                  chunk_size: int, overwrite: bool = True) -> None:
    """Write `entries` in llama.cpp's GGUF imatrix layout (the legacy .dat one when `path` ends in .dat),
    under a temporary name renamed when complete."""
    path = Path(path)
    with atomic_output_file(path, overwrite) as (tmp, _):
        if path.suffix == ".dat":
            _write_legacy(tmp, entries, dataset, chunks)
        else:
            _write_gguf(tmp, entries, dataset, chunks, chunk_size)


def _write_gguf(path: Path, entries: dict[str, ImatrixEntry], dataset: str, chunks: int, chunk_size: int) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="imatrix")  # llama.cpp reads general.type, not the architecture
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, entry in entries.items():
        writer.add_tensor(name + _SUM, entry.sums.numpy().astype(np.float32))
        writer.add_tensor(name + _COUNT, entry.counts.reshape(-1, 1).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy(path: Path, entries: dict[str, ImatrixEntry], dataset: str, chunks: int) -> None:
    ncall = max(chunks, 1)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, entry in sorted(entries.items()):
            counts = entry.counts[:, None]
            # mean x² * ncall, as llama-imatrix stores it; a matrix with no tokens stores 1 (no preference)
            values = torch.where(counts > 0, entry.sums / counts.clamp_min(1), torch.ones_like(entry.sums)) * ncall
            encoded = name.encode()
            f.write(struct.pack("<i", len(encoded)) + encoded + struct.pack("<2i", ncall, values.numel()))
            f.write(values.numpy().astype("<f4").tobytes())
        f.write(struct.pack("<i", chunks))
        encoded = dataset.encode()
        f.write(struct.pack("<i", len(encoded)) + encoded)


__all__ = ["Imatrix", "ImatrixEntry", "imatrix_entries", "read_imatrix", "write_imatrix"]
