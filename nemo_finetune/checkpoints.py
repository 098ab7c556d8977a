"""NeMo checkpoints on disk: completeness, damage, LoRA adapters, the best checkpoint of a run."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from nemo_finetune.errors import PipelineError


def attention_head_dim(config) -> int:
    """The attention head size of a Megatron/NeMo config (kv_channels) or an HF config (head_dim); both fall back to
    hidden_size / attention heads, as TransformerConfig and transformers do."""
    explicit = getattr(config, "kv_channels", None) or getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


# --------------------------------------------------------------------------------------------------------------------
# NeMo checkpoints on disk
# --------------------------------------------------------------------------------------------------------------------
_VAL_LOSS = re.compile(r"val_loss=([0-9.]+(?:e[-+]?\d+)?)")


def is_nemo_checkpoint(path: Path) -> bool:
    """A complete NeMo 2 checkpoint has context/ (model config, tokenizer) and weights/ with its metadata."""
    path = Path(path)
    weights = path / "weights"
    return (path / "context").is_dir() and weights.is_dir() and (weights / "metadata.json").exists()


def hf_load_error(model: str, error: Exception) -> str:
    """One line for a model or tokenizer transformers could not load (offline hub id, gated model, custom code)."""
    text = str(error).strip()
    if "trust_remote_code" in text:
        return (
            f"--hf_model_id {model}: the model needs code from its repository; pass --trust_remote_code if you trust it"
        )
    first = text.splitlines()[0] if text else type(error).__name__
    return (
        f"--hf_model_id {model}: could not read the model's configuration or tokenizer ({type(error).__name__}: "
        f"{first}). Without network access, point --hf_model_id at a local directory (save_pretrained output); "
        "a gated hub model needs a login (HF_TOKEN)"
    )


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with the weight files of a complete-looking NeMo checkpoint, or None. Reads metadata only:
    weights/metadata.json and the torch-dist `.metadata` must parse, and every shard must be as long as the
    metadata says (a copy or write cut short). A shard damaged inside its length is not detected."""
    weights = Path(path) / "weights"
    try:
        json.loads((weights / "metadata.json").read_text())
    except (ValueError, OSError) as e:
        return f"weights/metadata.json is unreadable ({e})"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(weights)).read_metadata()
    except Exception as e:  # pickle, EOF, missing file: any of them means the same to a user
        return f"weights/.metadata is unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = weights / name
        if not shard.is_file():
            return f"weights/{name} is missing"
        if shard.stat().st_size < end:
            return f"weights/{name} is truncated ({shard.stat().st_size} of {end} bytes)"
    return None


ADAPTER_META = "adapter_metadata.json"  # NeMo's marker of a PEFT checkpoint (weights/ holds the adapter only)


def is_lora_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / "weights" / ADAPTER_META).exists()


def read_adapter_tensors(ckpt: Path, optimizer_state: str | None = None) -> dict:
    """The adapter weights of a NeMo LoRA checkpoint (torch_dist format, read without a process group), each layer
    stack one tensor, layer first. The checkpoint also holds the optimizer's state of every adapter weight under
    `optimizer.state.<kind>.<key>`, several times their size: only the weights are read, or with `optimizer_state`
    (e.g. "fp32_param", the master copies) that state of each weight that has it instead, under the weight's key."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(Path(ckpt) / "weights"))
    stored = reader.read_metadata().state_dict_metadata
    prefix = f"optimizer.state.{optimizer_state}." if optimizer_state else ""
    weights = [
        key
        for key, meta in stored.items()
        if ".adapter." in key
        and not key.startswith("optimizer.")
        and isinstance(meta, dcp.metadata.TensorStorageMetadata)
        and prefix + key in stored
    ]
    # zeros: a chunk the writer lost reads as zero
    state = {
        prefix + k: torch.zeros(stored[prefix + k].size, dtype=stored[prefix + k].properties.dtype) for k in weights
    }
    if state:
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


def adapter_matrices(adapter: dict) -> list[tuple[str, object]]:
    """(name, matrix) for every LoRA matrix of `adapter` (read_adapter_tensors), one per layer of each layer stack,
    named as Megatron names that layer's module (`decoder.layers.3.self_attention...`), in key order."""
    found = []
    for key, tensor in sorted(adapter.items()):
        name = key.removeprefix("module.")
        if ".layers." in name and tensor.dim() == 3:  # [layers, out, in]
            found += [(name.replace(".layers.", f".layers.{layer}.", 1), m) for layer, m in enumerate(tensor)]
        else:
            found.append((name, tensor))
    return found


def untrained_adapters(adapter: dict) -> list[str]:
    """The LoRA output matrices (B) among `adapter` (read_adapter_tensors) that are all zero, one name per layer. B
    starts at zero and leaves it at an adapter's first step, so these adapters change nothing: they never trained, or
    their weights were lost when the checkpoint was written."""
    return [
        name for name, matrix in adapter_matrices(adapter) if name.endswith("linear_out.weight") and not matrix.any()
    ]


def adapters_unlike_their_master_copies(ckpt: Path, adapter: dict) -> list[str]:
    """The LoRA matrices (per layer) of checkpoint `ckpt` whose weights in `adapter` (read_adapter_tensors) are not the
    cast of the fp32 master copies that Megatron's mixed-precision optimizer saved beside them. After every step the
    weights are exactly that cast (docs/gpu-validation.md checked it on checkpoints written during training), so a
    difference is data lost when the checkpoint was written. None where the checkpoint holds no master copies (fp32
    training, the distributed optimizer's layout)."""
    import torch

    masters = dict(adapter_matrices(read_adapter_tensors(ckpt, optimizer_state="fp32_param")))
    return [
        name
        for name, weight in adapter_matrices(adapter)
        if name in masters and not torch.equal(weight, masters[name].to(weight.dtype))
    ]


def warn_damaged_adapters(ckpt: Path, logger: logging.Logger, consequence: str, adapter: dict | None = None) -> dict:
    """Log the untrained_adapters and the adapters_unlike_their_master_copies of LoRA checkpoint `ckpt` (read unless
    given), if any, one warning each, ending in `consequence`; returns both lists under those names (the metrics
    file's keys). A full checkpoint has neither."""
    if adapter is None:
        adapter = read_adapter_tensors(ckpt) if is_lora_checkpoint(ckpt) else {}
    found = {
        "untrained_adapters": untrained_adapters(adapter),
        "adapters_unlike_master_copies": adapters_unlike_their_master_copies(ckpt, adapter) if adapter else [],
    }
    why = {
        "untrained_adapters": "LoRA adapter(s) have an all-zero output matrix (B) and change nothing: %s. A trained "
        "adapter's B is non-zero after its first step, so these never trained or were lost when the checkpoint was "
        "written",
        "adapters_unlike_master_copies": "LoRA matrix(es) differ from the fp32 master copies saved beside them: %s. "
        "Megatron's optimizer makes the weights exactly the cast of those copies after every step, so these were "
        "damaged when the checkpoint was written",
    }
    for kind, names in found.items():
        if names:
            logger.warning("%s: %d " + why[kind] + "; %s", Path(ckpt).name, len(names), ", ".join(names), consequence)
    return found


def checkpoint_val_loss(path: Path) -> float | None:
    m = _VAL_LOSS.search(Path(path).name)
    return float(m.group(1).rstrip(".")) if m else None


def find_checkpoint(nemo_logs_dir: Path) -> Path:
    """The best-val_loss checkpoint under `nemo_logs_dir` (searched recursively), else the `-last` one."""
    root = Path(nemo_logs_dir)
    if not root.is_dir():
        raise PipelineError(f"--nemo_logs_dir {root} does not exist; run peft_megatron.py first (it writes it)")
    candidates = [p for p in root.rglob("*") if p.is_dir() and is_nemo_checkpoint(p) and "checkpoints" in p.parts]
    complete = [p for p in candidates if not p.name.endswith("-last") and checkpoint_val_loss(p) is not None]
    if complete:
        return min(complete, key=lambda p: (checkpoint_val_loss(p), -p.stat().st_mtime))
    last = [p for p in candidates if p.name.endswith("-last")]
    if last:
        return max(last, key=lambda p: p.stat().st_mtime)
    raise PipelineError(
        f"no complete NeMo checkpoint (context/ + weights/metadata.json) under {root}; "
        "train with peft_megatron.py first, or pass --nemo_checkpoint_path"
    )
