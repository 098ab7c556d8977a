"""Build an offline wheel bundle for an air-gapped GPU node: exactly the wheels the node lacks for requirements.txt.

Run it with the Python of the README's test install (Linux x86_64, registry access): the bundle carries the
versions installed there, the ones the CPU tests ran against. Inputs: the node's Python version and its
`pip freeze` (a bare name means "present, version unknown"); requirements.txt; torch and the CUDA wheels are never
carried.

    .venv/bin/python tools/build_offline_bundle.py --target tools/targets/nvidia-h100-cuda-py312.txt \
        --python 3.12 --out .whl
    # on the node (no network), from the repository root:
    bash .whl/install.sh            # pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site

A package the node already has is kept, unless requirements.txt constrains its version and the node's version
does not satisfy it (or is unknown): transformers 4.57 and huggingface_hub<1.0 travel to the H100 for that reason.
Pure-Python packages published only as sdists are built into wheels here; PuLP is repacked without its CBC solver
binaries (NeMo never solves an LP), which keeps the bundle far under the 64 MiB a device call may carry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEVER_CARRY = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx-cu).*|cuda-.*|pip|setuptools|wheel)$"
)
# What our scripts import on the node (training workers, inference, export, evaluation). Only the distributions these
# modules load travel: nemo_toolkit[llm] pulls in ~100 more (ray, faiss, jieba, boto3, ...) that no path of ours
# imports, and they would take the bundle past the 64 MiB a device call may carry.
RUNTIME_MODULES = [
    "nemo.collections.llm",
    "nemo.collections.llm.recipes.qwen3_8b",
    "nemo.collections.llm.recipes.llama31_8b",
    "nemo.collections.llm.peft",
    "nemo.lightning",
    "nemo.lightning.pytorch.callbacks",
    "nemo_run",
    "nemo_run.core.runners.fdl_runner",
    "nemo.utils.callbacks.dist_ckpt_io",
    "megatron.core.inference.engines",
    "megatron.core.inference.contexts.dynamic_context",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
    "modelopt.torch.opt",
    "modelopt.torch.quantization",
    "nvidia_resiliency_ext.checkpointing",
    "lightning.pytorch.loggers",
    "tensorboard",
    "datasets",
    "peft",
    "bert_score",
    "rouge_score.rouge_scorer",
    "transformers",
    "safetensors",
    "tokenizers",
    "liger_kernel.ops.rms_norm",
]
# Imported by NeMo/Megatron only when installed (try/except ImportError): object-store checkpoints, W&B, NVTX
# ranges, numexpr. Tracing sees them because they are installed here; the node runs without them. `--include`
# adds any back (e.g. `--include wandb` for a W&B run: +19 MiB).
OPTIONAL_AT_RUNTIME = {
    "wandb",
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "multi-storage-client",
    "numcodecs",
    "zarr",
    "asciitree",
    "webdataset",
    "braceexpand",
    "google-auth",
    "google-api-core",
    "googleapis-common-protos",
    "nvtx",
    "numexpr",
    "pyasn1",
    "pyasn1-modules",
    "proto-plus",
    "fasteners",
}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
INSTALL_SH = """#!/usr/bin/env bash
# Installs this bundle without network access. Usage: bash .whl/install.sh [TARGET_DIR]  (default /tmp/site)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="${1:-/tmp/site}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$here"/*.whl
echo "installed $(ls "$here"/*.whl | wc -l) wheels into $target; now: export PYTHONPATH=$target"
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_target(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[canonical(name)] = version.strip() or None
    return out


def read_constraints(requirements: Path) -> dict[str, str]:
    """Top-level requirement name -> its version specifier ('' when unconstrained)."""
    from packaging.requirements import Requirement

    out = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonical(req.name)] = str(req.specifier)
    return out


def runtime_distributions() -> dict[str, str]:
    """{distribution: installed version} of every distribution whose modules get loaded when RUNTIME_MODULES are
    imported, in a fresh interpreter of this environment. The installed versions, not a fresh resolution of
    requirements.txt: the bundle then holds what the CPU tests ran against (a fresh resolution once took a newer
    importlib_metadata whose own new dependency the trace here had never loaded)."""
    probe = (
        "import importlib, json, sys\n"
        f"for m in {RUNTIME_MODULES!r}:\n    importlib.import_module(m)\n"
        "from importlib.metadata import packages_distributions\n"
        "top = {n.split('.')[0] for n in list(sys.modules)}\n"
        "m = packages_distributions()\n"
        "from importlib.metadata import version\n"
        "print(json.dumps({d: version(d) for t in top for d in m.get(t, [])}))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"importing the runtime modules failed:\n{out.stderr[-3000:]}")
    return {canonical(d): v for d, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def to_carry(
    runtime: dict[str, str],
    target: dict[str, str | None],
    constraints: dict[str, str],
    include: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Carry what the runtime imports and the node lacks, or has at a version requirements.txt rules out."""
    from packaging.specifiers import SpecifierSet

    carry = {}
    for name, version in sorted(runtime.items()):
        if NEVER_CARRY.match(name) or name in OPTIONAL_AT_RUNTIME - include:
            continue
        if name not in target:
            carry[name] = version
            continue
        spec, have = constraints.get(name, ""), target[name]
        # An unknown version on the node is kept: guessing would carry large wheels (pyarrow) for nothing.
        if spec and have is not None and have not in SpecifierSet(spec):
            carry[name] = version
    return carry


def download(name: str, version: str, python: str, out: Path) -> Path:
    before = set(out.iterdir())
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *platform_args,
        "-d",
        str(out),
        f"{name}=={version}",
    ]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        # Published as an sdist only: build a wheel here (pure-Python packages; a compiled one would fail loudly).
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), f"{name}=={version}"]
        subprocess.run(cmd, check=True)
    new = set(out.iterdir()) - before
    wheels = [p for p in new if p.suffix == ".whl"]
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel for {name}=={version}, got {sorted(p.name for p in new)}")
    return wheels[0]


def strip_pulp_solvers(wheel: Path) -> None:
    """Rewrite the PuLP wheel without pulp/solverdir/ (CBC binaries), fixing RECORD."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for item in src.infolist():
            if item.filename.startswith("pulp/solverdir/") or item.filename == record_name:
                continue
            data = src.read(item)
            dst.writestr(item, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{item.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", type=Path, required=True, help="the node's pip freeze (name or name==version lines)"
    )
    parser.add_argument("--python", default="3.12", help="the node's Python version, e.g. 3.12")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    parser.add_argument("--out", type=Path, default=REPO / ".whl")
    parser.add_argument("--max_mib", type=float, default=60.0, help="fail when the bundle is larger")
    parser.add_argument("--include", default="", help="comma-separated optional packages to carry anyway (wandb)")
    args = parser.parse_args(argv)

    include = frozenset(canonical(n) for n in args.include.split(",") if n.strip())
    carry = to_carry(runtime_distributions(), read_target(args.target), read_constraints(args.requirements), include)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    sizes = []
    for name, version in carry.items():
        wheel = download(name, version, args.python, args.out)
        if name == "pulp":
            strip_pulp_solvers(wheel)
        sizes.append((wheel.stat().st_size / 2**20, wheel.name))
    (args.out / "install.sh").write_text(INSTALL_SH)
    manifest = "".join(f"{mib:8.3f} MiB  {name}\n" for mib, name in sorted(sizes, reverse=True))
    total = sum(m for m, _ in sizes)
    (args.out / "MANIFEST.txt").write_text(manifest + f"TOTAL {total:.2f} MiB, {len(sizes)} wheels\n")
    print(manifest + f"TOTAL {total:.2f} MiB, {len(sizes)} wheels -> {args.out}")
    if total > args.max_mib:
        print(f"error: bundle is {total:.1f} MiB > --max_mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
