"""--dry_run: the plan of a job, printed without touching a GPU."""

from __future__ import annotations

import logging
import os

from nemo_finetune.checkpoints import is_nemo_checkpoint
from nemo_finetune.launch import configure_executor, launch_command, slurm_script, target_environment
from nemo_finetune.recipe import configure_recipe
from nemo_finetune.rendezvous import rendezvous_environ, scoped_environ

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
        f"max_steps: {config.max_steps} "
        f"(validate every {config.val_check_interval}, {config.limit_val_batches} batches)",
        f"max_seq_length: {config.max_seq_length}" + (" (samples packed into rows)" if config.packed_sequence else ""),
        *(["CUDA graphs: every transformer layer, captured after the first step"] if config.cuda_graphs else []),
        f"imported checkpoint: {config.nemo_ckpt_path} "
        f"({'present' if is_nemo_checkpoint(config.nemo_ckpt_path) else 'to be imported'})",
        f"data: {config.data.dataset_name or '(existing JSONL)'} -> {config.data_path}",
        f"checkpoints: {config.layout.checkpoints} ({kept} + last)",
        f"tensorboard: {config.layout.tensorboard}",
    ]


def dry_run(config) -> int:
    from nemo_finetune import compat

    local = compat.prepare_process()
    env = target_environment(config, local)
    recipe = configure_recipe(config, env)
    executor = configure_executor(config, env)
    print("plan:")
    for line in plan_lines(config):
        print(f"  {line}")
    where = "this machine" if config.executor == "local" else "the Slurm nodes"
    print(
        f"  environment ({where}): {env.describe()}; adaptations here: {', '.join(sorted(compat.applied())) or 'none'}"
    )
    if config.executor == "slurm":
        print("  sbatch script NeMo-Run would submit:\n" + slurm_script(config, recipe, executor), flush=True)
    else:
        with scoped_environ(rendezvous_environ(config, os.environ)):
            print(f"  launch: {launch_command(config, recipe, executor)}", flush=True)
    return 0
