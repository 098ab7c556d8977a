"""Module names that checkpoints written by earlier versions of this project refer to. A NeMo checkpoint's context
names its model config's layer-spec function by module path (sdpa_attention.layer_spec), so a checkpoint trained
before the kernels moved into nemo_finetune.kernels would no longer load for evaluation, export or resume."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from nemo_finetune.compat.base import Shim, mark, register

log = logging.getLogger("peft_megatron.compat")

SHIMS = register(
    {
        "moved-modules": Shim(
            "every process (scripts and training workers)",
            "NeMo's checkpoint contexts refer to functions by module path; this project's SDPA layer spec and paged "
            "attention moved from top-level modules into nemo_finetune.kernels",
            "no checkpoint written before the move (2026-12-04) is still in use",
        ),
    }
)
MOVED = {
    "sdpa_attention": "nemo_finetune.kernels.sdpa_attention",
    "paged_attention": "nemo_finetune.kernels.paged_attention",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import sdpa_attention` gives the module at its new place (one module object under both names)."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        mark("moved-modules", f"{spec.name} (named by a checkpoint of an earlier version) is {MOVED[spec.name]}")
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


def alias_moved_modules() -> None:
    """Let the old module names import; idempotent. The shim counts as applied (and says so) once a checkpoint's
    context imports one of them."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())  # last: a real module of that name on sys.path still wins
