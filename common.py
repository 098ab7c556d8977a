"""Shared plumbing for the four scripts: dataclass-driven CLIs, collected validation, atomic outputs, rank-0 waits
and checkpoint discovery. Standard library only, so `--help` and validation stay fast."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("peft_megatron")

USAGE_ERROR = 2  # argparse's exit code for bad usage; validation errors use it too
RUN_NAME = "nemo_logs"  # NeMoLogger's name: <output_dir>/nemo_logs/checkpoints/nemo_logs--val_loss=...-step=...


def attention_head_dim(config) -> int:
    """The attention head size of a Megatron/NeMo config (kv_channels) or an HF config (head_dim); both fall back to
    hidden_size / attention heads, as TransformerConfig and transformers do."""
    explicit = getattr(config, "kv_channels", None) or getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where a run keeps what it writes under --output_dir (README, "Outputs"); every script finds it here."""

    root: Path

    data = property(lambda self: self.root / "data")  # training/validation/test JSONL and .data_ready.json
    imported = property(lambda self: self.root / "imported_hf_ckpt")  # the HF model as a NeMo checkpoint
    logs = property(lambda self: self.root / RUN_NAME)  # NeMoLogger's directory
    checkpoints = property(lambda self: self.logs / "checkpoints")  # best val_loss and -last
    exports = property(lambda self: self.logs / "exports")  # HF exports; never inside checkpoints/
    tensorboard = property(lambda self: self.root / "tb_logs")
    report = property(lambda self: self.root / "report")  # summary.json, loss_curve.png
    log_file = property(lambda self: self.root / "peft_megatron.log")
    nemo_run = property(lambda self: self.root / "nemo_run")  # NeMo-Run's experiments and the workers' logs
    profiles = property(lambda self: self.root / "profiles")

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunLayout | None:
        """The run of a checkpoint peft_megatron.py wrote (<run>/nemo_logs/checkpoints/<name>), else None."""
        checkpoint = Path(checkpoint).resolve()
        if checkpoint.parent.name == "checkpoints" and checkpoint.parents[1].name == RUN_NAME:
            return cls(checkpoint.parents[2])
        return None


class ConfigError(ValueError):
    """Every problem found in the user's input, reported together; each line names the flag and the fix."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


class PipelineError(RuntimeError):
    """A failure with a message meant for the user (bad data, missing checkpoint, failed launch); exit code 1."""


LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"  # our console, log file and workers' lines


class _ConsolePolicy(logging.Filter):
    """What the console shows: our records from the chosen level up; other libraries' (NeMo, Megatron, Lightning,
    OneLogger, Python warnings) only from ERROR up, unless the level is DEBUG, which shows everything."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.level <= logging.DEBUG:
            return True
        ours = record.name == log.name or record.name.startswith(log.name + ".")
        return record.levelno >= (self.level if ours else logging.ERROR)


def _to_root_handlers(record: logging.LogRecord) -> bool:
    """A filter on NeMo's own logger: its records go through our handlers (policy, log file), not NeMo's."""
    logging.getLogger().handle(record)
    return False


def setup_logging(level: str = "INFO") -> None:
    """One console handler with _ConsolePolicy; Python warnings and NeMo's logger routed through it. Idempotent."""
    level_no = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "peft_megatron", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_ConsolePolicy(level_no))
    console.peft_megatron = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.setLevel(min(level_no, logging.INFO))  # the log file keeps other libraries' INFO lines
    logging.captureWarnings(True)
    # NeMo's logger (nemo.utils.logging) prints through handlers of its own and does not propagate; the same logger
    # object, made here first, keeps this filter when NeMo configures it at import.
    nemo_logger = logging.getLogger("nemo_logger")
    if _to_root_handlers not in nemo_logger.filters:
        nemo_logger.addFilter(_to_root_handlers)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Log the start and end of a pipeline phase with its duration (the console's landmarks)."""
    log.info("== %s", name)
    started = time.monotonic()
    yield
    log.info("== %s: done in %.1f s", name, time.monotonic() - started)


ANSI_CODE = r"\x1b\[[0-9;:]*m"  # terminal colours, as rich and NeMo-Run print them; not for the log file


def _log_files() -> list[logging.Handler]:
    """Our log-file handlers (log_to_file) on the root logger."""
    root = logging.getLogger()
    return [h for h in root.handlers if isinstance(h, logging.FileHandler) and getattr(h, "peft_megatron", False)]


class _LineWriter:
    """A stand-in for sys.stdout that hands on whole lines (`route`); anything else it is asked is the console's."""

    def __init__(self, console):
        self.console, self._partial, self._lock = console, "", threading.RLock()
        self.log_files = _log_files()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self.route(line)
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ...: the console's own
        if name == "console":
            raise AttributeError(name)
        return getattr(self.console, name)

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self.route(self._partial)
                self._partial = ""

    def to_log_files(self, source: str, line: str) -> None:
        """Into our log file only: NeMo-Run's console handler on the root logger would print it back here."""
        record = logging.LogRecord(source, logging.INFO, __file__, 0, "%s", (re.sub(ANSI_CODE, "", line),), None)
        for handler in self.log_files:
            handler.handle(record)

    def route(self, line: str) -> None:
        raise NotImplementedError


class PrintsToLogFile(_LineWriter):
    """What a library prints on stdout goes to our log file, not the console."""

    def __init__(self, console, source: str):
        super().__init__(console)
        self.source = source

    def route(self, line: str) -> None:
        if line.strip():
            self.to_log_files(self.source, line)


@contextlib.contextmanager
def prints_to_log_file(source: str, level: str) -> Iterator[None]:
    """Inside the block, stdout prints (NeMo's import draws a tree of the files it wrote) go to the log file only;
    at DEBUG, or without a log file (--import_only), they stay on the console. Our records and stderr are untouched."""
    if getattr(logging, level.upper(), logging.INFO) <= logging.DEBUG or not _log_files():
        yield
        return
    writer = PrintsToLogFile(sys.stdout, source)
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.close()


class WorkerConsole(_LineWriter):
    """Stands in for sys.stdout while NeMo-Run tails the training workers' output, which it prints there, each line
    prefixed with the role and replica (`qwen3_8b/0 [default0]:...`). Every worker line goes to our log file; the
    console shows the workers' lines of ours, every `every_n_steps`-th progress line, resuming, checkpoint and
    stopping decisions, and, from a worker's first traceback or error on, everything. Other text passes unchanged."""

    _ANSI = rf"(?:{ANSI_CODE})?"
    FAILURE = re.compile(
        r"Traceback \(most recent call last\)|^\s*[\w.]*(?:Error|Exception)\b.*:|\bERROR\b:|"
        r"\[NeMo E|CRITICAL|ChildFailedError|exitcode"
    )
    PROGRESS = re.compile(r"Training epoch \d+, iteration (\d+)/(\d+)")
    COMPAT = re.compile(r"peft_megatron\.compat\] compat: ")  # each worker's shims (nemo_compat): the log file's
    DECISIONS = re.compile(
        r"'val_loss' reached|'val_loss' was not in top|did not improve in the last|Signaling Trainer to stop|"
        r"Restoring states from the checkpoint path|`Trainer.fit` stopped|peft_megatron"
    )
    RANK = re.compile(r"^\[\w+\]:")  # torchrun's per-rank prefix, [default0]:

    def __init__(self, console, role: str, every_n_steps: int):
        super().__init__(console)
        self.every = max(1, every_n_steps)
        self.worker_line = re.compile(rf"^{self._ANSI}{re.escape(role[-10:])}/\d+{self._ANSI} ")
        self.failing = False

    def route(self, line: str) -> None:
        start = self.worker_line.match(line)
        if start is None:
            self.console.write(line + "\n")
            return
        self.to_log_files("workers", line)
        if self.shows(self.RANK.sub("", line[start.end() :])):
            self.console.write(line + "\n")

    def shows(self, body: str) -> bool:
        if self.failing or self.FAILURE.search(body):
            self.failing = True
            return True
        if self.COMPAT.search(body):
            return False
        progress = self.PROGRESS.search(body)
        if progress:
            step, last = int(progress[1]), int(progress[2])
            return step % self.every == 0 or step == last
        return self.DECISIONS.search(body) is not None


@contextlib.contextmanager
def quiet_workers(role: str, level: str, every_n_steps: int) -> Iterator[None]:
    """The training workers' output as WorkerConsole shows it; at DEBUG, all of it as NeMo-Run prints it."""
    if getattr(logging, level.upper(), logging.INFO) <= logging.DEBUG:
        yield
        return
    console = WorkerConsole(sys.stdout, role, every_n_steps)
    with contextlib.redirect_stdout(console):
        try:
            yield
        finally:
            console.close()


_EXPERIMENTS: list[Any] = []  # see experiment(): kept alive so that their __del__ runs only at exit


@contextlib.contextmanager
def experiment(title: str, **kwargs: Any) -> Iterator[Any]:
    """`nemo_run.Experiment(title, **kwargs)`, entered, with the root logger's handlers and level left as they were.

    NeMo-Run 0.11.1 replaces the root logger's handlers whenever an Experiment is built (`configure_logging`:
    `logging.basicConfig(force=True)` with its RichHandler) and removes the root's first handler whenever one is
    garbage-collected (`Experiment.__del__` -> `deconfigure_logging`): every line of ours after a launch lost our
    format, the console policy and the log file. Ours go back once it is built; keeping the object alive defers its
    __del__ to interpreter exit. This can go when NeMo-Run leaves the root logger alone."""
    import nemo_run as run

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def restore() -> None:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)

    try:
        exp = run.Experiment(title, **kwargs)
        restore()
        _EXPERIMENTS.append(exp)
        with exp:
            yield exp
    finally:
        restore()


def log_to_file(path: Path, level: str = "INFO") -> Path:
    """Also write every record (every library's, from INFO up, or DEBUG) to `path`, appending."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(min(getattr(logging, level.upper(), logging.INFO), logging.INFO))
    handler.peft_megatron = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return path


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Exit codes: 0 ok, 1 pipeline failure, 2 usage error. Messages go to stderr without a traceback."""
    try:
        code = main(argv)
    except ConfigError as e:
        print(f"error: invalid arguments:\n{e}", file=sys.stderr)
        code = USAGE_ERROR
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


# --------------------------------------------------------------------------------------------------------------------
# Dataclass -> argparse. The dataclass is the single source of truth: names, types, defaults and help.
# --------------------------------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """The argparse type of float fields: nan and inf are never a meaningful setting, and would pass every range
    check (comparisons with nan are false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_or_auto(text: str) -> int | None:
    """An integer flag whose value may be `auto` (None: resolved later from the machine)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


class _BoolAction(argparse.Action):
    """`--flag`, `--no-flag`, and `--flag true|false` (the form SageMaker uses for hyperparameters)."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        name = option_strings[0][2:]
        super().__init__([f"--{name}", f"--no-{name}"], dest, nargs="?", default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else parse_bool(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"{option_string}: {e}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[int] and int | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def declared_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """cls's fields, each with the dataclass that declares it, in declaration order: the fields of the bases in the
    order the class lists its bases, then its own (dataclasses.fields orders inherited fields by reverse MRO)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    fields: list[tuple[dataclasses.Field, type]] = []
    for base in cls.__bases__:
        if dataclasses.is_dataclass(base):
            fields += [(by_name[f.name], owner) for f, owner in declared_fields(base) if f.name in by_name]
    seen = {f.name for f, _ in fields}
    own = cls.__dict__.get("__annotations__", {})
    return fields + [(by_name[name], cls) for name in own if name in by_name and name not in seen]


def iter_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any, str | None]]:
    """(field, resolved type, parent field name or None), flattening nested dataclass fields."""
    hints = typing.get_type_hints(cls)
    for f, _ in declared_fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for sub, sub_tp, _ in iter_fields(tp):
                yield sub, sub_tp, f.name
        else:
            yield f, tp, None


def field_groups(cls: type) -> dict[str, str | None]:
    """Each flag's --help section: the GROUP of the dataclass that declares it (None: no section)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, str | None] = {}
    for f, owner in declared_fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            groups.update(field_groups(hints[f.name]))
        else:
            groups[f.name] = getattr(owner, "GROUP", None)
    return groups


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per (flattened) field: `--name`, typed from the annotation, help from `metadata["help"]`."""
    seen: set[str] = set()
    groups = field_groups(cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f, tp, _ in iter_fields(cls):
        assert f.name not in seen, f"duplicate field name {f.name} across nested dataclasses"
        seen.add(f.name)
        group = groups[f.name]
        if group is not None and group not in sections:
            sections[group] = parser.add_argument_group(group)
        target = sections[group] if group is not None else parser
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        base, optional = _unwrap_optional(tp)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            target.add_argument(f"--{f.name}", action=_BoolAction, help=f"{help_text} (default: {default})", **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "type" in f.metadata:
            kwargs["type"] = f.metadata["type"]
        elif base in (int, float, str):
            kwargs["type"] = finite_float if base is float else base
        else:
            raise TypeError(f"unsupported field type {tp} for {f.name}")
        shown = f.metadata.get("shown", "unset" if default is None and optional else default)
        target.add_argument(f"--{f.name}", help=f"{help_text} (default: {shown})", metavar=f.name.upper(), **kwargs)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace | dict) -> Any:
    """Build `cls` from parsed values; nested dataclasses are filled from the same flat namespace."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = dataclass_from_namespace(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def parse_dataclass_args(cls: type, argv: list[str] | None, description: str) -> tuple[Any, set[str]]:
    """Parse argv into `cls`; also return the names of the flags given explicitly (they beat the environment)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return dataclass_from_namespace(cls, ns), set(vars(ns))


def flag_names(cls: type) -> list[str]:
    return [f.name for f, _, _ in iter_fields(cls)]


# Set in os.environ by Lightning once a process has joined torch.distributed; a script this process starts must pick
# its own rendezvous.
RENDEZVOUS_VARS = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK"}
)


def environ_without_rendezvous() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block and as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------------------------------
# Atomic outputs: a crash never leaves a file or directory that looks complete.
# --------------------------------------------------------------------------------------------------------------------
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def _atomic_open(path: Path, binary: bool = False) -> Iterator[typing.IO]:
    """A handle on a temporary sibling of `path`, fsynced and renamed over it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result is an ordinary file, readable as any other
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with _atomic_open(path) as fh:
        fh.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_open(path, binary=True) as fh:
        fh.write(data)


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines through a temporary file; returns the row count."""
    count = 0
    with _atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a sibling temporary directory; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while it was being written; nothing was replaced")
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float, what: str, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive advisory lock (fcntl) on `path` for the block; another job on the same directory waits, up
    to `timeout_s`. The kernel drops the lock when its holder dies, so a killed run never leaves it held."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PipelineError(
                        f"another job has held {path} for {timeout_s:.0f}s ({what}); wait for it to "
                        "finish, or use another directory"
                    ) from None
                if not waited:
                    log.info("waiting for another job's %s (lock %s)", what, path)
                    waited = True
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def rank_zero_attempt(lock: Path, failed: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Global rank 0's side of a phase on the shared filesystem (the other nodes run wait_for_file): one job at a
    time; the last attempt's failure marker cleared first; any failure of this one recorded for the waiting nodes."""
    with exclusive_lock(lock, timeout_s, what):
        failed.unlink(missing_ok=True)
        try:
            yield
        except BaseException as e:
            atomic_write_text(failed, f"{type(e).__name__}: {e}\n")
            raise


def file_heads(root: Path, recursive: bool = True) -> dict[str, list]:
    """{relative path: [size, sha256 of the first MiB]} of every file under `root`: an identity of model and
    checkpoint directories that is cheap at any size (small files are hashed whole; large ones by their headers and
    leading tensors) and the same on every node's copy (no modification times)."""
    heads = {}
    for path in sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file()):
        with open(path, "rb") as fh:
            heads[str(path.relative_to(root))] = [path.stat().st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest()]
    return heads


def file_digest(path: Path) -> dict:
    """Size and sha256 of a file: what a done marker records so that reading it back can check the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


STALE_FAILURE_GRACE_S = 120.0


def filesystem_now(directory: Path) -> float:
    """The current time on the filesystem's clock (a shared filesystem stamps files with its server's time, which
    need not match this node's): the modification time of a file created now."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".clock.") as probe:
            return os.stat(probe.name).st_mtime
    except OSError:  # a directory this node cannot write: its own clock is the best estimate
        return time.time()


def wait_for_file(
    done: Path,
    failed: Path,
    timeout_s: float,
    what: str,
    poll_s: float = 2.0,
    is_done: Callable[[], bool] | None = None,
    stale_grace_s: float = STALE_FAILURE_GRACE_S,
) -> None:
    """Wait until `done` exists (or `is_done()`), failing fast when `failed` appears and after `timeout_s`.

    A `failed` marker written before this node began waiting may be an earlier attempt's, which global rank 0
    removes when it starts this one: it is believed only if it is still there `stale_grace_s` later."""
    start = time.monotonic()
    deadline = start + timeout_s
    started_on_fs = filesystem_now(failed.parent) - 1.0  # 1 s: filesystems with coarse timestamps
    check = is_done or done.exists
    next_log = 0.0
    while True:
        if check():
            return
        now = time.monotonic()
        try:  # rank 0 may remove the marker between these two reads
            written = failed.stat().st_mtime
            reason = failed.read_text(errors="replace").strip()
        except FileNotFoundError:
            written = None
        if written is not None and (written >= started_on_fs or now - start >= stale_grace_s):
            when = (
                ""
                if written >= started_on_fs
                else (f", written before this node started; rank 0 began no new attempt in {stale_grace_s:.0f}s")
            )
            raise PipelineError(f"{what} failed on global rank 0: {reason} (marker {failed}{when}); fix it and re-run")
        if now >= deadline:
            raise PipelineError(
                f"timed out after {timeout_s:.0f}s waiting for {what} ({done}); is global rank 0 running and "
                f"is the directory on a filesystem every node shares?"
            )
        if now >= next_log:
            log.info("waiting for %s from global rank 0 (%.0fs left)", what, deadline - now)
            next_log = now + 30
        time.sleep(poll_s)


def iter_jsonl(path: Path, required: Iterable[str] = (), text: Iterable[str] = ()) -> Iterator[dict]:
    """Rows of a JSON-lines file; a malformed line, a non-object, a missing field or a `text` field that is not a
    string names the file and line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise PipelineError(f"{path}:{lineno}: missing field(s) {missing}")
            for key in text:
                if not isinstance(row[key], str):
                    raise PipelineError(f"{path}:{lineno}: field {key!r} is {json.dumps(row[key])[:40]}, not text")
            yield row


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


def remove_leftovers(target: Path, what: str, patterns: tuple[str, ...] = ("*.partial",)) -> None:
    """Remove the temporary siblings `.<target name>.<pattern>` that killed runs writing `target` left (atomic_dir's
    `.partial` directories and the like), saying so in one line. Call under the lock that guards `target`."""
    parent = target.parent
    leftovers = (
        sorted({p for pattern in patterns for p in parent.glob(f".{target.name}.{pattern}")}) if parent.is_dir() else []
    )
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if leftovers:
        log.warning(
            "removed %d unfinished %s(s) left by killed runs: %s",
            len(leftovers),
            what,
            ", ".join(p.name for p in leftovers),
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
    their weights were lost when the checkpoint was written (GPU runs 51-53)."""
    return [
        name for name, matrix in adapter_matrices(adapter) if name.endswith("linear_out.weight") and not matrix.any()
    ]


def adapters_unlike_their_master_copies(ckpt: Path, adapter: dict) -> list[str]:
    """The LoRA matrices (per layer) of checkpoint `ckpt` whose weights in `adapter` (read_adapter_tensors) are not
    the cast of the fp32 master copies that Megatron's mixed-precision optimizer saved beside them. After every step
    the weights are exactly that cast (16 checkpoints written during training on the GPU, run 57), so a difference is
    data lost when the checkpoint was written. None where the checkpoint holds no master copies (fp32 training, the
    distributed optimizer's layout)."""
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
