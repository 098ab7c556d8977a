"""Start-up hook for NeMo-Run's torchrun workers (peft_megatron.py puts this directory first on their PYTHONPATH).

Megatron-Core 0.15.3 compiles a managed-memory allocator with nvcc when NeMo is imported, before any code of ours runs
in the worker, NeMo's LoRA transform needs its TE guards before it runs, and Megatron-Core's asynchronous checkpoint
save needs its fix (with TE too) before the first save; nemo_finetune.compat installs them here. (A
Lightning callback could carry the guards, but it would be pickled into every checkpoint's context, which NeMo's
restricted unpickler then refuses to load.) Only active when the launcher set the flag, and any
other sitecustomize on the path still runs afterwards.
"""

import importlib.machinery
import importlib.util
import os
import sys

from nemo_finetune import compat  # stdlib imports only; the repository is on the workers' PYTHONPATH

try:
    compat.install_from_environment(os.environ)
except Exception as e:  # site.py would print it and let the worker train without its shims
    print(f"error: could not prepare this training worker's shims (nemo_finetune.compat): {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.origin != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
