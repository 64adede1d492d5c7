"""The built wheel is a complete bunny: installed into a fresh virtual environment and run
from a folder outside the source tree, `bunny demo --help` and a miniature `bunny demo`
work, so the demo configs and the vision tower ship as package data.

The fresh environment has no packages of its own besides the wheel; a `.pth` file puts the
project environment's site-packages after its own, so torch and the other dependencies are
reused, not copied. That directory's own `.pth` files (the editable bunny among them) are
not processed, so `import bunny` can only find the wheel."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# A demo small enough to run in a minute or two on 2 CPU cores: one step per stage.
MINI_DEMO = ["train_images=2", "eval_images=2", "eval_batch_size=8", "max_turns=2",
             "pretrain.max_samples=2", "pretrain.per_device_batch_size=2",
             "finetune.per_device_batch_size=2", "finetune.lora_r=4", "finetune.epochs=1"]


def _run(cmd, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _build_wheel(tmp_path: Path, env) -> Path:
    """`pip wheel --no-deps` of a copy of the project (building in place would write build/
    and egg-info into the working tree); the build backend is the project environment's
    setuptools (torch requires one), so nothing is downloaded."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
        need = Requirement(line)
        assert need.specifier.contains(version(need.name)), f"{need.name} {version(need.name)} does not meet {need}"
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, source], tmp_path, env)
    (wheel,) = dist.glob("bunny-*.whl")
    return wheel


def _fresh_env(tmp_path: Path, wheel: Path, env) -> tuple[Path, Path]:
    """(bin folder, site-packages) of a new venv holding only the wheel, plus a .pth to the
    project environment's site-packages."""
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    project = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "project_dependencies.pth").write_text("".join(p + "\n" for p in sorted(project)))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
         tmp_path, env)
    return root / "bin", purelib


@pytest.mark.slow
def test_wheel_runs_the_demo_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    wheel = _build_wheel(tmp_path, env)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bunny/assets/configs/demo/{n}.yaml" for n in ("demo", "pretrain", "finetune")} <= names
    tower = "bunny/assets/towers/shapes-siglip-64"
    assert {f"{tower}/config.json", f"{tower}/model.safetensors", f"{tower}/preprocessor_config.json"} <= names
    assert "bunny/serve/static/index.html" in names

    bin_dir, site = _fresh_env(tmp_path, wheel, env)
    work = tmp_path / "elsewhere"  # cwd outside the source tree: nothing found through ./src or ./configs
    work.mkdir()
    where = _run([bin_dir / "python", "-c", "import bunny, bunny.train.demo as d; print(bunny.__file__); "
                  "print(d.DEMO_CONFIGS)"], work, env).stdout.split()
    assert Path(where[0]).is_relative_to(site) and Path(where[1]).is_relative_to(site)

    help_text = _run([bin_dir / "bunny", "demo", "--help"], work, env).stdout
    assert "--set KEY=VALUE" in help_text and "--configs" in help_text

    out = work / "demo"
    _run([bin_dir / "bunny", "demo", "--out", out, *[a for kv in MINI_DEMO for a in ("--set", kv)]], work, env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage1"]["steps"] == 1 and summary["stage2"]["steps"] == 1
    # demo.yaml of the installed package was read (projector_word_init is on only there) and its stage
    # recipes (template and lora_alpha differ from Recipe's defaults) ...
    assert summary["settings"]["projector_word_init"] is True and summary["projector_word_init"]["r2"] is not None
    stage2 = yaml.safe_load((out / "stage2" / "recipe.yaml").read_text())
    assert stage2["template"] == "bunny-nosystem" and stage2["lora_alpha"] == 64
    # ... and the shipped tower came from the installed package too.
    recipe = (out / "stage1" / "recipe.yaml").read_text()
    tower_line = next(line for line in recipe.splitlines() if line.startswith("tower:"))
    assert Path(tower_line.split(":", 1)[1].strip()).is_relative_to(site / "bunny" / "assets" / "towers")
    assert (out / "stage2" / "model" / "config.json").is_file() and summary["fresh_image"]["question"]
