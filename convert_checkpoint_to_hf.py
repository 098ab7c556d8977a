"""Export a NeMo 2 checkpoint to Hugging Face: LoRA merged into safetensors, or the adapter alone in HF PEFT format.

    # best val_loss checkpoint (else the last) of a training run -> nemo_logs/exports/<ckpt>.hf_model/
    # (config, safetensors, tokenizer)
    python convert_checkpoint_to_hf.py --nemo_logs_dir outputs/Qwen/Qwen3-8B/nemo_logs

    # the LoRA adapter alone -> nemo_logs/exports/<ckpt>.hf_peft/ (adapter_config.json + adapter_model.safetensors,
    # for peft.PeftModel.from_pretrained), for Llama, Qwen3, Mistral and other Llama-layout models
    python convert_checkpoint_to_hf.py --nemo_checkpoint_path CKPT --no_merge

    # a full fine-tuned checkpoint, or an imported base checkpoint, exports as it is
    python convert_checkpoint_to_hf.py --nemo_checkpoint_path outputs/x/imported_hf_ckpt --output_dir base_hf/

Re-runnable: an existing export of the same checkpoint is kept (pass --overwrite to replace it); every export
records what it was made from (.peft_megatron_export.json: the checkpoint and a fingerprint of its files' content,
and each exported file's sha256), so an export of another or since-changed checkpoint, an incomplete or damaged one,
or a directory that holds something else is refused, never reused. Large files' digests are cached by inode, size
and times (~/.cache/nemo_finetune), so a re-run reads an unchanged checkpoint once. The free disk space is checked
before the export starts. Outputs are written to a temporary directory and renamed, so an interrupted export never
looks complete. `--verify` (default on for models under 2B parameters) reloads the export with transformers; for
LoRA it checks that the merged model and peft.PeftModel(base, adapter) give the same logits. The adapter mapping
itself is tested against NeMo's own exporter on NeMo-layout LoRA weights (tests/test_convert_checkpoint_to_hf.py).
Runs on CPU or GPU.
Exit codes: 0 ok, 1 failure, 2 invalid arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nemo_finetune.checkpoints import (
    ADAPTER_META,
    attention_head_dim,
    checkpoint_damage,
    find_checkpoint,
    is_lora_checkpoint,
    is_nemo_checkpoint,
    read_adapter_tensors,
    warn_damaged_adapters,
)
from nemo_finetune.cli import parse_dataclass_args, run_cli
from nemo_finetune.console import library_logs_through_ours, prints_as_library_records, setup_logging
from nemo_finetune.errors import ConfigError, PipelineError
from nemo_finetune.files import atomic_dir, atomic_write_text, overlap_problems, remove_leftovers, space_problem
from nemo_finetune.fingerprints import digest, digests, legacy_heads
from nemo_finetune.layout import RunLayout
from nemo_finetune.records import output_files

log = logging.getLogger("peft_megatron.export")

VERIFY_MAX_PARAMS = 2e9
EXPORT_LOCK_TIMEOUT_S = 6 * 3600  # an export of a 70B model can take an hour; a second export waits for it
VERIFY_PROMPT_TOKENS = 24
# NeMo LoRA target -> the HF (Llama layout) projections it covers
HF_TARGETS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
HF_MODULE = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass
class ExportConfig:
    nemo_logs_dir: str | None = field(
        default=None, metadata={"help": "training run's nemo_logs dir: export its best val_loss checkpoint, else last"}
    )
    nemo_checkpoint_path: str | None = field(
        default=None, metadata={"help": "an explicit NeMo checkpoint (LoRA, full fine-tuned, or imported base)"}
    )
    no_merge: bool = field(default=False, metadata={"help": "export the LoRA adapter alone in HF PEFT format"})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "default: nemo_logs/exports/<checkpoint>.hf_model (.hf_peft with --no_merge) for a run's "
            "checkpoint, else beside the checkpoint"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})
    verify: bool | None = field(
        default=None, metadata={"help": "check the export against a second path (default: on below 2B parameters)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom code from the model repository"})
    log_level: str = field(default="INFO", metadata={"help": "logging level"})


def validate(cfg: ExportConfig) -> None:
    problems = []
    if (cfg.nemo_logs_dir is None) == (cfg.nemo_checkpoint_path is None):
        problems.append("give exactly one of --nemo_logs_dir (search a training run) or --nemo_checkpoint_path")
    if cfg.output_dir and Path(cfg.output_dir).is_file():
        problems.append(f"--output_dir {cfg.output_dir} is a file; give a directory path (an export is a directory)")
    if problems:
        raise ConfigError(problems)


def resolve_checkpoint(cfg: ExportConfig) -> Path:
    if cfg.nemo_logs_dir is not None:
        ckpt = find_checkpoint(Path(cfg.nemo_logs_dir))
        log.info("exporting %s", ckpt)
        return ckpt
    ckpt = Path(cfg.nemo_checkpoint_path)
    if not ckpt.exists():
        raise PipelineError(f"--nemo_checkpoint_path {ckpt} does not exist; train with peft_megatron.py first")
    if not is_nemo_checkpoint(ckpt):
        if (ckpt / "context").is_dir() or (ckpt / "weights").is_dir():
            raise PipelineError(
                f"{ckpt} is a half-written NeMo checkpoint (context/ or weights/metadata.json missing); use another "
                "checkpoint of the run, or re-run the training (or import) that writes it"
            )
        raise PipelineError(
            f"{ckpt} is not a NeMo checkpoint (no context/ and weights/); pass a checkpoint directory written by "
            "peft_megatron.py, e.g. .../nemo_logs/checkpoints/<name>, or --nemo_logs_dir"
        )
    damage = checkpoint_damage(ckpt)
    if damage:
        raise PipelineError(
            f"{ckpt} is damaged: {damage}; export another checkpoint of the run (e.g. its -last "
            "one), or re-run the training that writes it"
        )
    return ckpt


def base_checkpoint(ckpt: Path) -> Path:
    meta = json.loads((ckpt / "weights" / ADAPTER_META).read_text())
    base = Path(meta["model_ckpt_path"])
    if not is_nemo_checkpoint(base):
        raise PipelineError(
            f"the LoRA checkpoint {ckpt} was trained on base {base}, which is missing or incomplete; re-create it "
            "with `python peft_megatron.py --import_only ...` (same --nemo_ckpt_dir) first"
        )
    return base


# --------------------------------------------------------------------------------------------------------------------
# What an export was made from
# --------------------------------------------------------------------------------------------------------------------
EXPORT_RECORD = ".peft_megatron_export.json"  # written last into every export


def export_source(ckpt: Path, base: Path | None, kind: str) -> dict:
    """What an export is made from: the checkpoint (and a LoRA checkpoint's base), by the content of every file."""
    content = {"checkpoint": digests(ckpt), "base": digests(base) if base else None}
    return {
        "checkpoint": str(ckpt.resolve()),
        "kind": kind,
        "fingerprint": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
    }


def legacy_fingerprint(ckpt: Path, base: Path | None) -> str:
    """The fingerprint records written before whole-file digests hold (each file's size and first MiB)."""
    content = {"checkpoint": legacy_heads(ckpt), "base": legacy_heads(base) if base else None}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_export_record(out: Path, source: dict) -> None:
    """Written last: what the export was made from and the content digest of each file it holds."""
    files = {
        str(p.relative_to(out)): digest(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != EXPORT_RECORD
    }
    atomic_write_text(out / EXPORT_RECORD, json.dumps({**source, "files": files}, indent=2) + "\n")


def not_an_export(out: Path) -> bool:
    """True when `out` holds files but no export record of this script (a directory it must never replace)."""
    if not out.is_dir() or not any(out.iterdir()):
        return False
    try:
        record = json.loads((out / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return True
    return not (
        isinstance(record, dict) and isinstance(record.get("files"), dict) and {"kind", "fingerprint"} <= set(record)
    )


def is_current_export(out: Path, source: dict, ckpt: Path, base: Path | None) -> bool:
    """True when the directory `out` is a complete, unchanged export of `source`; False when nothing is there to keep
    (absent, or empty, which is removed); a PipelineError naming the fix for anything else."""
    if not out.exists():
        return False
    if not any(out.iterdir()):
        out.rmdir()
        return False
    overwrite = "pass --overwrite to replace it, or choose another --output_dir"
    if not_an_export(out):
        raise PipelineError(
            f"--output_dir {out} holds files this script did not write (no readable {EXPORT_RECORD}), which it "
            "leaves alone: choose another --output_dir"
        )
    record = json.loads((out / EXPORT_RECORD).read_text())
    files, kind, fingerprint = dict(record["files"]), record["kind"], record["fingerprint"]
    legacy = all(isinstance(recorded, int) for recorded in files.values())  # sizes alone: an older record
    changed = next((name for name, recorded in files.items() if _file_changed(out / name, recorded)), None)
    if changed:
        raise PipelineError(f"{out} is a damaged export ({changed} is missing or its content has changed); {overwrite}")
    if legacy and kind == source["kind"] and fingerprint == legacy_fingerprint(ckpt, base):
        log.info("%s: recording the content digests of the export and its checkpoint (an older record)", out)
        write_export_record(out, {**{k: v for k, v in record.items() if k != "files"}, **source})
        return True
    if (kind, fingerprint) != (source["kind"], source["fingerprint"]):
        raise PipelineError(
            f"{out} holds a {kind} export of {record.get('checkpoint')}, not a {source['kind']} export "
            f"of {source['checkpoint']} as it is now; {overwrite}"
        )
    return True


def _file_changed(path: Path, recorded) -> bool:
    """Whether an export's file differs from its record: a digest, or (records before digests) a size."""
    if not path.is_file():
        return True
    if isinstance(recorded, int):
        return path.stat().st_size != recorded
    return digest(path) != recorded


# --------------------------------------------------------------------------------------------------------------------
# NeMo calls (CPU or GPU)
# --------------------------------------------------------------------------------------------------------------------
def export_hf(nemo_ckpt: Path, out: Path, env) -> None:
    """`llm.export_ckpt(target="hf")` of a full (or merged) checkpoint into `out` (must not exist)."""
    from nemo.collections import llm

    from nemo_finetune import compat

    with compat.cpu_checkpoint_io(env), prints_as_library_records("nemo.export_ckpt"):  # "✓ exported to <tmp>"
        llm.export_ckpt(path=nemo_ckpt, target="hf", output_path=out, overwrite=True)
    fix_special_token_ids(nemo_ckpt, out)


def fix_special_token_ids(nemo_ckpt: Path, out: Path) -> None:
    """NeMo's Qwen3 exporter writes Qwen's default bos/eos ids into config.json whatever the tokenizer is; take them
    from the checkpoint's generation config (or tokenizer) so generate() stops where the model was trained to."""
    from transformers import AutoTokenizer

    gen = nemo_ckpt / "context" / "artifacts" / "generation_config.json"
    generation = json.loads(gen.read_text()) if gen.exists() else {}
    tok = AutoTokenizer.from_pretrained(out)
    tokenizer_ids = {
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key, value in tokenizer_ids.items():
        config[key] = generation.get(key, value)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_in_hf(base_hf: Path, adapter_dir: Path, out: Path) -> None:
    """Merge the exported adapter into the exported base in float32 with PEFT, then save in the base's dtype.

    NeMo 2.7.3's merge_lora merges in bf16 and its merged checkpoint then fails to export (norms stay float32 while
    the exporter builds a bf16 target: "dtype mismatch between source and target state dicts"); merging the two
    exact exports in HF space avoids both."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = getattr(AutoConfig.from_pretrained(base_hf), "torch_dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_hf).save_pretrained(out)
    if (base_hf / "generation_config.json").exists():
        GenerationConfig.from_pretrained(base_hf).save_pretrained(out)


def lora_settings(ckpt: Path) -> dict:
    from nemo.lightning.io import load_context

    lora = load_context(ckpt / "context", subpath="model.model_transform")
    cfg = load_context(ckpt / "context", subpath="model.config")
    return {
        "dim": lora.dim,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": attention_head_dim(cfg),
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_layers": cfg.num_layers,
        "gated": bool(getattr(cfg, "gated_linear_unit", False)),
    }


# --------------------------------------------------------------------------------------------------------------------
# NeMo fused LoRA -> HF PEFT (the generic exporter NeMo 2.7.3 lacks for Qwen3/Qwen2/Mistral)
# --------------------------------------------------------------------------------------------------------------------
def split_qkv_rows(t, num_heads: int, num_groups: int, head_dim: int):
    """Megatron interleaves QKV rows per query group ([q heads of g, k_g, v_g] for each g); return q, k, v."""
    per_group = num_heads // num_groups
    t = t.reshape(num_groups, (per_group + 2) * head_dim, *t.shape[1:])
    q = t[:, : per_group * head_dim].reshape(num_heads * head_dim, *t.shape[2:])
    k = t[:, per_group * head_dim : (per_group + 1) * head_dim].reshape(num_groups * head_dim, *t.shape[2:])
    v = t[:, (per_group + 1) * head_dim :].reshape(num_groups * head_dim, *t.shape[2:])
    return q, k, v


def nemo_lora_to_peft(adapter: dict, settings: dict) -> dict:
    """Map NeMo LoRA tensors (layers stacked on dim 0, as torch_dist stores them) to PEFT's per-projection names.

    A fused target shares one `linear_in` (A) across its projections, so each projection gets the same lora_A and its
    rows of `linear_out` (B): B_q A, B_k A, B_v A reproduce (B A) exactly; likewise gate/up for linear_fc1."""
    out = {}
    for key, tensor in adapter.items():
        parts = key.split(".")
        target = next((p for p in parts if p in HF_TARGETS), None)
        if target is None or not key.endswith((".linear_in.weight", ".linear_out.weight")):
            raise PipelineError(f"unexpected adapter tensor {key}: only LoRA on {sorted(HF_TARGETS)} is exportable")
        is_a = key.endswith(".linear_in.weight")
        for layer in range(tensor.shape[0]):
            w = tensor[layer]
            if is_a:
                pieces = {proj: w for proj in HF_TARGETS[target]}
            elif target == "linear_qkv":
                q, k, v = split_qkv_rows(
                    w, settings["num_attention_heads"], settings["num_query_groups"], settings["head_dim"]
                )
                pieces = {"q_proj": q, "k_proj": k, "v_proj": v}
            elif target == "linear_fc1" and settings["gated"]:
                gate, up = w.chunk(2, dim=0)
                pieces = {"gate_proj": gate, "up_proj": up}
            else:
                pieces = {HF_TARGETS[target][0]: w}
            for proj, weight in pieces.items():
                name = (
                    f"base_model.model.model.layers.{layer}.{HF_MODULE[proj]}.{proj}.lora_{'A' if is_a else 'B'}.weight"
                )
                out[name] = weight.contiguous().clone()
    return out


def adapter_config(settings: dict, base_model: str) -> dict:
    targets = sorted({proj for t in settings["target_modules"] for proj in HF_TARGETS.get(t, ())})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings["dim"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }


def export_adapter(lora_ckpt: Path, out: Path, base_model: str) -> None:
    from safetensors.torch import save_file

    settings = lora_settings(lora_ckpt)
    unsupported = sorted(set(settings["target_modules"]) - set(HF_TARGETS))
    if unsupported:
        raise PipelineError(f"LoRA targets {unsupported} have no HF PEFT equivalent; export merged instead")
    adapter = read_adapter_tensors(lora_ckpt)
    warn_damaged_adapters(lora_ckpt, log, "the export holds them as they are", adapter)
    tensors = nemo_lora_to_peft(adapter, settings)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(settings, base_model), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------------------------
def reference_logits(model_dir: Path, adapter_dir: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_finetune.compat.fixes import without_module_name_warning

    with without_module_name_warning():  # a checkpoint's directory name is no Python identifier; nothing is imported
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, VERIFY_PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def verify_pair(merged_dir: Path, base_dir: Path, adapter_dir: Path) -> float:
    """max |logits(merged) - logits(PeftModel(base, adapter))|, with a bf16-merge tolerance."""
    merged = reference_logits(merged_dir)
    peft = reference_logits(base_dir, adapter_dir)
    diff = float((merged - peft).abs().max())
    scale = float(merged.abs().max())
    log.info("verify: max |merged - base+adapter| logit diff %.3e (logit scale %.2f)", diff, scale)
    # NeMo merges in bf16; a wrong mapping shows as differences of the order of the logits themselves.
    if not diff <= 2e-2 * max(1.0, scale):
        raise PipelineError(f"verification failed: merged export and base+adapter differ by {diff:.3e} in logits")
    return diff


def model_tensors(nemo_ckpt: Path) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each of the model's own tensors in a checkpoint, from its metadata alone: the
    `module.` entries, not the optimizer state a training checkpoint also holds."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(nemo_ckpt / "weights")).read_metadata()
    tensors = []
    for key, meta in md.state_dict_metadata.items():
        size, dtype = getattr(meta, "size", None), getattr(getattr(meta, "properties", None), "dtype", None)
        if key.startswith("module.") and size is not None and dtype is not None:
            tensors.append((math.prod(size), dtype.itemsize))
    return tensors


def parameter_count(nemo_ckpt: Path) -> int:
    return sum(n for n, _ in model_tensors(nemo_ckpt))


def export_size(kind: str, ckpt: Path, base: Path | None, verify: bool) -> int:
    """Bytes an export writes beside --output_dir at its peak, about: the HF weights in the checkpoint's dtype (a
    merge also exports its base into a scratch directory first; an adapter's check merges one), and 1% + 16 MB for
    the tokenizer and configuration files."""

    def weights(c: Path) -> int:
        return sum(n * itemsize for n, itemsize in model_tensors(c))

    own = weights(ckpt)
    if kind == "merged" or (kind == "adapter" and verify):
        own += 2 * weights(base)
    return int(own * 1.01) + (16 << 20)


# --------------------------------------------------------------------------------------------------------------------
def default_export_path(ckpt: Path, suffix: str) -> Path:
    """<run>/nemo_logs/exports/<checkpoint name><suffix> for a training run's checkpoint, else beside it.

    Never inside checkpoints/: NeMo's ModelCheckpoint treats every directory there as a checkpoint, parses
    `val_loss=` out of its name and, on a resumed run, deletes the surplus over save_top_k - an export named after
    the best checkpoint competes with it (a resumed run then fails)."""
    run = RunLayout.of_checkpoint(ckpt)
    if run is not None:
        return run.exports / (ckpt.name + suffix)
    if ckpt.parent.name == "checkpoints":  # another NeMoLogger's run: the same layout under its own name
        return ckpt.parent.parent / "exports" / (ckpt.name + suffix)
    return ckpt.with_name(ckpt.name + suffix)


def export(cfg: ExportConfig) -> Path:
    ckpt = resolve_checkpoint(cfg)
    kind = export_kind(ckpt, cfg.no_merge)
    out = Path(cfg.output_dir) if cfg.output_dir else default_export_path(ckpt, EXPORT_SUFFIX[kind])
    base = None if kind == "full" else base_checkpoint(ckpt)
    inputs = [("the checkpoint", ckpt)] + ([("its base checkpoint", base)] if base else [])
    problems = overlap_problems([("--output_dir", out)], inputs, "the export would replace or change it")
    if problems:
        raise ConfigError(problems)
    source = export_source(ckpt, base, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two exports into one --output_dir take turns; the second then finds the first one's export.
    with output_files(out).locked(EXPORT_LOCK_TIMEOUT_S, "export"):
        if cfg.overwrite and not_an_export(out):
            raise PipelineError(
                f"--output_dir {out} holds files this script did not write (no readable {EXPORT_RECORD}); "
                "--overwrite replaces only an export: move them away yourself, or choose another --output_dir"
            )
        if not cfg.overwrite and is_current_export(out, source, ckpt, base):
            log.info("%s already holds this export; keeping it (pass --overwrite to replace it)", out)
            print(f"export already present: {out}")
            return out
        remove_leftovers(out, "export", ("work.*", "*.partial"))
        _write_export(cfg, kind, ckpt, base, source, out)
    print(f"exported {ckpt} -> {out}")
    return out


EXPORT_SUFFIX = {"full": ".hf_model", "merged": ".hf_model", "adapter": ".hf_peft"}


def export_kind(ckpt: Path, no_merge: bool) -> str:
    """full: a fully fine-tuned checkpoint; merged: LoRA merged into its base; adapter: LoRA alone (HF PEFT)."""
    lora = is_lora_checkpoint(ckpt)
    if no_merge and not lora:
        raise PipelineError(f"--no_merge exports a LoRA adapter, but {ckpt} holds full weights; drop --no_merge")
    return "adapter" if no_merge else "merged" if lora else "full"


def _write_export(cfg: ExportConfig, kind: str, ckpt: Path, base: Path | None, source: dict, out: Path) -> None:
    from nemo_finetune import compat

    verify = cfg.verify if cfg.verify is not None else parameter_count(base or ckpt) < VERIFY_MAX_PARAMS
    problem = space_problem("--output_dir", out, export_size(kind, ckpt, base, verify), f"the {kind} export")
    if problem:  # before the minutes of work a full disk would end with
        raise PipelineError(problem)
    env = compat.prepare_process()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work.") as work:
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            WRITERS[kind](ckpt, base, tmp, Path(work), env, verify)
            write_export_record(tmp, source)


def write_full(ckpt: Path, base: None, out: Path, work: Path, env, verify: bool) -> None:
    export_hf(ckpt, out, env)
    if verify:
        verify_loads(out)


def write_merged(ckpt: Path, base: Path, out: Path, work: Path, env, verify: bool) -> None:
    base_hf, adapter = work / "base_hf", work / "adapter"
    export_hf(base, base_hf, env)
    adapter.mkdir()
    export_adapter(ckpt, adapter, base_model=str(base_hf))
    merge_in_hf(base_hf, adapter, out)
    if verify:
        verify_pair(out, base_hf, adapter)


def write_adapter(ckpt: Path, base: Path, out: Path, work: Path, env, verify: bool) -> None:
    export_adapter(ckpt, out, base_model=str(base))
    if verify:  # merge in a scratch directory, only to compare logits
        base_hf, merged = work / "base_hf", work / "merged"
        export_hf(base, base_hf, env)
        merge_in_hf(base_hf, out, merged)
        verify_pair(merged, base_hf, out)


WRITERS = {"full": write_full, "merged": write_merged, "adapter": write_adapter}


def verify_loads(out: Path) -> None:
    logits = reference_logits(out)
    if not bool(logits.isfinite().all()):
        raise PipelineError(f"verification failed: {out} produces non-finite logits")
    log.info("verify: %s loads with transformers and gives finite logits", out)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_dataclass_args(ExportConfig, argv, __doc__)
    setup_logging(cfg.log_level)
    validate(cfg)
    library_logs_through_ours()
    export(cfg)
    return 0


def cli() -> None:
    """The console entry point of an installed copy (pyproject.toml), the same as running this file."""
    run_cli(main)


if __name__ == "__main__":
    cli()
