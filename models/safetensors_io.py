"""Lazy safetensors reading (memory-mapped, any dtype incl. bf16/fp8) and writing, one tensor at a time.

We parse the format ourselves (8-byte header length, JSON header, raw little-endian bytes) so that a
tensor is a numpy memmap view: slicing it reads only the bytes it needs, and fp8/bf16 need no torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  pass


def read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20 or n > os.path.getsize(path):
      raise SafetensorsError(f"{path}: corrupted safetensors header (length {n})")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: corrupted safetensors header ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


class Checkpoint:
  """All tensors of a HF directory (single file or sharded with model.safetensors.index.json)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
      raise SafetensorsError(f"{directory}: no *.safetensors files")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise SafetensorsError(f"{path}: listed in model.safetensors.index.json but missing")
      header, offset = read_header(path)
      size = os.path.getsize(path)
      for key, info in header.items():
        if info["dtype"] not in DTYPES:
          raise SafetensorsError(f"{path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        if offset + info["data_offsets"][1] > size:
          raise SafetensorsError(f"{path}: tensor '{key}' extends past the end of the file (truncated?)")
        self._where[key] = (path, info, offset)
    self._maps: dict[str, np.memmap] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """A read-only memmap view; nothing is read until it is sliced or copied."""
    path, info, offset = self._where[key]
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    buf = self._maps[path][offset + start : offset + end]
    return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write(
  path: str,
  tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
  metadata: dict[str, str] | None = None,
):
  """Writes tensors given as (name, shape, dtype, produce); each is produced, written and dropped in turn."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, produce in tensors:
      arr = np.ascontiguousarray(produce(), dtype=dtype)
      assert arr.shape == tuple(shape), (name, arr.shape, shape)
      f.write(arr.tobytes())
