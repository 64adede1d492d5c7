"""The training loop for both stages, on Hugging Face Accelerate.

Accelerate gives the multi-process plumbing (torchrun / `accelerate launch`, DDP or
DeepSpeed, bf16 autocast); the loop itself is ours so that three properties hold exactly:

- The sample order is a function of (seed, epoch) only and is cut into *global* steps,
  each rank taking its share; the loss is normalised by the number of answer tokens in
  the whole global batch. So 1 process with batch 4 and 2 processes with batch 2 see the
  same samples per step and compute the same loss and gradients.
- Randomness inside a step (LoRA dropout) is reseeded from (seed, step, micro-batch), so
  a resumed run repeats the uninterrupted run's losses.
- A non-finite loss stops the run before the optimizer step; checkpoints are only ever
  written after a finite step, so the last one stays good.

`fsdp: true` shards the model across the processes (bunny.train.sharding, torch's FSDP2)
instead of replicating it (DDP); the loop is the same, and so are its losses.
`quantize_base` (QLoRA) loads the frozen LLM through bitsandbytes (bunny.train.qlora).
"""
from __future__ import annotations

import importlib.util
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bunny.data.collate import collate, count_targets, real_tokens
from bunny.data.llava import ConversationDataset, load_conversations
from bunny.data.packing import UNCUT, attention_layout, check_packable
from bunny.data.sampler import modality_length_grouped_order, shuffled_order
from bunny.errors import BunnyError
from bunny.train.checkpoint import find_resume_point, load_checkpoint, save_checkpoint
from bunny.train.parts import (build_for_recipe, configure_trainables, match_projector_norm,
                               projector_reference)
from bunny.train.recipe import Recipe, dump_recipe
from bunny.train import qlora, sharding
from bunny.train.reporting import MetricSink


@dataclass
class TrainResult:
    history: list[dict]  # {"step", "loss", "lr", ...} per optimizer step
    model: object = None
    processor: object = None
    outputs: dict = field(default_factory=dict)  # name -> path written
    wall_seconds: float = 0.0
    samples_per_second: float = 0.0
    skipped: int = 0  # samples dropped by skip_missing
    # Elements of parameters and optimizer state this process holds, after its first step
    # (sharding.holdings): with fsdp about 1/N of the totals.
    holdings: dict = field(default_factory=dict)


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    bf16 = str(recipe.bf16).lower()
    use_bf16 = bf16 == "true" or (bf16 == "auto" and torch.cuda.is_available())
    kwargs = {"mixed_precision": "bf16" if use_bf16 else "no",
              # Without a GPU, Accelerate only joins a torchrun group (gloo) when told cpu=True.
              "cpu": not torch.cuda.is_available(),
              # A text-only batch leaves the projector (and tower) without gradients.
              "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
    if recipe.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not Path(recipe.deepspeed).is_file():
            raise BunnyError(f"DeepSpeed config not found: {recipe.deepspeed}")
        if not torch.cuda.is_available():
            # Accelerate runs DeepSpeed only when told cpu=False, and without a GPU it then
            # leaves each torchrun rank alone (world size 1); with cpu=True it drops the plugin
            # without a word. Either way the run would not be what the recipe says.
            raise BunnyError(f"the recipe asks for DeepSpeed ({recipe.deepspeed}) but no GPU is visible; "
                             "Accelerate cannot run DeepSpeed on the CPU. Remove `deepspeed` to train with "
                             "DDP (gloo) on the CPU, or run on GPUs")
        if importlib.util.find_spec("deepspeed") is None:
            raise BunnyError(f"the recipe asks for DeepSpeed ({recipe.deepspeed}) but deepspeed is not installed: "
                             "pip install deepspeed (on the GPU machine), or remove `deepspeed` from the recipe")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=recipe.deepspeed,
                                                     gradient_accumulation_steps=recipe.grad_accum)
    acc = Accelerator(**kwargs)
    if recipe.deepspeed and acc.distributed_type.name != "DEEPSPEED":
        raise BunnyError(f"the recipe asks for DeepSpeed ({recipe.deepspeed}) but Accelerate set up "
                         f"{acc.distributed_type.name}; launch with torchrun or `accelerate launch`")
    if acc.distributed_type.name == "FSDP":
        # An Accelerate config with distributed_type FSDP: Accelerate would wrap the model its own
        # way in prepare(); bunny shards it itself (bunny.train.sharding) from the recipe.
        raise BunnyError("the Accelerate config sets distributed_type FSDP; bunny shards the model itself: set "
                         "`fsdp: true` in the recipe and launch with a config whose distributed_type is MULTI_GPU "
                         "(or plain `accelerate launch --num_processes N` / torchrun)")
    return acc


def build_dataset(recipe: Recipe, processor) -> tuple[ConversationDataset, int]:
    if not recipe.data_path:
        raise BunnyError("the recipe has no data_path")
    convs, report = load_conversations(recipe.data_path, recipe.image_root or None, recipe.skip_missing)
    if report.skipped_missing:
        print(f"data: {report.summary()}")
    if recipe.max_samples:
        convs = convs[:recipe.max_samples]
    dataset = ConversationDataset(convs, processor, recipe.effective_data_template, recipe.effective_image_mode,
                                  UNCUT if recipe.packing else recipe.model_max_length,
                                  cache_images=recipe.cache_images, independent_turns=recipe.independent_turns)
    if recipe.packing:  # packing refuses (by name) a sample longer than a row instead of cutting it
        check_packable(dataset.lengths, [c.id for c in dataset.conversations], recipe.model_max_length)
    return dataset, len(report.skipped_missing)


def sample_order(recipe: Recipe, dataset: ConversationDataset, epoch: int) -> list[int]:
    if recipe.group_by_modality_length:
        return modality_length_grouped_order(dataset.lengths, dataset.has_image, recipe.per_device_batch_size,
                                             recipe.seed, epoch)
    return shuffled_order(len(dataset), recipe.seed, epoch)


def make_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(recipe.warmup_ratio * total_steps)
    if recipe.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def compile_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer of the LLM in place (module.compile keeps the
    parameters and their names, so checkpoints and LoRA merging are unaffected)."""
    valid = torch._dynamo.list_backends(exclude_tags=())
    if backend not in valid:
        raise BunnyError(f"unknown compile_backend {backend!r}; valid: {', '.join(valid)}")
    for layer in model.language_model.get_decoder().layers:
        layer.compile(backend=backend)


def sharded_state(model, optimizer) -> tuple[dict, dict]:
    """(full trainables, optimizer state by parameter name) of a sharded run; collective."""
    return sharding.gather_trainable(model), sharding.gather_optimizer(model, optimizer)


def train(recipe: Recipe, model=None, processor=None, stop_after: int | None = None,
          on_step=None) -> TrainResult:
    """Run one stage as the recipe says. `model`/`processor` may be given (tests, the demo)
    instead of being built from the recipe. `stop_after` ends the loop early after that
    many optimizer steps, as a killed run would (tests of resuming). `on_step(step, record)`
    is called on the main process after every optimizer step with that step's history record
    (loss, throughput, rates), e.g. to probe the model mid-run."""
    start = time.perf_counter()
    qlora.check(recipe)  # before anything is built or written: no GPU, no bitsandbytes, fields that do not fit
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    acc = make_accelerator(recipe)
    sharded = recipe.fsdp and acc.num_processes > 1
    if recipe.fsdp and not sharded:
        acc.print("note: fsdp is set but this run has one process: nothing to shard across, training unsharded "
                  "(launch with torchrun --nproc_per_node N or accelerate launch --num_processes N to shard)")
    out_dir = Path(recipe.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    torch.manual_seed(recipe.seed)  # LoRA and projector init: identical on every rank
    if model is None:
        model, processor = qlora.build(recipe, acc.device) if recipe.quantize_base else build_for_recipe(recipe)
    elif recipe.quantize_base:
        raise BunnyError(f"quantize_base: {recipe.quantize_base} loads the LLM itself (quantised); "
                         "train(recipe) without a model")
    if recipe.fsdp:
        sharding.units(model)  # a model that cannot be sharded fails here, on one process too
    if recipe.image_token_pool and recipe.image_token_pool != model.config.image_token_pool:
        raise BunnyError(f"the recipe asks for image_token_pool {recipe.image_token_pool} but the model was built "
                         f"with {model.config.image_token_pool}; it is fixed when the model is built")
    dataset, skipped = build_dataset(recipe, processor)
    groups = configure_trainables(model, recipe)
    # The images whose tokens set the projector's norm (projector_norm_init / _hold): the first 16
    # samples' tower features, computed once (again after each step only where the tower trains).
    norm_samples, reference = [], None
    if recipe.projector_norm_init or recipe.projector_norm_hold:
        norm_samples = [dataset[i] for i in range(min(len(dataset), 16))]
        reference = projector_reference(model, norm_samples)
    if reference is not None and find_resume_point(out_dir, recipe.resume) is None:
        scale = match_projector_norm(model, reference)
        acc.print(f"projector scaled by {scale:.4g} to the LLM's embedding norm")
    world, rank = acc.num_processes, acc.process_index
    per_step = recipe.per_device_batch_size * world * recipe.grad_accum
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise BunnyError(f"{len(dataset)} samples are fewer than one global batch of {per_step} "
                         "(per_device_batch_size x processes x grad_accum)")
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))
    # The frame the gathered weights are exported in (main process; parameters on meta: no memory).
    skeleton = sharding.meta_skeleton(model) if sharded and acc.is_main_process else None
    if recipe.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.compile:
        compile_layers(model, recipe.compile_backend)
    model.train()
    if not recipe.unfreeze_tower:
        model.vision_tower.eval()  # frozen: no dropout, fixed statistics
    if sharded:
        model.to(acc.device)
        groups = sharding.shard(model, groups)  # the optimizer must see the sharded parameters
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    if sharded:  # already distributed: Accelerate would wrap it in DDP
        wrapped = model
    else:
        wrapped, optimizer = acc.prepare(model, optimizer)
    step, history = 0, []
    resume_from = find_resume_point(out_dir, recipe.resume)
    if resume_from is not None:
        step, history = load_checkpoint(resume_from, model, optimizer, scheduler, sharded=sharded)
        acc.print(f"resumed from {resume_from} at step {step}")
    sink = MetricSink(out_dir, recipe.tensorboard, recipe.wandb_project, recipe.to_dict()) if acc.is_main_process else None
    bar = None
    if acc.is_main_process and recipe.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=recipe.stage, unit="step", dynamic_ncols=True)
    params = [p for g in groups for p in g["params"]]
    packing = {"pack_to": recipe.model_max_length, "layout": attention_layout(model)} if recipe.packing else {}
    order_cache: dict[int, list[int]] = {}
    samples_done, train_time = 0, 0.0
    last_ckpt = None
    holdings: dict = {}
    try:
        while step < total_steps and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in order_cache:
                order_cache = {epoch: sample_order(recipe, dataset, epoch)}
            chosen = order_cache[epoch][pos * per_step:(pos + 1) * per_step]
            micro = []
            for k in range(recipe.grad_accum):
                lo = (k * world + rank) * recipe.per_device_batch_size
                batch = collate([dataset[i] for i in chosen[lo:lo + recipe.per_device_batch_size]],
                                processor.pad_token_id, **packing)
                micro.append(batch)
            local = torch.tensor([float(count_targets(b["labels"])) for b in micro], device=acc.device)
            n_tokens = acc.reduce(local.sum(), reduction="sum").item()
            loss_sum = torch.zeros((), device=acc.device)
            for k, batch in enumerate(micro):
                torch.manual_seed(hash((recipe.seed, step, k, rank)) % (2 ** 31))
                batch = {key: v.to(acc.device) for key, v in batch.items()}
                sync = k == len(micro) - 1
                if sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                    wrapped.set_requires_gradient_sync(sync)
                with (nullcontext() if sync or sharded else acc.no_sync(wrapped)), acc.autocast():
                    loss = wrapped(**batch).loss
                    # Weight each micro-batch's mean by its share of the global batch's tokens;
                    # x world undoes DDP's (or FSDP's reduce-scatter's) averaging over processes.
                    weight = local[k].item() / n_tokens
                    acc.backward(loss * weight * world)
                loss_sum += loss.detach().float() * weight
            step_loss = acc.reduce(loss_sum, reduction="sum").item()
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                raise BunnyError(f"the loss became {step_loss} at step {step + 1}; training stopped before the "
                                 f"update. Last good checkpoint: {last_ckpt or find_resume_point(out_dir, 'auto') or 'none'}."
                                 " Lower lr, check the data, or disable bf16.")
            grad_norm = acc.clip_grad_norm_(params, recipe.max_grad_norm) if recipe.max_grad_norm > 0 else None
            lrs = {g["name"]: pg["lr"] for g, pg in zip(groups, optimizer.param_groups)}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            projector_scale = None
            if recipe.projector_norm_hold:
                if recipe.unfreeze_tower:
                    reference = projector_reference(model, norm_samples)
                projector_scale = match_projector_norm(model, reference)
            if not holdings:
                holdings = sharding.holdings(wrapped, optimizer)
                if sharded:
                    acc.print(f"fsdp: {world} processes; this one holds "
                              f"{holdings['params_local'] / holdings['params_total']:.1%} of the parameters and "
                              f"{holdings['optim_local'] / max(1, holdings['optim_total']):.1%} of the optimizer state")
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            samples_done += per_step
            record = {"step": step, "loss": step_loss, "samples_per_s": per_step / dt,
                      "tokens_per_s": acc.reduce(torch.tensor(float(sum(real_tokens(b) for b in micro)), device=acc.device),
                                                 reduction="sum").item() / dt}
            record.update({f"lr_{name}": v for name, v in lrs.items()})
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if projector_scale is not None:
                record["projector_scale"] = projector_scale
            history.append(record)
            if on_step is not None and acc.is_main_process:
                on_step(step, record)
            if sink is not None and (step % recipe.log_every == 0 or step == total_steps):
                sink.log(step, {k: v for k, v in record.items() if k != "step"})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            if recipe.save_every and step % recipe.save_every == 0 and step < total_steps:
                acc.wait_for_everyone()
                # Sharded: every process takes part in gathering the full state; the main one writes it.
                state = sharded_state(wrapped, optimizer) if sharded else None
                if acc.is_main_process:
                    last_ckpt = save_checkpoint(out_dir, step, acc.unwrap_model(wrapped), optimizer, scheduler,
                                                history, recipe.keep_checkpoints, gathered=state)
                acc.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
        if sink is not None:
            sink.close()
    model = acc.unwrap_model(wrapped)
    if sharded and step >= total_steps:
        # The whole trained model on the main process (the others keep their shards).
        model = sharding.gathered_model(wrapped, skeleton) or model
    result = TrainResult(history=history, model=model, processor=processor, skipped=skipped, holdings=holdings,
                         samples_per_second=samples_done / train_time if train_time else 0.0)
    if step >= total_steps:
        acc.wait_for_everyone()
        if acc.is_main_process:
            from bunny.train.export import export_stage

            result.outputs = export_stage(model, processor, recipe, history)
    result.wall_seconds = time.perf_counter() - start
    return result
