"""Safetensors reading for streaming merges: the input checkpoints, tensor by tensor.

Each tensor (or a flat slice of it) is read from the offsets in the file's header with plain `preadv`
calls into a reused buffer. Not `safe_open`: its mmap pages count in RSS, so merging K multi-GB inputs
that way looks like K whole models in memory (measured: 1.82 GB vs 0.68 GB peak RSS for 3 x 507 MB
inputs). The writer hands out the same ReadBuffer to be filled with merged bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20
READ_AHEAD = 64 << 20
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)(\.index\.json)?$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return SAFETENSORS_DTYPES[self.dtype].itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, in data order; InvalidInput naming the file when broken."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise InvalidInput(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise InvalidInput(f"{path}: header length {header_len} is not plausible for a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: safetensors header is not valid JSON ({exc})") from None
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise InvalidInput(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        if info.nbytes != info.numel * info.itemsize or begin < 0 or data_start + end > size:
            raise InvalidInput(f"{path}: tensor {name!r} has data offsets that do not match its shape/file")
        infos.append(info)
    return sorted(infos, key=lambda i: i.offset)


class ReadBuffer:
    """Reused read memory. Grows by replacement, so tensors still viewing the old memory stay valid."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.filled = memoryview(b"")  # the last view handed out: what a writer writes

    def view(self, nbytes: int) -> memoryview:
        if len(self._data) < nbytes:
            self._data = bytearray(nbytes)
        self.filled = memoryview(self._data)[:nbytes]
        return self.filled

    def tensor(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `count` elements viewing this buffer's memory (contents undefined)."""
        if count == 0:
            self.filled = memoryview(b"")
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self.view(count * dtype.itemsize), dtype=dtype, count=count)


class Checkpoint:
    """The safetensors weights of a Hugging Face model folder, read by header offset."""

    def __init__(self, folder, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in read_header(file):
                if info.name in self.tensors:
                    raise InvalidInput(f"{self.label}: tensor {info.name!r} appears in two shards")
                self.tensors[info.name] = info
        self._check_index()
        self._fds: dict[Path, int] = {}
        self._hinted: dict[int, int] = {}  # fd -> end of the range asked for with WILLNEED
        self._lock = threading.Lock()  # several merging threads may read at once

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = self._index_map()
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise InvalidInput(f"{self.label}: {INDEX_NAME} names {missing[0].name}, which is missing")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise InvalidInput(f"{self.label}: no *.safetensors weights in {self.folder}")
        return files

    def _index_map(self) -> dict:
        try:
            weight_map = json.loads((self.folder / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise InvalidInput(f"{self.label}: {INDEX_NAME} has no valid 'weight_map'") from None
        if not isinstance(weight_map, dict):
            raise InvalidInput(f"{self.label}: {INDEX_NAME} 'weight_map' must be an object")
        return weight_map

    def _check_index(self) -> None:
        if not (self.folder / INDEX_NAME).exists():
            return
        for name, file in self._index_map().items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise InvalidInput(f"{self.label}: {INDEX_NAME} puts tensor {name!r} in {file}, which lacks it")

    def used_files(self) -> list[str]:
        """Relative paths of the files a merge reads or copies: the safetensors weights in use, their
        index, and the side files (config, tokenizer ...)."""
        used = {f.relative_to(self.folder).as_posix() for f in self.files}
        if (self.folder / INDEX_NAME).exists():
            used.add(INDEX_NAME)
        return sorted(used | set(side_files(self.folder)))

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            return {}
        try:
            config = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidInput(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise InvalidInput(f"{path}: not a JSON object")
        return config

    def read_into(self, info: TensorInfo, buffer: ReadBuffer, start: int = 0, count: int | None = None):
        """Elements [start, start+count) of a tensor, flat, read into `buffer`.

        Returns a tensor that views the buffer's memory: valid until the buffer is used again.
        """
        count = info.numel - start if count is None else count
        nbytes = count * info.itemsize
        view = buffer.view(nbytes)
        fd = self._fd(info.file)
        pos, done = info.offset + start * info.itemsize, 0
        self._read_ahead(fd, pos + nbytes)
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise InvalidInput(f"{info.file}: ends inside tensor {info.name!r}")
            done += n
        if nbytes == 0:
            return torch.empty(0, dtype=SAFETENSORS_DTYPES[info.dtype])
        return torch.frombuffer(view, dtype=SAFETENSORS_DTYPES[info.dtype], count=count)

    def _read_ahead(self, fd: int, end: int) -> None:
        """Ask the kernel to load the next READ_AHEAD bytes in the background, so a cold read overlaps
        with the merging (the kernel's own readahead is a few hundred KB: each slice read waited)."""
        with self._lock:
            if end <= self._hinted.get(fd, 0) - READ_AHEAD // 2:
                return
            self._hinted[fd] = end + READ_AHEAD
        os.posix_fadvise(fd, end, READ_AHEAD, os.POSIX_FADV_WILLNEED)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._hinted.clear()


def side_files(src: Path) -> list[str]:
    """Config, tokenizer, generation config ...: every top-level non-weight file of `src`."""
    return [
        path.name for path in sorted(src.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME and not WEIGHT_FILE.match(path.name)
        and not path.name.endswith(".partial")
    ]
