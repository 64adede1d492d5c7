"""Sharded training (fsdp: true, torch's FSDP2) on the CPU: 2 processes (gloo) against the
same recipe on 1 process with the same global batch.

One torchrun launch runs two sharded runs (LoRA with checkpoints, killed after step 7 and
resumed; full fine-tuning with the tower trained, gradient checkpointing and gradient
accumulation); the references run here, in one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bunny.model.loading import load_pretrained
from bunny.testing import make_tiny_bunny
from bunny.train.trainer import train
from fsdp_worker import STEPS, recipe_for
from trainhelp import write_dataset

WORKER = Path(__file__).parent / "fsdp_worker.py"
MODES = ("lora", "full")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (sharded reports per rank, sharded output folder)} and the data file."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_dataset(root / "data", n=16, text_only=4)  # text-only samples: some processes skip the tower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    str(WORKER), str(data), str(root / "two"), *MODES], check=True, env=env, timeout=600)
    reports = {m: [json.loads((root / "two" / m / f"report-{r}.json").read_text()) for r in (0, 1)] for m in MODES}
    return reports, root, data


def reference(mode: str, root: Path, data: Path):
    result = train(recipe_for(mode, data, root / "one" / mode, 1), *make_tiny_bunny())
    return result


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sharded_losses_and_model_equal_one_process(runs, mode):
    reports, root, data = runs
    one = reference(mode, root, data)
    expected = torch.tensor([h["loss"] for h in one.history])
    assert len(expected) == STEPS
    for rank in (0, 1):
        report = reports[mode][rank]
        torch.testing.assert_close(torch.tensor(report["losses"]), expected, rtol=1e-5, atol=1e-5)
        norms = [h["grad_norm"] for h in report["history"]]  # of the whole gradient, before clipping
        torch.testing.assert_close(torch.tensor(norms), torch.tensor([h["grad_norm"] for h in one.history]),
                                   rtol=1e-4, atol=1e-6)
        assert sum(n > 0.2 for n in norms) >= 3  # clipped (max_grad_norm 0.2) on several steps
        if report["before_kill"]:  # and the steps before the kill, trained sharded
            torch.testing.assert_close(torch.tensor([h["loss"] for h in report["before_kill"]]), expected[:7],
                                       rtol=1e-5, atol=1e-5)
    # The sharded run's model, gathered and saved by the main process, loads in one process
    # as a bunny checkpoint and holds the weights the one-process run trained.
    sharded, _ = load_pretrained(root / "two" / mode / "run" / "model")
    single, _ = load_pretrained(root / "one" / mode / "run" / "model")
    got, want = sharded.state_dict(), single.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_each_process_holds_half(runs, mode):
    reports, _, _ = runs
    held = [r["holdings"] for r in reports[mode]]
    for kind in ("params", "optim"):
        total = held[0][f"{kind}_total"]
        assert sum(h[f"{kind}_local"] for h in held) == total  # the shards cover the whole, once
        for h in held:
            assert 0.45 * total <= h[f"{kind}_local"] <= 0.55 * total, (kind, h)


def test_killed_sharded_run_resumes_to_the_same_losses(runs):
    """(That the resumed losses equal the one-process run's is checked above.)"""
    reports, root, _ = runs
    killed = reports["lora"][0]
    # Steps 1-6 come from the checkpoint of step 6 (the main process's history, timings and
    # all), 7-10 were trained again: to the losses of the run before the kill.
    assert len(killed["before_kill"]) == 7 and killed["history"][:6] == killed["before_kill"][:6]
    for rank in (0, 1):
        report = reports["lora"][rank]
        assert report["history"][6]["loss"] == pytest.approx(report["before_kill"][6]["loss"], rel=1e-6)
    checkpoints = sorted((root / "two" / "lora" / "run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000009"]
    state = json.loads((checkpoints[0] / "state.json").read_text())
    assert state["optimizer_layout"] == "by_name"


def test_a_sharded_checkpoint_resumes_on_one_process(runs, tmp_path):
    """The checkpoint of step 9 (full tensors, optimizer state by name) resumed unsharded
    trains step 10 to the one-process run's loss."""
    reports, root, data = runs
    checkpoint = root / "two" / "lora" / "run" / "checkpoints" / "step-0000009"
    recipe = recipe_for("lora", data, tmp_path, 1)
    recipe.resume = str(checkpoint)
    result = train(recipe, *make_tiny_bunny())
    assert len(result.history) == STEPS
    assert result.history[-1]["loss"] == pytest.approx(reports["lora"][0]["losses"][-1], rel=1e-5)
