"""The console and the log file: what the user sees, what the log keeps, and the workers' lines."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nemo_finetune.failures import KERNEL_ASSERTION

log = logging.getLogger("peft_megatron")


LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"  # our console, log file and workers' lines


SHIM_LOGGER = "peft_megatron.compat"


class _ConsolePolicy(logging.Filter):
    """What the console shows: our records from the chosen level up, but the shims' application lines only at DEBUG
    (the log file has them; a plan lists them); other libraries' (NeMo, Megatron, Lightning, OneLogger, Python
    warnings) only from ERROR up, unless the level is DEBUG, which shows everything."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.level <= logging.DEBUG:
            return True
        if record.name == SHIM_LOGGER:  # which shims a process applied: the log file's, and the plan says it
            return record.levelno >= max(self.level, logging.WARNING)
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


class _PrintsAsRecords(_LineWriter):
    def __init__(self, console, logger: logging.Logger):
        super().__init__(console)
        self.logger = logger

    def route(self, line: str) -> None:
        if line.strip():
            self.logger.info("%s", re.sub(ANSI_CODE, "", line))


@contextlib.contextmanager
def prints_as_library_records(source: str) -> Iterator[None]:
    """Inside the block, stdout prints become INFO records of the library logger `source`: kept by the log file when
    there is one, shown on the console only at --log_level DEBUG, as every library's INFO lines (NeMo's export
    prints the temporary directory it wrote)."""
    writer = _PrintsAsRecords(sys.stdout, logging.getLogger(source))
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.close()


def library_logs_through_ours() -> None:
    """transformers prints its warnings (`torch_dtype is deprecated`) through a handler of its own; hand them to the
    root logger instead, where the console policy and the log file decide. Call where transformers is imported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


class WorkerConsole(_LineWriter):
    """Stands in for sys.stdout while NeMo-Run tails the training workers' output, which it prints there, each line
    prefixed with the role and replica (`qwen3_8b/0 [default0]:...`). Every worker line goes to our log file; the
    console shows the workers' lines of ours, every `every_n_steps`-th progress line, resuming, checkpoint and
    stopping decisions, the first CUDA kernel assertion (one line per failing GPU thread: the rest are counted),
    and, from a worker's first traceback or error on, everything. NeMo-Run's own lines (its experiment banner and
    status) go to the log file, unless they report an error."""

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
        self.kernel_assertions = 0

    def route(self, line: str) -> None:
        start = self.worker_line.match(line)
        if start is None:  # NeMo-Run's own: the experiment's banner, status and how-to-inspect blocks
            if self.FAILURE.search(line) or not self.log_files:
                self.console.write(line + "\n")
            elif line.strip():
                self.to_log_files("nemo_run", line)
            return
        self.to_log_files("workers", line)
        if self.shows(self.RANK.sub("", line[start.end() :])):
            self.console.write(line + "\n")

    def shows(self, body: str) -> bool:
        if KERNEL_ASSERTION.search(body):
            self.kernel_assertions += 1
            return self.kernel_assertions == 1
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

    def close(self) -> None:
        super().close()
        if self.kernel_assertions > 1:
            more = self.kernel_assertions - 1
            self.console.write(f"({more} more kernel assertion lines like it, one per GPU thread, in the logs)\n")


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
