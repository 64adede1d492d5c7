"""`bunny train finetune CONFIG --set ...` end to end on a tiny saved model."""
import json

from bunny.cli import main
from bunny.testing import save_tiny_bunny

from trainhelp import write_dataset


def test_finetune_command_with_overrides(tmp_path, capsys):
    model_dir = save_tiny_bunny(tmp_path / "tiny")
    data = write_dataset(tmp_path / "data", n=4)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"# tiny\ninit_from: {model_dir}\ndata_path: {data}\nlora_r: 4\nlora_alpha: 8\n"
                   f"output_dir: {tmp_path / 'run'}\nper_device_batch_size: 2\nprogress_bar: false\n")
    rc = main(["train", "finetune", str(cfg), "--set", "max_steps=2", "--num-threads", "1", "--tensorboard", "false"])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["steps"] == 2 and (tmp_path / "run" / "model" / "config.json").is_file()
    assert "max_steps: 2" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_unknown_override_is_a_clean_error(tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("lr: 1.0e-4\n")
    assert main(["train", "pretrain", str(cfg), "--learning-rate", "3"]) == 2
    assert "unknown recipe field(s) 'learning_rate'" in capsys.readouterr().err
