"""Shared fixtures: tiny offline models and datasets, and a runner for the real scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_finetune.demo_assets import build_hf_model, build_tokenizer, recall_rows  # noqa: E402
from nemo_finetune.rendezvous import environ_without_rendezvous  # noqa: E402


def pytest_configure(config):
    """Without a GPU, Triton kernels run under Triton's interpreter. It must be on before anything imports Triton
    (Megatron and torch do): the standard library's jit functions are bound to the mode at import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # The scripts cache large files' digests per user (nemo_finetune/fingerprints.py): the suite's stay in its own.
    os.environ["NEMO_FINETUNE_CACHE"] = tempfile.mkdtemp(prefix="nemo_finetune_cache.")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.get("NEMO_FINETUNE_CACHE", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (the GPU runs are recorded in docs/gpu-validation.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def script_env(env: dict | None = None) -> dict:
    """The environment a user's fresh offline shell gives a script."""
    # An in-process NeMo call (tests/test_convert_checkpoint_to_hf.py) leaves rendezvous variables in os.environ with
    # its port still bound; a script started afterwards must not inherit them, as a user's fresh shell would not.
    full_env = {
        **environ_without_rendezvous(),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in [k for k in full_env if k.startswith("SM_") or k == "TRITON_INTERPRET"]:
        del full_env[key]
    return {**full_env, **(env or {})}


def qa_flags(output_dir: Path, model=None, dataset=None) -> list[str]:
    """peft_megatron.py's flags naming a question/answer job's columns and output, and its model and dataset if given
    (else the flags' defaults)."""
    args = ["--input_column", "question", "--output_column", "answer", "--output_dir", str(output_dir)]
    if model is not None:
        args += ["--hf_model_id", str(model)]
    if dataset is not None:
        args += ["--dataset_name", str(dataset)]
    return args


def qa_job(model, output_dir: Path, *extra: str, dataset=None) -> list[str]:
    """peft_megatron.py's flags for a one-GPU job of `model` on a question/answer dataset (the tests' tiny assets)."""
    return [*qa_flags(output_dir, model, dataset), "--gpus_per_node", "1", "--tensor_parallel_size", "1", *extra]


def fake_nvidia_smi(tmp_path: Path, gpus: int) -> dict:
    """A PATH on which `nvidia-smi -L` lists `gpus` GPUs: the one machine fact a GPU-less CI cannot have."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    listing = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n' for i in range(gpus))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + listing)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run one of the repository's scripts as a user would; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        env=script_env(env),
        timeout=timeout,
        cwd=cwd or REPO,
    )


def failure(result) -> str:
    """What a failed run shows: its output from the first traceback on (the launcher prints a training worker's from
    there; NeMo-Run's own exit report follows it and would fill a plain tail), else the tail, then stderr's tail."""
    start = result.stdout.find("Traceback (most recent call last)")
    shown = result.stdout[start : start + 8000] if start >= 0 else result.stdout[-4000:]
    return shown + (result.stderr or "")[-2000:]


def start_script(script: str, *args: str) -> subprocess.Popen:
    """Start a script in the background, its stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=script_env(),
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """A tokenizer, tiny Qwen3 and Llama models (random norms, GQA, head_dim 128) and the recall dataset."""
    root = tmp_path_factory.mktemp("assets")
    rows = recall_rows(num_keys=24)
    tokenizer = build_tokenizer(root / "tokenizer", [f"{r['question']} {r['answer']}" for r in rows] * 4)
    qwen3 = build_hf_model(root / "qwen3", tokenizer, "qwen3", num_layers=2, hidden_size=128, seed=1)
    llama = build_hf_model(root / "llama", tokenizer, "llama", num_layers=2, hidden_size=128, seed=2)
    data = root / "recall.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tokenizer": tokenizer, "qwen3": qwen3, "llama": llama, "data": data, "rows": rows}


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """A live one-node Slurm cluster (tools/local_slurm_cluster.sh: munge, accounting, slurmctld, slurmd) for the
    session; the environment a shell needs to reach it."""
    import shutil

    missing = [b for b in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        why = f"{', '.join(missing)} not installed" if missing else "not root"
        pytest.skip(f"no local Slurm cluster ({why}): `bash tools/local_slurm_cluster.sh install` as root (Debian)")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # not under pytest's 0700 directory: the mysql user reads it
    root.chmod(0o755)
    script = REPO / "tools" / "local_slurm_cluster.sh"
    started = subprocess.run(["bash", str(script), "start", str(root)], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["bash", str(script), "stop", str(root)], capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def fake_checkpoint(path: Path, adapter: bool = False, tensors: dict | None = None) -> Path:
    """A NeMo checkpoint's layout with intact torch-dist weight files (`tensors`, else one tiny tensor) and no model
    behind them."""
    import torch
    import torch.distributed.checkpoint as dcp

    (path / "context").mkdir(parents=True)
    dcp.save(tensors or {"w": torch.zeros(4)}, checkpoint_id=str(path / "weights"))
    (path / "weights" / "metadata.json").write_text("{}")
    if adapter:
        (path / "weights" / "adapter_metadata.json").write_text('{"model_ckpt_path": "/nowhere/base"}')
    return path


def edit_in_place(path: Path, offset: int, byte: bytes | None = None) -> bytes:
    """Change one byte of `path` in place at `offset` (negative: from the end; to `byte`, else its bits flipped) and
    put its modification time back, as a same-size rewrite by a tool that keeps times would: only the content
    differs. Returns the original bytes."""
    original, stat = path.read_bytes(), path.stat()
    offset %= len(original)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(byte or bytes([original[offset] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    return original


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem (tmpfs): mounting needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    yield disk
    subprocess.run(["umount", str(disk)])


def kill_when(proc: subprocess.Popen, seen, timeout_s: float = 300) -> None:
    """SIGKILL `proc` as soon as `seen()` is true (polled, no fixed sleeps); fail if it ends first. A directory that
    vanishes while `seen()` globs it (NeMo's export removes and remakes its output directory) counts as not yet."""
    import time

    def looked() -> bool:
        try:
            return seen()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + timeout_s
    while not looked():
        assert proc.poll() is None, "the script ended before the moment to kill it:\n" + proc.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.01)
    proc.kill()
    proc.wait()


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows a W&B offline run logged, read from its run-*.wandb file: wandb 0.2x writes no summary file offline
    and its own reader lives in the Go core, so the log format (LevelDB-style records in 32 KiB blocks after a
    ':W&B' header, each a wandb_internal_pb2.Record) is read here."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    rows, pos, block, chunk = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# A real Megatron-Core model in this process (tests of the SDPA attention, packed rows and the LoRA shim)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def model_parallel(module_model_parallel, monkeypatch):
    """Model parallelism, and CPU models that stay on the CPU: Megatron's RotaryEmbedding moves its frequencies to
    torch.cuda.current_device() on its first forward, which a CPU-only machine lacks and which would split a CPU
    model across devices on a GPU machine. CUDA models are built and run with the real device."""
    import torch

    real = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: CURRENT[0] if CURRENT[0] == "cpu" else real())


CURRENT = ["cpu"]  # the device of the model being run (see model_parallel)


@pytest.fixture(scope="module")
def module_model_parallel():
    """One-process Megatron model parallelism (gloo), torn down afterwards."""
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        # Left by an in-process NeMo import earlier in the session (tests/test_convert_checkpoint_to_hf.py), which
        # never tears down Megatron's groups; they are the same one-process groups this fixture builds.
        parallel_state.destroy_model_parallel()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"file://{tempfile.mktemp(prefix='megatron_pg_')}", rank=0, world_size=1
        )
    parallel_state.initialize_model_parallel()
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def tiny_gpt(device: str, dtype, max_sequence_length: int = 40):
    """A 2-layer Qwen3-shaped GPTModel (GQA, QK-norm, RMSNorm, SwiGLU, RoPE) on the project's SDPA layer spec."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_finetune.kernels.sdpa_attention import SDPADotProductAttention

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    torch.manual_seed(0)
    model = GPTModel(
        config,
        spec,
        vocab_size=97,
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        rotary_base=1_000_000,
    )
    return model.to(device=device, dtype=dtype).eval()


def lora_tensors(untrained_layer: int | None = None, damaged_layer: int | None = None) -> dict:
    """A two-layer LoRA checkpoint's tensors as NeMo writes them in bf16 training: layer stacks of bf16 weights, each
    the cast of the fp32 master copy saved beside it with the optimizer's other state (zero moments).
    `untrained_layer`'s linear_proj output matrix is zero (its master copy too); `damaged_layer`'s linear_fc1 input
    matrix has one value unlike its master copy's."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attention.linear_proj": (16, 64), "mlp.linear_fc1": (128, 16)}
    masters = {}
    for target, (out_dim, in_dim) in shapes.items():
        key = f"module.decoder.layers.{target}.adapter"
        masters[f"{key}.linear_in.weight"] = torch.randn(2, 4, in_dim, generator=gen)
        masters[f"{key}.linear_out.weight"] = torch.randn(2, out_dim, 4, generator=gen)
    if untrained_layer is not None:
        masters["module.decoder.layers.self_attention.linear_proj.adapter.linear_out.weight"][untrained_layer] = 0
    model = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    if damaged_layer is not None:
        model["module.decoder.layers.mlp.linear_fc1.adapter.linear_in.weight"][damaged_layer, 0, 0] += 1
    optimizer = {f"optimizer.state.exp_avg.{k}": torch.zeros_like(v) for k, v in masters.items()}
    optimizer |= {f"optimizer.state.fp32_param.{k}": v for k, v in masters.items()}
    return {**optimizer, **model}
