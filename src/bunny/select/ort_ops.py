"""Two CPU kernels from onnxruntime (MLAS), which imports far faster than torch (whose int8
product would need its ~1.3 s import):

- `to_float32`: float16 -> float32 (F16C/AVX-512), ~5x numpy's cast; every float16 is a
  float32, so the values are the same bits either way.
- `product`: int8 matrix products (MatMulInteger; VNNI kernels where the CPU has them).

`product(u, b)` returns (u - 128) @ b exactly, for u uint8 (m, k) and b int8 (k, n): the
model subtracts the zero point 128 itself, so int8 values enter as u = q + 128. Exact as
long as the int32 sums cannot overflow (the caller bounds them) and the kernel does not
saturate: CPUs without VNNI multiply-add uint8 x int8 pairs into int16 (vpmaddubsw), which
saturates for large values, so `qmax()` checks the kernel once per process on values that
would saturate and narrows the int8 range to [-63, 63] if they did.

The two one-node models are files built with the onnx package (`onnx_models`)."""
from __future__ import annotations

import threading

import numpy as np

from bunny.errors import BunnyError
from bunny.select import onnx_models

_LOCK = threading.Lock()
_SESSIONS: dict = {}
_QMAX: list = []


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
            sess = ort.InferenceSession(str(onnx_models.path(kind)), opts, providers=["CPUExecutionProvider"])
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
    it: without, it returns a copy, made while holding the GIL (worker threads then wait
    for each other)."""
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
