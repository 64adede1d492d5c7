"""A miniature `bunny demo` on the real SmolLM2-135M and the shipped tower: the whole
pipeline runs and writes its summary (accuracy is not asserted at this size)."""
import json

import pytest

from bunny.model.loading import DEFAULT_TOWER


@pytest.mark.slow
def test_miniature_demo(tmp_path):
    from pathlib import Path

    from bunny.train.demo import run_demo

    if not (Path(DEFAULT_TOWER) / "config.json").is_file():
        pytest.skip("the shipped tower is not present")
    summary = run_demo(tmp_path, overrides={"train_images": 16, "eval_images": 2, "eval_batch_size": 8,
                                            "pretrain.max_samples": 8, "pretrain.per_device_batch_size": 4,
                                            "finetune.per_device_batch_size": 4, "finetune.lora_r": 8})
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("wall_seconds", "yes_no_accuracy", "open_answer_accuracy", "yes_no_colour_only",
                "yes_no_shape_only", "count_majority"):
        assert key in saved and saved[key] is not None
    assert (tmp_path / "loss_curve.png").is_file()
    assert summary["stage1"]["steps"] == 2 and summary["stage2"]["steps"] == 8  # 2 epochs of 16 / 4
    assert summary["fresh_image"]["question"]
