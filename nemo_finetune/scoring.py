"""The test split and how predictions are scored: the prompts and labels test_checkpoint.py generates for, and the
exact match and ROUGE-L of its metrics (the parity benchmark's reference side is scored by the same code)."""

from __future__ import annotations

from pathlib import Path

from nemo_finetune.errors import PipelineError
from nemo_finetune.files import iter_jsonl


def load_test_examples(data_dir: Path, tokenizer, max_samples: int) -> list[dict]:
    """(prompt, label) pairs from test.jsonl, formatted exactly as training saw them."""
    path = data_dir / "test.jsonl"
    if not path.exists():
        raise PipelineError(f"{path} does not exist; prepare data with `peft_megatron.py --prepare_data_only` first")
    examples = []
    for row in list(iter_jsonl(path, ()))[:max_samples]:
        if "messages" in row:
            messages = row["messages"]
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            examples.append({"input": prompt, "label": messages[-1]["content"], "chat": True})
        elif "input" in row and "output" in row:
            examples.append({"input": row["input"], "label": row["output"]})
        else:
            raise PipelineError(f"{path}: rows need input/output or messages")
    if not examples:
        raise PipelineError(f"{path} has no rows")
    return examples


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def exact_match(predictions: list[str], labels: list[str]) -> float:
    return sum(normalize(p) == normalize(t) for p, t in zip(predictions, labels, strict=True)) / max(1, len(labels))


def rouge_l(predictions: list[str], labels: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predictions, labels, strict=True)]
    return sum(scores) / max(1, len(scores))
