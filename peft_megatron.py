r"""Fine-tune a Hugging Face model with NeMo 2.0 / Megatron-Core: LoRA or full, TP/PP/CP, one GPU to many nodes.

    # the bundled demo: tiny Qwen3 model + recall task -> import, LoRA, evaluate, export (1 GPU, a few minutes)
    python peft_megatron.py --demo

    # plan a job without a GPU (validates, prints the layout, global batch and the torchrun command)
    python peft_megatron.py --dry_run --num_nodes 4 --gpus_per_node 8 --tensor_parallel_size 8 \
        --pipeline_parallel_size 2 --dataset_name data/train.jsonl

    # LoRA on this machine's GPUs (--gpus_per_node and --tensor_parallel_size default to auto), local data in
    # question/answer columns; <output_dir>/report/ gets summary.json and loss_curve.png at the end
    python peft_megatron.py --hf_model_id Qwen/Qwen3-8B --recipe_cls_name qwen3_8b \
        --dataset_name data/train.jsonl --input_column question --output_column answer

    # full fine-tuning of Llama 3.1 8B
    python peft_megatron.py --hf_model_id meta-llama/Llama-3.1-8B --recipe_cls_name llama31_8b --full_ft ...

    # phases on their own: HF -> NeMo import (CPU is fine), data preparation (CPU)
    python peft_megatron.py --import_only --hf_model_id ./my-hf-model --recipe_cls_name qwen3_8b --nemo_ckpt_dir ckpt/
    python peft_megatron.py --prepare_data_only --hf_model_id ./my-hf-model --dataset_name data.jsonl

This file is the pipeline: the settings (Config, one flag per field), then one function per phase in the order a run
goes through them (check -> import -> data -> job -> train -> report), then main. Evaluation and export follow with
test_checkpoint.py and convert_checkpoint_to_hf.py. The machinery lives in the nemo_finetune package
(docs/ARCHITECTURE.md): where a run's files go, nemo_finetune/layout.py and records.py; every runtime shim of NeMo /
Megatron-Core, nemo_finetune/compat; the demo, nemo_finetune/demo.py.
A re-run reuses an earlier run's import and data only where their records prove them equal to what it would write
(file contents by sha256; large files' digests cached by inode, size and times in ~/.cache/nemo_finetune, so an
unchanged model is read once); anything else is refused with the difference, never reused.
Exit codes: 0 success, 1 pipeline failure, 2 invalid arguments, 3 demo prepared but no CUDA GPU to train on.
On SageMaker, SM_CHANNEL_TRAINING, SM_MODEL_DIR, SM_HOSTS, SM_CURRENT_HOST and SM_NUM_GPUS fill the matching
settings unless a flag is given explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataset_module import HFDatasetConfig
from nemo_finetune import compat, demo
from nemo_finetune.checks import validate_config
from nemo_finetune.choices import CORE_ATTENTION, EXECUTORS, LOG_LEVELS, LORA_TARGETS, PEFT_SCHEMES
from nemo_finetune.cli import int_or_auto, parse_dataclass_args, run_cli, settings_yaml, with_config_file
from nemo_finetune.console import log_to_file, phase, setup_logging
from nemo_finetune.data import prepare_data, with_epoch_steps
from nemo_finetune.files import atomic_write_text
from nemo_finetune.importer import import_hf_checkpoint
from nemo_finetune.launch import configure_executor, launch_training, submit_training, target_environment
from nemo_finetune.layout import RunLayout
from nemo_finetune.plan import dry_run
from nemo_finetune.recipe import configure_recipe
from nemo_finetune.report import write_report
from nemo_finetune.resolve import (
    SEED_GPUS_PER_NODE,
    apply_global_batch,
    apply_machine_defaults,
    apply_sagemaker_env,
    visible_gpu_count,
)

log = logging.getLogger("peft_megatron")


@dataclass
class ModelSettings:
    """The model to fine-tune and its recipe."""

    GROUP = "model"  # the --help section of these flags

    hf_model_id: str = field(
        default="Qwen/Qwen3-8B",
        metadata={"help": "Hugging Face hub id or local directory of the model to fine-tune"},
    )
    recipe_cls_name: str = field(
        default="qwen3_8b", metadata={"help": "NeMo recipe module (nemo.collections.llm.recipes.<name>)"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow custom code from the model repository (tokenizer and model loads)"}
    )


@dataclass
class ParallelismSettings:
    """GPUs and how the model is split across them."""

    GROUP = "parallelism"  # the --help section of these flags

    num_nodes: int = field(default=1, metadata={"help": "number of nodes"})
    gpus_per_node: int | None = field(
        default=None,
        metadata={
            "type": int_or_auto,
            "shown": "auto",
            "help": "GPUs (processes) per node; auto: the GPUs this machine shows (CUDA_VISIBLE_DEVICES respected), "
            f"or {SEED_GPUS_PER_NODE} on a machine without GPUs (a --dry_run plan for a GPU node)",
        },
    )
    tensor_parallel_size: int | None = field(
        default=None,
        metadata={
            "type": int_or_auto,
            "shown": "auto",
            "help": "tensor parallelism: splits each layer; auto: the largest size that divides --gpus_per_node "
            "and, for a local model, its attention and KV heads",
        },
    )
    pipeline_parallel_size: int = field(default=1, metadata={"help": "pipeline parallelism: splits the layer stack"})
    context_parallel_size: int = field(default=1, metadata={"help": "context parallelism: splits the sequence"})


@dataclass
class TrainingSettings:
    """The optimisation run."""

    GROUP = "training"  # the --help section of these flags

    max_steps: int | None = field(
        default=10000, metadata={"help": "optimizer steps (left out with --num_train_epochs, which sets them)"}
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "passes over the training split instead of --max_steps: the steps become ceil(epochs x training "
            "rows / global batch size) once the data is prepared (packed rows with --packed_sequence)"
        },
    )
    val_check_interval: int = field(default=800, metadata={"help": "validate (and checkpoint) every N steps"})
    log_every_n_steps: int = field(default=10, metadata={"help": "logging interval in steps"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per GPU per forward pass"})
    accumulate_grad_batches: int = field(default=8, metadata={"help": "micro-batches accumulated per step"})
    requested_global_batch_size: int | None = field(
        default=None,
        metadata={
            "flag": "global_batch_size",
            "help": "rows per optimizer step over all GPUs, instead of --accumulate_grad_batches, which becomes it / "
            "(--micro_batch_size x data-parallel size); given both, they must agree",
        },
    )
    limit_val_batches: int = field(default=80, metadata={"help": "validation batches per check"})
    max_seq_length: int = field(default=2048, metadata={"help": "tokens per sequence (longer prompts are truncated)"})
    packed_sequence: bool = field(
        default=False,
        metadata={
            "help": "pack several samples into each row of --max_seq_length tokens (attention stays inside each "
            "sample): no padding, fewer steps per epoch on variable-length data. Needs --micro_batch_size 1; "
            "--accumulate_grad_batches then counts packed rows"
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "capture each transformer layer's forward and backward as CUDA graphs after the first step and "
            "replay them (Megatron's local graphs: one launch per layer; the gain is largest where steps are "
            "host-bound, as in full fine-tuning of small models). Needs --packed_sequence: graphs replay one shape, "
            "so packed rows and their sequence boundaries are padded to it"
        },
    )
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default: recipe's)"})
    min_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate at the end of the cosine schedule (default: recipe's, 0)"}
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear learning-rate warm-up, in optimizer steps (default: recipe's, 50)"}
    )
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (default: recipe's, 0.1)"})
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "gradient clipping by global norm; 0 turns clipping off (default: recipe's, 1.0)"},
    )
    early_stopping_threshold: float = field(default=0.001, metadata={"help": "minimum val_loss improvement"})
    early_stopping_patience: int = field(default=3, metadata={"help": "validation checks without improvement"})
    core_attention: str = field(
        default="sdpa",
        metadata={
            "help": "attention without Transformer Engine: sdpa (torch's flash/cuDNN kernels, O(s) memory) or "
            "unfused (Megatron's local DotProductAttention, an s x s score tensor per head); TE's own when installed",
            "choices": CORE_ATTENTION,
        },
    )
    save_weights_only: bool = field(
        default=False,
        metadata={"help": "checkpoints without optimizer state: smaller, but a resumed run restarts the optimizer"},
    )
    save_top_k: int = field(
        default=1,
        metadata={"help": "checkpoints kept by lowest val_loss, besides the last one; -1 keeps every checkpoint"},
    )
    sync_checkpoint_save: bool = field(
        default=False,
        metadata={
            "help": "write each checkpoint before training goes on (NeMo's default writes it from a background "
            "process forked from the training worker while the next steps run)"
        },
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "continue training from this NeMo checkpoint (a directory under <output_dir>/nemo_logs/"
            "checkpoints) instead of the run's last one; by default a run resumes from its -last checkpoint if any"
        },
    )
    no_resume: bool = field(
        default=False,
        metadata={
            "help": "start from the imported model even where the run has checkpoints; refused while "
            "<output_dir>/nemo_logs/checkpoints holds any (give a new --output_dir)"
        },
    )


@dataclass
class PeftSettings:
    """What is trained: LoRA/DoRA adapters or every weight."""

    GROUP = "PEFT"  # the --help section of these flags

    peft_scheme: str = field(default="lora", metadata={"help": f"one of {', '.join(PEFT_SCHEMES)}"})
    full_ft: bool = field(default=False, metadata={"help": "full fine-tuning instead of PEFT"})
    lora_dim: int | None = field(default=None, metadata={"help": "LoRA rank (default: NeMo's, 32)"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: NeMo's, 32)"})
    lora_dropout: float | None = field(
        default=None, metadata={"help": "dropout on the adapters' input (default: NeMo's, 0.0)"}
    )
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated layers that get adapters, of "
            f"{', '.join(LORA_TARGETS)}, or Megatron module patterns such as '*.layers.0.*.linear_qkv' "
            "(default: NeMo's, all four)"
        },
    )


@dataclass
class MonitoringSettings:
    """Monitors, profilers and W&B."""

    GROUP = "monitoring"  # the --help section of these flags

    enable_megatron_progress_bar: bool = field(default=False, metadata={"help": "Megatron-style progress bar"})
    enable_memory_monitor: bool = field(default=False, metadata={"help": "log GPU memory"})
    enable_speed_monitor: bool = field(default=False, metadata={"help": "log step times and throughput"})
    enable_runtime_estimator: bool = field(default=False, metadata={"help": "log the estimated time to finish"})
    enable_memory_profile: bool = field(default=False, metadata={"help": "torch memory snapshots (one profiler)"})
    enable_pytorch_profiler: bool = field(default=False, metadata={"help": "torch profiler traces (one profiler)"})
    enable_nsys_callback: bool = field(default=False, metadata={"help": "Nsight Systems range (one profiler)"})
    use_wandb: bool = field(default=False, metadata={"help": "also log to W&B (WANDB_MODE=offline works)"})
    wandb_project: str = field(default="peft_megatron", metadata={"help": "W&B project"})


@dataclass
class PathSettings:
    """Where the run writes (nemo_finetune.layout.RunLayout under --output_dir)."""

    GROUP = "paths"  # the --help section of these flags

    output_dir: str | None = field(
        default=None, metadata={"help": "logs and checkpoints (default: outputs/<hf_model_id>)"}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "prepared JSONL (default: <output_dir>/data); a re-run reuses it while the settings, the "
            "tokenizer and the source files' content are unchanged"
        },
    )
    nemo_ckpt_dir: str | None = field(
        default=None,
        metadata={
            "help": "imported NeMo checkpoint (default: <output_dir>/imported_hf_ckpt); a re-run reuses it while "
            "the model files' content (sha256) and the recipe are unchanged"
        },
    )


@dataclass
class DataSettings:
    """The dataset and its prompt format (flags of dataset_module.HFDatasetConfig)."""

    data: HFDatasetConfig = field(default_factory=HFDatasetConfig)


@dataclass
class RunControlSettings:
    """What this invocation does, and how loudly."""

    GROUP = "run control"  # the --help section of these flags

    log_level: str = field(
        default="INFO",
        metadata={
            "choices": LOG_LEVELS,
            "help": "console level; DEBUG shows every library's and training worker's line (the log file has them all)",
        },
    )
    node_rank: int = field(default=0, metadata={"help": "this node's rank (multi-node launches)"})
    wait_timeout_s: float = field(
        default=3600.0, metadata={"help": "how long other nodes wait for rank 0's import or data preparation"}
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of settings, keys = flag names (e.g. learning_rate: 1e-4); flags given override it"
        },
    )
    write_config: str | None = field(
        default=None,
        metadata={
            "help": "write the resolved settings to this YAML file, which --config reads back (with --dry_run too)"
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "validate and print the plan; touch no GPU"})
    import_only: bool = field(default=False, metadata={"help": "only import the HF checkpoint to NeMo"})
    prepare_data_only: bool = field(default=False, metadata={"help": "only prepare the JSONL data"})
    demo: bool = field(default=False, metadata={"help": "build and run the bundled demo under ./demo"})


@dataclass
class ClusterSettings:
    """Where the training runs: this node or a Slurm cluster."""

    GROUP = "cluster"  # the --help section of these flags

    executor: str = field(
        default="local",
        metadata={
            "choices": EXECUTORS,
            "help": "local: torchrun on this node; slurm: import and prepare data here (a login node, CPU is fine), "
            "then submit one sbatch job of --num_nodes x --gpus_per_node through NeMo-Run's SlurmExecutor + torchrun",
        },
    )
    slurm_account: str | None = field(default=None, metadata={"help": "Slurm account (--executor slurm)"})
    slurm_partition: str | None = field(default=None, metadata={"help": "Slurm partition"})
    slurm_time: str = field(default="04:00:00", metadata={"help": "Slurm time limit, [D-]HH:MM:SS"})
    container_image: str | None = field(
        default=None,
        metadata={
            "help": "container the Slurm job runs in (pyxis/enroot), e.g. a NeMo framework image; its TE is "
            "assumed. Without one the nodes run this Python environment"
        },
    )
    container_mounts: str = field(
        default="",
        metadata={
            "help": "extra comma-separated host:container mounts; this repository and --output_dir are "
            "mounted at their own paths (they must be on a filesystem every node shares)"
        },
    )
    detach: bool = field(
        default=False,
        metadata={
            "help": "--executor slurm: return once the job is queued, printing its id and how to follow and cancel "
            "it (default: wait for the job to end and exit with its outcome, as a local run does)"
        },
    )


@dataclass
class Config(
    ModelSettings,
    ParallelismSettings,
    TrainingSettings,
    PeftSettings,
    MonitoringSettings,
    PathSettings,
    DataSettings,
    RunControlSettings,
    ClusterSettings,
):
    """Every setting of a fine-tuning job: the groups above, flattened into one flag each (in this order in --help);
    the command-line flags are generated from these fields."""

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    @property
    def data_parallel_size(self) -> int:
        # Megatron: world = TP x PP x CP x DP (parallel_state.initialize_model_parallel); CP takes GPUs from DP too.
        return self.world_size // self.model_parallel_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulate_grad_batches * self.data_parallel_size

    @property
    def output_path(self) -> Path:
        return (
            Path(self.output_dir)
            if self.output_dir
            else Path("outputs") / self.hf_model_id.strip("/").replace("..", "_")
        )

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.output_path)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else self.layout.data

    @property
    def nemo_ckpt_path(self) -> Path:
        return Path(self.nemo_ckpt_dir) if self.nemo_ckpt_dir else self.layout.imported

    @property
    def experiment_title(self) -> str:
        return "full_ft" if self.full_ft else f"peft_{self.peft_scheme}"


# ====================================================================================================================
# The pipeline, one function per phase
# ====================================================================================================================
def parse_config(
    argv: list[str] | None = None, environ: dict | None = None, visible_gpus: Callable[[], int] | None = None
) -> Config:
    """--config's file, then the flags, then SageMaker's environment, then `auto` resolved for this machine
    (`visible_gpus` counts its GPUs)."""
    argv = with_config_file(Config, sys.argv[1:] if argv is None else list(argv))
    config, explicit = parse_dataclass_args(Config, argv, __doc__)
    config = apply_sagemaker_env(config, explicit, os.environ if environ is None else environ)
    if config.num_train_epochs is not None and "max_steps" not in explicit:
        config = dataclasses.replace(config, max_steps=None)  # set from the prepared data (steps_for_epochs)
    config = apply_machine_defaults(config, visible_gpus or visible_gpu_count)
    return apply_global_batch(config, explicit)


def check(config: Config, machine_gpus: Callable[[], int]) -> None:
    """Every problem with the settings at once (exit 2), before any heavy work; a local launch is also checked
    against this machine's GPUs (the demo checks for its GPU itself: without one it prepares and exits 3)."""
    phase_only = config.dry_run or config.import_only or config.prepare_data_only or config.demo
    launches = config.executor == "local" and not phase_only
    validate_config(config, machine_gpus() if launches else None, os.environ)


def write_settings(config: Config) -> None:
    """--write_config: the settings as resolved here, as YAML that --config reads back."""
    leave_out = ("config", "write_config", "dry_run", "import_only", "prepare_data_only", "demo")
    atomic_write_text(Path(config.write_config).expanduser(), settings_yaml(config, leave_out))
    log.info("settings written to %s (read back with --config)", config.write_config)


def import_model(config: Config) -> Path:
    """The HF model as a NeMo checkpoint in --nemo_ckpt_dir: global rank 0 imports it, the other nodes wait."""
    with phase("HF -> NeMo import"):
        return import_hf_checkpoint(config)


def prepare(config: Config) -> tuple[Config, dict]:
    """Train / validation / test JSONL (and packed rows) in --data_dir: global rank 0 writes, the others wait.
    With --num_train_epochs, the steps follow from the rows prepared. Returns the data's summary too."""
    with phase("data preparation"):
        summary = prepare_data(config)
        return with_epoch_steps(config, summary), summary


def build_job(config: Config) -> tuple:
    """The NeMo recipe and the NeMo-Run executor, for the environment the training workers will have."""
    env = target_environment(config, compat.prepare_process())
    return configure_recipe(config, env), configure_executor(config, env)


def train(config: Config, recipe, executor) -> float:
    """torchrun through NeMo-Run on this node until training ends; returns the wall time in seconds."""
    with phase("training"):
        return launch_training(config, recipe, executor)


def submit(config: Config, recipe, executor) -> float | None:
    """--executor slurm: an sbatch job through NeMo-Run, waited for to its end (its wall time in seconds), or with
    --detach left queued (None)."""
    with phase("training (Slurm)"):
        return submit_training(config, recipe, executor)


def report(config: Config, data: dict, wall_time_s: float) -> dict:
    """<output_dir>/report/: summary.json and loss_curve.png, and the gist printed (real tokens/s from `data`)."""
    return write_report(config, data, wall_time_s)


def main(argv: list[str] | None = None) -> int:
    machine_gpus = functools.cache(visible_gpu_count)  # asked at most once, by `auto` or by the launch check
    config = parse_config(argv, visible_gpus=machine_gpus)
    setup_logging(config.log_level)
    if config.demo:
        config = demo.demo_config(config)
    check(config, machine_gpus)
    if config.write_config:
        write_settings(config)
    if config.dry_run:
        return dry_run(config)
    if config.import_only:
        import_hf_checkpoint(config)
        return 0
    if config.prepare_data_only:
        prepare_data(config)
        return 0
    log.info("full log, every library's messages: %s", log_to_file(config.layout.log_file, config.log_level))
    if config.demo:
        return demo.run_demo(config)
    import_model(config)
    config, data = prepare(config)
    recipe, executor = build_job(config)
    wall_time_s = (submit if config.executor == "slurm" else train)(config, recipe, executor)
    if wall_time_s is not None:  # None: a detached Slurm job, still queued or running
        report(config, data, wall_time_s)
    return 0


def cli() -> None:
    """The console entry point of an installed copy (pyproject.toml), the same as running this file."""
    run_cli(main)


if __name__ == "__main__":
    cli()
