"""Tiny, offline assets for the demo (`peft_megatron.py --demo`) and the tests.

Everything here is made locally: a byte-level BPE tokenizer trained with `tokenizers`, a randomly initialised
Qwen3- or Llama-architecture Hugging Face model (GQA, head_dim 128 because NeMo's Qwen3 importer assumes it), and a
key->code recall task whose answers can be checked by exact match.

    python -m nemo_finetune.demo_assets demo/          # builds demo/tokenizer, demo/hf_model, demo/dataset (idempotent)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from nemo_finetune.files import atomic_dir, atomic_write_text

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
QUESTION_TEMPLATES = (
    "What is the code for {key}?",
    "Recall the code of {key}.",
    "{key} has which code?",
    "Give the code assigned to {key}.",
)
_CONSONANTS, _VOWELS = "bcdfghklmnprstvz", "aeiou"
_CODES = ("red", "blue", "green", "gold", "gray", "pink", "teal", "navy")


def recall_rows(num_keys: int = 48, seed: int = 0) -> list[dict]:
    """Rows {"question", "answer"}: every key appears once per question template, so a held-out row asks about a
    key that training saw phrased differently - a tiny model can learn it, and exact match measures it."""
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < num_keys:
        keys.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3)))
    rows = []
    for key in sorted(keys):
        code = f"{rng.choice(_CODES)}-{rng.randrange(10)}"
        rows.extend({"question": t.format(key=key), "answer": code} for t in QUESTION_TEMPLATES)
    return rows


def build_tokenizer(path: Path, corpus: list[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a Hugging Face tokenizer directory."""
    path = Path(path)
    if (path / "tokenizer_config.json").exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines on a console that is not a terminal
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None, unk_token=None)
    hf.chat_template = CHAT_TEMPLATE
    with atomic_dir(path) as tmp:
        hf.save_pretrained(tmp)
    return path


def build_hf_model(
    path: Path,
    tokenizer_dir: Path,
    family: str = "qwen3",
    num_layers: int = 2,
    hidden_size: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    head_dim: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
) -> Path:
    """Save a randomly initialised causal LM of `family` ("qwen3" or "llama") with the tokenizer beside it.

    Norm weights are randomised too (not 1.0), so a converter that drops them cannot pass a round-trip test."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    if family == "qwen3":
        config, cls = Qwen3Config(rope_theta=1_000_000.0, **common), Qwen3ForCausalLM
    elif family == "llama":
        config, cls = LlamaConfig(rope_theta=500_000.0, **common), LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}: use 'qwen3' or 'llama'")
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def build_demo_workspace(root: Path, family: str = "qwen3", num_layers: int = 2, hidden_size: int = 256) -> dict:
    """Create (once) the demo's tokenizer, model and dataset under `root`; return their paths."""
    root = Path(root)
    rows = recall_rows()
    corpus = [f"{r['question']} {r['answer']}" for r in rows] * 4
    tokenizer_dir = build_tokenizer(root / "tokenizer", corpus)
    model_dir = build_hf_model(root / "hf_model", tokenizer_dir, family, num_layers, hidden_size)
    dataset_file = root / "dataset" / "recall.jsonl"
    if not dataset_file.exists():
        atomic_write_text(dataset_file, "".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tokenizer": tokenizer_dir, "model": model_dir, "dataset": dataset_file}


if __name__ == "__main__":
    paths = build_demo_workspace(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
