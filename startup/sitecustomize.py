"""Start-up hook for NeMo-Run's torchrun workers (peft_megatron.py puts this directory first on their PYTHONPATH).

Megatron-Core 0.15.3 compiles a managed-memory allocator with nvcc when NeMo is imported, before any code of ours runs
in the worker; nemo_compat's stub must be in sys.modules first. Only active when the launcher set the flag, and any
other sitecustomize on the path still runs afterwards.
"""

import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("PEFT_MEGATRON_WORKER_COMPAT") == "1":
    import nemo_compat

    nemo_compat.skip_unified_memory_build()

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.origin != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
