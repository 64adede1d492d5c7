"""Run by test_distributed.py, once alone and once under torchrun with 2 processes: the
same tiny recipe and global batch; the main process writes the loss curve."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bunny.testing import make_tiny_bunny  # noqa: E402
from bunny.train.trainer import train  # noqa: E402
from trainhelp import tiny_recipe  # noqa: E402

if __name__ == "__main__":
    data, out, per_device = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    recipe = tiny_recipe(out, data, per_device_batch_size=per_device, max_steps=4, resume="none")
    result = train(recipe, *make_tiny_bunny())
    if result.outputs:  # the main process exports
        (out / "losses.json").write_text(json.dumps([h["loss"] for h in result.history]))
