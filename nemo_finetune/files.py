"""Filesystem primitives: atomic outputs (a crash never leaves a file that looks complete), locks, rank-0
attempts and the other nodes' waits, JSON-lines reading. Standard library only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from nemo_finetune.errors import PipelineError

log = logging.getLogger("peft_megatron")


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


def overlap(written: Path, other: Path) -> str | None:
    """How a path a command writes meets another path: "is", "lies inside" or "contains" (both resolved, so relative
    paths and symlinks count), or None when neither holds the other."""
    a, b = Path(written).expanduser().resolve(), Path(other).expanduser().resolve()
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None


# Kernel filesystems that hold no files a program can create: an output path there fails only when it is written.
KERNEL_FILESYSTEMS = set(
    "proc sysfs devtmpfs devpts cgroup cgroup2 securityfs debugfs tracefs configfs bpf pstore mqueue binfmt_misc "
    "fusectl efivarfs".split()
)


def path_problem(flag: str, path: Path) -> str | None:
    """Why `path` cannot be a directory this command creates and writes, found without writing: a symbolic link
    loop, a file in the way, a kernel or read-only filesystem, no write permission; None where it can."""
    path = Path(path).expanduser()
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        return f"{flag} {path}: a symbolic link on the way loops; fix the link or choose another {flag}"
    blocking = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    if blocking is None:
        return None
    if not blocking.is_dir():
        return f"{flag} {path}: {blocking} is a file, not a directory; choose another {flag}"
    mount = filesystem_of(blocking)
    if mount and mount[0] in KERNEL_FILESYSTEMS:
        return f"{flag} {path}: {blocking} is on the kernel's {mount[0]} filesystem; choose a directory on disk"
    if mount and "ro" in mount[1]:
        return f"{flag} {path}: {blocking} is on a read-only filesystem; choose a writable directory"
    if not os.access(blocking, os.W_OK | os.X_OK):
        return f"{flag} {path}: {blocking} is not writable by this user; choose another {flag} or fix its permissions"
    return None


def space_problem(flag: str, directory: Path, needed: int, what: str) -> str | None:
    """Why `directory` cannot take `needed` more bytes: its filesystem has less free (a write that runs out of space
    fails deep inside a library, after the work); None where it can."""
    try:
        resolved = Path(directory).expanduser().resolve()
    except (RuntimeError, OSError):
        return None  # path_problem names the loop
    existing = next((p for p in (resolved, *resolved.parents) if p.is_dir()), None)
    if existing is None:
        return None
    free = shutil.disk_usage(existing).free
    if free >= needed:
        return None
    return (
        f"{flag} {directory}: {what} needs about {_size(needed)} and the filesystem of {existing} has {_size(free)} "
        f"free; free space there or choose another {flag}"
    )


def _size(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n, step = n / 1000, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def filesystem_of(path: Path) -> tuple[str, set[str]] | None:
    """(type, mount options) of the filesystem holding the existing, resolved `path` (Linux: /proc/self/mounts, the
    longest mount point above it); None where the mount table cannot be read."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str, set[str]] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # octal escapes (a space: 040)
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) > best[0]):
            best = (len(point), fields[2], set(fields[3].split(",")))
    return (best[1], best[2]) if best else None


def overlap_problems(
    written: list[tuple[str, Path]], inputs: list[tuple[str, Path]], consequence: str, allow_containing: bool = False
) -> list[str]:
    """One problem for each output (named by its flag) that is, lies inside or (unless `allow_containing`) contains
    an input (named by what it is), with the consequence and the fix."""
    problems = []
    for flag, path in written:
        for what, source in inputs:
            how = overlap(path, source)
            if how and not (allow_containing and how == "contains"):
                problems.append(f"{flag} {path} {how} {what} {source}: {consequence}; give a {flag} outside it")
    return problems


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


MAX_LINE_CHARS = 64 << 20  # one JSON line: far beyond any row, and a bound on what reading one may take


def iter_jsonl(
    path: Path, required: Iterable[str] = (), text: Iterable[str] = (), max_text_chars: int | None = None
) -> Iterator[dict]:
    """Rows of a JSON-lines file; a file that is not UTF-8, a line over MAX_LINE_CHARS, a malformed line, a
    non-object, a missing field, a `text` field that is not a string or is longer than `max_text_chars` names the
    file (and line)."""
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as e:
                raise PipelineError(
                    f"{path} is not UTF-8 text ({e.reason} after line {lineno}); give JSON lines saved as UTF-8"
                ) from None
            if not line:
                return
            lineno += 1
            if len(line) > MAX_LINE_CHARS:
                raise PipelineError(f"{path}:{lineno}: a line over {MAX_LINE_CHARS:,} characters; no row is this long")
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
                if max_text_chars is not None and len(row[key]) > max_text_chars:
                    raise PipelineError(
                        f"{path}:{lineno}: field {key!r} holds {len(row[key]):,} characters, over the "
                        f"{max_text_chars:,} scored per row"
                    )
            yield row


def remove_leftovers(target: Path, what: str, patterns: tuple[str, ...] = ("*.partial",)) -> None:
    """Remove the temporary siblings `.<target name>.<pattern>` that killed runs writing `target` left (atomic_dir's
    `.partial` directories and the like), saying so in one line. Call under the lock that guards `target`."""
    remove_temporaries(target.parent, what, tuple(f".{target.name}.{pattern}" for pattern in patterns))


def remove_temporaries(directory: Path, what: str, globs: tuple[str, ...]) -> None:
    """Remove what matches `globs` in `directory` (temporaries of killed runs), saying so in one line. Call under the
    lock that guards the directory's writers."""
    leftovers = sorted({p for pattern in globs for p in directory.glob(pattern)}) if directory.is_dir() else []
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
