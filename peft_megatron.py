"""Fine-tune a Hugging Face model with NeMo 2.0 / Megatron-Core: LoRA or full, TP/PP/CP, one GPU to many nodes.

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

The seven phases are one function each: configure (Config + validate_config), import_hf_checkpoint,
prepare_data, configure_recipe, launch_training, then test_checkpoint.py and convert_checkpoint_to_hf.py.
Where a run's files go: common.RunLayout. Every runtime shim of NeMo / Megatron-Core: nemo_compat.SHIMS.
The demo: demo.py (its assets: demo_workspace.py).
Exit codes: 0 success, 1 pipeline failure, 2 invalid arguments, 3 demo prepared but no CUDA GPU to train on.
On SageMaker, SM_CHANNEL_TRAINING, SM_MODEL_DIR, SM_HOSTS, SM_CURRENT_HOST and SM_NUM_GPUS fill the matching
settings unless a flag is given explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RUN_NAME,
    ConfigError,
    PipelineError,
    RunLayout,
    atomic_dir,
    atomic_write_text,
    attention_head_dim,
    checkpoint_damage,
    experiment,
    file_heads,
    hf_load_error,
    int_or_auto,
    is_nemo_checkpoint,
    log_to_file,
    parse_dataclass_args,
    phase,
    prints_to_log_file,
    quiet_workers,
    rank_zero_attempt,
    remove_leftovers,
    run_cli,
    scoped_environ,
    setup_logging,
    wait_for_file,
)
from dataset_module import HFDatasetConfig, format_summary, prepare_dataset

log = logging.getLogger("peft_megatron")

REPO_DIR = Path(__file__).resolve().parent
PEFT_SCHEMES = ("lora", "dora")  # what NeMo 2.7.3's finetune_recipe accepts (besides None for full fine-tuning)
PROFILER_FLAGS = ("enable_memory_profile", "enable_pytorch_profiler", "enable_nsys_callback")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXECUTORS = ("local", "slurm")
CORE_ATTENTION = ("sdpa", "unfused")  # without TE: sdpa_attention.py, or Megatron's local DotProductAttention
IMPORT_FAILED_SUFFIX = ".import-failed"
IMPORT_LOCK_SUFFIX = ".import-lock"
IMPORT_RECORD = ".import_source.json"  # inside an imported checkpoint: the model and recipe it was made from
EXIT_NO_GPU = 3
SEED_GPUS_PER_NODE = 8  # --gpus_per_node auto on a machine without GPUs: the plan of one 8-GPU node


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

    max_steps: int = field(default=10000, metadata={"help": "optimizer steps"})
    val_check_interval: int = field(default=800, metadata={"help": "validate (and checkpoint) every N steps"})
    log_every_n_steps: int = field(default=10, metadata={"help": "logging interval in steps"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per GPU per forward pass"})
    accumulate_grad_batches: int = field(default=8, metadata={"help": "micro-batches accumulated per step"})
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


@dataclass
class PeftSettings:
    """What is trained: LoRA/DoRA adapters or every weight."""

    GROUP = "PEFT"  # the --help section of these flags

    peft_scheme: str = field(default="lora", metadata={"help": f"one of {', '.join(PEFT_SCHEMES)}"})
    full_ft: bool = field(default=False, metadata={"help": "full fine-tuning instead of PEFT"})
    lora_dim: int | None = field(default=None, metadata={"help": "LoRA rank (default: NeMo's, 32)"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: NeMo's, 32)"})


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
    """Where the run writes (common.RunLayout under --output_dir)."""

    GROUP = "paths"  # the --help section of these flags

    output_dir: str | None = field(
        default=None, metadata={"help": "logs and checkpoints (default: outputs/<hf_model_id>)"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "prepared JSONL (default: <output_dir>/data)"})
    nemo_ckpt_dir: str | None = field(
        default=None, metadata={"help": "imported NeMo checkpoint (default: <output_dir>/imported_hf_ckpt)"}
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
# Phase 1: configuration
# ====================================================================================================================
def parse_config(
    argv: list[str] | None = None, environ: dict | None = None, visible_gpus: Callable[[], int] | None = None
) -> Config:
    """Flags, then SageMaker's environment, then `auto` resolved for this machine (`visible_gpus` counts its GPUs)."""
    config, explicit = parse_dataclass_args(Config, argv, __doc__)
    config = apply_sagemaker_env(config, explicit, os.environ if environ is None else environ)
    return apply_machine_defaults(config, visible_gpus or visible_gpu_count)


def visible_gpu_count() -> int:
    """The CUDA GPUs this process may use, without importing torch (which takes seconds): nvidia-smi's list,
    narrowed by CUDA_VISIBLE_DEVICES as CUDA narrows it (up to the first invalid entry such as -1)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    physical = sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    entries = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return min(len(entries), physical)


def apply_machine_defaults(config: Config, visible_gpus: Callable[[], int]) -> Config:
    """Resolve `auto` in --gpus_per_node and --tensor_parallel_size; values given explicitly are kept."""
    gpus = config.gpus_per_node
    if gpus is None:
        gpus = visible_gpus() or SEED_GPUS_PER_NODE
    tp = config.tensor_parallel_size
    if tp is None:
        heads = _local_model_heads(config.hf_model_id)
        tp = max((t for t in range(1, max(gpus, 1) + 1) if gpus % t == 0 and all(h % t == 0 for h in heads)), default=1)
    return dataclasses.replace(config, gpus_per_node=gpus, tensor_parallel_size=tp)


def _local_model_heads(hf_model_id: str) -> tuple[int, ...]:
    """A local model's attention and KV head counts (tensor parallelism must divide both); () when unknown."""
    try:
        return _attention_heads(json.loads((Path(hf_model_id).expanduser() / "config.json").read_text("utf-8")))
    except (OSError, ValueError):
        return ()  # a hub id, or a directory validation will name the problem of


def _attention_heads(hf: dict) -> tuple[int, ...]:
    """(attention heads, KV heads) from an HF config.json's contents; () when it does not say."""
    try:
        heads = int(hf["num_attention_heads"])
        return heads, int(hf.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return ()


def apply_sagemaker_env(config: Config, explicit: set[str], environ) -> Config:
    """Fill settings from SageMaker's environment; flags given explicitly win."""
    updates: dict[str, Any] = {}

    def offer(name: str, value: Any) -> None:
        if name not in explicit:
            updates[name] = value

    if "SM_CHANNEL_TRAINING" in environ:
        offer("data_dir", environ["SM_CHANNEL_TRAINING"])
    if "SM_MODEL_DIR" in environ:
        offer("output_dir", environ["SM_MODEL_DIR"])
        offer("nemo_ckpt_dir", str(RunLayout(Path(environ["SM_MODEL_DIR"])).imported))
    if "SM_NUM_GPUS" in environ and "gpus_per_node" not in explicit:
        try:
            gpus = int(environ["SM_NUM_GPUS"])
        except ValueError:
            raise ConfigError([f"SM_NUM_GPUS={environ['SM_NUM_GPUS']!r} is not an integer"]) from None
        if gpus < 1:
            raise ConfigError(
                [
                    f"SM_NUM_GPUS={gpus}: this SageMaker instance has no GPU; choose a GPU instance type "
                    "(e.g. ml.p4d.24xlarge or ml.p5.48xlarge)"
                ]
            )
        offer("gpus_per_node", gpus)
    if "SM_HOSTS" in environ:
        try:
            hosts = json.loads(environ["SM_HOSTS"])
            if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
                raise ValueError
        except ValueError:
            raise ConfigError(
                [f'SM_HOSTS={environ["SM_HOSTS"]!r} is not a JSON list of host names such as ["algo-1", "algo-2"]']
            ) from None
        current = environ.get("SM_CURRENT_HOST")
        if current not in hosts:
            raise ConfigError([f"SM_CURRENT_HOST={current!r} is not one of SM_HOSTS {hosts}"])
        offer("num_nodes", len(hosts))
        offer("node_rank", hosts.index(current))
    return dataclasses.replace(config, **updates)


def available_recipes() -> list[str]:
    """Recipe modules of the installed NeMo that define finetune_recipe, found without importing NeMo."""
    spec = importlib.util.find_spec("nemo")
    if spec is None or not spec.submodule_search_locations:
        return []
    recipes = Path(list(spec.submodule_search_locations)[0]) / "collections" / "llm" / "recipes"
    return sorted(p.stem for p in recipes.glob("*.py") if "def finetune_recipe" in p.read_text(errors="replace"))


def is_local_model(hf_model_id: str) -> bool:
    return hf_model_id.startswith(("/", ".", "~")) or Path(hf_model_id).is_dir()


# Far beyond any real setting: they catch typos and stray exponents (1e21) before any heavy work.
UPPER_BOUNDS = {
    "learning_rate": (1.0, "fine-tuning learning rates are around 1e-6 to 1e-3"),
    "micro_batch_size": (65536, "a micro-batch is what one GPU holds"),
    "accumulate_grad_batches": (65536, "global batches are rarely over a few thousand sequences"),
    "max_seq_length": (1 << 20, "no supported model has a context over 1,048,576 tokens"),
    "lora_dim": (65536, "a LoRA rank is at most the model's hidden size"),
    "wait_timeout_s": (7 * 24 * 3600.0, "a week"),
}


POSITIVE = (
    "num_nodes",
    "gpus_per_node",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "context_parallel_size",
    "max_steps",
    "val_check_interval",
    "log_every_n_steps",
    "micro_batch_size",
    "accumulate_grad_batches",
    "limit_val_batches",
    "max_seq_length",
    "early_stopping_patience",
)
PARALLEL = ("num_nodes", "gpus_per_node", "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size")


def validate_config(config: Config, visible_gpus: int | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Collect every problem with the settings and raise them together, before any heavy work; one checker per
    concern, each a function of the config (and of the machine where it must be). `visible_gpus`: the GPUs of this
    machine when it is about to launch training (None: not launching, nothing to check)."""
    environ = os.environ if environ is None else environ
    problems = [
        *_machine_problems(config, visible_gpus, environ),
        *_range_problems(config),
        *_layout_problems(config, environ),
        *_mode_problems(config),
        *_attention_problems(config),
        *(_local_model_problems(config) if is_local_model(config.hf_model_id) and not config.demo else []),
        *_path_problems(config),
        *_slurm_problems(config),
        *config.data.problems(),
    ]
    if problems:
        raise ConfigError(problems)


def _non_positive(config: Config) -> list[str]:
    return [n for n in POSITIVE if getattr(config, n) <= 0]


def _machine_problems(config: Config, visible_gpus: int | None, environ: Mapping[str, str]) -> list[str]:
    import nemo_compat  # stdlib imports only

    problems = []
    try:
        nemo_compat.skipped_in_workers(environ)
    except ValueError as e:
        problems.append(str(e))
    if config.cuda_graphs and visible_gpus == 0:
        problems.append("--cuda_graphs needs CUDA GPUs and this machine shows none; drop --cuda_graphs")
    if visible_gpus and config.gpus_per_node > visible_gpus:
        problems.append(
            f"--gpus_per_node {config.gpus_per_node}: this machine shows {visible_gpus} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give at most {visible_gpus} "
            "or leave the flag out (auto)"
        )
    return problems


def _range_problems(config: Config) -> list[str]:
    problems = [f"--{n} {getattr(config, n)} must be a positive integer" for n in _non_positive(config)]
    for name in ("lora_dim", "lora_alpha", "learning_rate"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            problems.append(f"--{name} {getattr(config, name)} must be positive")
    if config.early_stopping_threshold < 0:
        problems.append(f"--early_stopping_threshold {config.early_stopping_threshold} must be >= 0")
    if config.save_top_k == 0 or config.save_top_k < -1:
        problems.append(f"--save_top_k {config.save_top_k} must be a positive integer, or -1 to keep every checkpoint")
    if config.wait_timeout_s <= 0:
        problems.append(f"--wait_timeout_s {config.wait_timeout_s} must be positive")
    for name, (bound, why) in UPPER_BOUNDS.items():
        value = getattr(config, name)
        if value is not None and value > bound:
            problems.append(f"--{name} {value} is above {bound:g} ({why}); check the value")
    return problems


def _layout_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    """GPUs, parallel sizes, steps and the multi-node rendezvous agree with each other (ranges are checked apart)."""
    problems = []
    bad = set(_non_positive(config))
    if not bad & set(PARALLEL):
        if config.world_size % config.model_parallel_size:
            problems.append(
                f"world size {config.world_size} (--num_nodes {config.num_nodes} x --gpus_per_node "
                f"{config.gpus_per_node}) is not divisible by --tensor_parallel_size x --pipeline_parallel_size x "
                f"--context_parallel_size = {config.model_parallel_size}; change the parallel sizes or GPU count"
            )
        if not 0 <= config.node_rank < config.num_nodes:
            problems.append(f"--node_rank {config.node_rank} must be in [0, --num_nodes {config.num_nodes})")
    if not bad & {"val_check_interval", "max_steps"} and config.val_check_interval > config.max_steps:
        problems.append(
            f"--val_check_interval {config.val_check_interval} > --max_steps {config.max_steps}: validation "
            "(and so checkpointing and early stopping) would never run; lower it"
        )
    cp = config.context_parallel_size
    if not bad & {"context_parallel_size", "max_seq_length"} and cp > 1 and config.max_seq_length % (2 * cp):
        problems.append(
            f"--max_seq_length {config.max_seq_length} must be divisible by 2 x --context_parallel_size "
            f"= {2 * cp} (Megatron splits each sequence into 2 x CP chunks)"
        )
    rendezvous = environ.get("MASTER_ADDR") or "SM_HOSTS" in environ
    if config.num_nodes > 1 and config.executor == "local" and not config.dry_run and not rendezvous:
        problems.append(
            f"--num_nodes {config.num_nodes}: set MASTER_ADDR (node 0's address) and MASTER_PORT in every node's "
            "environment for the torchrun rendezvous"
        )
    return problems


def _mode_problems(config: Config) -> list[str]:
    """What to train, which recipe, and which one phase or profiler a run selects."""
    problems = []
    lora_flags = [f"--{n} {getattr(config, n)}" for n in ("lora_dim", "lora_alpha") if getattr(config, n) is not None]
    if config.full_ft and lora_flags:
        problems.append(f"{' and '.join(lora_flags)} set LoRA, which --full_ft does not train; drop one or the other")
    if config.peft_scheme.lower() not in PEFT_SCHEMES and not config.full_ft:
        problems.append(f"--peft_scheme {config.peft_scheme!r} is not one of {list(PEFT_SCHEMES)} (or use --full_ft)")
    recipes = available_recipes()
    if not recipes:
        problems.append("NeMo is not installed: pip install -r requirements.txt (see README)")
    elif config.recipe_cls_name not in recipes:
        close = difflib.get_close_matches(config.recipe_cls_name, recipes, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"available: {', '.join(recipes)}"
        problems.append(f"--recipe_cls_name {config.recipe_cls_name!r} is not a NeMo fine-tuning recipe ({hint})")
    enabled = [f"--{p}" for p in PROFILER_FLAGS if getattr(config, p)]
    if len(enabled) > 1:
        problems.append(f"{' and '.join(enabled)} are mutually exclusive profilers; enable one per run")
    modes = [f"--{m}" for m in ("dry_run", "import_only", "prepare_data_only") if getattr(config, m)]
    if len(modes) > 1:
        problems.append(f"{', '.join(modes)} each select one phase; give one of them")
    return problems


def _attention_problems(config: Config) -> list[str]:
    """Packed sequences and context parallelism need attention paths that this machine (or the nodes) must have."""
    problems = []
    no_te = importlib.util.find_spec("transformer_engine") is None
    if config.packed_sequence:
        if config.micro_batch_size != 1 and config.micro_batch_size > 0:
            problems.append(
                f"--packed_sequence with --micro_batch_size {config.micro_batch_size}: a packed row of "
                f"--max_seq_length tokens is the micro-batch; set --micro_batch_size 1 and raise "
                "--accumulate_grad_batches for the same tokens per step"
            )
        if config.core_attention == "unfused" and no_te:
            problems.append(
                "--packed_sequence with --core_attention unfused: Megatron's unfused attention cannot "
                "keep packed samples apart; use --core_attention sdpa"
            )
    if config.cuda_graphs and not config.packed_sequence:
        problems.append(
            "--cuda_graphs without --packed_sequence: Megatron's CUDA graphs replay the shapes they captured, and "
            "unpacked batches change shape with their longest sample; add --packed_sequence (rows of "
            "--max_seq_length tokens) or drop --cuda_graphs"
        )
    cp = config.context_parallel_size
    te_on_nodes = config.executor == "slurm" and config.container_image  # a NeMo image holds TE
    if cp > 1 and not config.dry_run and not te_on_nodes and no_te:
        problems.append(
            f"--context_parallel_size {cp} needs Transformer Engine's attention, which is not installed here; "
            "use 1 (--dry_run still plans such a layout)"
        )
    return problems


def _path_problems(config: Config) -> list[str]:
    problems = []
    for flag, path in (
        ("--output_dir", config.output_path),
        ("--data_dir", config.data_path),
        ("--nemo_ckpt_dir", config.nemo_ckpt_path),
    ):
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            problems.append(f"{flag} {path}: {blocking} is a file, not a directory; choose another {flag}")
        elif flag == "--output_dir" and blocking is not None and not os.access(blocking, os.W_OK | os.X_OK):
            problems.append(
                f"{flag} {path}: {blocking} is not writable by this user; choose another {flag} or fix its permissions"
            )
    return problems


SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def _slurm_problems(config: Config) -> list[str]:
    if config.executor != "slurm":
        given = [f"--{n}" for n in ("slurm_account", "slurm_partition", "container_image") if getattr(config, n)]
        return [f"{', '.join(given)} apply to --executor slurm only; add it or drop them"] if given else []
    problems = []
    if not config.slurm_account:
        problems.append("--executor slurm needs --slurm_account (the account sbatch charges)")
    if not SLURM_TIME.match(config.slurm_time):
        problems.append(f"--slurm_time {config.slurm_time!r} is not [D-]HH:MM:SS (e.g. 04:00:00 or 1-12:00:00)")
    if config.demo:
        problems.append("--demo runs on this machine's GPU; drop --executor slurm")
    bad_mounts = [m for m in config.container_mounts.split(",") if m.strip() and ":" not in m]
    if bad_mounts:
        problems.append(f"--container_mounts {', '.join(bad_mounts)}: each mount is host_path:container_path")
    return problems


# Recipe-name prefix -> the HF `model_type`s its importer can read (checked for local models before any import).
RECIPE_MODEL_TYPES = {
    "qwen3_": ("qwen3", "qwen3_moe"),
    "qwen2_": ("qwen2",),
    "qwen25_": ("qwen2",),
    "llama2_": ("llama",),
    "llama3_": ("llama",),
    "llama31_8b": ("llama",),
    "llama31_70b": ("llama",),
    "llama31_405b": ("llama",),
    "llama32_": ("llama",),
    "mistral_": ("mistral",),
    "mixtral_": ("mixtral",),
    "gemma_": ("gemma",),
    "gemma2_": ("gemma2",),
    "gemma3_": ("gemma3", "gemma3_text"),
}


def _local_model_problems(config: Config) -> list[str]:
    """What a local --hf_model_id directory says before any import: it exists, holds a readable config.json, its
    architecture is the recipe's family, and its shape fits the parallel layout."""
    model_dir = Path(config.hf_model_id).expanduser()
    flag = f"--hf_model_id {config.hf_model_id}"
    if not model_dir.exists():
        return [
            f"{flag}: no such directory; give a Hugging Face model directory (save_pretrained output) or a hub "
            "id such as Qwen/Qwen3-8B"
        ]
    if not model_dir.is_dir():
        return [f"{flag}: is a file; give the model's directory (the one holding config.json)"]
    if not (model_dir / "config.json").exists():
        return [
            f"{flag}: no config.json in that directory; give a Hugging Face model directory (save_pretrained "
            "output) or a hub id such as Qwen/Qwen3-8B"
        ]
    try:
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return [f"{flag}: config.json is not readable JSON ({e}); re-save the model with save_pretrained"]
    if not isinstance(hf, dict):
        return [f"{flag}: config.json holds a {type(hf).__name__}, not a model configuration object"]
    problems = []
    family = next(
        (p for p in sorted(RECIPE_MODEL_TYPES, key=len, reverse=True) if config.recipe_cls_name.startswith(p)), None
    )
    model_type = hf.get("model_type")
    if family and model_type and model_type not in RECIPE_MODEL_TYPES[family]:
        problems.append(
            f"--recipe_cls_name {config.recipe_cls_name} imports {'/'.join(RECIPE_MODEL_TYPES[family])} models but "
            f"{model_dir / 'config.json'} says model_type {model_type!r}; choose the recipe of the model's family"
        )
    if hf.get("auto_map") and not config.trust_remote_code:
        # transformers runs the repository's code only for a model_type it does not know itself.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            problems.append(
                f"{flag}: config.json points model_type {model_type!r}, which transformers does not know, to code in "
                "the model repository (auto_map); pass --trust_remote_code if you trust that code"
            )
    problems.extend(_weight_file_problems(model_dir, flag))
    if not (config.import_only or config.prepare_data_only):
        problems.extend(_model_shape_problems(config, hf))
    return problems


def _weight_file_problems(model_dir: Path, flag: str) -> list[str]:
    """safetensors files whose header does not describe the file (a download or copy cut short): reading the
    header is cheap, and the importer would otherwise fail deep inside transformers."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError) as e:
            problems.append(
                f"{flag}: {path.name} is unreadable ({e}); the file is incomplete or damaged — copy or "
                "download the model again"
            )
    return problems


def _model_shape_problems(config: Config, hf: dict) -> list[str]:
    """Parallel sizes the model's shape cannot take, read from a local config.json."""
    out = []
    heads, groups = _attention_heads(hf) or (None, None)
    layers = hf.get("num_hidden_layers")
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if heads and tp > 0 and (heads % tp or groups % tp):
        out.append(f"--tensor_parallel_size {tp} must divide the model's {heads} attention heads and {groups} KV heads")
    if layers and pp > 0 and layers % pp:
        out.append(f"--pipeline_parallel_size {pp} must divide the model's {layers} layers")
    return out


# ====================================================================================================================
# Phase 2: HF -> NeMo checkpoint import (global rank 0; the other nodes wait)
# ====================================================================================================================
def import_failed_marker(config: Config) -> Path:
    return config.nemo_ckpt_path.with_name(config.nemo_ckpt_path.name + IMPORT_FAILED_SUFFIX)


def import_hf_checkpoint(config: Config) -> Path:
    """Import `hf_model_id` into `nemo_ckpt_dir` unless a complete checkpoint is there; atomic, rank 0 only."""
    target = config.nemo_ckpt_path
    failed = import_failed_marker(config)
    if config.node_rank != 0:
        wait_for_file(
            target, failed, config.wait_timeout_s, "the HF -> NeMo import", is_done=lambda: is_nemo_checkpoint(target)
        )
        check_import_source(target, import_source(config))  # every node refuses a stale import, not only rank 0
        return target
    lock = target.with_name(f".{target.name}{IMPORT_LOCK_SUFFIX}")
    with rank_zero_attempt(lock, failed, config.wait_timeout_s, "HF -> NeMo import"):
        _import_on_rank0(config, target)
    return target


def _import_on_rank0(config: Config, target: Path) -> None:
    source = import_source(config)
    if is_nemo_checkpoint(target):
        check_import_source(target, source)
        damage = checkpoint_damage(target)
        if damage:
            raise PipelineError(f"--nemo_ckpt_dir {target} holds a damaged import: {damage}; remove it to import again")
        log.info("imported checkpoint already present: %s", target)
        return
    if target.exists() and any(target.iterdir()):
        raise PipelineError(
            f"--nemo_ckpt_dir {target} exists but is not a complete NeMo checkpoint (no context/ + weights/"
            "metadata.json); remove it or choose another --nemo_ckpt_dir"
        )
    remove_leftovers(target, "import")
    _run_import(config, target, source)


def import_source(config: Config) -> dict:
    """What an import is made from: the recipe and the model, a hub id or a local directory (file_heads)."""
    identity: dict[str, Any] = {"model": model_location(config), "recipe": config.recipe_cls_name}
    model_dir = Path(identity["model"])
    if is_local_model(config.hf_model_id) and model_dir.is_dir():
        identity["files"] = file_heads(model_dir, recursive=False)
    return identity


def check_import_source(target: Path, source: dict) -> None:
    """Refuse an existing import of another model (or of the same directory since changed)."""
    record = target / IMPORT_RECORD
    if not record.is_file():
        log.warning(
            "%s has no %s (imported before this check existed); using it as the import of %s — remove it if it is not",
            target,
            IMPORT_RECORD,
            source["model"],
        )
        return
    try:
        recorded = json.loads(record.read_text())
    except ValueError:
        recorded = {}
    if recorded != source:
        changed = sorted(k for k in set(recorded) | set(source) if recorded.get(k) != source.get(k))
        raise PipelineError(
            f"--nemo_ckpt_dir {target} holds an import of {recorded.get('model')} (recipe {recorded.get('recipe')}), "
            f"not of {source['model']} (recipe {source['recipe']}) as it is now (differs in: {', '.join(changed)}); "
            "choose another --nemo_ckpt_dir, or remove it to import again"
        )


def _run_import(config: Config, target: Path, identity: dict) -> None:
    import nemo_compat

    env = nemo_compat.prepare_process()
    import fiddle as fdl
    from nemo.collections import llm

    recipe = _recipe_module(config.recipe_cls_name).finetune_recipe(num_nodes=1, num_gpus_per_node=1)
    assign(recipe.model.config, **nemo_compat.model_config_overrides(env))  # e.g. RoPE fusion needs TE
    model = fdl.build(recipe.model)  # picks the importer; the sizes come from the HF config
    source = f"hf://{model_location(config)}"
    check_importer_head_dim(model, source, config.trust_remote_code)
    log.info("importing %s -> %s (%s)", source, target, env.describe())
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()  # empty (checked by the caller); import writes to a temporary sibling and renames
    with atomic_dir(target) as tmp, nemo_compat.cpu_checkpoint_io(env):
        # Some importers (Qwen3) take trust_remote_code, others (Llama) do not and never run remote code.
        accepts = "trust_remote_code" in inspect.signature(type(model.importer(source)).apply).parameters
        extra = {"trust_remote_code": config.trust_remote_code} if accepts else {}
        with prints_to_log_file("nemo.import_ckpt", config.log_level):  # its tree of the files it wrote
            llm.import_ckpt(model=model, source=source, output_path=tmp, overwrite=True, **extra)
        if not is_nemo_checkpoint(tmp):
            raise PipelineError(f"llm.import_ckpt finished but {tmp} is not a complete checkpoint")
        atomic_write_text(tmp / IMPORT_RECORD, json.dumps(identity, indent=2) + "\n")
    log.info("imported checkpoint written to %s", target)


def check_importer_head_dim(model, source: str, trust_remote_code: bool = False) -> None:
    """NeMo's importers ignore HF `head_dim` (Qwen3's fixes kv_channels=128): refuse rather than write a wrong model."""
    from transformers import AutoConfig

    connector = model.importer(source)
    connector.trust_remote_code = trust_remote_code  # read by connector.config; normally set inside apply()
    hf_path = str(connector)
    try:
        nemo_cfg = connector.config
        hf = AutoConfig.from_pretrained(hf_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(hf_load_error(hf_path, e)) from None
    hf_head_dim, nemo_head_dim = attention_head_dim(hf), attention_head_dim(nemo_cfg)
    if hf_head_dim != nemo_head_dim:
        raise PipelineError(
            f"{hf_path}: head_dim {hf_head_dim} but NeMo's importer would build head_dim {nemo_head_dim}; this "
            "checkpoint cannot be converted correctly by NeMo 2.7.3"
        )


def _recipe_module(name: str):
    from importlib import import_module

    return import_module(f"nemo.collections.llm.recipes.{name}")


# ====================================================================================================================
# Phase 3: data preparation (global rank 0; the other nodes wait)
# ====================================================================================================================
def model_location(config: Config) -> str:
    """`hf_model_id` as an absolute path when it is a local directory (workers may run elsewhere), else the hub id."""
    return (
        str(Path(config.hf_model_id).expanduser().resolve())
        if is_local_model(config.hf_model_id)
        else config.hf_model_id
    )


def tokenizer_source(config: Config) -> str:
    """The imported checkpoint's own tokenizer once it exists (always local), else the HF model's."""
    nemo_tokenizer = config.nemo_ckpt_path / "context" / "nemo_tokenizer"
    return str(nemo_tokenizer.resolve()) if nemo_tokenizer.is_dir() else model_location(config)


def prepare_data(config: Config) -> dict:
    summary = prepare_dataset(
        config.data,
        config.data_path,
        tokenizer_name=tokenizer_source(config),
        max_seq_length=config.max_seq_length,
        trust_remote_code=config.trust_remote_code,
        global_rank=config.node_rank,
        wait_timeout_s=config.wait_timeout_s,
        tokenizer_identity=config.hf_model_id,
    )
    if config.packed_sequence:
        import fiddle as fdl

        summary["packed"] = fdl.build(configure_data(config)).prepare_packed(global_rank=config.node_rank)
    print(format_summary(summary), flush=True)
    val_rows = summary["packed"]["val"]["packs"] if config.packed_sequence else summary["rows"].get("val", 0)
    if val_rows < config.global_batch_size:
        # Megatron's validation sampler drops the incomplete last global batch: no val_loss, so no checkpoint.
        what = "packs into" if config.packed_sequence else "has"
        raise PipelineError(
            f"the validation split {what} {val_rows} rows, fewer than one global batch ({config.global_batch_size}): "
            "validation would run no batch, so no val_loss and no checkpoint. Raise --val_fraction or lower "
            "--micro_batch_size/--accumulate_grad_batches"
        )
    return summary


# ====================================================================================================================
# Phase 4: recipe, strategy, trainer, logging, callbacks
# ====================================================================================================================
def _accepted_params(target) -> set[str]:
    """Parameter names `target` really accepts: fiddle configs silently take misspelled attributes on classes
    whose __init__ has **kwargs (MegatronStrategy), so follow **kwargs up the MRO and stop where it ends."""
    import inspect

    if not inspect.isclass(target):
        return set(inspect.signature(target).parameters)
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        params = inspect.signature(vars(cls)["__init__"]).parameters
        names.update(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def assign(cfg, **values) -> None:
    """Set fields on a fiddle config, refusing names its target does not take (a typo would only fail on GPU)."""
    unknown = sorted(set(values) - _accepted_params(cfg.__fn_or_cls__))
    if unknown:
        raise TypeError(f"{cfg.__fn_or_cls__.__qualname__} takes no {unknown}")
    for name, value in values.items():
        setattr(cfg, name, value)


def configure_recipe(config: Config, env=None):
    """The NeMo recipe for this job, by plain assignment over `finetune_recipe`'s defaults."""
    import fiddle as fdl
    import nemo_run as run

    import nemo_compat

    env = env or nemo_compat.detect_environment()
    recipe = _recipe_module(config.recipe_cls_name).finetune_recipe(
        dir=str(config.output_path),
        name=RUN_NAME,
        num_nodes=config.num_nodes,
        num_gpus_per_node=config.gpus_per_node,
        peft_scheme=None if config.full_ft else config.peft_scheme.lower(),
        packed_sequence=False,
    )
    if is_nemo_checkpoint(config.nemo_ckpt_path):
        # The architecture is the imported model's (sizes come from its HF config), not the recipe's default size.
        from nemo.lightning.io import load_context

        imported = load_context(config.nemo_ckpt_path / "context", subpath="model.config", build=False)
        recipe.model.config = fdl.cast(run.Config, imported)
    # Sequence length settings in the model and the data must agree.
    skipped = nemo_compat.skipped_in_workers(os.environ)  # the workers inherit this environment
    overrides = nemo_compat.model_config_overrides(env, training=True, skip=skipped)
    assign(recipe.model.config, seq_length=config.max_seq_length, **overrides)
    configure_attention(config, recipe.model.config, env)
    recipe.data = configure_data(config)

    assign(
        recipe.trainer.strategy,
        tensor_model_parallel_size=config.tensor_parallel_size,
        pipeline_model_parallel_size=config.pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        ckpt_load_strictness=False,  # LoRA adapters are absent from the base checkpoint
    )
    assign(
        recipe.trainer,
        max_steps=config.max_steps,
        # Megatron's local CUDA graphs capture whichever layer calls come first. NeMo's LoRA set-up puts the model
        # back in train mode after Lightning's eval() for the sanity check, so those no-grad calls would be captured
        # as forward-only graphs that training steps then replay and cannot run backward through.
        num_sanity_val_steps=0 if config.cuda_graphs else 1,
        val_check_interval=config.val_check_interval,
        limit_val_batches=config.limit_val_batches,
        log_every_n_steps=config.log_every_n_steps,
        # Megatron accumulates the micro-batches of one global batch inside a step; Lightning's accumulation would
        # multiply it again, so gradient accumulation lives in global_batch_size only.
        accumulate_grad_batches=1,
    )
    recipe.trainer.callbacks = list(recipe.trainer.callbacks or []) + configure_callbacks(config)
    recipe.log = configure_logger(config)

    assign(recipe.resume, resume_if_exists=True, resume_ignore_no_checkpoint=True)
    assign(recipe.resume.restore_config, path=str(config.nemo_ckpt_path.resolve()))

    optim = {"lr": config.learning_rate} if config.learning_rate else {}
    assign(recipe.optim.config, **optim, **nemo_compat.optimizer_config_overrides(env))
    if not config.full_ft:
        lora = {k: v for k, v in (("dim", config.lora_dim), ("alpha", config.lora_alpha)) if v is not None}
        assign(recipe.peft, **lora)
    recipe.tokenizer = "data"
    return recipe


def configure_attention(config: Config, model_config, env) -> None:
    """Without TE, train with SDPA core attention (sdpa_attention.py) unless --core_attention unfused; a model
    family with its own layer spec keeps it."""
    if env.has_te or config.core_attention != "sdpa":
        return
    from nemo.collections.llm.gpt.model.base import default_layer_spec, local_layer_spec

    import sdpa_attention

    if model_config.transformer_layer_spec in (default_layer_spec, local_layer_spec, sdpa_attention.layer_spec):
        assign(model_config, transformer_layer_spec=sdpa_attention.layer_spec)
    else:
        log.warning(
            "this model has its own layer spec (%s); its attention is kept", model_config.transformer_layer_spec
        )


def configure_data(config: Config):
    import nemo_run as run

    from dataset_module import GeneralizedHFDataModule

    return run.Config(
        GeneralizedHFDataModule,
        dataset_config=dataclasses.asdict(config.data),
        tokenizer_name_or_path=tokenizer_source(config),
        dataset_root=str(config.data_path.resolve()),
        seq_length=config.max_seq_length,
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size,
        trust_remote_code=config.trust_remote_code,
        wait_timeout_s=config.wait_timeout_s,
        tokenizer_identity=config.hf_model_id,
        packed_sequence=config.packed_sequence,
        one_shape=config.cuda_graphs,
        num_workers=2,
    )


def configure_logger(config: Config):
    import nemo_run as run
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from nemo import lightning as nl

    wandb = None
    if config.use_wandb:
        wandb = run.Config(
            WandbLogger, project=config.wandb_project, name=config.experiment_title, save_dir=str(config.output_path)
        )
    checkpoint = run.Config(
        nl.ModelCheckpoint,
        monitor="val_loss",
        mode="min",
        save_last="link",
        save_top_k=config.save_top_k,
        save_weights_only=config.save_weights_only,
        # NeMo's default drops the optimizer from the checkpoint written at the end of training, so a run resumed
        # from `last` could not continue; keep it unless the user asked for weights only.
        save_optim_on_train_end=not config.save_weights_only,
        # Saved when validation ends, so the val_loss in the name is the one just measured.
        every_n_train_steps=None,
        # Lightning formats every {field} as field=value and would print an unknown {model_name} as model_name=0.
        filename=f"{RUN_NAME}--{{val_loss:.4f}}-{{step}}-{{consumed_samples:.0f}}",
    )
    return run.Config(
        nl.NeMoLogger,
        name=RUN_NAME,
        log_dir=str(config.output_path.resolve()),
        use_datetime_version=False,  # a stable checkpoint directory is what lets a restarted run resume
        # Relative to log_dir, which NeMoLogger resolves it against: <output_dir>/tb_logs.
        tensorboard=run.Config(TensorBoardLogger, save_dir=config.layout.tensorboard.name, name="peft_megatron"),
        wandb=wandb,
        ckpt=checkpoint,
    )


def configure_callbacks(config: Config) -> list:
    import nemo_run as run
    from lightning.pytorch.callbacks import EarlyStopping
    from nemo.lightning.pytorch import callbacks as cb

    callbacks = [
        run.Config(
            EarlyStopping,
            monitor="val_loss",
            min_delta=config.early_stopping_threshold,
            patience=config.early_stopping_patience,
            mode="min",
            verbose=True,
        )
    ]
    if config.enable_megatron_progress_bar:
        callbacks.append(run.Config(cb.MegatronProgressBar, refresh_rate=config.log_every_n_steps))
    if config.enable_memory_monitor:
        callbacks.append(run.Config(cb.MemoryMonitor))
    else:  # the run report's peak memory: one statistic, logged like the loss
        callbacks.append(run.Config(cb.MemoryMonitor, memory_keys={"allocated_bytes.all.peak": "peak_allocated_mem"}))
    if config.enable_speed_monitor:
        callbacks.append(run.Config(cb.SpeedMonitor, window_size=100))
    if config.enable_runtime_estimator:
        callbacks.append(run.Config(cb.RuntimeEstimator))
    profile_dir = str(config.layout.profiles.resolve())
    if config.enable_memory_profile:
        callbacks.append(run.Config(cb.MemoryProfileCallback, dir=profile_dir, ranks=[0]))
    if config.enable_pytorch_profiler:
        callbacks.append(run.Config(cb.PytorchProfilerCallback, start_step=1, end_step=2, trace_dir=profile_dir))
    if config.enable_nsys_callback:
        callbacks.append(run.Config(cb.NsysCallback, start_step=1, end_step=2, ranks=[0]))
    return callbacks


# ====================================================================================================================
# Phase 5: launch through NeMo-Run (torchrun)
# ====================================================================================================================
def configure_executor(config: Config, env=None):
    import nemo_run as run

    import nemo_compat

    env = env or nemo_compat.detect_environment()
    pythonpath = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env_vars = {
        "PYTHONPATH": pythonpath,  # the workers import dataset_module and nemo_compat from this repository
        "TOKENIZERS_PARALLELISM": "false",
    }
    # startup/sitecustomize.py applies nemo_compat's import-time adaptations in each worker before NeMo loads: all of
    # them without TE or CUDA, with both only the asynchronous-checkpoint fix.
    env_vars["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR / "startup"), pythonpath])
    env_vars[nemo_compat.WORKER_ENV_FLAG] = nemo_compat.worker_flag(env)
    if config.cuda_graphs:
        env_vars[nemo_compat.CUDA_GRAPHS_ENV] = "1"
    if config.executor == "slurm":
        return _slurm_executor(config, env_vars)
    return run.LocalExecutor(
        ntasks_per_node=config.gpus_per_node, nodes=config.num_nodes, launcher="torchrun", env_vars=env_vars
    )


def rendezvous_environ(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """What NeMo-Run's torchrun launcher reads from this process's environment when it builds a multi-node local
    launch (node rank, node 0's address from SageMaker's SM_HOSTS unless MASTER_ADDR is set, port); set only while
    the launch is built and run (common.scoped_environ)."""
    if config.executor != "local" or config.num_nodes == 1:
        return {}
    values = {"NODE_RANK": str(config.node_rank), "MASTER_PORT": environ.get("MASTER_PORT", "29500")}
    hosts = json.loads(environ["SM_HOSTS"]) if "SM_HOSTS" in environ else None
    if "MASTER_ADDR" not in environ and hosts:
        values["MASTER_ADDR"] = hosts[0]
    return values


def target_environment(config: Config, local):
    """Where the training workers run: this machine for --executor local; for Slurm the compute nodes, which have
    GPUs, and TE when they run a container image (NeMo's images hold it) or this environment has it."""
    if config.executor == "local":
        return local
    import nemo_compat

    return nemo_compat.Environment(has_te=local.has_te or bool(config.container_image), has_cuda=True)


def _slurm_executor(config: Config, env_vars: dict):
    import nemo_run as run

    mounts = [m.strip() for m in config.container_mounts.split(",") if m.strip()]
    if config.container_image:
        # The workers import this repository's modules and read and write the run's files at the same paths.
        run_dirs = (config.output_path, config.data_path, config.nemo_ckpt_path)
        shared = sorted({REPO_DIR, *(p.resolve() for p in run_dirs)})
        shared = [p for p in shared if not any(q != p and q in p.parents for q in shared)]
        mounts += [f"{p}:{p}" for p in shared]
    executor = run.SlurmExecutor(
        account=config.slurm_account,
        partition=config.slurm_partition,
        time=config.slurm_time,
        nodes=config.num_nodes,
        ntasks_per_node=config.gpus_per_node,
        gpus_per_node=config.gpus_per_node,
        container_image=config.container_image,
        container_mounts=mounts,
        env_vars=env_vars,
        tunnel=run.LocalTunnel(job_dir=str(config.layout.nemo_run.resolve())),
    )
    executor.launcher = "torchrun"  # one torchrun per node, rendezvous at the first node (NeMo-Run's sbatch script)
    return executor


def submit_training(config: Config, recipe, executor) -> None:
    """--executor slurm: submit the job and return; the job's logs and checkpoints appear under --output_dir."""
    with experiment(
        config.experiment_title,
        executor=executor,
        log_level=config.log_level,
        base_dir=str(config.layout.nemo_run.resolve()),
    ) as exp:
        exp.add(recipe, tail_logs=False, name=config.recipe_cls_name)
        exp.run(detach=True)
    for job in exp.jobs:
        print(
            f"submitted Slurm job {job.id} ({job.state}); logs under {config.layout.nemo_run}, checkpoints "
            f"under {config.layout.checkpoints}",
            flush=True,
        )


def launch_training(config: Config, recipe, executor) -> float:
    """Run the experiment to its end; returns its wall time in seconds."""
    from torchx.specs.api import AppState

    started = time.monotonic()
    if config.enable_pytorch_profiler or config.enable_memory_profile:
        config.layout.profiles.mkdir(parents=True, exist_ok=True)  # the callbacks require it to exist
    log.info("training workers' output: in full in %s; here, what matters", config.layout.log_file)
    # A single job's workers are waited for (and their output tailed) when the experiment's context exits.
    with (
        quiet_workers(config.recipe_cls_name, config.log_level, config.log_every_n_steps),
        scoped_environ(rendezvous_environ(config, os.environ)),  # NeMo-Run reads them while it builds the launch
        experiment(
            config.experiment_title,
            executor=executor,
            log_level=config.log_level,
            base_dir=str(config.layout.nemo_run.resolve()),
        ) as exp,
    ):
        exp.add(recipe, tail_logs=True, name=config.recipe_cls_name)
        exp.run(detach=False)
    states = {job.id: job.state for job in exp.jobs}  # final only once the context has waited for the jobs
    failed = {jid: str(state) for jid, state in states.items() if state != AppState.SUCCEEDED}
    if failed:
        raise PipelineError(
            f"training failed (job states {failed}); the worker logs are under {config.layout.nemo_run} "
            "(the error is printed above)"
        )
    log.info("fine-tuning finished; checkpoints under %s", config.layout.checkpoints)
    return time.monotonic() - started


def write_report(config: Config, wall_time_s: float) -> dict:
    """<output_dir>/report/: summary.json and loss_curve.png of the finished run (run_report.py); prints the gist."""
    import run_report

    summary = run_report.write_training_report(
        config.output_path,
        {
            "model": config.hf_model_id,
            "mode": "full fine-tuning" if config.full_ft else f"PEFT ({config.peft_scheme})",
            "max_steps": config.max_steps,
            "world_size": config.world_size,
            "global_batch_size": config.global_batch_size,
            "max_seq_length": config.max_seq_length,
            "wall_time_s": wall_time_s,
            "command": shlex.join(sys.orig_argv),
        },
    )
    print(f"report: {config.layout.report}", flush=True)
    for line in run_report.summary_lines(summary):
        print(f"  {line}", flush=True)
    return summary


# ====================================================================================================================
# --dry_run
# ====================================================================================================================
def plan_lines(config: Config) -> list[str]:
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


def launch_command(config: Config, recipe, executor) -> str:
    """The torchrun command NeMo-Run would run on this node (the serialized recipe argument abbreviated)."""
    from nemo_run.run.torchx_backend.packaging import package

    role = package(config.recipe_cls_name, recipe, executor, serialize_to_file=False).roles[0]
    args = [a if len(a) < 200 else f"<serialized recipe, {len(a)} chars>" for a in role.args]
    return " ".join([role.entrypoint, *args])


def slurm_script(config: Config, recipe, executor) -> str:
    """The sbatch script NeMo-Run would submit, from NeMo-Run's own dry run; the files it writes are removed."""
    import shutil

    base = config.layout.nemo_run.resolve()
    created = [p for p in (base, *base.parents) if not p.exists()]
    exp = None
    try:
        with experiment(config.experiment_title, executor=executor, base_dir=str(base), log_level="WARN") as exp:
            exp.add(recipe, tail_logs=False, name=config.recipe_cls_name)
            exp.dryrun(log=False, delete_exp_dir=False)
            return next(Path(exp._exp_dir).glob("*_sbatch.sh")).read_text()  # NeMo-Run names no public accessor
    finally:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        elif exp is not None:
            shutil.rmtree(exp._exp_dir, ignore_errors=True)


def dry_run(config: Config) -> int:
    import nemo_compat

    local = nemo_compat.prepare_process()
    env = target_environment(config, local)
    recipe = configure_recipe(config, env)
    executor = configure_executor(config, env)
    print("plan:")
    for line in plan_lines(config):
        print(f"  {line}")
    where = "this machine" if config.executor == "local" else "the Slurm nodes"
    print(
        f"  environment ({where}): {env.describe()}; adaptations here: "
        f"{', '.join(sorted(nemo_compat.applied())) or 'none'}"
    )
    if config.executor == "slurm":
        print("  sbatch script NeMo-Run would submit:\n" + slurm_script(config, recipe, executor), flush=True)
    else:
        with scoped_environ(rendezvous_environ(config, os.environ)):
            print(f"  launch: {launch_command(config, recipe, executor)}", flush=True)
    return 0


# ====================================================================================================================
def main(argv: list[str] | None = None) -> int:
    machine_gpus = functools.cache(visible_gpu_count)  # asked at most once, by `auto` or by the launch check
    config = parse_config(argv, visible_gpus=machine_gpus)
    setup_logging(config.log_level)
    if config.demo:
        import demo

        config = demo.demo_config(config)
    launches = config.executor == "local" and not (config.dry_run or config.import_only or config.prepare_data_only)
    validate_config(config, machine_gpus() if launches else None, os.environ)
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
    with phase("HF -> NeMo import"):
        import_hf_checkpoint(config)
    with phase("data preparation"):
        prepare_data(config)
    import nemo_compat

    env = target_environment(config, nemo_compat.prepare_process())
    recipe, executor = configure_recipe(config, env), configure_executor(config, env)
    if config.executor == "slurm":
        submit_training(config, recipe, executor)
        return 0
    with phase("training"):
        wall_time_s = launch_training(config, recipe, executor)
    write_report(config, wall_time_s)
    return 0


if __name__ == "__main__":
    sys.modules["peft_megatron"] = sys.modules[__name__]  # demo.py imports this module: one copy, not two
    run_cli(main)
