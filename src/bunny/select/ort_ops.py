"""Two CPU kernels from onnxruntime (MLAS), which imports in ~0.03 s (torch's int8 product
needs a ~1.3 s import, a fifth of a 200k-row selection's time):

- `to_float32`: float16 -> float32 (F16C/AVX-512), ~5x numpy's cast; every float16 is a
  float32, so the values are the same bits either way.
- `product`: int8 matrix products (MatMulInteger; VNNI kernels where the CPU has them).

`product(u, b)` returns (u - 128) @ b exactly, for u uint8 (m, k) and b int8 (k, n): the
model subtracts the zero point 128 itself, so int8 values enter as u = q + 128. Exact as
long as the int32 sums cannot overflow (the caller bounds them) and the kernel does not
saturate: CPUs without VNNI multiply-add uint8 x int8 pairs into int16 (vpmaddubsw), which
saturates for large values, so `qmax()` checks the kernel once per process on values that
would saturate and narrows the int8 range to [-63, 63] if they did."""
from __future__ import annotations

import threading

import numpy as np

from bunny.errors import BunnyError

_FLOAT, _UINT8, _INT8, _INT32, _FLOAT16 = 1, 2, 3, 6, 10  # onnx TensorProto.DataType
_LOCK = threading.Lock()
_SESSIONS: dict = {}
_QMAX: list = []


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, value) -> bytes:
    """One protobuf field: an int (varint) or bytes (length-delimited)."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _tensor_input(name: bytes, elem: int) -> bytes:
    """ValueInfoProto {name, type: TypeProto {tensor_type {elem_type, shape: two unknown dims}}}."""
    shape = _field(1, b"") + _field(1, b"")
    return _field(1, name) + _field(2, _field(1, _field(1, elem) + _field(2, shape)))


def _model(node: bytes, inputs: bytes, output: bytes, initializer: bytes = b"") -> bytes:
    """An ONNX model (ir_version 8, opset 13) of one node; field numbers as in onnx.proto."""
    graph = _field(1, node) + _field(2, b"bunny") + (_field(5, initializer) if initializer else b"") + inputs + output
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, b"") + _field(2, 13))


def model_bytes(kind: str) -> bytes:
    """"product": Y = MatMulInteger(A uint8, B int8, a_zero_point = 128);
    "cast": Y = Cast(X float16, to = float32)."""
    if kind == "product":
        node = _field(1, b"A") + _field(1, b"B") + _field(1, b"azp") + _field(2, b"Y") + _field(4, b"MatMulInteger")
        zero_point = _field(2, _UINT8) + _field(8, b"azp") + _field(9, bytes([128]))  # a uint8 scalar
        inputs = _field(11, _tensor_input(b"A", _UINT8)) + _field(11, _tensor_input(b"B", _INT8))
        return _model(node, inputs, _field(12, _tensor_input(b"Y", _INT32)), zero_point)
    if kind == "cast":
        to = _field(1, b"to") + _field(3, _FLOAT) + _field(20, 2)  # AttributeProto {name, i, type INT}
        node = _field(1, b"X") + _field(2, b"Y") + _field(4, b"Cast") + _field(5, to)
        return _model(node, _field(11, _tensor_input(b"X", _FLOAT16)), _field(12, _tensor_input(b"Y", _FLOAT)))
    raise ValueError(kind)


def _session(kind: str, threads: int = 1, required: bool = True):
    """One inference session per kind and thread count, shared by all threads
    (onnxruntime allows concurrent runs of a session). Without onnxruntime: an error, or
    None when not `required`."""
    with _LOCK:
        sess = _SESSIONS.get((kind, threads))
        if sess is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                if not required:
                    return None
                raise BunnyError("step 1's int8 products need onnxruntime: pip install 'bunny[select]' "
                                 "(or pass --products float32)") from exc
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, threads)
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            sess = ort.InferenceSession(model_bytes(kind), opts, providers=["CPUExecutionProvider"])
            _SESSIONS[(kind, threads)] = sess
        return sess


CAST_ROWS = 1024  # rows per conversion call: source and result stay in cache


def to_float32(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(n, d) float16 or float32 rows -> float32 (into `out` when given, C-contiguous).
    Without onnxruntime (e.g. a GPU machine running `--device cuda` only), numpy's cast:
    slower, the same bits."""
    if out is None:
        out = np.empty(src.shape, np.float32)
    sess = _session("cast", required=False) if src.dtype == np.float16 and src.size else None
    if sess is None:
        np.copyto(out, src)
        return out
    for a in range(0, len(src), CAST_ROWS):
        _run_into(sess, {"X": np.ascontiguousarray(src[a:a + CAST_ROWS])}, out[a:a + CAST_ROWS])
    return out


def _run_into(sess, inputs: dict, out: np.ndarray) -> None:
    """Run `sess` with its output "Y" written straight into `out` (C-contiguous): no copy
    of the result, and none made while holding the GIL."""
    io = sess.io_binding()
    for name, arr in inputs.items():
        io.bind_cpu_input(name, arr)
    io.bind_output("Y", "cpu", 0, out.dtype, out.shape, out.ctypes.data)
    sess.run_with_iobinding(io)


def product(u: np.ndarray, b: np.ndarray, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """(u - 128) @ b as int32, for u uint8 (m, k), b int8 (k, n), both C-contiguous; into
    `out` (m, n) int32 C-contiguous when given. With `out` onnxruntime writes straight into
    it: without, it returns a copy made while holding the GIL, which made two worker
    threads ~1.4x as fast as one instead of ~1.75x."""
    sess = _session("product", threads)
    if out is None:
        return sess.run(None, {"A": u, "B": b})[0]
    _run_into(sess, {"A": u, "B": b}, out)
    return out


def qmax() -> int:
    """Largest |q| for which `product` is exact on this CPU: 127, or 63 when the kernel
    saturates int16 pair sums (checked once, on the worst case: 255 x 127 pairs)."""
    with _LOCK:
        if _QMAX:
            return _QMAX[0]
    got = 0
    for q in (127, 63):
        u = np.full((4, 64), 128 + q, np.uint8)
        u[1] = 128 - q
        b = np.full((64, 8), q, np.int8)
        b[:, 1] = -q
        want = (u.astype(np.int64) - 128) @ b.astype(np.int64)
        if np.array_equal(product(u, b), want):
            got = q
            break
    if not got:
        raise BunnyError("onnxruntime's int8 product is not exact on this CPU: pass --products float32")
    with _LOCK:
        _QMAX[:] = [got]
    return got
