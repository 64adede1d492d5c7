"""What a finished stage leaves in its output folder.

- every stage: losses.json, loss_curve.png, train_report.json, recipe.yaml (at the start);
- stage 1: mm_projector.safetensors + the reference's mm_projector.bin and config.json,
  which is what the reference's stage 2 (`pretrain_mm_mlp_adapter`) reads;
- LoRA: adapter/ (PEFT adapter files + non-LoRA trainables), then the adapters are merged
  and model/ is a plain bunny checkpoint that `load_pretrained` opens;
- full: model/.
"""
from __future__ import annotations

import json
from pathlib import Path

from bunny.atomic import atomic_write
from bunny.train.parts import merge_lora, save_adapter, save_projector
from bunny.train.recipe import Recipe
from bunny.train.reporting import plot_losses


def export_stage(model, processor, recipe: Recipe, history: list[dict]) -> dict:
    from bunny.model.loading import save_pretrained

    out = Path(recipe.output_dir)
    written: dict[str, str] = {}
    atomic_write(out / "losses.json", json.dumps(history) + "\n")
    written["losses"] = str(out / "losses.json")
    if history:
        written["loss_curve"] = str(plot_losses({recipe.stage: [(h["step"], h["loss"]) for h in history]},
                                                out / "loss_curve.png", f"{recipe.stage} ({recipe.tune})"))
    model.config.projector_trained = True
    if recipe.stage == "pretrain":
        for path in save_projector(model, out):
            written[path.name] = str(path)
        atomic_write(out / "config.json", model.config.to_json_string())
    if recipe.tune == "lora":
        save_adapter(model, out / "adapter")
        written["adapter"] = str(out / "adapter")
        if recipe.quantize_base:  # QLoRA: the adapter folded into the full-precision base, as `bunny merge lora` does
            from bunny.merge.lora import merged_model

            model, processor = merged_model(out / "adapter")
        else:
            merge_lora(model)
    if recipe.save_full_model:
        # The run's own folder: a rerun's model replaces the last one, whatever its files.
        written["model"] = str(save_pretrained(model, processor, out / "model", protect_others=False))
    tail = history[-10:]
    report = {"stage": recipe.stage, "tune": recipe.tune, "steps": len(history),
              "final_loss_mean_last_10": sum(h["loss"] for h in tail) / len(tail) if tail else None,
              "samples_per_s_mean": sum(h["samples_per_s"] for h in history) / len(history) if history else None,
              "outputs": written}
    atomic_write(out / "train_report.json", json.dumps(report, indent=1) + "\n")
    written["report"] = str(out / "train_report.json")
    return written
