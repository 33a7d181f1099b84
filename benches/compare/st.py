"""Minimal safetensors reader/writer on numpy alone (no `safetensors` package).

Format: 8-byte little-endian u64 header length N, then N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes (offsets relative to the end of the header).
"""
import json
import struct

import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _bf16_to_f32(raw):
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32)


def load(path):
    """Returns (tensors: dict name -> np.ndarray, metadata: dict). BF16 becomes f32."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = body[b:e]
        shape = tuple(info["shape"])
        dt = info["dtype"]
        if dt == "BF16":
            arr = _bf16_to_f32(raw).reshape(shape)
        elif dt in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[dt]).reshape(shape).copy()
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dt}")
        out[name] = arr
    return out, meta


def load_tensors(path):
    return load(path)[0]


def save(path, tensors, metadata=None):
    """Writes a dict name -> np.ndarray (f32/f16/f64/i32/i64/u8/...)."""
    rev = {v: k for k, v in _DTYPES.items()}
    header = {}
    chunks = []
    off = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        key = np.dtype(dt).str.replace("|", "<") if False else None
        code = None
        for d, c in rev.items():
            if np.dtype(d) == a.dtype:
                code = c
                break
        if code is None:
            raise ValueError(f"tensor {name}: unsupported dtype {a.dtype}")
        raw = a.astype(_DTYPES[code], copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for c in chunks:
            f.write(c)
