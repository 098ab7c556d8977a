"""From flags to a resolved job: SageMaker's environment, `auto` GPU counts and tensor parallelism for this
machine, and where the model comes from (a hub id or a local directory)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_finetune.errors import ConfigError
from nemo_finetune.layout import RunLayout

log = logging.getLogger("peft_megatron")


SEED_GPUS_PER_NODE = 8  # --gpus_per_node auto on a machine without GPUs: the plan of one 8-GPU node


def visible_gpu_count() -> int:
    """The CUDA GPUs this process may use, without importing torch (which takes seconds): nvidia-smi's list (the
    driver's device files where nvidia-smi is not installed), narrowed by CUDA_VISIBLE_DEVICES as CUDA narrows it (up
    to the first invalid entry such as -1)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        listed = listing.stdout.splitlines() if listing.returncode == 0 else []
        physical = sum(line.startswith("GPU ") for line in listed)
    except subprocess.TimeoutExpired:
        physical = 0
    except OSError:  # no nvidia-smi: count the driver's device files (/dev/nvidia0, /dev/nvidia1, ...)
        physical = sum(p.name[len("nvidia") :].isdigit() for p in Path("/dev").glob("nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    entries = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return min(len(entries), physical)


def apply_machine_defaults(config, visible_gpus: Callable[[], int]):
    """Resolve `auto` in --gpus_per_node and --tensor_parallel_size; values given explicitly are kept."""
    gpus = config.gpus_per_node
    if gpus is None:
        gpus = visible_gpus() or SEED_GPUS_PER_NODE
    tp = config.tensor_parallel_size
    if tp is None:
        heads = local_model_heads(config.hf_model_id)
        tp = max((t for t in range(1, max(gpus, 1) + 1) if gpus % t == 0 and all(h % t == 0 for h in heads)), default=1)
    return dataclasses.replace(config, gpus_per_node=gpus, tensor_parallel_size=tp)


def apply_global_batch(config, explicit: set[str]):
    """--global_batch_size sets --accumulate_grad_batches to it / (micro-batch x data-parallel size) unless that flag
    is given too; a size that does not divide is left for validation to name."""
    wanted = config.requested_global_batch_size
    parallel = (config.tensor_parallel_size, config.pipeline_parallel_size, config.context_parallel_size)
    if wanted is None or "accumulate_grad_batches" in explicit or min(*parallel, config.micro_batch_size) <= 0:
        return config
    per_step = config.micro_batch_size * config.data_parallel_size
    if per_step <= 0 or wanted <= 0 or wanted % per_step:
        return config
    return dataclasses.replace(config, accumulate_grad_batches=wanted // per_step)


def local_model_heads(hf_model_id: str) -> tuple[int, ...]:
    """A local model's attention and KV head counts (tensor parallelism must divide both); () when unknown."""
    try:
        return attention_heads(json.loads((Path(hf_model_id).expanduser() / "config.json").read_text("utf-8")))
    except (OSError, ValueError):
        return ()  # a hub id, or a directory validation will name the problem of


def attention_heads(hf: dict) -> tuple[int, ...]:
    """(attention heads, KV heads) from an HF config.json's contents; () when it does not say."""
    try:
        heads = int(hf["num_attention_heads"])
        return heads, int(hf.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return ()


def apply_sagemaker_env(config, explicit: set[str], environ):
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


def recipe_parameters(name: str) -> set[str]:
    """The parameters of an installed recipe's finetune_recipe, read from its source without importing NeMo (every
    name where it takes **kwargs; none where it has no finetune_recipe)."""
    import ast

    spec = importlib.util.find_spec("nemo")
    if spec is None or not spec.submodule_search_locations:
        return set()
    source = Path(list(spec.submodule_search_locations)[0]) / "collections" / "llm" / "recipes" / f"{name}.py"
    try:
        tree = ast.parse(source.read_text(errors="replace"))
    except (OSError, SyntaxError):
        return set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "finetune_recipe":
            if node.args.kwarg is not None:
                return {"peft_scheme", "packed_sequence", "**"}
            return {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
    return set()


def is_local_model(hf_model_id: str) -> bool:
    return hf_model_id.startswith(("/", ".", "~")) or Path(hf_model_id).is_dir()


def model_location(config) -> str:
    """`hf_model_id` as an absolute path when it is a local directory (workers may run elsewhere), else the hub id."""
    return (
        str(Path(config.hf_model_id).expanduser().resolve())
        if is_local_model(config.hf_model_id)
        else config.hf_model_id
    )


def imported_tokenizer(checkpoint: Path) -> Path:
    """Where a NeMo checkpoint imported from HF keeps its copy of the model's tokenizer."""
    return Path(checkpoint) / "context" / "nemo_tokenizer"


def tokenizer_source(config) -> str:
    """The imported checkpoint's own tokenizer once it exists (always local), else the HF model's."""
    nemo_tokenizer = imported_tokenizer(config.nemo_ckpt_path)
    return str(nemo_tokenizer.resolve()) if nemo_tokenizer.is_dir() else model_location(config)
