"""Loss parity with Hugging Face transformers + PEFT: the same weights, data and micro-batches on both sides.

Forward parity (CPU, fp32; `tests/test_parity.py` runs it for Qwen3 and Llama, plain, --chat and --packed_sequence):
the loss of the first micro-batch a training job takes, before any update. Our side is the job itself: the model
peft_megatron's recipe builds (its layer spec and config overrides) holding the weights of the project's HF -> NeMo
import, and the micro-batch NeMo's training dataloader yields from the JSONL dataset_module prepared (its sample
order, template, loss mask, EOS, padding and packing). The reference side reads the same rows from that JSONL and
builds its batch as HF + TRL users do (`reference_batch`), independently of NeMo: the tokenizer's own special
tokens, prompt and completion tokenized together, the loss on the completion and EOS, right padding.

Conventions that differ on purpose (docs/PARITY.md gives their effect on the loss):
- plain rows: NeMo's template is "{input} {output}", so the completion starts with a space (TRL joins prompt and
  completion as given); the reference here uses the same joint.
- --chat: NeMo appends EOS after the chat template's last token when that is not EOS already (so that generation
  stops at EOS); TRL does not. Both put the loss on every token of the conversation (TRL's default
  assistant_only_loss=False). The reference adds NeMo's EOS when `nemo_chat_eos` is set.

    python benchmarks/parity.py forward --hf_model DIR --data_dir DIR --recipe qwen3_600m [--chat] [--packed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {"qwen3": "qwen3_600m", "llama": "llama32_1b"}  # small recipes of each family; the model's own config wins


# --------------------------------------------------------------------------------------------------------------------
# The reference side: HF + TRL's conventions, written from their documentation, not from NeMo's code
# --------------------------------------------------------------------------------------------------------------------
def reference_ids(row: dict, tokenizer, nemo_chat_eos: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, labels with -100 where no loss) of one prepared row, as TRL's SFTTrainer builds them.

    Plain rows {"input", "output"}: prompt = input, completion = " " + output + EOS, tokenized together with the
    tokenizer's special tokens (a BOS where it adds one); the loss on the completion. Chat rows {"messages"}: the
    chat template's tokens, the loss on all of them (TRL's default), plus EOS if `nemo_chat_eos` (NeMo's convention)."""
    if "messages" in row:
        ids = list(tokenizer.apply_chat_template(row["messages"], tokenize=True))
        if nemo_chat_eos and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)
    prompt = tokenizer(row["input"])["input_ids"]
    ids = tokenizer(row["input"] + " " + row["output"])["input_ids"] + [tokenizer.eos_token_id]
    if ids[: len(prompt)] != prompt:
        raise ValueError(f"the prompt's tokens change when the completion follows it: {row}")
    return ids, [-100] * len(prompt) + ids[len(prompt) :]


def reference_batch(rows: list[dict], tokenizer, nemo_chat_eos: bool = True) -> dict:
    """Right-padded input_ids / attention_mask / labels of `rows` (HF models shift the labels themselves)."""
    import torch

    pairs = [reference_ids(r, tokenizer, nemo_chat_eos) for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in pairs]),
    }


def reference_loss(model, batch: dict) -> tuple[float, int]:
    """(mean token loss, loss tokens) of an HF causal LM on `batch`, as the Trainer computes it for one step."""
    import torch

    with torch.no_grad():
        loss = model(**batch).loss
    return float(loss), int((batch["labels"][:, 1:] != -100).sum())


# --------------------------------------------------------------------------------------------------------------------
# Our side: the training job's model and its first micro-batch
# --------------------------------------------------------------------------------------------------------------------
def job_config(hf_model: Path, nemo_ckpt: Path, data_dir: Path, recipe: str, **flags):
    """peft_megatron's Config of a one-GPU job on this model and data (the flags a user gives)."""
    import peft_megatron

    return peft_megatron.Config(
        hf_model_id=str(hf_model),
        recipe_cls_name=recipe,
        nemo_ckpt_dir=str(nemo_ckpt),
        data_dir=str(data_dir),
        output_dir=str(data_dir.parent / "run"),
        gpus_per_node=1,
        tensor_parallel_size=1,
        **flags,
    )


def first_micro_batch(config) -> tuple[dict, list[int] | None]:
    """NeMo's first training micro-batch of the job (one GPU) and the prepared training rows it holds, in order
    (None when packed: a packed row's samples are found by their tokens). Megatron's sampler gives the first
    micro-batch the positions 0..micro_batch_size-1 of the training dataset's order."""
    dataset = train_dataset(config)
    positions = range(config.micro_batch_size)
    batch = dataset.collate_fn([dataset[i] for i in positions])
    rows = None if config.packed_sequence else [int(dataset.samples_mapping[i][0]) for i in positions]
    return batch, rows


def train_dataset(config):
    """The dataset the job's train dataloader builds: the project's data module, max_num_samples = ceil(global
    batch x max_steps x 1.005), NeMo's seeded sample order (packed rows with --packed_sequence)."""
    import fiddle as fdl

    from nemo_finetune.recipe import configure_data

    module = fdl.build(configure_data(config))
    packed = config.packed_sequence
    if packed:
        module.prepare_packed()
    return module._create_dataset(
        module.train_path_packed if packed else module.train_path,
        pack_metadata_path=module.pack_metadata if packed else None,
        max_num_samples=int(math.ceil(config.global_batch_size * config.max_steps * 1.005)),
        sanity_check_dist_workers=False,  # a CUDA all-reduce that checks the ranks agree; one process here
        **module.dataset_kwargs,
    )


def packed_samples(batch: dict) -> list[list[int]]:
    """The token ids of each sample in a packed micro-batch: cu_seqlens (up to cu_seqlens_argmin, then padding)
    split the row, the last span past token_count being the padding to the row's length; a sample's tokens lack
    its last id, which is its last position's label."""
    tokens, labels = batch["tokens"].flatten().tolist(), batch["labels"].flatten().tolist()
    bounds = batch["cu_seqlens"].flatten().tolist()[: int(batch["cu_seqlens_argmin"].flatten()[0])]
    real = int(batch["token_count"][0])
    return [
        tokens[start:end] + [labels[end - 1]] for start, end in zip(bounds[:-1], bounds[1:], strict=True) if end <= real
    ]


def job_model(config):
    """The model a training worker of `config` builds (recipe model config, layer spec, overrides), fp32 on the
    CPU, holding the weights of the job's imported checkpoint."""
    import fiddle as fdl
    from nemo.lightning import _strategy_lib
    from nemo.lightning.io.connector import ModelConnector

    from nemo_finetune import compat
    from nemo_finetune.recipe import configure_recipe

    env = compat.prepare_process()
    with compat.cpu_checkpoint_io(env):  # also sets up Megatron's (one-process) parallel state
        imported, _ = ModelConnector.nemo_load(None, config.nemo_ckpt_path, cpu=True)
    lightning_module = fdl.build(configure_recipe(config, env).model)
    with _strategy_lib.megatron_cpu_init_context(lightning_module.config):
        lightning_module.configure_model()
    model = lightning_module.module
    weights = imported.module.state_dict()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"the imported weights do not fit the job's model: missing {missing}, extra {unexpected}")
    return model.float().eval()


def job_loss(model, batch: dict) -> tuple[float, int]:
    """(mean token loss, loss tokens) of one micro-batch as a training step computes it: NeMo's forward step and
    masked-token loss reduction (sum over loss tokens / their count)."""
    import torch
    from nemo.collections.llm.gpt.model.base import gpt_forward_step
    from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

    # Megatron's RoPE moves its frequencies to torch.cuda.current_device(): the CPU, where this model is.
    with torch.no_grad(), mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        out = gpt_forward_step(model, batch)
        loss_sum, tokens, _ = MaskedTokenLossReduction().forward(batch, out)
    return float(loss_sum / tokens), int(tokens)


def reference_rows_of(config, batch: dict, rows: list[int] | None, tokenizer) -> list[dict]:
    """The prepared training rows of our micro-batch: by index, or for a packed row by matching each sample's
    tokens with a row's reference tokens (a sample no row tokenizes to is itself a parity failure)."""
    prepared = [json.loads(line) for line in open(config.data_path / "training.jsonl", encoding="utf-8")]
    if rows is not None:
        return [prepared[i] for i in rows]
    by_tokens = {tuple(reference_ids(r, tokenizer)[0]): r for r in prepared}
    found = []
    for sample in packed_samples(batch):
        row = by_tokens.get(tuple(sample))
        if row is None:
            raise AssertionError(f"a packed sample's tokens are no prepared row's reference tokens: {sample}")
        found.append(row)
    return found


def forward_parity(config) -> dict:
    """Our first micro-batch's loss and the reference's on the same rows, with the HF model the job imported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch, rows = first_micro_batch(config)
    ours, ours_tokens = job_loss(job_model(config), batch)
    tokenizer = AutoTokenizer.from_pretrained(config.hf_model_id)
    reference_rows = reference_rows_of(config, batch, rows, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(config.hf_model_id, dtype=torch.float32).eval()
    reference, reference_tokens = reference_loss(model, reference_batch(reference_rows, tokenizer))
    return {
        "ours": ours,
        "reference": reference,
        "relative_difference": abs(ours - reference) / abs(reference),
        "loss_tokens": {"ours": ours_tokens, "reference": reference_tokens},
        "rows": len(reference_rows),
    }


# --------------------------------------------------------------------------------------------------------------------
# Training-curve parity (GPU, bf16): our training run against HF + PEFT / HF, step for step
# --------------------------------------------------------------------------------------------------------------------
# Qwen3-0.6B's layer (16 query heads, 8 KV heads of 128, FFN 3072) in 16 layers: 252M parameters, random weights.
CURVE_SHAPE = dict(num_layers=16, hidden_size=1024, num_heads=16, num_kv_heads=8, intermediate_size=3072)
BATCH = 8  # rows per step: one micro-batch, so NeMo's per-micro-batch mean and HF's token mean are one value
OPTIMIZER = dict(weight_decay=0.1, betas=(0.9, 0.98), eps=1e-5)  # NeMo's fine-tuning recipe's Adam
MAX_GRAD_NORM = 1.0
LORA_DIM, LORA_ALPHA = 32, 64
VAL_BATCHES = 4


@dataclass(frozen=True)
class CurveCase:
    mode: str  # "lora" or "full"
    steps: int
    learning_rate: float
    warmup_steps: int


CURVES = {"lora": CurveCase("lora", 100, 1e-3, 10), "full": CurveCase("full", 30, 1e-5, 5)}


def nemo_lr(step: int, case: CurveCase, min_lr: float = 0.0) -> float:
    """NeMo's CosineAnnealing with linear warm-up at optimizer step `step` (0-based): max x (s+1)/(w+1) up to step
    w, then a cosine from max to min_lr over the remaining steps (nemo/core/optim/lr_scheduler.py)."""
    if case.warmup_steps > 0 and step <= case.warmup_steps:
        return case.learning_rate * (step + 1) / (case.warmup_steps + 1)
    progress = (step - case.warmup_steps) / (case.steps - case.warmup_steps)
    return (case.learning_rate - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)) + min_lr


def curve_workspace(root: Path, family: str) -> dict:
    """The tokenizer (with a Llama-3-style BOS for llama), the random-init model and the recall dataset."""
    from nemo_finetune.demo_assets import build_hf_model, build_tokenizer, recall_rows

    rows = recall_rows(num_keys=96)
    tokenizer = build_tokenizer(root / "tokenizer", [f"{r['question']} {r['answer']}" for r in rows] * 4)
    if family == "llama":
        tokenizer = with_bos(tokenizer, root / "tokenizer_bos")
    model = build_hf_model(root / f"{family}_model", tokenizer, family, seed=3, **CURVE_SHAPE)
    data = root / "recall.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "data": data}


def with_bos(tokenizer_dir: Path, out: Path, bos: str = "<|begin_of_text|>") -> Path:
    """A copy of a tokenizer that starts text with a BOS token, as Llama 3's does (its chat template writes it too)."""
    if (out / "tokenizer_config.json").exists():
        return out
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": bos})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(out)
    return out


def job_flags(ws: dict, family: str, case: CurveCase, out: Path, steps: int, seed: int) -> list[str]:
    """peft_megatron.py's flags for the case: one GPU, `steps` steps of 8 rows, validation (and a checkpoint) at
    the end, the loss and learning rate of every step in TensorBoard."""
    flags = [
        "--hf_model_id", str(ws["model"]), "--recipe_cls_name", RECIPES[family],
        "--dataset_name", str(ws["data"]), "--input_column", "question", "--output_column", "answer",
        "--val_fraction", "0.1", "--seed", str(seed),
        "--output_dir", str(out), "--data_dir", str(ws["root"] / f"{family}_data"),
        "--nemo_ckpt_dir", str(ws["root"] / f"{family}_nemo"),
        "--gpus_per_node", "1", "--tensor_parallel_size", "1",
        "--max_steps", str(steps), "--val_check_interval", str(steps), "--limit_val_batches", str(VAL_BATCHES),
        "--log_every_n_steps", "1", "--micro_batch_size", str(BATCH), "--global_batch_size", str(BATCH),
        "--max_seq_length", "64", "--learning_rate", str(case.learning_rate),
        "--warmup_steps", str(min(case.warmup_steps, steps)), "--weight_decay", str(OPTIMIZER["weight_decay"]),
        "--max_grad_norm", str(MAX_GRAD_NORM), "--save_weights_only", "--no_resume",
    ]  # fmt: skip
    if case.mode == "full":
        return flags + ["--full_ft"]
    return flags + ["--lora_dim", str(LORA_DIM), "--lora_alpha", str(LORA_ALPHA)]


class ScriptFailed(Exception):
    """A project script exited non-zero; the message ends with its log's last lines."""


def run_script(*args: str, log: Path, tail_lines: int = 40) -> None:
    """A project script as a user runs it; its output goes to `log`. A failure raises ScriptFailed with the log's
    last lines (a run on a remote machine may leave the file behind)."""
    import subprocess

    with open(log, "w") as fh:
        result = subprocess.run([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        # A failed training run's last line is its own reason (nemo_finetune/failures.py), a kernel assertion first.
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-tail_lines:])
        raise ScriptFailed(f"{' '.join(args[:2])} failed (exit {result.returncode}); the end of {log}:\n{tail}")


def our_curve(flags: list[str], out: Path) -> dict:
    """Train with peft_megatron.py and read back its per-step loss and learning rate and its final val_loss."""
    from nemo_finetune.report import read_scalars

    run_script(str(REPO / "peft_megatron.py"), *flags, log=out.with_suffix(".log"))
    scalars = read_scalars(out)
    val = scalars["val_loss"]
    return {
        "loss": [scalars["reduced_train_loss"][s] for s in sorted(scalars["reduced_train_loss"])],
        "lr": [scalars["lr"][s] for s in sorted(scalars["lr"])],
        "val_loss": val[max(val)],
    }


def initial_adapter(ws: dict, family: str, case: CurveCase, seed: int) -> Path:
    """The LoRA adapters our run starts from, in HF PEFT format: a one-step run with the same seed builds the same
    adapters (A random, B zero); its step leaves A unchanged but for weight decay's 1 - lr x 0.1 (B = 0 gives A no
    gradient), which bf16 cannot hold, and the project's adapter export writes them out. B is zeroed on load."""
    out = ws["root"] / f"{family}_init"
    run_script(str(REPO / "peft_megatron.py"), *job_flags(ws, family, case, out, 1, seed), log=out.with_suffix(".log"))
    adapter = ws["root"] / f"{family}_init_adapter"
    export = [str(REPO / "convert_checkpoint_to_hf.py"), "--nemo_logs_dir", str(out / "nemo_logs"), "--no_merge"]
    run_script(*export, "--output_dir", str(adapter), log=adapter.with_suffix(".log"))
    return adapter


def training_order(flags: list[str]) -> tuple[object, list[int]]:
    """The job's Config and the prepared training rows its steps take, in order (NeMo's sample order)."""
    import peft_megatron

    config = peft_megatron.parse_config(flags)
    dataset = train_dataset(config)
    rows = config.global_batch_size * config.max_steps
    return config, [int(dataset.samples_mapping[i][0]) for i in range(rows)]


def reference_model(ws: dict, case: CurveCase, adapter: Path | None, attention: str = "sdpa"):
    """HF + PEFT with our initial adapters (bf16 base, fp32 adapters, PEFT's default), one A shared by q/k/v and by
    gate/up as in NeMo's fused linear layers; or, for full fine-tuning, the HF model in fp32 under bf16 autocast.

    Both start from the weights our run starts from: the import holds them in bf16 (the recipe's params_dtype), so
    the full fine-tuning reference's fp32 master weights are the bf16 values too, as Megatron's fp32 main params are
    (a model saved in fp32 would otherwise give the reference master weights between bf16's steps, where updates far
    below one step flip the rounding that Megatron's first steps leave unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.bfloat16, attn_implementation=attention)
    if case.mode == "full":
        return base.float().to(device)
    from peft import PeftModel

    base = base.to(device)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    for layer in model.base_model.model.model.layers:
        fused = ((layer.self_attn, "q_proj", ("k_proj", "v_proj")), (layer.mlp, "gate_proj", ("up_proj",)))
        for owner, first, others in fused:
            shared = getattr(owner, first).lora_A["default"]
            for name in others:
                if not torch.equal(getattr(owner, name).lora_A["default"].weight, shared.weight):
                    raise AssertionError(f"the exported adapter's {name} A differs from {first}'s")
                getattr(owner, name).lora_A["default"] = shared
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    return model


def reference_curve(
    ws: dict, case: CurveCase, config, order: list[int], adapter: Path | None, attention: str = "sdpa"
) -> dict:
    """Train the reference on our rows in our order with our optimizer settings and NeMo's schedule; `attention`:
    transformers' attention implementation (another one gives the same computation with other bf16 rounding)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ws["model"])
    rows = [json.loads(line) for line in open(config.data_path / "training.jsonl", encoding="utf-8")]
    val_rows = [json.loads(line) for line in open(config.data_path / "validation.jsonl", encoding="utf-8")]
    model = reference_model(ws, case, adapter, attention)
    params = [p for p in model.parameters() if p.requires_grad]  # a shared A once
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": OPTIMIZER["weight_decay"]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},  # NeMo: no decay on norms and biases
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=case.learning_rate, betas=OPTIMIZER["betas"], eps=OPTIMIZER["eps"], fused=True
    )
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.mode == "full")
    losses, lrs = [], []
    model.train()
    for step in range(config.max_steps):
        batch = reference_batch([rows[i] for i in order[step * BATCH : (step + 1) * BATCH]], tokenizer)
        with autocast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lr = nemo_lr(step, dataclasses.replace(case, steps=config.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        lrs.append(lr)
    return {"loss": losses, "lr": lrs, "val_loss": reference_val_loss(model, tokenizer, val_rows, autocast)}


def reference_val_loss(model, tokenizer, val_rows: list[dict], autocast) -> float | None:
    """The validation loss as NeMo's validation takes it: the first VAL_BATCHES whole batches of the validation
    split in file order, each batch's token mean, averaged."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    val = []
    with torch.no_grad(), autocast:
        batches = min(VAL_BATCHES, len(val_rows) // BATCH)
        for start in range(0, batches * BATCH, BATCH):
            batch = reference_batch(val_rows[start : start + BATCH], tokenizer)
            val.append(float(model(**{k: v.to(device) for k, v in batch.items()}).loss))
    return sum(val) / len(val) if val else None


def exported_val_loss(out: Path, case: CurveCase, config) -> float | None:
    """Our final model, exported by convert_checkpoint_to_hf.py (LoRA merged), through the reference's validation:
    where it equals the reference's val_loss and not our logged one, the two validations differ, not the models."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = out.parent / f"{out.name}_export"
    args = [str(REPO / "convert_checkpoint_to_hf.py"), "--nemo_logs_dir", str(out / "nemo_logs")]
    run_script(*args, "--output_dir", str(export), "--overwrite", log=export.with_suffix(".log"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if case.mode == "full" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(export, dtype=dtype).to(device)
    val_rows = [json.loads(line) for line in open(config.data_path / "validation.jsonl", encoding="utf-8")]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=case.mode == "full")
    return reference_val_loss(model, AutoTokenizer.from_pretrained(export), val_rows, autocast)


def compare_curves(ours: dict, reference: dict) -> dict:
    relative = [abs(a - b) / abs(b) for a, b in zip(ours["loss"], reference["loss"], strict=True)]
    return {
        "steps": len(relative),
        "max_step_relative_difference": max(relative),
        "mean_step_relative_difference": sum(relative) / len(relative),
        "val_loss_relative_difference": abs(ours["val_loss"] - reference["val_loss"]) / reference["val_loss"],
        "max_lr_difference": max(abs(a - b) for a, b in zip(ours["lr"], reference["lr"], strict=True)),
    }


def curve_parity(root: Path, family: str, mode: str, seed: int = 1234) -> dict:
    """One family and mode: our run and the reference's, with the comparison."""
    case = CURVES[mode]
    ws = curve_workspace(root, family)
    adapter = initial_adapter(ws, family, case, seed) if mode == "lora" else None
    out = root / f"{family}_{mode}"
    flags = job_flags(ws, family, case, out, case.steps, seed)
    ours = our_curve(flags, out)
    config, order = training_order(flags)
    reference = reference_curve(ws, case, config, order, adapter)
    # The noise floor: the reference against itself with eager attention instead of SDPA, the same computation with
    # other bf16 rounding, which grows through training as any two implementations' does.
    eager = reference_curve(ws, case, config, order, adapter, attention="eager")
    ours["exported_val_loss"] = exported_val_loss(out, case, config)
    return {"family": family, "mode": mode, "case": dataclasses.asdict(case), "shape": CURVE_SHAPE, "ours": ours,
            "reference": reference, "reference_eager": eager, "comparison": compare_curves(ours, reference),
            "noise_floor": compare_curves(eager, reference), "run": run_facts()}  # fmt: skip


def run_facts() -> dict:
    """Where and when a comparison ran (parity holds on any GPU; the record says which, and the GPU's UUID tells
    whether failed runs shared one card), and the training workers' shim settings where the environment changes
    them (PEFT_MEGATRON_WORKER_SKIP / _TRIAL)."""
    import datetime

    import torch

    from nemo_finetune import compat

    where = {"device": "cpu"}
    if torch.cuda.is_available():
        where = {"device": torch.cuda.get_device_name(), "gpu_uuid": str(torch.cuda.get_device_properties(0).uuid)}
    settings = (compat.WORKER_SKIP_ENV, compat.WORKER_TRIAL_ENV)
    shims = {name: os.environ[name] for name in settings if os.environ.get(name)}
    return {**where, "date": datetime.date.today().isoformat(), **shims}


def merge_curves(previous: list[dict], new: list[dict]) -> list[dict]:
    """The earlier results with each family and mode run again replaced in place, the others' order kept, the new
    ones after them."""
    fresh = {(r["family"], r["mode"]): r for r in new}
    kept = [fresh.pop((r["family"], r["mode"]), r) for r in previous]
    return kept + [r for r in new if (r["family"], r["mode"]) in fresh]


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(max(7, 5 * len(results)), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        name = "HF + PEFT" if r["mode"] == "lora" else "HF (fp32 + autocast)"
        ax.plot(r["ours"]["loss"], label="ours (NeMo)", lw=1.4)
        ax.plot(r["reference"]["loss"], label=name, lw=1.0, ls="--")
        c, noise = r["comparison"], r["noise_floor"]
        ax.set_title(
            f"{r['family']} 252M, {r['mode']}: mean step diff {c['mean_step_relative_difference']:.2%} "
            f"(HF sdpa vs eager: {noise['mean_step_relative_difference']:.2%})",
            fontsize=9,
        )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.suptitle(
        "Training loss on the key -> code recall task, ours vs the reference:\n"
        "the same weights, rows, order and optimizer (bf16, one GPU)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------------------------
# Quality parity on the demo task (GPU): exact match of our LoRA run and of HF + PEFT trained the same way, per seed
# --------------------------------------------------------------------------------------------------------------------
QUALITY_SEEDS = (1234, 1235, 1236)
SETTINGS_LEFT_OUT = ("config", "write_config", "dry_run", "import_only", "prepare_data_only", "demo")


def demo_job(root: Path, seed: int):
    """The demo's job (`demo.demo_config`: its model, data, steps, batch, LoRA and learning rate) with this seed, which
    also shapes the split; the run, its data and the shared import under `root`."""
    import peft_megatron
    from nemo_finetune import demo

    with mock.patch.object(demo, "DEMO_DIR", root / "demo"):
        config = demo.demo_config(peft_megatron.parse_config(["--demo"]))
    return dataclasses.replace(
        config,
        demo=False,
        output_dir=str(root / f"ours_{seed}"),
        data_dir=str(root / f"data_{seed}"),
        nemo_ckpt_dir=str(root / "imported"),
        data=dataclasses.replace(config.data, seed=seed),
    )


def our_quality(config, flags: tuple[str, ...] = ()) -> dict:
    """peft_megatron.py with the job's settings (`--config`) and any further `flags`, then the demo's evaluation by
    test_checkpoint.py of the checkpoint it picks (lowest val_loss)."""
    from nemo_finetune.cli import settings_yaml
    from nemo_finetune.demo import demo_evaluation_args

    settings = config.output_path.with_suffix(".yaml")
    settings.write_text(settings_yaml(config, SETTINGS_LEFT_OUT))
    run_script(
        str(REPO / "peft_megatron.py"), "--config", str(settings), *flags, log=config.output_path.with_suffix(".log")
    )
    evaluation = [str(REPO / "test_checkpoint.py"), *demo_evaluation_args(config, None, "after")]
    run_script(*evaluation, log=config.output_path.with_suffix(".evaluate.log"))
    metrics = json.loads((config.output_path / "predictions_after.metrics.json").read_text())
    return {"exact_match": metrics["exact_match"], "rouge_l": metrics["rouge_l"], "num_samples": metrics["num_samples"]}


def recipe_training(config) -> dict:
    """The optimizer, schedule and LoRA settings the job's NeMo recipe trains with (the reference takes them)."""
    from nemo_finetune.recipe import configure_recipe

    recipe = configure_recipe(config)
    optim, schedule, lora = recipe.optim.config, recipe.optim.lr_scheduler, recipe.peft
    return {
        "learning_rate": optim.lr, "weight_decay": optim.weight_decay, "betas": (optim.adam_beta1, optim.adam_beta2),
        "eps": optim.adam_eps, "max_grad_norm": optim.clip_grad, "warmup_steps": schedule.warmup_steps,
        "min_lr": schedule.min_lr, "lora_dim": lora.dim, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
    }  # fmt: skip


def reference_quality(config, seed: int) -> dict:
    """HF + PEFT trained as the job trains: its rows, steps, micro-batch, LoRA rank/alpha/dropout on every projection,
    AdamW, schedule and clipping, a validation every --val_check_interval steps whose best adapters are kept (as
    test_checkpoint.py takes the lowest-val_loss checkpoint). What an HF + PEFT user gets otherwise: PEFT's own
    initialisation under `seed`, a new shuffle of the rows each epoch, a bf16 base with fp32 adapters. Then greedy
    generation on the test split, scored by test_checkpoint.py's metrics."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_finetune import scoring

    hp = recipe_training(config)
    case = CurveCase("lora", config.max_steps, hp["learning_rate"], hp["warmup_steps"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(config.hf_model_id)
    base = AutoModelForCausalLM.from_pretrained(config.hf_model_id, dtype=torch.bfloat16).to(device)
    lora = LoraConfig(
        r=hp["lora_dim"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"], task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": hp["weight_decay"]},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=hp["learning_rate"], betas=hp["betas"], eps=hp["eps"], fused=device == "cuda",
    )  # fmt: skip
    rows = [json.loads(line) for line in open(config.data_path / "training.jsonl", encoding="utf-8")]
    val_rows = [json.loads(line) for line in open(config.data_path / "validation.jsonl", encoding="utf-8")]
    batch_size, shuffle = config.micro_batch_size, random.Random(seed)
    order: list[int] = []
    while len(order) < config.max_steps * batch_size:
        order += shuffle.sample(range(len(rows)), len(rows))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            starts = range(0, min(config.limit_val_batches * batch_size, len(val_rows)), batch_size)
            losses = [float(model(**_on(reference_batch(val_rows[s : s + batch_size], tokenizer), device)).loss)
                      for s in starts]  # fmt: skip
        model.train()
        return sum(losses) / len(losses)

    best, lrs, val_losses = (math.inf, 0, None), [], {}  # best: (val_loss, step, adapters)
    model.train()
    for step in range(config.max_steps):
        batch = reference_batch([rows[i] for i in order[step * batch_size : (step + 1) * batch_size]], tokenizer)
        model(**_on(batch, device)).loss.backward()
        if hp["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
        lrs.append(nemo_lr(step, case, hp["min_lr"]))
        for group in optimizer.param_groups:
            group["lr"] = lrs[-1]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.val_check_interval == 0 or step + 1 == config.max_steps:
            loss = val_losses[step + 1] = val_loss()
            if loss < best[0]:
                best = (loss, step + 1, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.load_state_dict(best[2], strict=False)
    predictions, labels = reference_predictions(model, tokenizer, config, device)
    return {
        "exact_match": scoring.exact_match(predictions, labels),
        "rouge_l": scoring.rouge_l(predictions, labels),
        "num_samples": len(labels), "best_val_loss": best[0], "best_step": best[1], "val_loss": val_losses, "lr": lrs,
        "predictions": predictions,
    }  # fmt: skip


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def reference_predictions(model, tokenizer, config, device) -> tuple[list[str], list[str]]:
    """Greedy answers to the test split's prompts, tokenized as test_checkpoint.py tokenizes them (a BOS before a
    plain prompt where the tokenizer adds one; a chat prompt's template writes its own), as many new tokens as the
    demo's evaluation generates, up to EOS."""
    import torch

    from nemo_finetune import scoring
    from nemo_finetune.demo import demo_evaluation_args

    args = demo_evaluation_args(config, None, "reference")
    new_tokens = int(args[args.index("--num_tokens_to_generate") + 1])
    examples = scoring.load_test_examples(config.data_path, tokenizer, 10**12)  # every row
    prompts = [tokenizer(e["input"], add_special_tokens=not e.get("chat"))["input_ids"] for e in examples]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)  # fmt: skip
    predictions = []
    for row in out[:, width:].tolist():
        tokens = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        predictions.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return predictions, [e["label"] for e in examples]


def quality_summary(results: dict) -> dict:
    """Mean, lowest and highest exact match of each side over the seeds both sides ran, and the means' difference."""
    seeds = sorted(set(results["ours"]) & set(results["reference"]))
    side = {}
    for name in ("ours", "reference"):
        values = [results[name][s]["exact_match"] for s in seeds]
        side[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else None
    difference = side["ours"]["mean"] - side["reference"]["mean"] if seeds else None
    return {"seeds": seeds, **side, "mean_difference": difference}


def quality_parity(
    root: Path,
    seeds: list[int],
    previous: dict | None,
    out: Path,
    our_flags: tuple[str, ...] = (),
    ours_only: bool = False,
) -> dict:
    """Our run and the reference's for each seed (a side already in `previous` is kept, not run again; `ours_only`:
    no reference, e.g. to count how often our runs fail); `out` holds what is done so far. A failed run of ours is
    recorded under "failures" (each failure kept, with its GPU and date) and the next seed goes on; a later call with
    `previous` runs that seed again."""
    results = previous or {"task": "the demo's key -> code recall (python peft_megatron.py --demo)", "ours": {},
                           "reference": {}}  # fmt: skip
    for seed in seeds:
        key = str(seed)
        if key in results["ours"] and (key in results["reference"] or ours_only):
            continue
        config = demo_job(root, seed)
        if key not in results["ours"]:
            try:
                results["ours"][key] = {**our_quality(config, our_flags), "run": run_facts(), "flags": list(our_flags)}
                out.write_text(json.dumps(results, indent=1) + "\n")  # kept if the reference's run is cut
            except ScriptFailed as failure:
                failed = {"error": str(failure), **run_facts(), "flags": list(our_flags)}
                results.setdefault("failures", {}).setdefault(key, []).append(failed)
                out.write_text(json.dumps(results, indent=1) + "\n")
                print(json.dumps({"seed": seed, "ours": "failed", "error": str(failure).splitlines()[:3]}), flush=True)
                continue
        if key not in results["reference"] and not ours_only:
            results["reference"][key] = reference_quality(config, seed)
        results["summary"] = quality_summary(results)
        out.write_text(json.dumps(results, indent=1) + "\n")
        scores = {name: results[name].get(key, {}).get("exact_match") for name in ("ours", "reference")}
        print(json.dumps({"seed": seed, **scores}), flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    forward = sub.add_parser("forward", help="first-micro-batch loss, ours vs HF, on the CPU in fp32")
    forward.add_argument("--hf_model", type=Path, required=True)
    forward.add_argument("--nemo_ckpt", type=Path, required=True, help="the model's import (peft_megatron.py)")
    forward.add_argument("--data_dir", type=Path, required=True, help="JSONL prepared by dataset_module.py")
    forward.add_argument("--recipe", required=True)
    forward.add_argument("--chat", action="store_true")
    forward.add_argument("--packed", action="store_true")
    forward.add_argument("--micro_batch_size", type=int, default=8)
    forward.add_argument("--out", type=Path, help="also write the result here (JSON)")
    curves = sub.add_parser("curves", help="training curves, ours vs HF + PEFT / HF, on one GPU in bf16")
    curves.add_argument("--families", nargs="+", default=["qwen3", "llama"], choices=sorted(RECIPES))
    curves.add_argument("--modes", nargs="+", default=["lora", "full"], choices=sorted(CURVES))
    curves.add_argument("--work_dir", type=Path, required=True, help="models, data, runs and logs go here")
    curves.add_argument("--previous", type=Path, help="results of earlier runs: kept, those run again replaced")
    curves.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "parity.json")
    curves.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "parity_curves.png")
    quality = sub.add_parser("quality", help="the demo task's exact match, ours vs HF + PEFT, per seed, on one GPU")
    quality.add_argument("--work_dir", type=Path, required=True, help="models, data, runs and logs go here")
    quality.add_argument("--seeds", nargs="+", type=int, default=list(QUALITY_SEEDS))
    quality.add_argument("--previous", type=Path, help="results of seeds run before (kept; their seeds are skipped)")
    quality.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "parity_quality.json")
    quality.add_argument(
        "--our_flags", default="", help='more peft_megatron.py flags for our runs: --our_flags="--flag value"'
    )
    quality.add_argument("--ours_only", action="store_true", help="no reference runs (how often ours fail)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ScriptFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.command == "quality":
        args.work_dir.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.previous.read_text()) if args.previous else None
        flags = tuple(shlex.split(args.our_flags))
        results = quality_parity(args.work_dir, args.seeds, previous, args.out, flags, args.ours_only)
        print(json.dumps(results.get("summary")))
        return 0
    if args.command == "curves":
        args.work_dir.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.previous.read_text()) if args.previous else []
        results = []
        for family in args.families:
            for mode in args.modes:
                results.append(curve_parity(args.work_dir, family, mode))
                print(
                    json.dumps({k: results[-1][k] for k in ("family", "mode", "comparison", "noise_floor")}), flush=True
                )
                merged = merge_curves(previous, results)
                args.out.write_text(json.dumps(merged, indent=1) + "\n")  # what is done so far
        plot_curves(merged, args.plot)
        return 0
    flags = dict(micro_batch_size=1 if args.packed else args.micro_batch_size, accumulate_grad_batches=1)
    config = job_config(args.hf_model, args.nemo_ckpt, args.data_dir, args.recipe, **flags)
    config.data.chat = args.chat
    config.packed_sequence = args.packed
    result = json.dumps(forward_parity(config), indent=2)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
