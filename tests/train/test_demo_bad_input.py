"""`bunny demo` refuses settings that make the run impossible, before it writes data or trains."""
from __future__ import annotations

import pytest

from bunny.errors import BunnyError
from bunny.train.demo import run_demo


@pytest.mark.parametrize("overrides,message", [
    ({"train_images": 0}, "train_images must be >= 1"),
    ({"eval_images": 0}, "eval_images must be even and >= 2"),
    ({"eval_images": 7}, "eval_images must be even and >= 2"),
    ({"max_turns": 1}, "max_turns must be >= 2"),
    ({"train_hard_share": 1.5}, r"train_hard_share must be within \[0, 1\]"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"num_threads": -1}, "num_threads must be >= 0"),
    ({"train_images": 40, "pretrain.max_samples": 41}, "pretrain.max_samples is 41 but the demo draws only "
                                                        "train_images=40"),
    ({"train_images": 40, "finetune.max_samples": 400}, "finetune.max_samples is 400"),
    ({"train_images": 4, "pretrain.max_samples": 0}, "pretrain would see 4 samples, fewer than one batch of 8"),
    ({"train_imagez": 4}, "unknown demo setting.*train_imagez"),
    ({"pretrain.learning_rate": 1e-3}, "learning_rate"),
    ({"finetune.lr": "fast"}, "lr"),
])
def test_impossible_settings_fail_before_any_work(tmp_path, overrides, message):
    with pytest.raises(BunnyError, match=message):
        run_demo(tmp_path / "out", overrides=overrides)
    assert not (tmp_path / "out").exists()  # no data drawn, no stage started


def test_every_problem_is_named_at_once(tmp_path):
    with pytest.raises(BunnyError) as err:
        run_demo(tmp_path / "out", overrides={"train_images": 0, "eval_images": 3})
    assert "train_images" in str(err.value) and "eval_images" in str(err.value)


def test_missing_tower_folder(tmp_path):
    with pytest.raises(BunnyError, match="vision tower .*nowhere.* is missing"):
        run_demo(tmp_path / "out", tower=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()


def test_configs_folder_without_recipes(tmp_path):
    with pytest.raises(BunnyError, match="holds no pretrain.yaml"):
        run_demo(tmp_path / "out", configs=tmp_path)
