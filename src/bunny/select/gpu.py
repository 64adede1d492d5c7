"""The torch path (`--device cuda`): nearest-centroid assignment and the per-cluster
similarity tiles computed with torch on a GPU; `--device torch-cpu` runs the same code on
the CPU (tests, machines without faiss).

The ids are the numpy/faiss path's, bit for bit: torch only *proposes*, and every value
that decides a result goes through the same rule functions on the host.
- Assignment: float32 distances |c|^2 - 2 x.c on the device (|x|^2 is the same for every
  centroid), top two; rows whose two proposals are within `assign.GAP` are decided by
  `assign.refine` (per-row float64 distances on the host), exactly as after faiss. Both
  proposals err by < 1e-5 for unit rows, far below GAP/2, so a row not refined gets the
  true nearest centroid on either path.
- Similarity: float32 tiles of the upper triangle (TF32 off), candidates above
  threshold - REFINE, then `rules._decide`: values farther than REFINE from the threshold
  decide alone (float32 error < REFINE for unit rows of d <= 2048), nearer ones by
  `rules.pair_dots` on the host. Same edges as `rules.dense_edges`, hence the same
  components.
Only this module imports torch; the CPU path never does.
"""
from __future__ import annotations

import threading

import numpy as np

from bunny.errors import BunnyError
from bunny.select import rules
from bunny.select.assign import GAP, refine

_LOCK = threading.Lock()
_CENTROIDS: dict = {}



def torch_device(device: str):
    """torch.device for a --device value: "cuda", "cuda:N" or "torch-cpu"."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a core dependency
        raise BunnyError(f"--device {device} needs torch") from exc
    if device == "torch-cpu":
        return torch.device("cpu")
    if not device.startswith("cuda"):
        raise BunnyError(f"--device {device!r}: choose cpu, cuda, cuda:N or torch-cpu")
    if not torch.cuda.is_available():
        raise BunnyError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    # full float32 products: TF32 would round the inputs to 10 mantissa bits
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


def _centroids_on(centroids: np.ndarray, dev):
    """(c, |c|^2) on the device, uploaded once per process and device."""
    import torch

    key = (id(centroids), centroids.shape, str(dev))
    with _LOCK:
        hit = _CENTROIDS.get(key)
        if hit is None or hit[0] is not centroids:
            ct = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
            hit = (centroids, ct, (ct * ct).sum(1))
            _CENTROIDS.clear()
            _CENTROIDS[key] = hit
    return hit[1], hit[2]


class TorchAssigner:
    """Nearest centroid of each row (same labels as `assign.Assigner`)."""

    def __init__(self, centroids: np.ndarray, device: str):
        self.c = np.ascontiguousarray(centroids, dtype=np.float32)
        self.dev = torch_device(device)

    def labels_and_gap(self, x):
        """(best, gap) proposals for float32 rows x (numpy or a torch tensor on the device)."""
        import torch

        ct, cn = _centroids_on(self.c, self.dev)
        xt = torch.as_tensor(x).to(self.dev).float()
        d2 = torch.addmm(cn[None, :], xt, ct.T, alpha=-2.0)  # |c|^2 - 2 x.c
        if len(self.c) == 1:
            return np.zeros(len(xt), np.int32), np.full(len(xt), np.inf)
        val, idx = torch.topk(d2, 2, dim=1, largest=False)
        gap = (val[:, 1] - val[:, 0]).double()
        return idx[:, 0].int().cpu().numpy(), gap.cpu().numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n,) int32 cluster of each row (float32, or float16 as stored: converted to
        float32 on the device, exactly as `Layout.rows_f32` does on the host)."""
        best, gap = self.labels_and_gap(x)
        close = gap <= GAP
        if close.any():  # only these rows are needed on the host, in float32
            best[close] = refine(np.asarray(x[close], np.float32), self.c, best[close], gap[close])
        return best


def torch_edges(device: str, block: int = 0):
    """An `edges(u, threshold)` function for `rules.components` that computes the
    similarity tiles with torch on `device` (same pairs as `rules.similarity_edges`)."""
    dev = torch_device(device)

    def edges(x: np.ndarray, threshold: float):
        import torch

        n = len(x)
        if n < 2:
            return
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
        bl = block or max(64, min(8192, (1 << 27) // n))  # tile <= ~128M floats
        cut = threshold - rules.REFINE
        for a in range(0, n, bl):
            b = min(a + bl, n)
            s = xt[a:b] @ xt[a:].T  # (b-a, n-a) float32
            s[:, : b - a].masked_fill_(torch.ones(b - a, b - a, dtype=torch.bool, device=dev).tril(), -np.inf)
            flat = torch.nonzero(s.reshape(-1) > cut).squeeze(1)
            if not len(flat):
                continue
            v = s.reshape(-1)[flat].cpu().numpy()
            flat = flat.cpu().numpy()
            ii, jj = np.divmod(flat, n - a)
            yield rules._decide(x, ii + a, jj + a, v, threshold)

    return edges
