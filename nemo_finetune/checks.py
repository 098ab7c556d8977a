"""Validation of a training job: one checker per concern, every problem collected and raised together (ConfigError),
each naming the flag and the fix, before any heavy work."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from dataset_module import data_dir_problems, local_sources
from nemo_finetune import slurm
from nemo_finetune.choices import LORA_TARGETS, PEFT_SCHEMES, PROFILER_FLAGS, lora_targets
from nemo_finetune.errors import ConfigError
from nemo_finetune.files import overlap_problems, path_problem, space_problem
from nemo_finetune.layout import REPO_DIR
from nemo_finetune.resolve import attention_heads, available_recipes, is_local_model, recipe_parameters

log = logging.getLogger("peft_megatron")


# Far beyond any real setting: they catch typos and stray exponents (1e21) before any heavy work.
UPPER_BOUNDS = {
    "learning_rate": (1.0, "fine-tuning learning rates are around 1e-6 to 1e-3"),
    "micro_batch_size": (65536, "a micro-batch is what one GPU holds"),
    "accumulate_grad_batches": (65536, "global batches are rarely over a few thousand sequences"),
    "max_seq_length": (1 << 20, "no supported model has a context over 1,048,576 tokens"),
    "lora_dim": (65536, "a LoRA rank is at most the model's hidden size"),
    "min_learning_rate": (1.0, "fine-tuning learning rates are around 1e-6 to 1e-3"),
    "warmup_steps": (10**9, "more steps than any run takes"),
    "weight_decay": (1.0, "AdamW's decay is a fraction of the weight per step, usually 0 to 0.1"),
    "max_grad_norm": (1e6, "clipping norms are around 0.1 to 10"),
    "wait_timeout_s": (7 * 24 * 3600.0, "a week"),
    "num_train_epochs": (1e6, "fine-tuning takes a few passes over its data"),
    "max_steps": (10**9, "more steps than any run takes"),
    "val_check_interval": (10**9, "more steps than any run takes"),
    "log_every_n_steps": (10**9, "more steps than any run takes"),
    "limit_val_batches": (10**9, "more batches than any validation split holds"),
    "early_stopping_patience": (10**6, "validation checks of one run"),
    "early_stopping_threshold": (100.0, "the least val_loss improvement that counts, usually 0 to 0.01"),
    "save_top_k": (10**6, "checkpoints of one run"),
    "lora_alpha": (10**6, "alpha / rank scales the adapters, usually 1 to 4"),
    "num_nodes": (10**5, "nodes of one job"),
    "gpus_per_node": (1024, "GPUs of one node"),
    "tensor_parallel_size": (10**5, "GPUs of one job"),
    "pipeline_parallel_size": (10**5, "GPUs of one job"),
    "context_parallel_size": (10**5, "GPUs of one job"),
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


def validate_config(config, visible_gpus: int | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Collect every problem with the settings and raise them together, before any heavy work; one checker per
    concern, each a function of the config (and of the machine where it must be). `visible_gpus`: the GPUs of this
    machine when it is about to launch training (None: not launching, nothing to check)."""
    environ = os.environ if environ is None else environ
    unresolvable = _unresolvable_paths(config)
    if unresolvable:  # every later check resolves paths
        raise ConfigError(unresolvable)
    problems = [
        *_machine_problems(config, visible_gpus, environ),
        *_range_problems(config),
        *_layout_problems(config, environ),
        *_mode_problems(config),
        *_attention_problems(config),
        *(_local_model_problems(config) if is_local_model(config.hf_model_id) and not config.demo else []),
        *(_hub_name_problems(config) if not is_local_model(config.hf_model_id) and not config.demo else []),
        *_path_problems(config),
        *_overlap_problems(config),
        *_resume_problems(config),
        *_slurm_problems(config, environ),
        *config.data.problems(),
    ]
    if problems:
        raise ConfigError(problems)


def _non_positive(config) -> list[str]:
    return [n for n in POSITIVE if getattr(config, n) is not None and getattr(config, n) <= 0]


def _machine_problems(config, visible_gpus: int | None, environ: Mapping[str, str]) -> list[str]:
    from nemo_finetune import compat  # stdlib imports only

    problems = []
    for named in (compat.skipped_in_workers, compat.trials_in_workers):
        try:
            named(environ)
        except ValueError as e:
            problems.append(str(e))
    launches_here = config.executor == "local" and not (config.import_only or config.prepare_data_only)
    if launches_here and importlib.util.find_spec("torch") is None:  # the workers run this Python's torch
        problems.append(
            f"torch is not installed for this Python ({sys.executable}), which launches the training workers: "
            "install it into this environment (README's install command), or run the script with the Python that "
            "has it"
        )
    if visible_gpus == 0:
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        problems.append(
            "training needs CUDA GPUs and this machine shows none (nvidia-smi lists no GPU"
            f"{'' if visible is None else f', CUDA_VISIBLE_DEVICES={visible}'}): plan the job with --dry_run, run the "
            "CPU phases with --import_only or --prepare_data_only, or submit it to GPU nodes with --executor slurm"
        )
    if visible_gpus and config.gpus_per_node > visible_gpus:
        problems.append(
            f"--gpus_per_node {config.gpus_per_node}: this machine shows {visible_gpus} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give at most {visible_gpus} "
            "or leave the flag out (auto)"
        )
    return problems


def _range_problems(config) -> list[str]:
    problems = [f"--{n} {getattr(config, n)} must be a positive integer" for n in _non_positive(config)]
    for name in ("lora_dim", "lora_alpha", "learning_rate"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            problems.append(f"--{name} {getattr(config, name)} must be positive")
    for name in ("min_learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout"):
        if getattr(config, name) is not None and getattr(config, name) < 0:
            problems.append(f"--{name} {getattr(config, name)} must be >= 0")
    if config.lora_dropout is not None and config.lora_dropout >= 1:
        problems.append(f"--lora_dropout {config.lora_dropout} must be below 1 (it is the fraction of inputs dropped)")
    lr, min_lr = config.learning_rate, config.min_learning_rate
    if lr is not None and min_lr is not None and min_lr > lr:
        problems.append(f"--min_learning_rate {min_lr:g} is above --learning_rate {lr:g}; the schedule decays to it")
    targets = lora_targets(config.lora_target_modules)
    if targets is not None:
        unknown = [t for t in targets if t not in LORA_TARGETS and not ("*" in t and t.endswith(LORA_TARGETS))]
        if unknown or not targets:
            problems.append(
                f"--lora_target_modules {config.lora_target_modules!r}: {', '.join(unknown) or 'no layer'} is not one "
                f"of {', '.join(LORA_TARGETS)} (or a pattern ending in one, such as '*.layers.0.*.linear_qkv')"
            )
    if config.early_stopping_threshold < 0:
        problems.append(f"--early_stopping_threshold {config.early_stopping_threshold} must be >= 0")
    if config.save_top_k == 0 or config.save_top_k < -1:
        problems.append(f"--save_top_k {config.save_top_k} must be a positive integer, or -1 to keep every checkpoint")
    if config.wait_timeout_s <= 0:
        problems.append(f"--wait_timeout_s {config.wait_timeout_s} must be positive")
    for name, (bound, why) in UPPER_BOUNDS.items():
        value = getattr(config, name)
        if value is not None and value > bound:
            problems.append(f"--{name} {value} is above {bound:,} ({why}); check the value")
    return problems


def _layout_problems(config, environ: Mapping[str, str]) -> list[str]:
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
    if config.max_steps is not None and config.num_train_epochs is not None:
        problems.append(
            f"--max_steps {config.max_steps} and --num_train_epochs {config.num_train_epochs:g} both set the length "
            "of the run; give one of them"
        )
    if config.num_train_epochs is not None and config.num_train_epochs <= 0:
        problems.append(f"--num_train_epochs {config.num_train_epochs:g} must be positive")
    steps = config.max_steps
    if not bad & {"val_check_interval", "max_steps"} and steps is not None and config.val_check_interval > steps:
        problems.append(
            f"--val_check_interval {config.val_check_interval} > --max_steps {config.max_steps}: validation "
            "(and so checkpointing and early stopping) would never run; lower it"
        )
    wanted = config.requested_global_batch_size
    if wanted is not None and wanted <= 0:
        problems.append(f"--global_batch_size {wanted} must be a positive integer")
    elif wanted is not None and not bad & {*PARALLEL, "micro_batch_size", "accumulate_grad_batches"}:
        per_step = config.micro_batch_size * config.data_parallel_size
        if config.global_batch_size != wanted:
            problems.append(
                f"--global_batch_size {wanted} is not --micro_batch_size {config.micro_batch_size} x "
                f"--accumulate_grad_batches {config.accumulate_grad_batches} x data-parallel size "
                f"{config.data_parallel_size} = {config.global_batch_size}; give a multiple of {per_step} and leave "
                "out --accumulate_grad_batches"
            )
    cp = config.context_parallel_size
    if not bad & {"context_parallel_size", "max_seq_length"} and cp > 1 and config.max_seq_length % (2 * cp):
        problems.append(
            f"--max_seq_length {config.max_seq_length} must be divisible by 2 x --context_parallel_size "
            f"= {2 * cp} (Megatron splits each sequence into 2 x CP chunks)"
        )
    port = environ.get("MASTER_PORT")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        problems.append(f"MASTER_PORT={port!r} in the environment is not a TCP port; set it to a number 1 to 65535")
    rendezvous = environ.get("MASTER_ADDR") or "SM_HOSTS" in environ
    launches = not (config.dry_run or config.import_only or config.prepare_data_only)  # the phases meet no one
    if config.num_nodes > 1 and config.executor == "local" and launches and not rendezvous:
        problems.append(
            f"--num_nodes {config.num_nodes}: set MASTER_ADDR (node 0's address) and MASTER_PORT in every node's "
            "environment for the torchrun rendezvous"
        )
    return problems


def _mode_problems(config) -> list[str]:
    """What to train, which recipe, and which one phase or profiler a run selects."""
    problems = []
    lora = ("lora_dim", "lora_alpha", "lora_dropout", "lora_target_modules")
    lora_flags = [f"--{n} {getattr(config, n)}" for n in lora if getattr(config, n) is not None]
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
    elif not {"peft_scheme", "packed_sequence"} <= recipe_parameters(config.recipe_cls_name):
        problems.append(
            f"--recipe_cls_name {config.recipe_cls_name}: NeMo's recipe is not a GPT-style decoder's fine-tuning "
            "recipe (its finetune_recipe takes no packed_sequence or peft_scheme: T5, Mamba, Nemotron-H, ...), "
            "which this toolkit trains; choose the recipe of a Llama, Qwen, Mistral, Gemma or similar model"
        )
    enabled = [f"--{p}" for p in PROFILER_FLAGS if getattr(config, p)]
    if len(enabled) > 1:
        problems.append(f"{' and '.join(enabled)} are mutually exclusive profilers; enable one per run")
    modes = [f"--{m}" for m in ("dry_run", "import_only", "prepare_data_only") if getattr(config, m)]
    if len(modes) > 1:
        problems.append(f"{', '.join(modes)} each select one phase; give one of them")
    return problems


def _attention_problems(config) -> list[str]:
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
    if cp > 1 and not te_on_nodes and no_te:  # a --dry_run refuses what the launch would
        problems.append(
            f"--context_parallel_size {cp} needs Transformer Engine's attention, which is not installed where the "
            "workers would run; use 1, or plan it for nodes that have TE (--executor slurm --container_image with a "
            "NeMo image)"
        )
    return problems


def _unresolvable_paths(config) -> list[str]:
    """Path flags behind a symbolic link loop."""
    datasets = [part.strip() for part in (config.data.dataset_name or "").split(",") if part.strip()]
    paths = [("--output_dir", config.output_path), ("--data_dir", config.data_dir),  # unset: under --output_dir
             ("--nemo_ckpt_dir", config.nemo_ckpt_dir), ("--hf_model_id", config.hf_model_id),
             ("--write_config", config.write_config), ("--resume_from", config.resume_from),
             *(("--dataset_name", part) for part in datasets)]  # fmt: skip
    problems = []
    for flag, path in paths:
        if path is None:
            continue
        try:
            Path(path).expanduser().resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
            problems.append(f"{flag} {path}: a symbolic link on the way loops; fix the link or give another path")
    return problems


def _path_problems(config) -> list[str]:
    problems = []
    for flag, path in (
        ("--output_dir", config.output_path),
        ("--data_dir", config.data_path),
        ("--nemo_ckpt_dir", config.nemo_ckpt_path),
    ):
        problem = path_problem(flag, path)
        if problem:
            problems.append(problem)
    if config.write_config is not None:
        target = Path(config.write_config).expanduser()
        blocking = next((p for p in target.parents if p.exists()), None)
        if target.is_dir() or (blocking is not None and not blocking.is_dir()):
            problems.append(f"--write_config {target}: not a file path (a directory is in the way); give a file name")
    return problems


def _overlap_problems(config) -> list[str]:
    """What the run writes apart from what it reads: the data and the import never where the dataset or the HF model
    is (either could be replaced); the run's directory never the model's or the dataset's, nor inside them."""
    model = config.hf_model_id if is_local_model(config.hf_model_id) and not config.demo else None
    sources = local_sources(config.data, model)
    problems = data_dir_problems(config.data, config.data_path, model) if config.data.dataset_name else []
    consequence = "the import writes the NeMo checkpoint there and replaces a damaged one"
    problems += overlap_problems([("--nemo_ckpt_dir", config.nemo_ckpt_path)], sources, consequence)
    consequence = "the run writes its data, checkpoints and logs there"
    problems += overlap_problems([("--output_dir", config.output_path)], sources, consequence, allow_containing=True)
    return problems


def _resume_problems(config) -> list[str]:
    """--resume_from names a checkpoint of the same kind of run; --no_resume never writes beside checkpoints."""
    from nemo_finetune.checkpoints import is_lora_checkpoint, is_nemo_checkpoint

    problems = []
    if config.resume_from is not None and config.no_resume:
        problems.append("--resume_from and --no_resume contradict each other; give one of them")
    if config.resume_from is not None:
        ckpt = Path(config.resume_from).expanduser()
        if not is_nemo_checkpoint(ckpt):
            problems.append(
                f"--resume_from {ckpt}: not a complete NeMo checkpoint (context/ and weights/ with metadata.json); "
                f"give one of the directories under {config.layout.checkpoints}"
            )
        elif is_lora_checkpoint(ckpt) == config.full_ft:
            kind, run = ("a LoRA", "a --full_ft") if config.full_ft else ("a full fine-tuning", "a LoRA")
            problems.append(
                f"--resume_from {ckpt} is {kind} checkpoint and this is {run} run; resume it with the settings "
                "that wrote it"
            )
    checkpoints = config.layout.checkpoints
    if config.no_resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        problems.append(
            f"--no_resume: {checkpoints} holds checkpoints of an earlier run, which a new run would mix with its "
            "own; give a new --output_dir (or drop --no_resume to continue from the last one)"
        )
    return problems


SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def _slurm_problems(config, environ: Mapping[str, str]) -> list[str]:
    if config.executor != "slurm":
        names = ("slurm_account", "slurm_partition", "container_image", "detach")
        given = [f"--{n}" for n in names if getattr(config, n)]
        return [f"{', '.join(given)} apply to --executor slurm only; add it or drop them"] if given else []
    problems = []
    previous = slurm.read_record(config.layout.jobs)
    checked = previous and not (config.import_only or config.prepare_data_only)
    current = slurm.active_state(previous["job_id"]) if checked else None
    if current is not None:
        job_id = previous["job_id"]
        problems.append(
            f"Slurm job {job_id} of this run ({config.output_path}) is still {current}: wait for it to "
            f"end (squeue -j {job_id}) or cancel it (scancel {job_id}), or give another --output_dir"
        )
    if not config.slurm_account:
        problems.append("--executor slurm needs --slurm_account (the account sbatch charges)")
    if not SLURM_TIME.match(config.slurm_time):
        problems.append(f"--slurm_time {config.slurm_time!r} is not [D-]HH:MM:SS (e.g. 04:00:00 or 1-12:00:00)")
    if config.demo:
        problems.append("--demo runs on this machine's GPU; drop --executor slurm")
    bad_mounts = [m for m in config.container_mounts.split(",") if m.strip() and ":" not in m]
    if bad_mounts:
        problems.append(f"--container_mounts {', '.join(bad_mounts)}: each mount is host_path:container_path")
    if not config.container_image:
        # NeMo-Run 0.11 replaces every "/nemo_run" in the sbatch script of a job without a container image with the
        # job's directory (its name for the directory mounted in containers): paths holding it would break.
        written = [str(config.output_path.resolve()), str(REPO_DIR), *environ.get("PATH", "").split(os.pathsep)]
        written += environ.get("PYTHONPATH", "").split(os.pathsep)
        broken = [p for p in written if "/nemo_run" in p]
        if broken:
            problems.append(
                f"--executor slurm without --container_image: NeMo-Run rewrites every '/nemo_run' in the job script, "
                f"which would break {', '.join(broken)} (--output_dir, this repository, PATH, PYTHONPATH); move them "
                "to a path without it, or give --container_image"
            )
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
    "phi3_": ("phi3",),
    "baichuan2_": ("baichuan",),
    "chatglm3_": ("chatglm",),
    "deepseek_v": ("deepseek_v2", "deepseek_v3"),
    "gpt_oss_": ("gpt_oss",),
    "starcoder2_": ("starcoder2",),
    "nemotron3_": ("nemotron",),
    "nemotron4_": ("nemotron",),
    "llama4_": ("llama4",),
}
# Sizes the import builds the model from; where config.json gives one, it is a whole number above 0.
MODEL_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size")  # fmt: skip
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


# Model families as the names of NeMo's recipes and of hub ids spell them (a recipe's leading letters), and Qwen's
# generations, whose importers differ (qwen2 for Qwen2 and Qwen2.5, qwen3 for Qwen3).
HUB_NAME_FAMILIES = (
    "baichuan", "chatglm", "deepseek", "gemma", "llama", "mistral", "mixtral", "nemotron", "qwen", "starcoder",
)  # fmt: skip
QWEN_GENERATIONS = {"qwen2", "qwen3"}


def _name_families(name: str) -> set[str]:
    """The families a hub id's name spells: {"llama"}, {"qwen", "qwen3"}, {"deepseek", "qwen"}, ..."""
    name = name.lower()
    families = {family for family in HUB_NAME_FAMILIES if family in name}
    return families | {f"qwen{n}" for n in re.findall(r"qwen(\d)", name)} & QWEN_GENERATIONS


def _recipe_families(recipe: str) -> set[str]:
    """The families of a recipe, from its leading name (`llama31_nemotron_nano_8b` -> {"llama"})."""
    lead = re.match(r"[a-z]+\d?", recipe.lower())
    return _name_families(lead.group()) if lead else set()


def _hub_name_problems(config) -> list[str]:
    """A hub id whose name says another family than the recipe's (meta-llama/Llama-3.1-8B or Qwen/Qwen2.5-7B with
    the default qwen3_8b): the import would fail after the download. Refused only where the name says another
    family and not the recipe's (or another Qwen generation), so fine-tunes named after their base pass
    (`DeepSeek-R1-Distill-Qwen-7B` with a qwen2 recipe)."""
    recipe, named = _recipe_families(config.recipe_cls_name), _name_families(config.hf_model_id)
    if not recipe or not named:
        return []
    if recipe - QWEN_GENERATIONS <= named:  # the name says the recipe's family; a Qwen's generation must agree
        stated = named & QWEN_GENERATIONS
        if not stated or recipe & stated:
            return []
        other = stated
    else:
        other = named - recipe
    other = sorted(other - {"qwen"} if other & QWEN_GENERATIONS else other)
    plain = re.sub(r"[^a-z0-9]", "", config.hf_model_id.lower().rsplit("/", 1)[-1])
    candidates = [r for r in available_recipes() if _recipe_families(r) & set(other)]
    ranked = sorted(candidates, key=lambda r: -difflib.SequenceMatcher(None, plain, r.replace("_", "")).ratio())[:5]
    fix = "if NeMo has one"
    if ranked:
        fix = f"e.g. --recipe_cls_name {ranked[0]}" + (f" (or {', '.join(ranked[1:])})" if ranked[1:] else "")
    return [
        f"--recipe_cls_name {config.recipe_cls_name} imports {max(recipe, key=len)} models but --hf_model_id "
        f"{config.hf_model_id} names a {'/'.join(other)} model; pass the recipe of its family, {fix} (a local model "
        "directory is judged by its config.json instead)"
    ]


def _remote_tokenizer_problems(model_dir: Path, hf: dict, trust_remote_code: bool, flag: str) -> list[str]:
    """A tokenizer that transformers would build from code in the model directory (tokenizer_config.json's auto_map
    for a tokenizer_class it does not know itself) needs --trust_remote_code, as the data preparation and the import
    will say; said here too, so that --dry_run refuses it as well."""
    if trust_remote_code or not (model_dir / "tokenizer_config.json").is_file():
        return []
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return [f"{flag}: tokenizer_config.json is not readable JSON ({e}); re-save the tokenizer with save_pretrained"]
    auto_map = tokenizer_config.get("auto_map") if isinstance(tokenizer_config, dict) else None
    if isinstance(auto_map, dict):
        auto_map = auto_map.get("AutoTokenizer")
    if not auto_map:
        return []
    name = tokenizer_config.get("tokenizer_class") or hf.get("tokenizer_class")
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if name and (tokenizer_class_from_name(name) or tokenizer_class_from_name(name + "Fast")):
        return []  # transformers' own class runs, as AutoTokenizer picks it without the flag
    return [
        f"{flag}: tokenizer_config.json points the tokenizer{f' {name!r}' if name else ''}, which transformers does "
        "not know, to code in the model repository (auto_map); pass --trust_remote_code if you trust that code"
    ]


def _local_model_problems(config) -> list[str]:
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
    problems.extend(_remote_tokenizer_problems(model_dir, hf, config.trust_remote_code, flag))
    from nemo_finetune.checkpoints import is_nemo_checkpoint

    imported = is_nemo_checkpoint(config.nemo_ckpt_path)  # training reads the import, data its tokenizer
    if not imported and not config.prepare_data_only and not any(any(model_dir.glob(p)) for p in WEIGHT_FILES):
        problems.append(
            f"{flag}: no weights in that directory (no *.safetensors or pytorch_model*.bin); copy the model's weight "
            "files there (save_pretrained writes them) or give the directory that holds them"
        )
    if not imported and not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            f"{flag}: no tokenizer in that directory (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "beside the model (tokenizer.save_pretrained(DIR))"
        )
    problems.extend(_weight_file_problems(model_dir, flag))
    if not imported and not config.prepare_data_only:
        needed = import_size(model_dir)
        problem = space_problem("--nemo_ckpt_dir", config.nemo_ckpt_path, needed, "the import") if needed else None
        problems.extend([problem] if problem else [])
    sizes = _model_size_problems(hf, model_dir / "config.json")
    if sizes:
        return problems + sizes  # the shape checks below read these sizes
    highest = tokenizer_highest_id(model_dir)
    if hf.get("vocab_size") and highest is not None and highest >= hf["vocab_size"]:
        problems.append(
            f"{flag}: its tokenizer has token ids up to {highest:,}, past the model's {hf['vocab_size']:,} embedding "
            "rows (config.json vocab_size); a row with such a token would stop training with a CUDA index error. "
            "Resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)), then "
            "save_pretrained), or save the model's own tokenizer beside it"
        )
    if config.data.chat and not has_chat_template(model_dir):
        problems.append(
            f"--chat: the tokenizer of {flag} has no chat template (no chat_template in tokenizer_config.json, no "
            "chat_template.jinja), so chat rows cannot be formatted; use a chat or instruct model, or drop --chat "
            "and give --input_column / --output_column"
        )
    if not (config.import_only or config.prepare_data_only):
        problems.extend(_model_shape_problems(config, hf))
    return problems


def import_size(model_dir: Path) -> int:
    """Bytes the NeMo import of a local model writes, about: its weights in bf16 (the recipes' params_dtype) read
    from the safetensors headers (pytorch_model*.bin: their size), and 1% + 16 MB for the context and metadata."""
    from safetensors import SafetensorError, safe_open

    elements = 0
    for path in model_dir.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    elements += math.prod(shape)
        except (SafetensorError, OSError):
            return 0  # _weight_file_problems names it
    other = sum(p.stat().st_size for p in model_dir.glob("pytorch_model*.bin"))
    weights = 2 * elements + other
    return int(weights * 1.01) + (16 << 20) if weights else 0


def _model_size_problems(hf: dict, config_file: Path) -> list[str]:
    """Sizes in config.json the import cannot build a model from: not a whole number above 0, or heads that do not
    divide the hidden size (without head_dim) or into the KV heads."""
    bad = [key for key in MODEL_SIZES if key in hf and hf[key] is not None and not _positive_int(hf[key])]
    if bad:
        given = ", ".join(f"{key} {hf[key]!r}" for key in bad)
        return [
            f"{config_file}: {given}: a model's sizes are whole numbers above 0; fix config.json or re-save the model"
        ]
    heads, kv_heads, hidden = hf.get("num_attention_heads"), hf.get("num_key_value_heads"), hf.get("hidden_size")
    problems = []
    if heads and hidden and hf.get("head_dim") is None and hidden % heads:
        problems.append(f"{config_file}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and "
                        "no head_dim is given); fix config.json or re-save the model")  # fmt: skip
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"{config_file}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                        f"{kv_heads}; fix config.json or re-save the model")  # fmt: skip
    return problems


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def tokenizer_highest_id(model_dir: Path) -> int | None:
    """The highest token id a saved tokenizer can produce: its vocabulary (tokenizer.json's model, else vocab.json)
    and its added tokens (tokenizer.json, added_tokens.json, tokenizer_config.json's added_tokens_decoder); None
    where none of those is readable (a SentencePiece-only tokenizer)."""

    def read(name: str):
        try:
            return json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    ids: list[int] = []
    fast = read("tokenizer.json")
    if isinstance(fast, dict):
        vocab = (fast.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += [i for i in vocab.values() if isinstance(i, int)]
        elif isinstance(vocab, list):  # Unigram: [token, score] pairs in id order
            ids.append(len(vocab) - 1)
        ids += [t["id"] for t in fast.get("added_tokens") or () if isinstance(t, dict) and isinstance(t.get("id"), int)]
    else:
        vocab = read("vocab.json")
        if isinstance(vocab, dict):
            ids += [i for i in vocab.values() if isinstance(i, int)]
    added = read("added_tokens.json")
    if isinstance(added, dict):
        ids += [i for i in added.values() if isinstance(i, int)]
    settings = read("tokenizer_config.json")
    decoder = settings.get("added_tokens_decoder") if isinstance(settings, dict) else None
    if isinstance(decoder, dict):
        ids += [int(i) for i in decoder if str(i).isdigit()]
    return max(ids) if ids else None


def has_chat_template(model_dir: Path) -> bool:
    """Whether a saved tokenizer carries a chat template (transformers keeps it in tokenizer_config.json or, since
    4.4x, in chat_template.jinja / chat_template.json beside it)."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


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


def _model_shape_problems(config, hf: dict) -> list[str]:
    """Parallel sizes the model's shape cannot take, read from a local config.json."""
    out = []
    heads, groups = attention_heads(hf) or (None, None)
    layers = hf.get("num_hidden_layers")
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if heads and tp > 0 and (heads % tp or groups % tp):
        out.append(f"--tensor_parallel_size {tp} must divide the model's {heads} attention heads and {groups} KV heads")
    if layers and pp > 0 and layers % pp:
        out.append(f"--pipeline_parallel_size {pp} must divide the model's {layers} layers")
    return out
