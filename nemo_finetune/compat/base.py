"""Shim bookkeeping shared by every kind: the table's entry type, what a process applied and how to take it
back, the releases the shims were written for, the environment (TE, CUDA), and patches that wait for a module's
import."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("peft_megatron.compat")


@dataclasses.dataclass(frozen=True)
class Shim:
    where: str  # the processes it applies to
    upstream: str  # what the pinned release does wrong without TE / CUDA / flash-attn
    remove_when: str


# Every shim of every kind (no_te, speedups, cuda_graphs, fixes), filled by register() as those modules load;
# importing nemo_finetune.compat loads them all.
SHIMS: dict[str, Shim] = {}


def register(entries: dict[str, Shim]) -> dict[str, Shim]:
    """Add a kind's shims to SHIMS; a name is one shim."""
    clash = sorted(set(entries) & set(SHIMS))
    if clash:
        raise ValueError(f"shims registered twice: {clash}")
    SHIMS.update(entries)
    return entries


# The releases whose functions the no-TE shims replace by name and signature (requirements.txt pins them).
WRITTEN_FOR = {"nemo_toolkit": "2.7.", "megatron-core": "0.15."}

_applied: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Environment:
    has_te: bool
    has_cuda: bool

    def describe(self) -> str:
        return f"transformer_engine={'yes' if self.has_te else 'no'}, cuda={'yes' if self.has_cuda else 'no'}"


def detect_environment() -> Environment:
    """TE counts only if its torch extension imports: Megatron defines placeholder TE names when it is missing."""
    has_te = False
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            import transformer_engine.pytorch  # noqa: F401

            has_te = True
        except Exception as e:  # a broken TE install is treated as absent, loudly
            log.warning("transformer_engine is installed but does not import (%s); running without it", e)
    import torch

    return Environment(has_te=has_te, has_cuda=torch.cuda.is_available())


def applied() -> frozenset[str]:
    """Names of the shims applied in this process (for logs and tests)."""
    return frozenset(_applied)


_undo: list[tuple[str, object, str, object]] = []  # (shim, owner, attribute, the value it replaced), oldest first

_MISSING = object()


def replace_attribute(shim: str, owner, attribute: str, value) -> None:
    """Set owner.attribute for `shim`, remembering what it replaces so that undo() can put it back."""
    _undo.append((shim, owner, attribute, getattr(owner, attribute, _MISSING)))
    setattr(owner, attribute, value)


def replacement_count() -> int:
    """How many replacements the shims of this process have made so far (undo(since=...) takes back the later ones)."""
    return len(_undo)


def undo(shim: str | None = None, since: int = 0) -> None:
    """Put back what the shims (or the one named), applied after the first `since` replacements, replaced; newest
    first. The unified-memory stub stays: modules that imported it hold it, and the real module would compile."""
    for index in reversed(range(since, len(_undo))):
        name, owner, attribute, previous = _undo[index]
        if shim is not None and name != shim:
            continue
        if previous is _MISSING:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, previous)
        del _undo[index]
        if not any(other[0] == name for other in _undo):
            _applied.discard(name)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Shims applied inside the block are taken back when it ends (tests; the scripts keep theirs for the process)."""
    since = replacement_count()
    try:
        yield
    finally:
        undo(since=since)


def mark(name: str, why: str) -> None:
    assert name in SHIMS, f"shim {name!r} is not listed in nemo_finetune.compat SHIMS"
    if name not in _applied:
        _applied.add(name)
        log.info("compat: %s (%s)", name, why)


@functools.cache
def installed_versions() -> dict[str, str]:
    """The installed releases of WRITTEN_FOR's distributions, read once per process (prepare_process runs often)."""
    import importlib.metadata as metadata

    installed = {}
    for dist in WRITTEN_FOR:
        try:
            installed[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            installed[dist] = "not installed"
    return installed


def check_versions(installed: dict[str, str] | None = None) -> None:
    """The no-TE shims replace NeMo / Megatron-Core functions of the releases in WRITTEN_FOR; on other releases they
    could silently patch the wrong thing, so they refuse, naming what is installed and the fix."""
    installed = installed_versions() if installed is None else installed
    wrong = {d: v for d, v in installed.items() if d in WRITTEN_FOR and not v.startswith(WRITTEN_FOR[d])}
    if wrong:
        found = ", ".join(f"{d} {v}" for d, v in wrong.items())
        wanted = ", ".join(f"{d} {p}x" for d, p in WRITTEN_FOR.items())
        raise RuntimeError(
            f"nemo_compat's shims for running without Transformer Engine were written for {wanted}; found {found}. "
            "Install the pinned stack (pip install -r requirements.txt), or install Transformer Engine, with which "
            "no shim is needed."
        )


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs `patch()` right after `module` is imported (for patches that must land before first use)."""

    def __init__(self, module: str, patch):
        self.module, self.patch = module, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch()

        spec.loader.exec_module = exec_then_patch
        return spec


def after_import(module: str, patch) -> None:
    if module in sys.modules:
        patch()
    else:
        sys.meta_path.insert(0, _PostImportHook(module, patch))
