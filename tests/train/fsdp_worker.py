"""Run by test_fsdp.py under torchrun (2 processes, gloo): tiny-model training runs with
`fsdp: true`, one after the other in the same processes (one launch: the imports dominate);
each process writes each run's losses and holdings to OUT/MODE/report-RANK.json.

argv: DATA OUT MODE [MODE ...], MODE one of
- lora: 10 steps of LoRA (tower frozen), a checkpoint every 3 steps, killed after step 7
  (the last checkpoint at step 6) and resumed to step 10;
- full: 10 steps of full fine-tuning with the tower trained, gradient checkpointing and
  gradient accumulation (2 micro-batches of 1 per process).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bunny.testing import make_tiny_bunny  # noqa: E402
from bunny.train.trainer import train  # noqa: E402
from trainhelp import tiny_recipe  # noqa: E402

STEPS = 10


def recipe_for(mode: str, data: Path, out: Path, processes: int):
    """The recipe of the sharded runs (2 processes) and of their one-process references
    (unsharded, batch 4): the same global batch of 4."""
    fsdp = processes > 1
    per_device, grad_accum = (4, 1) if not fsdp else (1, 2) if mode == "full" else (2, 1)
    # max_grad_norm below the gradients' norms: the clipping of sharded gradients is checked too.
    fields = dict(per_device_batch_size=per_device, max_steps=STEPS, fsdp=fsdp, save_every=3, keep_checkpoints=1,
                  save_full_model=True, resume="auto", max_grad_norm=0.2, grad_accum=grad_accum)
    if mode == "full":
        fields.update(tune="full", unfreeze_tower=True, gradient_checkpointing=True, lr=2e-3, save_every=0)
    return tiny_recipe(out, data, **fields)


if __name__ == "__main__":
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for mode in sys.argv[3:]:
        recipe = recipe_for(mode, data, out / mode, 2)
        before = train(recipe, *make_tiny_bunny(), stop_after=7).history if mode == "lora" else []
        result = train(recipe, *make_tiny_bunny())
        rank = torch.distributed.get_rank()
        (out / mode / f"report-{rank}.json").write_text(json.dumps({
            "losses": [h["loss"] for h in result.history], "history": result.history, "before_kill": before,
            "holdings": result.holdings}))
