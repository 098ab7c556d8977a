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
import json
import math
import sys
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
    (None when packed: a packed row's samples are found by their tokens).

    The dataset is the one the job's train dataloader builds (the project's data module, max_num_samples =
    ceil(global batch x max_steps x 1.005), NeMo's seeded sample order); Megatron's sampler gives the first
    micro-batch positions 0..micro_batch_size-1 of that order."""
    import fiddle as fdl

    from nemo_finetune.recipe import configure_data

    module = fdl.build(configure_data(config))
    max_samples = int(math.ceil(config.global_batch_size * config.max_steps * 1.005))
    packed = config.packed_sequence
    if packed:
        module.prepare_packed()
    dataset = module._create_dataset(
        module.train_path_packed if packed else module.train_path,
        pack_metadata_path=module.pack_metadata if packed else None,
        max_num_samples=max_samples,
        sanity_check_dist_workers=False,  # a CUDA all-reduce that checks the ranks agree; one process here
        **module.dataset_kwargs,
    )
    positions = range(config.micro_batch_size)
    batch = dataset.collate_fn([dataset[i] for i in positions])
    rows = None if packed else [int(dataset.samples_mapping[i][0]) for i in positions]
    return batch, rows


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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
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
