"""--dry_run: the plan of a job, printed without touching a GPU."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from nemo_finetune.checkpoints import is_nemo_checkpoint
from nemo_finetune.data import prepared_summary, validation_problem, with_epoch_steps
from nemo_finetune.errors import ConfigError
from nemo_finetune.launch import configure_executor, launch_command, slurm_script, target_environment
from nemo_finetune.recipe import configure_recipe
from nemo_finetune.rendezvous import rendezvous_environ, scoped_environ
from nemo_finetune.resolve import is_local_model

log = logging.getLogger("peft_megatron")


def plan_lines(config) -> list[str]:
    mode = "full fine-tuning" if config.full_ft else f"PEFT ({config.peft_scheme})"
    kept = {1: "best val_loss", -1: "every validation's"}.get(config.save_top_k, f"{config.save_top_k} best val_loss")
    return [
        f"model: {config.hf_model_id}",
        f"recipe: {config.recipe_cls_name}",
        f"mode: {mode}",
        f"nodes x gpus: {config.num_nodes} x {config.gpus_per_node} "
        f"(world size {config.world_size}, node_rank {config.node_rank})",
        f"parallelism: TP {config.tensor_parallel_size} | PP {config.pipeline_parallel_size} | "
        f"CP {config.context_parallel_size} | DP {config.data_parallel_size}",
        f"micro_batch_size: {config.micro_batch_size}",
        f"accumulate_grad_batches: {config.accumulate_grad_batches}",
        f"global_batch_size: {config.global_batch_size}",
        f"max_steps: {_steps(config)} (validate every {config.val_check_interval}, {config.limit_val_batches} batches)",
        f"resume: {_resume(config)}",
        f"seed: {config.data.seed} (the split, the training order, the adapters' initialisation and dropout)",
        f"max_seq_length: {config.max_seq_length}" + (" (samples packed into rows)" if config.packed_sequence else ""),
        *(["CUDA graphs: every transformer layer, captured after the first step"] if config.cuda_graphs else []),
        f"imported checkpoint: {config.nemo_ckpt_path} "
        f"({'present' if is_nemo_checkpoint(config.nemo_ckpt_path) else 'to be imported'})",
        f"data: {config.data.dataset_name or '(existing JSONL)'} -> {config.data_path}",
        f"checkpoints: {config.layout.checkpoints} ({kept} + last)"
        + ("; each written before training goes on" if config.sync_checkpoint_save else ""),
        f"tensorboard: {config.layout.tensorboard}",
    ]


def recipe_lines(config, recipe) -> list[str]:
    """What the recipe will do, as a user checks it before spending GPU hours: the optimizer and learning-rate
    schedule, what is trained, tokens per step, and the epochs the steps mean over the prepared training split."""
    import fiddle as fdl

    optim = fdl.ordered_arguments(recipe.optim.config, include_defaults=True)
    schedule = recipe.optim.lr_scheduler
    lines = [
        f"optimizer: {optim['optimizer']} (peak lr {optim['lr']:g}, betas {optim['adam_beta1']:g}/"
        f"{optim['adam_beta2']:g}, eps {optim['adam_eps']:g}, weight decay {optim['weight_decay']:g}, "
        f"gradient clip {optim['clip_grad']:g})"
    ]
    if schedule is not None:
        sched = fdl.ordered_arguments(schedule, include_defaults=True)
        warmup = sched.get("warmup_steps", 0)
        lines.append(
            f"learning rate: {schedule.__fn_or_cls__.__name__} over {_steps(config)} steps, {warmup} warm-up "
            f"steps, down to {sched.get('min_lr', 0):g}"
            + (
                "; the warm-up is longer than the run, so the peak is never reached"
                if config.max_steps is not None and warmup >= config.max_steps
                else ""
            )
        )
    if recipe.peft is None:
        lines.append("trained: every weight (full fine-tuning)")
    else:
        peft = fdl.build(copy.deepcopy(recipe.peft))  # a plain dataclass: its defaults, factories included
        lines.append(
            f"trained: {type(peft).__name__} adapters, rank {peft.dim}, alpha {peft.alpha} (scale "
            f"{peft.alpha / peft.dim:g}), dropout {peft.dropout:g}, on {', '.join(peft.target_modules)}"
        )
    tokens = config.global_batch_size * config.max_seq_length
    lines.append(
        f"tokens per step: at most {tokens:,} ({config.global_batch_size} rows of {config.max_seq_length}); "
        + ("packing fills the rows" if config.packed_sequence else "padding to each batch's longest row is not trained")
    )
    lines.append(f"epochs: {_epochs(config)}")
    return lines + size_lines(config, recipe)


def size_lines(config, recipe) -> list[str]:
    """Parameters, what is trained, and a rough memory budget per GPU, from the model's config (no model built):
    the imported checkpoint's, a local model's config.json, or the recipe's defaults."""
    import json

    import fiddle as fdl

    from nemo_finetune import estimate

    args = fdl.ordered_arguments(recipe.model.config, include_defaults=True)
    shape = estimate.Shape.of(args)
    if shape is None:
        return ["parameters and memory: not estimated for this model (a mixture of experts, or not a dense GPT)"]
    if is_nemo_checkpoint(config.nemo_ckpt_path):
        source = "the imported checkpoint's config"
    elif is_local_model(config.hf_model_id):
        try:
            hf = json.loads((Path(config.hf_model_id).expanduser() / "config.json").read_text("utf-8"))
            shape, source = estimate.Shape.of_hf(hf, shape), "the model's config.json"
        except (OSError, ValueError, KeyError, TypeError):
            source = f"recipe {config.recipe_cls_name}'s defaults"
    else:
        source = f"recipe {config.recipe_cls_name}'s defaults; the import reads the model's own"
    vocab = estimate.padded_vocab(
        shape.vocab_size, args.get("make_vocab_size_divisible_by") or 128, config.tensor_parallel_size
    )
    parameters = shape.parameters(vocab)
    vocab_note = (
        f"vocabulary {shape.vocab_size:,} padded to {vocab:,}"
        if vocab
        else "without the embeddings (vocabulary set by the tokenizer)"
    )
    if recipe.peft is None:
        trained = parameters
    else:
        peft = fdl.build(copy.deepcopy(recipe.peft))
        trained = estimate.adapter_parameters(shape, list(peft.target_modules), peft.dim, type(peft).__name__ == "DoRA")
        parameters += trained
    memory = estimate.memory_per_gpu(
        shape,
        parameters,
        trained,
        vocab,
        config.micro_batch_size,
        config.max_seq_length,
        config.tensor_parallel_size,
        config.pipeline_parallel_size,
        config.data_parallel_size,
    )
    return [
        f"parameters: {parameters:,} ({source}; {vocab_note})",
        f"trainable parameters: {trained:,} ({100 * trained / parameters:.2f}%)",
        f"memory per GPU, rough: {memory.line()} (micro-batch {config.micro_batch_size} x {config.max_seq_length} "
        "tokens; bf16 weights, fp32 gradients, fp32 master weights + Adam moments sharded over data parallelism, "
        "activations s*b*h*L*(10 + 24/TP) bytes without recomputation; CUDA and NCCL buffers come on top)",
    ]


def _steps(config) -> str:
    if config.max_steps is not None:
        return str(config.max_steps)
    return f"from --num_train_epochs {config.num_train_epochs:g} once the data is prepared" + (
        " and packed" if config.packed_sequence else " (--prepare_data_only, then this plan shows them)"
    )


def _resume(config) -> str:
    if config.resume_from is not None:
        return f"from {config.resume_from}"
    if config.no_resume:
        return "never (a fresh run from the imported model)"
    return f"from the last checkpoint in {config.layout.checkpoints} if there is one, else from the imported model"


def _epochs(config) -> str:
    """The steps as passes over the training split, from the prepared data's record (or its packed rows)."""
    rows = (prepared_summary(config) or {}).get("rows", {}).get("train")
    if config.max_steps is None:
        return f"{config.num_train_epochs:g} (--num_train_epochs)"
    if not isinstance(rows, int) or rows <= 0:
        return "known once the data is prepared (--prepare_data_only prints the split sizes)"
    if config.packed_sequence:
        return f"about {config.max_steps * config.global_batch_size:,} packed rows from {rows:,} training samples"
    epochs = config.max_steps * config.global_batch_size / rows
    return f"{epochs:,.1f} over {rows:,} training rows ({config.max_steps} steps x {config.global_batch_size} rows)"


def dry_run(config) -> int:
    """Print the plan; refuse (exit 2) what the launch would refuse and this machine can know."""
    from nemo_finetune import compat

    summary = prepared_summary(config)
    if summary and not config.packed_sequence and validation_problem(config, summary):
        raise ConfigError([f"--data_dir {config.data_path}: {validation_problem(config, summary)}"])
    if summary and not config.packed_sequence:
        config = with_epoch_steps(config, summary)
    local = compat.prepare_process()
    env = target_environment(config, local)
    recipe = configure_recipe(config, env)
    executor = configure_executor(config, env)
    print("plan:")
    for line in plan_lines(config) + recipe_lines(config, recipe):
        print(f"  {line}")
    where = "this machine" if config.executor == "local" else "the Slurm nodes"
    print(
        f"  environment ({where}): {env.describe()}; adaptations here: {', '.join(sorted(compat.applied())) or 'none'}"
    )
    if config.executor == "slurm":
        print("  sbatch script NeMo-Run would submit:\n" + slurm_script(config, recipe, executor), flush=True)
    else:
        rendezvous = rendezvous_environ(config, os.environ)
        if config.num_nodes > 1 and "MASTER_ADDR" not in {**os.environ, **rendezvous}:
            rendezvous["MASTER_ADDR"] = "$MASTER_ADDR"  # each node's shell fills it in
        with scoped_environ(rendezvous):
            print(f"  launch: {launch_command(config, recipe, executor)}", flush=True)
    for line in unchecked_lines(config):
        print(f"  not checked here: {line}", flush=True)
    return 0


def unchecked_lines(config) -> list[str]:
    """What a dry run cannot know on this machine, which the launch finds out."""
    lines = []
    if not is_local_model(config.hf_model_id) and not is_nemo_checkpoint(config.nemo_ckpt_path):
        lines.append(
            f"--hf_model_id {config.hf_model_id}: the hub is asked at the import (offline, give a local directory)"
        )
    if config.data.chat and not is_local_model(config.hf_model_id):
        lines.append(f"--chat: whether {config.hf_model_id}'s tokenizer has a chat template (read at the import)")
    if config.executor == "local" and config.num_nodes > 1 and "MASTER_ADDR" not in os.environ:
        lines.append("the rendezvous host: set MASTER_ADDR (node 0's address) and MASTER_PORT on every node")
    if config.packed_sequence:
        lines.append("the validation split against one global batch: known once the rows are packed")
    elif prepared_summary(config) is None:
        lines.append("the validation split against one global batch: the data is not prepared yet")
    return lines
