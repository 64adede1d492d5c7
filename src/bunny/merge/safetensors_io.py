"""Reading checkpoints tensor by tensor, and writing safetensors shards one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a shard in memory at once. A shard is
only an 8-byte header length, a JSON header and the tensors' bytes back to back, so when
all names, dtypes and shapes are known first (they are: they come from the inputs' headers)
the header can be written up front and each tensor appended as soon as it is computed.
Memory then holds one tensor, not one shard.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from bunny.errors import BunnyError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Name -> where the tensor lives, for a folder of `model.safetensors` or indexed shards."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise BunnyError(f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}; averaging needs safetensors checkpoints")
    out: dict[str, TensorInfo] = {}
    for file in files:
        for name, meta in read_header(file).items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in CODE_DTYPES:
                raise BunnyError(f"{file}: tensor {name} has dtype {meta['dtype']}, which bunny cannot average")
            out[name] = TensorInfo(file, CODE_DTYPES[meta["dtype"]], tuple(meta["shape"]))
    return out


def chunk_rows(info: TensorInfo, max_bytes: int) -> int:
    """Rows (first-dimension entries) per piece so that one piece stays under max_bytes."""
    if not info.shape:
        return 1
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    return max(1, max_bytes // row_bytes)


def plan_shards(names: list[str], sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known up front;
    `write(name, tensor)` must be called in the planned order."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = TensorInfo(path, dtype, shape).nbytes
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._order = [s[0] for s in specs]
        self._specs = {s[0]: s for s in specs}
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks) -> None:
        """The tensor `name` given as consecutive pieces along its first dimension."""
        expected = self._specs[self._order[self._next]]
        written = 0
        for chunk in chunks:
            if name != expected[0] or chunk.dtype != expected[1]:
                raise RuntimeError(f"shard writer expected {expected[:2]}, got {name} {chunk.dtype}")
            data = chunk.detach().contiguous().cpu()
            # Bytes through a uint8 view: numpy has no bfloat16, so chunk.numpy() cannot be used.
            self._file.write(data.reshape(-1).view(torch.uint8).numpy())
            written += data.numel()
        if written != math.prod(expected[2]):
            raise RuntimeError(f"shard writer got {written} values for {name}, expected shape {expected[2]}")
        self._next += 1

    def close(self, complete: bool = True) -> None:
        self._file.close()
        if complete and self._next != len(self._order):
            raise RuntimeError(f"shard closed after {self._next} of {len(self._order)} tensors")
