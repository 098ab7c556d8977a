r"""Any Hugging Face or local dataset -> clean, reproducible train/val/test JSONL -> NeMo fine-tuning batches.

    # prepare a dataset on its own (no GPU, no model import; the tokenizer counts tokens and renders --chat)
    python dataset_module.py --data_dir runs/q8b/data --tokenizer Qwen/Qwen3-8B --dataset_name data/train.jsonl \
        --input_column question --output_column answer --prompt_template $'Q: {question}\nA:'

    # the same as a phase of a training job (--hf_model_id's tokenizer); either way a later run with the same
    # settings and --hf_model_id reuses the data
    python peft_megatron.py --prepare_data_only --hf_model_id ./my-model --dataset_name data/train.jsonl \
        --input_column question --output_column answer --prompt_template $'Q: {question}\nA:' --data_dir out/data

The JSONL rows are what NeMo 2.7.3's FineTuningDataModule reads: `{"input": prompt, "output": answer}` (loss on the
answer and EOS; NeMo joins them as "{input} {output}", after a BOS where the tokenizer adds one, as HF does) or,
with --chat, `{"messages": [...]}` rendered with the tokenizer's chat template (loss on every token, EOS appended
unless the template ends with it). docs/PARITY.md compares both with HF + TRL. Preparation is deterministic for
a seed, idempotent (a fingerprint of everything that shapes the output, the source files' content included, is
kept in `.data_ready.json`), atomic
(files are renamed into place, marker last), and done by global rank 0 only while other ranks wait with a timeout.
--data_dir never overlaps the dataset or the model it is prepared from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_finetune.checkpoints import hf_load_error
from nemo_finetune.choices import LOG_LEVELS
from nemo_finetune.compat import fixes
from nemo_finetune.errors import PipelineError
from nemo_finetune.files import (
    atomic_write_jsonl,
    atomic_write_text,
    iter_jsonl,
    overlap_problems,
    remove_temporaries,
)
from nemo_finetune.fingerprints import digest
from nemo_finetune.records import DATA_RECORD, PACKED_RECORD, data_files, packing_files

log = logging.getLogger("peft_megatron.data")

SPLIT_FILES = {"train": "training.jsonl", "val": "validation.jsonl", "test": "test.jsonl"}
MAX_ROWS = 10**12  # far beyond any dataset: catches typos and stray exponents
MARKER = DATA_RECORD  # written last: the settings' fingerprint, the summary, and each file's size and hash
PREPARING_MARKER = ".data_preparing"  # written first and removed last: present afterwards = interrupted
FORMAT_VERSION = 2  # 2: source files identified by content (1: by size and modification time)
COLLATE_ONLY_KWARGS = ("pad_to_max_length",)  # NeMo dataset settings that change batches, not packed files
PACKED_DIR = "packed"  # <data_dir>/packed/<pack size>-<key>/: training.npy, validation.npy, metadata.jsonl
PACKED_MARKER = PACKED_RECORD  # written last inside a packed directory renamed into place whole
PACK_FORMAT_VERSION = 2  # 2: packing order seeded (packs made before it depended on numpy's unseeded state)
PACK_ALGORITHM = "first_fit_shuffle"  # NeMo's default: first-fit over a shuffled order (seeded_numpy: one per seed)
PACKED_FILES = {"train": "training.npy", "val": "validation.npy"}
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
TRUNCATION_WARN_FRACTION = 0.02


@dataclass
class HFDatasetConfig:
    """Where the data comes from and how rows become prompt/answer pairs (flags of peft_megatron.py)."""

    GROUP = "data"  # the --help section of these flags

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face hub id, a local directory (files or a datasets.save_to_disk dump), or a file "
            "path (.jsonl/.json/.csv/.parquet; several comma-separated). Unset: --data_dir must already hold "
            "training.jsonl and validation.jsonl",
        },
    )
    dataset_subset: str | None = field(default=None, metadata={"help": "dataset configuration name (hub datasets)"})
    dataset_revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    input_column: str = field(default="input", metadata={"help": "column holding the prompt"})
    output_column: str = field(default="output", metadata={"help": "column holding the answer"})
    system_column: str | None = field(
        default=None, metadata={"help": "optional column prepended to the prompt (system prompt or context)"}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Python format string over column names that builds the prompt, e.g. "
            "'### Question:\\n{question}\\n\\n### Answer:'; the values go in as text. Default: the --input_column value"
        },
    )
    chat: bool = field(default=False, metadata={"help": "rows carry a 'messages' list rendered by the chat template"})
    val_fraction: float = field(default=0.05, metadata={"help": "validation share when the source has no such split"})
    test_fraction: float = field(default=0.05, metadata={"help": "test share when the source has no test split"})
    seed: int = field(
        default=1234,
        metadata={
            "help": "seed of the split, the packing and the order rows are trained in; in training also of the "
            "initialisation of LoRA adapters and of dropout (1 to 4294967295)"
        },
    )
    max_samples: int | None = field(default=None, metadata={"help": "keep at most this many rows per split"})
    overwrite_data: bool = field(
        default=False, metadata={"help": "re-prepare --data_dir even if it holds data prepared with other settings"}
    )

    def problems(self) -> list[str]:
        """Validation without touching the data (called before any heavy work)."""
        out = []
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                out.append(f"--{name} {value} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            out.append(
                f"--val_fraction + --test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                "training rows; make their sum below 1"
            )
        if not 1 <= self.seed <= 2**32 - 1:  # numpy's generators and Megatron's take no other
            out.append(f"--seed {self.seed} must be between 1 and {2**32 - 1}")
        if self.max_samples is not None and not 0 < self.max_samples <= MAX_ROWS:
            out.append(f"--max_samples {self.max_samples} must be 1 to {MAX_ROWS:g} (or unset for all rows)")
        template_ok = True
        if self.prompt_template is not None and not self.chat:
            try:
                _template_fields(self.prompt_template)
            except ValueError as e:
                template_ok = False
                out.append(
                    f"--prompt_template {self.prompt_template!r} is not a format string over column names ({e}); "
                    "write columns as {name} (their values go in as text) and literal braces as {{ }}"
                )
        if self.dataset_name:
            for part in self.dataset_name.split(","):
                p = Path(part.strip())
                if p.suffix.lower() in LOCAL_SUFFIXES and not p.exists():
                    out.append(f"--dataset_name file {p} does not exist")
        files = _local_files(self.dataset_name) if self.dataset_name else None
        if files and all(p.is_file() for p in files) and template_ok:
            out.extend(self._local_file_problems(files))
        return out

    def _local_file_problems(self, files: list[Path]) -> list[str]:
        """What local files tell before loading: they have one split (so validation rows come from
        --val_fraction), and the first row of a JSONL/CSV file names the columns the prompt needs."""
        out = []
        if self.val_fraction == 0:
            out.append(
                "--val_fraction 0: local files have no validation split of their own, so no validation "
                "would run (no val_loss, no checkpoint); give a share such as 0.05"
            )
        columns = _first_row_columns(files[0])
        if columns is None or self.chat:
            return out
        needed = (
            [self.input_column, self.output_column]
            if self.prompt_template is None
            else [*_template_fields(self.prompt_template), self.output_column]
        )
        if self.system_column:
            needed.append(self.system_column)
        missing = [c for c in dict.fromkeys(needed) if c not in columns]
        if missing:
            out.append(
                f"--dataset_name {files[0]} has no column(s) {missing} (needed by --input_column/"
                f"--output_column/--system_column/--prompt_template); its columns are {sorted(columns)}"
            )
        return out


def local_sources(cfg: HFDatasetConfig, tokenizer: str | None = None) -> list[tuple[str, Path]]:
    """What data is prepared from on this machine: the local dataset's files or directory, and the directory of a
    local tokenizer (a model directory)."""
    sources = []
    for part in (cfg.dataset_name or "").split(","):
        path = Path(part.strip()).expanduser()
        if part.strip() and path.exists():
            sources.append((f"the dataset {'directory' if path.is_dir() else 'file'}", path))
    if tokenizer and Path(tokenizer).expanduser().is_dir():
        sources.append(("the model directory", Path(tokenizer)))
    return sources


def data_dir_problems(cfg: HFDatasetConfig, data_dir: Path, tokenizer: str | None) -> list[str]:
    """--data_dir apart from what the data is prepared from: preparation writes training/validation/test.jsonl and
    packs there, and --overwrite_data replaces them, so a source inside it (or it inside a source) could be lost."""
    consequence = "preparation writes and replaces files there, so the source could be overwritten"
    return overlap_problems([("--data_dir", data_dir)], local_sources(cfg, tokenizer), consequence)


def _template_fields(template: str) -> list[str]:
    """The column names --prompt_template formats; ValueError where it is no format string over column names whose
    values are text (a bad field, conversion or format spec)."""
    import string

    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    for name in names:
        if not name or not name.isidentifier():
            raise ValueError(f"field {{{name}}} is not a column name")
    try:
        template.format(**{name: "text" for name in names})
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(str(e) if not isinstance(e, KeyError) else f"{{{e.args[0]}}} in a format spec") from None
    return names


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _first_row_columns(path: Path) -> set[str] | None:
    """Column names from a JSONL file's first object or a CSV header; None where that cannot be read cheaply."""
    import csv

    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.suffix.lower() == ".csv":
                header = next(csv.reader(fh), None)
                return set(header) if header else None
            if path.suffix.lower() == ".jsonl":
                first = next((line for line in fh if line.strip()), None)
                row = json.loads(first) if first else None
                return set(row) if isinstance(row, dict) else None
    except (ValueError, OSError):
        return None  # loading reports it with the file and line
    return None


def _local_files(spec: str) -> list[Path] | None:
    parts = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if parts and all(p.suffix.lower() in LOCAL_SUFFIXES for p in parts):
        return parts
    return None


def _check_jsonl(path: Path) -> None:
    """datasets reports a malformed JSON line without its position; we name the file and line first."""
    for _ in iter_jsonl(path):
        pass


def _check_utf8(path: Path) -> None:
    """datasets reports a text file in another encoding as a bare DatasetGenerationError; name the line instead."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PipelineError(
                    f"--dataset_name file {path}: line {lineno} is not UTF-8 (byte 0x{line[e.start]:02x} at byte "
                    f"{e.start + 1} of the line); re-save the file as UTF-8"
                ) from None


def _source_fingerprint(spec: str) -> dict:
    files = _local_files(spec)
    if files is None and Path(spec).is_dir():
        files = sorted(p for p in Path(spec).rglob("*") if p.is_file())
    if files is None:
        return {"hub": spec}
    return {"files": [{"path": str(p.resolve()), **digest(p)} for p in files]}  # content, not modification times


def load_splits(cfg: HFDatasetConfig) -> dict[str, list[dict]]:
    """Load the source into {split name in the source: rows}."""
    # Local files are read through a scratch cache, never the datasets library's own: it keys a local file on its path
    # and modification time, so a file rewritten with its time put back would give the old rows.
    with tempfile.TemporaryDirectory(prefix="nemo_finetune_datasets.") as scratch:
        return _load_splits(cfg, scratch)


def _load_splits(cfg: HFDatasetConfig, scratch: str) -> dict[str, list[dict]]:
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars: not log lines; the summary gives the counts
    spec = cfg.dataset_name
    files = _local_files(spec)
    try:
        if files is not None:
            for p in files:
                if p.suffix.lower() in (".csv", ".json", ".jsonl"):
                    _check_utf8(p)
                if p.suffix.lower() == ".jsonl" or (p.suffix.lower() == ".json" and _looks_like_jsonl(p)):
                    _check_jsonl(p)
            empty = [str(p) for p in files if p.stat().st_size == 0]
            if empty:
                raise PipelineError(f"--dataset_name: {', '.join(empty)} is empty; give files that hold rows")
            builders = {LOCAL_SUFFIXES[p.suffix.lower()] for p in files}
            if len(builders) > 1:
                raise PipelineError(f"--dataset_name mixes file types {sorted(builders)}; use one format")
            ds = datasets.load_dataset(builders.pop(), data_files={"train": [str(p) for p in files]}, cache_dir=scratch)
        elif Path(spec).is_dir() and any((Path(spec) / n).exists() for n in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(spec)
        elif Path(spec).is_dir():
            for p in Path(spec).rglob("*.jsonl"):
                _check_jsonl(p)
            ds = datasets.load_dataset(spec, cfg.dataset_subset, cache_dir=scratch)
        else:
            ds = datasets.load_dataset(spec, cfg.dataset_subset, revision=cfg.dataset_revision)
    except PipelineError:
        raise
    except FileNotFoundError as e:
        raise PipelineError(
            f"dataset {spec!r} not found ({e}). Without network access, point --dataset_name at local files "
            "(.jsonl/.json/.csv/.parquet, comma-separated) or a datasets.save_to_disk directory"
        ) from None
    except Exception as e:  # the hub client raises many types offline (ConnectionError, OfflineModeIsEnabled, ...)
        if files is not None or Path(spec).is_dir():
            raise PipelineError(f"could not read the local dataset {spec!r}: {type(e).__name__}: {e}") from None
        raise PipelineError(
            f"could not load dataset {spec!r}: {type(e).__name__}: {e}. Without network access, point "
            "--dataset_name at local files or a datasets.save_to_disk directory"
        ) from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    return {name: ds[name].to_list() for name in ds}


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1).strip()
    return head == "{"


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------
def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _to_row(raw: dict, cfg: HFDatasetConfig) -> tuple[dict | None, str | None]:
    """The JSONL row for one source row, or (None, reason it was dropped)."""
    if cfg.chat:
        messages = raw.get("messages")
        if not isinstance(messages, list) or not messages:
            return None, "empty or missing messages"
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or _is_empty(m.get("content")):
                return None, "message without role or content"
        if messages[-1]["role"] != "assistant":
            return None, "last message is not from the assistant"
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}, None
    answer = raw.get(cfg.output_column)
    if cfg.prompt_template is not None:
        values = {k: raw.get(k) for k in _template_fields(cfg.prompt_template)}
        if any(_is_empty(v) for v in values.values()):
            return None, "empty prompt"
        prompt = cfg.prompt_template.format(**{k: str(v) for k, v in values.items()})
    else:
        prompt = raw.get(cfg.input_column)
        if _is_empty(prompt):
            return None, "empty prompt"
    if _is_empty(answer):
        return None, "empty answer"
    prompt = str(prompt)
    if cfg.system_column is not None and not _is_empty(raw.get(cfg.system_column)):
        prompt = f"{raw[cfg.system_column]}\n\n{prompt}"
    return {"input": prompt, "output": str(answer)}, None


def _nested_text(raw: dict, cfg: HFDatasetConfig) -> tuple[str, Any] | None:
    """The first column the prompt or answer is built from that holds a list or a mapping instead of text."""
    if cfg.chat:
        return None
    for column in _required_columns(cfg):
        value = raw.get(column)
        if isinstance(value, (list, dict, tuple)):
            return column, value
    return None


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _required_columns(cfg: HFDatasetConfig) -> list[str]:
    if cfg.chat:
        return ["messages"]
    cols = _template_fields(cfg.prompt_template) if cfg.prompt_template is not None else [cfg.input_column]
    cols = list(dict.fromkeys(cols + [cfg.output_column] + ([cfg.system_column] if cfg.system_column else [])))
    return cols


def _check_columns(split: str, rows: list[dict], cfg: HFDatasetConfig) -> None:
    if not rows:
        return
    present = set().union(*(r.keys() for r in rows[:100]))
    missing = [c for c in _required_columns(cfg) if c not in present]
    if missing:
        flags = (
            "--chat expects a 'messages' column" if cfg.chat else "set --input_column/--output_column/--prompt_template"
        )
        raise PipelineError(
            f"split {split!r} of {cfg.dataset_name} has no column(s) {missing}; its columns are {sorted(present)} "
            f"({flags})"
        )


def build_splits(source: dict[str, list[dict]], cfg: HFDatasetConfig) -> tuple[dict[str, list[dict]], dict]:
    """Map source splits to train/val/test (carving missing ones from train), convert and filter rows."""
    chosen = {}
    for ours, aliases in _SPLIT_ALIASES.items():
        chosen[ours] = next((a for a in aliases if a in source), None)
    if chosen["train"] is None:
        if len(source) == 1:
            chosen["train"] = next(iter(source))
        else:
            raise PipelineError(f"{cfg.dataset_name} has splits {sorted(source)} but no 'train' split")
    dropped: dict[str, int] = {}
    converted: dict[str, list[dict]] = {}
    for ours, name in chosen.items():
        if name is None:
            continue
        _check_columns(name, source[name], cfg)
        rows = []
        for index, raw in enumerate(source[name]):
            nested = _nested_text(raw, cfg)
            if nested:
                column, value = nested
                raise PipelineError(
                    f"split {name!r} row {index}: column {column!r} holds a {type(value).__name__} "
                    f"({_shorten(repr(value))}), not text; name a column that holds the text itself, or flatten the "
                    "data first (its Python repr would be trained on)"
                )
            row, reason = _to_row(raw, cfg)
            if row is None:
                dropped[f"{ours}: {reason}"] = dropped.get(f"{ours}: {reason}", 0) + 1
            else:
                rows.append(row)
        if source[name] and not rows:
            raise PipelineError(f"every row of split {name!r} was dropped ({dropped}); check the column flags")
        converted[ours] = rows
    train = converted["train"]
    random.Random(cfg.seed).shuffle(train)
    n = len(train)
    carve = {s: cfg.val_fraction if s == "val" else cfg.test_fraction for s in ("val", "test") if s not in converted}
    counts = {s: max(1, round(n * f)) if f > 0 else 0 for s, f in carve.items()}
    start = 0
    for s in ("val", "test"):
        if s in counts:
            converted[s] = train[start : start + counts[s]]
            start += counts[s]
        else:
            random.Random(cfg.seed).shuffle(converted[s])
    converted["train"] = train[start:]
    if cfg.max_samples is not None:
        converted = {s: rows[: cfg.max_samples] for s, rows in converted.items()}
    for s in ("train", "val"):
        if not converted.get(s):
            fix = "raise --val_fraction" if s == "val" else "lower --val_fraction/--test_fraction"
            raise PipelineError(
                f"the {s} split is empty after filtering and splitting ({n} usable rows in the source's train split); "
                f"provide more data or {fix}"
            )
    sources = {s: (chosen[s] or f"carved from {chosen['train']}") for s in ("train", "val", "test")}
    return converted, {"dropped": dropped, "sources": sources}


# --------------------------------------------------------------------------------------------------------------------
# Token statistics
# --------------------------------------------------------------------------------------------------------------------
def adds_bos(tokenizer) -> bool:
    """Whether a Hugging Face tokenizer starts text with its BOS token by default (Llama 3 and Mistral do, Qwen has
    none). Plain prompt/answer rows then start with it in training and evaluation, as they do for HF and TRL users:
    NeMo's own default leaves it out, so the model would be fine-tuned on text unlike what it was trained on and what
    HF's generate() gives it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def token_stats(rows: list[dict], tokenizer, max_seq_length: int, limit: int = 20000) -> dict:
    """p50/p95/max of prompt+answer tokens over (up to `limit`) rows, their mean after truncation to max_seq_length
    (what a row gives the model), and the share longer than max_seq_length."""
    sample = rows[:limit]
    if not sample:
        return {}
    if "messages" in sample[0]:
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in sample]
    else:
        texts = [f"{r['input']} {r['output']}" for r in sample]
    added = 1 + ("messages" not in sample[0] and adds_bos(tokenizer))  # EOS, and BOS where training adds it
    lengths = sorted(len(ids) + added for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * (len(lengths) - 1) + 0.5))]

    over = sum(1 for x in lengths if x > max_seq_length)
    mean = sum(min(x, max_seq_length) for x in lengths) / len(lengths)
    return {
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": lengths[-1],
        "mean": round(mean, 2),
        "over_max_seq_length": over,
        "counted": len(lengths),
    }


# --------------------------------------------------------------------------------------------------------------------
# Preparation (idempotent, atomic, rank 0 only)
# --------------------------------------------------------------------------------------------------------------------
def fingerprint(cfg: HFDatasetConfig, tokenizer_name: str) -> dict:
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite_data"}
    body = {
        "format": FORMAT_VERSION,
        "config": shaping,
        "source": _source_fingerprint(cfg.dataset_name),
        "tokenizer": tokenizer_name,
    }
    return {"sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), **body}


def _read_marker(root: Path) -> dict | None:
    return data_files(root).read()


def _recorded_fingerprint(marker: dict | None) -> dict:
    """The fingerprint a marker records; {} (matching nothing) for no marker or a damaged one."""
    recorded = (marker or {}).get("fingerprint")
    return recorded if isinstance(recorded, dict) else {}


def _older_format_same_settings(recorded: dict, fp: dict) -> bool:
    """Data an earlier version of this script prepared with the same settings and tokenizer: its marker cannot say
    whether the source changed since (older formats identified it otherwise), so it is prepared again, not refused."""
    return (
        bool(recorded)
        and recorded.get("format") != fp["format"]
        and (recorded.get("config"), recorded.get("tokenizer")) == (fp["config"], fp["tokenizer"])
    )


def _files_present(root: Path) -> bool:
    return all((root / f).exists() for f in SPLIT_FILES.values())


def _diff(old: dict, new: dict) -> list[str]:
    a, b = old.get("config", {}), new.get("config", {})
    changed = [f"--{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("source") != new.get("source"):
        changed.append("the source files changed (their content, or which files)")
    if old.get("tokenizer") != new.get("tokenizer"):
        changed.append(f"tokenizer: {old.get('tokenizer')} -> {new.get('tokenizer')}")
    return changed or ["format version"]


@dataclass(frozen=True)
class DataTarget:
    """Where a dataset is prepared, for which tokenizer, and how the nodes share the work: what the data calls take
    besides the dataset settings (HFDatasetConfig)."""

    data_dir: Path
    tokenizer: str  # hub id or local directory, loaded for the token statistics
    max_seq_length: int
    tokenizer_identity: str | None = None  # enters the fingerprint (default: `tokenizer`), so the same model reached
    # through its imported checkpoint's tokenizer copy counts as unchanged
    trust_remote_code: bool = False
    global_rank: int = 0
    wait_timeout_s: float = 3600.0


def prepare_dataset(cfg: HFDatasetConfig, target: DataTarget) -> dict:
    """Write train/val/test JSONL under `target.data_dir` unless identical data is there; return the summary."""
    data_dir, tokenizer_name, max_seq_length = Path(target.data_dir), target.tokenizer, target.max_seq_length
    trust_remote_code, global_rank, wait_timeout_s = target.trust_remote_code, target.global_rank, target.wait_timeout_s
    if cfg.dataset_name is None:
        return _use_existing_jsonl(data_dir, cfg)
    problems = data_dir_problems(cfg, data_dir, tokenizer_name)
    if problems:  # checked with the flags already; this guards the data module's own calls
        raise PipelineError("; ".join(problems))
    fp = fingerprint(cfg, target.tokenizer_identity or tokenizer_name)
    if global_rank != 0:
        data_files(data_dir).wait(
            wait_timeout_s,
            "data preparation",
            is_done=lambda: _recorded_fingerprint(_read_marker(data_dir)).get("sha256") == fp["sha256"],
        )
        return _read_marker(data_dir)["summary"]
    # One preparation at a time per directory: a second job waits, then finds the first one's data (and reuses it
    # or refuses it with the differences); it never writes between the first one's files.
    with data_files(data_dir).attempt(wait_timeout_s, "data preparation"):
        return _prepare_on_rank0(cfg, data_dir, fp, tokenizer_name, max_seq_length, trust_remote_code)


def _prepare_on_rank0(
    cfg: HFDatasetConfig, data_dir: Path, fp: dict, tokenizer_name: str, max_seq_length: int, trust_remote_code: bool
) -> dict:
    remove_temporaries(data_dir, "data file", (".*.tmp",))  # atomic writes of a killed preparation
    marker = _read_marker(data_dir)
    damaged = _damaged_files(data_dir, marker) if marker else []
    recorded = _recorded_fingerprint(marker)
    same = recorded.get("sha256") == fp["sha256"]
    if same and not damaged:
        log.info(
            "data in %s already prepared with these settings (fingerprint %s); skipping", data_dir, fp["sha256"][:12]
        )
        _clear_finished_preparation(data_dir)
        return marker["summary"]
    interrupted = _remove_interrupted_preparation(data_dir)
    if same:
        log.info("%s: %s no longer match(es) what %s records; preparing again", data_dir, damaged, MARKER)
    elif _older_format_same_settings(recorded, fp):
        log.info("%s: prepared with these settings by an earlier version of this script; preparing again", data_dir)
    elif (marker or _files_present(data_dir)) and not interrupted and not cfg.overwrite_data:
        if recorded:
            why = _diff(recorded, fp)
        else:
            why = [f"its {MARKER} is damaged" if (data_dir / MARKER).exists() else f"files without a {MARKER} marker"]
        raise PipelineError(
            f"{data_dir} holds data prepared with other settings ({'; '.join(why)}); pass --overwrite_data to "
            "replace it, or choose another --data_dir"
        )
    tokenizer, splits, info = _read_source(cfg, tokenizer_name, trust_remote_code)
    atomic_write_text(data_dir / PREPARING_MARKER, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
    (data_dir / MARKER).unlink(missing_ok=True)  # an interrupted re-prepare must not leave the old marker behind
    fixes.remove_memmap_indexes([data_dir / name for name in SPLIT_FILES.values()])
    summary = _write_splits(data_dir, tokenizer, splits, info, max_seq_length)
    files = {name: digest(data_dir / name) for name in SPLIT_FILES.values()}
    data_files(data_dir).write({"fingerprint": fp, "summary": summary, "files": files})
    (data_dir / PREPARING_MARKER).unlink()
    return summary


def _damaged_files(data_dir: Path, marker: dict) -> list[str]:
    """The split files that differ from what the marker records (all of them for a marker that records none)."""
    recorded = marker.get("files")
    if not isinstance(recorded, dict):
        return sorted(SPLIT_FILES.values())
    return [
        name
        for name in SPLIT_FILES.values()
        if not (data_dir / name).is_file() or digest(data_dir / name) != recorded.get(name)
    ]


def _clear_finished_preparation(data_dir: Path) -> None:
    """A preparation killed after its marker and before it removed PREPARING_MARKER finished its data (the marker
    records every file, and they match it): only the stale PREPARING_MARKER is left to remove."""
    if (data_dir / PREPARING_MARKER).exists():
        (data_dir / PREPARING_MARKER).unlink(missing_ok=True)
        log.info("%s: removed %s left by a preparation that had finished its files", data_dir, PREPARING_MARKER)


def _remove_interrupted_preparation(data_dir: Path) -> bool:
    """Remove what a killed or failed preparation left (its split files and temporary files); True if it did."""
    started = data_dir / PREPARING_MARKER
    if not started.exists():
        return False
    leftovers = [data_dir / name for name in SPLIT_FILES.values()] + list(data_dir.glob(".*.jsonl.*.tmp"))
    removed = [p.name for p in leftovers if p.exists()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    log.warning(
        "%s: an earlier preparation was interrupted; removed what it left (%s)",
        data_dir,
        ", ".join(removed) or "nothing",
    )
    started.unlink()
    return True


def _read_source(cfg: HFDatasetConfig, tokenizer_name: str, trust_remote_code: bool) -> tuple[Any, dict, dict]:
    """The tokenizer and the converted splits, before anything is written: a source or tokenizer that cannot be
    used leaves the directory as it was."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(hf_load_error(tokenizer_name, e)) from None
    splits, info = build_splits(load_splits(cfg), cfg)
    return tokenizer, splits, info


def _write_splits(data_dir: Path, tokenizer, splits: dict, info: dict, max_seq_length: int) -> dict:
    summary: dict[str, Any] = {"rows": {}, "dropped": info["dropped"], "sources": info["sources"], "files": {}}
    for split, filename in SPLIT_FILES.items():
        rows = splits.get(split, [])
        count = atomic_write_jsonl(data_dir / filename, rows)
        summary["rows"][split] = count
        summary["files"][split] = str(data_dir / filename)
        log.info("%s split saved to %s (%d rows, from %s)", split, data_dir / filename, count, info["sources"][split])
    summary["tokens"] = token_stats(splits["train"], tokenizer, max_seq_length)
    summary["max_seq_length"] = max_seq_length
    return summary


def _use_existing_jsonl(data_dir: Path, cfg: HFDatasetConfig) -> dict:
    """No --dataset_name: the JSONL files must already be there (e.g. a SageMaker channel); check their rows."""
    marker = _read_marker(data_dir)
    damaged = _damaged_files(data_dir, marker) if marker and "files" in marker else []
    if (data_dir / PREPARING_MARKER).exists():
        if not (marker and "files" in marker and not damaged):
            raise PipelineError(
                f"--data_dir {data_dir} holds what an interrupted preparation left ({PREPARING_MARKER}); pass "
                "--dataset_name to prepare the data again"
            )
        _clear_finished_preparation(data_dir)
    if damaged:
        raise PipelineError(
            f"--data_dir {data_dir}: {', '.join(damaged)} differ(s) from what {MARKER} records (changed or truncated "
            "since it was prepared); pass --dataset_name to prepare the data again"
        )
    missing = [f for s, f in SPLIT_FILES.items() if s != "test" and not (data_dir / f).exists()]
    if missing:
        raise PipelineError(
            f"--data_dir {data_dir} lacks {missing}; pass --dataset_name to prepare them from a dataset"
        )
    rows = {}
    keys = ("messages",) if cfg.chat else ("input", "output")
    for split, filename in SPLIT_FILES.items():
        if (data_dir / filename).exists():
            rows[split] = sum(1 for _ in iter_jsonl(data_dir / filename, keys))
    log.info("using the JSONL already in %s: %s", data_dir, rows)
    return {"rows": rows, "dropped": {}, "sources": {s: "existing JSONL" for s in rows}, "files": {}}


def tokenizer_digest(tokenizer) -> str:
    """A digest of what a tokenizer's ids depend on: a fast tokenizer's canonical serialization (its model, merges,
    normalizer, pre-tokenizer, post-processor and added tokens), else its vocabulary; with the special tokens."""
    hf = getattr(tokenizer, "tokenizer", tokenizer)  # NeMo's AutoTokenizer holds the HF one
    backend = getattr(hf, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
    special = json.dumps([hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id])
    return hashlib.sha256((content + special).encode()).hexdigest()[:16]


def packed_location(
    data_dir: Path, tokenizer_identity: str, pack_size: int, seed: int, dataset_kwargs: dict | None
) -> tuple[Path, dict]:
    """Where the packed form of `data_dir`'s train and validation JSONL lives, and what it is a function of: the
    files' content (as their marker records it, else hashed), tokenizer, pack size, seed, dataset settings and
    algorithm. Every rank derives the same place from the files alone, and any change gives a new one."""
    marker = _read_marker(data_dir) or {}
    recorded = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    files = {}
    for split in PACKED_FILES:
        name = SPLIT_FILES[split]
        files[name] = recorded.get(name) or digest(data_dir / name)
    body = {
        "format": PACK_FORMAT_VERSION,
        "files": files,
        "tokenizer": tokenizer_identity,
        "pack_size": pack_size,
        "seed": seed,
        "dataset_kwargs": dataset_kwargs or {},
        "algorithm": PACK_ALGORITHM,
    }
    key = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return data_dir / PACKED_DIR / f"{pack_size}-{key[:16]}", {"sha256": key, **body}


def pack_dataset(
    data_dir: Path,
    tokenizer,
    tokenizer_identity: str,
    pack_size: int,
    seed: int,
    dataset_kwargs: dict | None = None,
    global_rank: int = 0,
    wait_timeout_s: float = 3600.0,
) -> dict:
    """Pack the train and validation JSONL of `data_dir` into rows of at most `pack_size` tokens with NeMo's packer
    (`prepare_packed_sequence_data`: its tokenization, truncation and loss masks, so a packed row's samples are
    exactly the unpacked ones) and return the summary. Global rank 0 packs under the data lock into a temporary
    directory renamed into place with its marker inside; other ranks wait for that marker; a packed directory whose
    marker matches is reused, and packed directories of other settings are removed."""
    data_dir = Path(data_dir)
    location, key = packed_location(data_dir, tokenizer_identity, pack_size, seed, dataset_kwargs)
    files = packing_files(data_dir, location)
    if global_rank != 0:
        files.wait(wait_timeout_s, "sequence packing")
        return files.read()["summary"]
    with files.attempt(wait_timeout_s, "sequence packing"):
        remove_temporaries(data_dir / PACKED_DIR, "sequence packing", (".*.partial",))  # of killed packing runs
        marker = _read_packed_marker(location)
        if marker is not None and marker.get("key", {}).get("sha256") == key["sha256"]:
            log.info("packed data in %s already made with these settings; reusing it", location)
            return marker["summary"]
        summary = _pack_into_place(data_dir, location, key, tokenizer, pack_size, seed, dataset_kwargs)
        for stale in (data_dir / PACKED_DIR).iterdir():
            if stale != location and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
                log.info("removed packed data of earlier settings: %s", stale)
        return summary


def _read_packed_marker(location: Path) -> dict | None:
    """The marker of a packed directory whose files are all there with the sizes and hashes it records."""
    marker = packing_files(location.parents[1], location).read()
    if marker is None:
        return None
    files = marker.get("files", {})
    if set(files) != set(PACKED_FILES.values()) or any(
        not (location / name).is_file() or digest(location / name) != recorded for name, recorded in files.items()
    ):
        log.warning("%s: packed files differ from what %s records; packing again", location, PACKED_MARKER)
        return None
    return marker


def _pack_into_place(
    data_dir: Path, location: Path, key: dict, tokenizer, pack_size: int, seed: int, dataset_kwargs: dict | None
) -> dict:
    import numpy as np
    from nemo.collections.llm.gpt.data.packed_sequence import prepare_packed_sequence_data

    work = location.parent / f".{location.name}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    summary: dict[str, Any] = {"pack_size": pack_size, "directory": str(location)}
    try:
        for split, filename in PACKED_FILES.items():
            with fixes.seeded_numpy(seed):
                prepare_packed_sequence_data(
                    input_path=data_dir / SPLIT_FILES[split],
                    output_path=work / filename,
                    output_metadata_path=work / "metadata.jsonl",
                    packed_sequence_size=pack_size,
                    tokenizer=tokenizer,
                    max_seq_length=pack_size,
                    seed=seed,
                    packing_algorithm=PACK_ALGORITHM,
                    dataset_kwargs=dict(dataset_kwargs or {}),  # NeMo pops keys from it
                )
            packs = np.load(work / filename, allow_pickle=True)
            samples = int(sum(len(p["seq_start_id"]) for p in packs))
            # A sample of n ids trains on n - 1 positions (inputs and labels are shifted), as the packer counts.
            tokens = sum(len(p["input_ids"]) for p in packs) - samples
            summary[split] = {
                "samples": samples,
                "packs": len(packs),
                "fill": round(tokens / max(1, len(packs) * pack_size), 4),
            }
        files = {name: digest(work / name) for name in PACKED_FILES.values()}
        atomic_write_text(
            work / PACKED_MARKER, json.dumps({"key": key, "summary": summary, "files": files}, indent=2) + "\n"
        )
        shutil.rmtree(location, ignore_errors=True)  # a damaged earlier pack of the same settings
        os.replace(work, location)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("packed %s", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = ["data summary:"]
    for split, n in summary.get("rows", {}).items():
        lines.append(f"  {split:5s} {n:>8d} rows  ({summary.get('sources', {}).get(split, '')})")
    for reason, n in sorted(summary.get("dropped", {}).items()):
        lines.append(f"  dropped {n} rows: {reason}")
    tok = summary.get("tokens") or {}
    if tok:
        lines.append(
            f"  prompt+answer tokens (train, {tok['counted']} rows): "
            f"p50 {tok['p50']} | p95 {tok['p95']} | max {tok['max']}"
        )
        share = tok["over_max_seq_length"] / max(1, tok["counted"])
        if share > TRUNCATION_WARN_FRACTION:
            lines.append(
                f"  WARNING: {share:.1%} of rows exceed --max_seq_length {summary['max_seq_length']} and will be "
                "truncated; raise --max_seq_length"
            )
    packed = summary.get("packed")
    if packed:
        for split in PACKED_FILES:
            p = packed[split]
            lines.append(
                f"  packed {split:5s} {p['samples']:>6d} samples -> {p['packs']:>6d} rows of <= "
                f"{packed['pack_size']} tokens ({p['fill']:.0%} filled)"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The NeMo data module (built lazily so that importing this file does not import NeMo)
# --------------------------------------------------------------------------------------------------------------------
def _build_data_module_class():
    from nemo.collections.common.tokenizers import AutoTokenizer
    from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule

    class GeneralizedHFDataModule(FineTuningDataModule):
        """FineTuningDataModule over JSONL prepared from any HF or local dataset (see module docstring)."""

        def __init__(
            self,
            dataset_config: dict,
            tokenizer_name_or_path: str,
            dataset_root: str,
            seq_length: int = 2048,
            micro_batch_size: int = 4,
            global_batch_size: int = 8,
            trust_remote_code: bool = False,
            wait_timeout_s: float = 3600.0,
            tokenizer_identity: str | None = None,
            packed_sequence: bool = False,
            one_shape: bool = False,
            **kwargs,
        ):
            # Plain values (the dataset settings as a dict, not HFDatasetConfig or DataTarget): NeMo stores these
            # arguments in every checkpoint's context and its restricted unpickler accepts only framework classes.
            config = HFDatasetConfig(**dataset_config)
            self.config = config
            self.tokenizer_identity = tokenizer_identity
            self.tokenizer_name_or_path = str(tokenizer_name_or_path)
            self.trust_remote_code = trust_remote_code
            self.wait_timeout_s = wait_timeout_s
            dataset_kwargs = dict(kwargs.pop("dataset_kwargs", None) or {})
            tokenizer = AutoTokenizer(self.tokenizer_name_or_path, trust_remote_code=trust_remote_code)
            if config.chat:  # the chat template writes any BOS itself
                dataset_kwargs.update(chat=True, use_hf_tokenizer_chat_template=True)
                fixes.chat_eos_for_id_zero()
            elif adds_bos(tokenizer.tokenizer):
                dataset_kwargs.setdefault("add_bos", True)
            if packed_sequence:
                from nemo.collections.llm.gpt.data.packed_sequence import PackedSequenceSpecs

                # One pack per micro-batch (NeMo checks micro_batch_size == 1), each up to seq_length tokens.
                # `one_shape` (CUDA graphs): NeMo pads every row to seq_length and its sequence boundaries to the
                # most samples any row holds (from the packing metadata), so every batch has one shape.
                kwargs["packed_sequence_specs"] = PackedSequenceSpecs(
                    packed_sequence_size=seq_length, pad_cu_seqlens=one_shape
                )
                if one_shape:
                    dataset_kwargs["pad_to_max_length"] = True
            self._packed_location: Path | None = None
            super().__init__(
                dataset_root=dataset_root,
                seq_length=seq_length,
                tokenizer=tokenizer,
                micro_batch_size=micro_batch_size,
                global_batch_size=global_batch_size,
                seed=config.seed,
                dataset_kwargs=dataset_kwargs,
                **kwargs,
            )

        def prepare_data(self) -> None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            target = DataTarget(
                Path(self.dataset_root),
                self.tokenizer_name_or_path,
                self.seq_length,
                tokenizer_identity=self.tokenizer_identity,
                trust_remote_code=self.trust_remote_code,
                global_rank=rank,
                wait_timeout_s=self.wait_timeout_s,
            )
            prepare_dataset(self.config, target)
            if self.packed_sequence_size > 0:
                self.prepare_packed(global_rank=rank)

        def prepare_packed(self, global_rank: int = 0) -> dict:
            """Pack the prepared train/validation JSONL (pack_dataset) and return the packing summary."""
            return pack_dataset(
                Path(self.dataset_root),
                self.tokenizer,
                self._tokenizer_key(),
                self.packed_sequence_size,
                self.seed,
                self._packing_kwargs(),
                global_rank=global_rank,
                wait_timeout_s=self.wait_timeout_s,
            )

        def _tokenizer_key(self) -> str:
            """The tokenizer's name and its content (tokenizer_digest): a new tokenizer saved under the same name
            never reuses the packs of the old one."""
            return f"{self.tokenizer_identity or self.tokenizer_name_or_path}#{tokenizer_digest(self.tokenizer)}"

        def _packing_kwargs(self) -> dict:
            """The dataset settings packing depends on: padding rows to one shape happens when batches are collated,
            so the same packed files serve runs with and without it."""
            return {k: v for k, v in self.dataset_kwargs.items() if k not in COLLATE_ONLY_KWARGS}

        def packed_dir(self) -> Path:
            """This data's packed directory (dataset_module.packed_location), the same on every rank."""
            if self._packed_location is None:
                self._packed_location, _ = packed_location(
                    Path(self.dataset_root),
                    self._tokenizer_key(),
                    self.packed_sequence_size,
                    self.seed,
                    self._packing_kwargs(),
                )
            return self._packed_location

        # NeMo's defaults (<root>/packed/<tokenizer name>/training_<size>.npy, reused whenever the file exists) would
        # train on a stale pack after the data or tokenizer changed; these paths change with them.
        @property
        def train_path_packed(self) -> Path:
            return self.packed_dir() / PACKED_FILES["train"]

        @property
        def validation_path_packed(self) -> Path:
            return self.packed_dir() / PACKED_FILES["val"]

        @property
        def pack_metadata(self) -> Path:
            return self.packed_dir() / "metadata.jsonl"

    GeneralizedHFDataModule.__module__ = __name__
    GeneralizedHFDataModule.__qualname__ = "GeneralizedHFDataModule"
    return GeneralizedHFDataModule


# --------------------------------------------------------------------------------------------------------------------
# Command line: prepare a dataset without a training job
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class PrepareSettings:
    """Where the JSONL goes and which tokenizer it is prepared for (the dataset flags follow)."""

    GROUP = "target"  # the --help section of these flags

    data_dir: str | None = field(
        default=None, metadata={"help": "directory for training/validation/test JSONL (required)"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "hub id or local directory of the model whose tokenizer counts tokens and renders --chat; give "
            "the training's --hf_model_id so that its run reuses the data (required)"
        },
    )
    max_seq_length: int = field(
        default=2048, metadata={"help": "the training's --max_seq_length: the summary counts the rows beyond it"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow custom code from the tokenizer's repository"}
    )
    log_level: str = field(default="INFO", metadata={"help": "console level", "choices": LOG_LEVELS})
    data: HFDatasetConfig = field(default_factory=HFDatasetConfig)


def main(argv: list[str] | None = None) -> int:
    from nemo_finetune.cli import parse_dataclass_args
    from nemo_finetune.console import setup_logging
    from nemo_finetune.errors import ConfigError

    settings, _ = parse_dataclass_args(PrepareSettings, argv, __doc__)
    setup_logging(settings.log_level)
    problems = [f"--{name} is required" for name in ("data_dir", "tokenizer") if not getattr(settings, name)]
    if settings.max_seq_length <= 0:
        problems.append(f"--max_seq_length {settings.max_seq_length} must be a positive integer")
    if settings.data_dir and Path(settings.data_dir).exists() and not Path(settings.data_dir).is_dir():
        problems.append(f"--data_dir {settings.data_dir} is a file; give a directory")
    if settings.data_dir:
        problems += data_dir_problems(settings.data, Path(settings.data_dir), settings.tokenizer)
    problems += settings.data.problems()
    if problems:
        raise ConfigError(problems)
    target = DataTarget(
        Path(settings.data_dir),
        settings.tokenizer,
        settings.max_seq_length,
        tokenizer_identity=settings.tokenizer,
        trust_remote_code=settings.trust_remote_code,
    )
    print(format_summary(prepare_dataset(settings.data, target)), flush=True)
    return 0


def __getattr__(name: str):
    if name == "GeneralizedHFDataModule":
        cls = _build_data_module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli() -> None:
    """The console entry point of an installed copy (pyproject.toml), the same as running this file."""
    from nemo_finetune.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
