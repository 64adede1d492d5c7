"""The distributed path on the CPU: 2 processes (gloo) with batch 2 each give the same
loss curve as 1 process with batch 4 (same global batch, token-normalised loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trainhelp import write_dataset

WORKER = Path(__file__).parent / "dist_worker.py"


def test_two_processes_match_one(tmp_path):
    data = write_dataset(tmp_path / "data", n=16, text_only=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(WORKER), str(data), str(tmp_path / "one"), "4"], check=True, env=env,
                   timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(WORKER), str(data), str(tmp_path / "two"), "2"], check=True, env=env, timeout=300)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
