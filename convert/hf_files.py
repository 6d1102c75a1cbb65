"""Reading and writing the weight files of a Hugging Face folder, one tensor at a time.

Reads `model.safetensors` or sharded `*.safetensors` (with or without the
index) one tensor at a time with positioned reads into a fresh array, so a
process holds at most the tensors it is working on. (A memory map, as
`safetensors.safe_open` uses, keeps every page it has touched resident: a
converter reading two 7B models that way ends up with both in its RSS.)
`pytorch_model*.bin` goes through `torch.load(..., weights_only=True,
mmap=True)` only: a pickle that would run code is refused. Writes safetensors
shards tensor by tensor: the header is known from the shapes before any data,
so no shard is ever held in memory.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}
_FROM_ST = {code: dtype for dtype, code in ST_DTYPES.items()}


class _SafetensorsFile:
    """One safetensors file's header (name -> dtype, shape, absolute byte range)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if 8 + length > size:
                    raise ValueError(f"header of {length} bytes exceeds the file")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            self.tensors = {}
            for name, info in header.items():
                start, end = (8 + length + o for o in info["data_offsets"])
                dtype = _FROM_ST.get(info["dtype"])
                if dtype is None:
                    raise ValueError(
                        f"tensor {name} has dtype {info['dtype']}, not one of {sorted(_FROM_ST)}"
                    )
                shape = tuple(info["shape"])
                if end > size or end - start != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(f"tensor {name}'s bytes {start}..{end} do not fit the file")
                self.tensors[name] = (dtype, shape, start)
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a complete safetensors file ({e}); it is probably "
                "truncated: download or copy it again"
            ) from None

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, start = self.tensors[name]
        array = np.empty(shape, dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(buffer):
                n = os.preadv(f.fileno(), [buffer[done:]], start + done)
                if n == 0:
                    raise ValueError(f"{self.path}: tensor {name} ends early (file truncated)")
                done += n
        return array


class HFWeights:
    """The tensors of a Hugging Face folder: names, shapes and one tensor at a time."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self._where: dict[str, str] = {}  # tensor name -> file
        self._open: dict[str, object] = {}
        files = _weight_files(self.folder)
        for path in files:
            handle = self._handle(path)
            for name in handle.keys():
                self._where[name] = path

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open[self._where[name]]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return handle.shape(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 as ml_dtypes.bfloat16)."""
        path = self._where[name]
        handle = self._open[path]
        if isinstance(handle, dict):
            return _torch_to_numpy(handle[name])
        return handle.read(name)

    def _handle(self, path: str):
        self._open[path] = _load_bin(path) if path.endswith(".bin") else _SafetensorsFile(path)
        return self._open[path]


def _weight_files(folder: str) -> list[str]:
    """The weight files of an HF folder, checked against its index when there is one."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Hugging Face folder {folder} does not exist")
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(
                    f"{index} lists shard(s) {missing} that are not in {folder}; copy them "
                    "from the model's files"
                )
            return [os.path.join(folder, s) for s in shards]
        files = sorted(glob.glob(os.path.join(folder, pattern)), key=_natural_key)
        if files:
            return files
    raise FileNotFoundError(
        f"{folder} holds no weights: expected model.safetensors, sharded *.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin"
    )


def _load_bin(path: str) -> dict:
    """A .bin's tensors: zip files memory-mapped, legacy (pre-1.6) ones read whole; never code."""
    import torch

    try:
        # Only the zip format can be memory-mapped; weights_only=True holds for both.
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise _damaged_bin(path, e) from None
        raise ValueError(
            f"{path} was refused: its pickle holds more than tensors (loading it could run "
            f"code). Convert it to safetensors with a tool you trust. ({str(e)[:200]})"
        ) from None
    except Exception as e:  # a damaged file fails in torch, zip or the unpickler, in any way
        raise _damaged_bin(path, e) from None


def _damaged_bin(path: str, error: Exception) -> ValueError:
    return ValueError(
        f"{path} cannot be read as a PyTorch weights file ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200] if str(error) else ''}); it is probably "
        "truncated or damaged: download or copy it again"
    )


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---- writing --------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'5GB' (10**9), '2GiB' (2**30), '500MB', or a byte count."""
    if isinstance(size, int) or str(size).isdigit():
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {size!r}: use a byte count or e.g. 5GB, 500MB, 2GiB")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "KMG".index(unit[0]) * base)


def plan_shards(specs, max_shard_size: int) -> list[list[tuple]]:
    """Splits (name, shape, dtype) specs, in order, into shards of at most max_shard_size."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(
    folder, specs, tensors: Iterable[tuple[str, np.ndarray]], max_shard_size: int
) -> list[str]:
    """Writes `tensors` (yielded in `specs` order) as safetensors shards plus an index.

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors`
    with `model.safetensors.index.json`. Returns the file names written.
    """
    shards = plan_shards(list(specs), max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream = iter(tensors)
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        total += _write_shard(os.path.join(folder, file_name), shard, stream)
        weight_map.update({spec[0]: file_name for spec in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        names.append("model.safetensors.index.json")
    return names


def _write_shard(path: str, shard, stream: Iterator[tuple[str, np.ndarray]]) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in shard:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": ST_DTYPES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in shard:
            got_name, array = next(stream)
            if got_name != name or array.shape != tuple(shape) or array.dtype != dtype:
                raise AssertionError(
                    f"{path}: expected {name} {shape} {dtype}, got "
                    f"{got_name} {array.shape} {array.dtype}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return offset
