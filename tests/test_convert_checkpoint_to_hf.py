"""HF -> NeMo import and NeMo -> HF export through the real scripts, on CPU, without Transformer Engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import convert_checkpoint_to_hf as conv
import peft_megatron as pm
from conftest import (
    REPO,
    edit_in_place,
    fake_checkpoint,
    kill_when,
    lora_tensors,
    run_script,
    script_env,
    start_script,
)
from nemo_finetune.checkpoints import find_checkpoint, is_nemo_checkpoint
from nemo_finetune.demo_assets import build_hf_model
from nemo_finetune.errors import PipelineError
from nemo_finetune.files import _size
from nemo_finetune.fingerprints import legacy_heads
from nemo_finetune.importer import import_hf_checkpoint
from nemo_finetune.records import IMPORT_RECORD, import_files, output_files
from nemo_finetune.rendezvous import environ_without_rendezvous
from nemo_finetune.resolve import imported_tokenizer


@pytest.fixture(autouse=True, scope="module")
def shims_in_scope():
    """The in-process conversions below apply nemo_compat's shims; later test files get the process back as it was."""
    from nemo_finetune import compat

    with compat.scoped():
        yield


RECIPES = {"qwen3": "qwen3_600m", "llama": "llama32_1b"}


def import_args(model, nemo: Path, recipe: str = "qwen3_600m") -> list[str]:
    """peft_megatron.py's arguments for the HF -> NeMo import alone."""
    return ["--import_only", "--hf_model_id", str(model), "--recipe_cls_name", recipe, "--nemo_ckpt_dir", str(nemo)]


def run_import(model, nemo: Path, recipe: str = "qwen3_600m", **kwargs):
    return run_script("peft_megatron.py", *import_args(model, nemo, recipe), **kwargs)


@pytest.fixture(scope="module")
def qwen3_head_dim_64(assets):
    return build_hf_model(assets["root"] / "qwen3_hd64", assets["tokenizer"], "qwen3", hidden_size=128, head_dim=64)


def import_and_export(model_dir: Path, recipe: str, tmp: Path) -> Path:
    nemo = tmp / "nemo"
    out = run_script("peft_megatron.py", *import_args(model_dir, nemo, recipe), "--log_level", "DEBUG")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compat: local-spec-norm-mapping" in out.stdout  # the shims' lines: on the console at DEBUG
    hf = tmp / "hf"
    out = run_script("convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(nemo), "--output_dir", str(hf))
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr  # our lines only: not NeMo's temporary path, not transformers' warnings
    assert "Checkpoint exported to" not in console and "torch_dtype" not in console and "compat:" not in console
    assert f"exported {nemo} -> {hf}" in console or str(hf) in console
    again = run_script("convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(nemo), "--output_dir", str(hf))
    assert again.returncode == 0 and f"export already present: {hf}" in again.stdout  # re-runnable, keeps it
    return hf


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_round_trip_is_bit_exact(family, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    source_dir = assets[family]
    exported = import_and_export(source_dir, RECIPES[family], tmp_path)
    a = AutoModelForCausalLM.from_pretrained(source_dir, torch_dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    norms = [k for k in sa if k.endswith("norm.weight")]
    assert norms and all(not torch.equal(sa[k], torch.ones_like(sa[k])) for k in norms)  # random norms survive
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-5)
    assert b.config.eos_token_id == a.config.eos_token_id  # not NeMo's hard-coded Qwen ids


def test_import_refuses_a_head_dim_the_importer_would_get_wrong(qwen3_head_dim_64, tmp_path):
    # NeMo 2.7.3's Qwen3 importer fixes kv_channels=128 whatever the HF config says.
    out = run_import(qwen3_head_dim_64, tmp_path / "nemo")
    assert out.returncode == 1
    assert "head_dim 64 but NeMo's importer would build head_dim 128" in out.stderr
    assert not (tmp_path / "nemo").exists()  # nothing that looks like a checkpoint
    marker = import_files(tmp_path / "nemo").failed
    assert "head_dim 64" in marker.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [marker.name, import_files(tmp_path / "nemo").lock.name]
    )


def test_other_node_fails_fast_when_rank0_import_fails(qwen3_head_dim_64, tmp_path):
    env = {**environ_without_rendezvous(), "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    common = [
        "--import_only",
        "--hf_model_id",
        str(qwen3_head_dim_64),
        "--recipe_cls_name",
        "qwen3_600m",
        "--nemo_ckpt_dir",
        str(tmp_path / "nemo"),
        "--num_nodes",
        "2",
        "--wait_timeout_s",
        "300",
    ]
    waiter = subprocess.Popen(
        [sys.executable, str(REPO / "peft_megatron.py"), *common, "--node_rank", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    rank0 = subprocess.run(
        [sys.executable, str(REPO / "peft_megatron.py"), *common, "--node_rank", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert rank0.returncode == 1
    start = time.monotonic()
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1 and time.monotonic() - start < 30
    assert "the HF -> NeMo import failed on global rank 0" in err and "head_dim" in err


def test_waiting_node_times_out_clearly(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    config = pm.parse_config(
        [
            "--import_only",
            "--hf_model_id",
            str(assets["qwen3"]),
            "--nemo_ckpt_dir",
            str(tmp_path / "n"),
            "--num_nodes",
            "2",
            "--node_rank",
            "1",
            "--wait_timeout_s",
            "1",
        ],
        {},
    )
    with pytest.raises(PipelineError, match="timed out after 1s waiting for the HF -> NeMo import"):
        import_hf_checkpoint(config)


def test_partial_checkpoint_directory_is_refused(assets, tmp_path):
    (tmp_path / "nemo" / "weights").mkdir(parents=True)
    out = run_import(assets["qwen3"], tmp_path / "nemo")
    assert out.returncode == 1 and "exists but is not a complete NeMo checkpoint" in out.stderr


def test_checkpoint_discovery_prefers_best_val_loss(tmp_path):
    ckpts = tmp_path / "nemo_logs" / "checkpoints"
    fake_checkpoint(ckpts / "m--val_loss=2.5000-step=99-consumed_samples=800.0")
    best = fake_checkpoint(ckpts / "m--val_loss=1.2500-step=199-consumed_samples=1600.0")
    fake_checkpoint(ckpts / "m--val_loss=1.2500-step=199-consumed_samples=1600.0-last")
    (ckpts / "m--val_loss=0.1000-step=299-consumed_samples=2400.0" / "context").mkdir(parents=True)  # half-written
    assert find_checkpoint(tmp_path / "nemo_logs") == best
    only_last = tmp_path / "b" / "checkpoints" / "m--step=9-last"
    fake_checkpoint(only_last)
    assert find_checkpoint(tmp_path / "b") == only_last
    with pytest.raises(PipelineError, match="no complete NeMo checkpoint"):
        find_checkpoint(tmp_path / "nemo_logs" / "checkpoints" / "m--val_loss=0.1000-step=299-consumed_samples=2400.0")


REFUSALS = [
    ("missing", "does not exist; train with peft_megatron.py first"),
    ("not_a_checkpoint", "is not a NeMo checkpoint"),
    ("half_written", "is a half-written NeMo checkpoint"),
    ("no_merge_on_full", "--no_merge exports a LoRA adapter, but"),
    ("lora_without_base", "`python peft_megatron.py --import_only ...` (same --nemo_ckpt_dir) first"),
]


def test_exports_of_a_run_land_outside_its_checkpoints_directory(tmp_path):
    """NeMo's ModelCheckpoint takes every directory under checkpoints/ for a checkpoint (and may delete one on
    resume), so a run's exports go to nemo_logs/exports/; an explicit checkpoint elsewhere exports beside itself."""
    ckpt = tmp_path / "nemo_logs" / "checkpoints" / "nemo_logs--val_loss=1.2-step=9-consumed_samples=80"
    assert conv.default_export_path(ckpt, ".hf_model") == tmp_path / "nemo_logs" / "exports" / (ckpt.name + ".hf_model")
    assert conv.default_export_path(tmp_path / "imported", ".hf_peft") == tmp_path / "imported.hf_peft"


@pytest.mark.parametrize("case, message", REFUSALS)
def test_converter_refuses_wrong_input(case, message, tmp_path):
    path = tmp_path / "ckpt"
    args = []
    if case == "not_a_checkpoint":
        path.mkdir()
    elif case == "half_written":
        (path / "context").mkdir(parents=True)
    elif case == "no_merge_on_full":
        fake_checkpoint(path)
        args = ["--no_merge"]
    elif case == "lora_without_base":
        fake_checkpoint(path, adapter=True)
    out = run_script("convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(path), *args)
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "ckpt.hf_model").exists() and not (tmp_path / "ckpt.hf_peft").exists()


def test_converter_usage_errors_exit_2():
    out = run_script("convert_checkpoint_to_hf.py")
    assert out.returncode == 2 and "exactly one of --nemo_logs_dir" in out.stderr


def test_adapter_mapping_matches_nemo_exporter_on_fused_lora(assets, tmp_path):
    """Synthetic NeMo-layout LoRA (fused, interleaved QKV; fused gate/up): merging it into the NeMo weights and
    exporting with NeMo's own HF exporter must equal peft.PeftModel(base, our adapter)."""
    from nemo.lightning.io import load_context
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from nemo_finetune import compat

    env = compat.prepare_process()
    nemo_dir = tmp_path / "nemo"
    assert run_import(assets["qwen3"], nemo_dir).returncode == 0
    model = load_context(nemo_dir / "context", subpath="model")
    exporter = model.exporter("hf", str(nemo_dir))
    exporter.trust_remote_code = False  # normally set inside apply()
    with compat.cpu_checkpoint_io(env):
        source, _ = exporter.nemo_load(str(nemo_dir))
    cfg = source.config
    rank, alpha, layers = 4, 8, cfg.num_layers
    settings = {
        "dim": rank,
        "alpha": alpha,
        "dropout": 0.0,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "gated": True,
        "target_modules": list(conv.HF_TARGETS),
    }
    gen = torch.Generator().manual_seed(0)
    state = source.state_dict()
    adapter = {}
    for target in conv.HF_TARGETS:
        weight_keys = [k for k in state if k.endswith(f"{target}.weight") and ".layers." in k]
        out_dim, in_dim = state[weight_keys[0]].shape
        a = torch.randn(layers, rank, in_dim, generator=gen) * 0.1
        b = torch.randn(layers, out_dim, rank, generator=gen) * 0.1
        adapter[f"module.decoder.layers.{target}.adapter.linear_in.weight"] = a
        adapter[f"module.decoder.layers.{target}.adapter.linear_out.weight"] = b
        with torch.no_grad():
            for layer in range(layers):
                key = next(k for k in weight_keys if f".layers.{layer}." in k)
                param = dict(source.named_parameters())[key]
                param.add_((alpha / rank) * (b[layer] @ a[layer]).to(param.dtype))
    merged = exporter.init(torch.float32)
    exporter.convert_state(source, merged)

    peft_dir = tmp_path / "adapter"
    peft_dir.mkdir()
    save_file(conv.nemo_lora_to_peft(adapter, settings), str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(__import__("json").dumps(conv.adapter_config(settings, "base")))
    base = AutoModelForCausalLM.from_pretrained(assets["qwen3"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, peft_dir)
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        expected, got = merged(ids).logits, peft_model(ids).logits
    assert (
        expected - AutoModelForCausalLM.from_pretrained(assets["qwen3"], torch_dtype=torch.float32)(ids).logits
    ).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adapter_export_names_adapters_all_zero_or_unlike_their_master_copies(tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    ckpt = fake_checkpoint(tmp_path / "lora", adapter=True, tensors=lora_tensors(untrained_layer=0, damaged_layer=1))
    settings = {"dim": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["linear_proj", "linear_fc1"], "gated": True}
    monkeypatch.setattr(conv, "lora_settings", lambda _: settings)  # a fake checkpoint has no NeMo context to read
    monkeypatch.setattr(conv.log, "handlers", [caplog.handler])
    out = tmp_path / "adapter"
    out.mkdir()
    conv.export_adapter(ckpt, out, "base")
    assert (
        "lora: 1 LoRA adapter(s) have an all-zero output matrix (B) and change nothing: "
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight." in caplog.text
    )
    assert (
        "lora: 1 LoRA matrix(es) differ from the fp32 master copies saved beside them: "
        "decoder.layers.1.mlp.linear_fc1.adapter.linear_in.weight. Megatron's optimizer" in caplog.text
    )
    warned = {r.getMessage() for r in caplog.records if r.getMessage().endswith("the export holds them as they are")}
    assert len(warned) == 2
    exported = load_file(out / "adapter_model.safetensors")  # as read, the lost matrix included
    assert not exported["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].any()
    assert exported["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].any()


def test_export_keeps_only_its_own_current_export_and_refuses_anything_else(assets, tmp_path):
    """An export records what it was made from; an existing --output_dir is reused only when it is a complete export
    of the same checkpoint, and every other case is refused with the fix before any heavy work."""
    import shutil

    nemo = tmp_path / "nemo"
    out = run_import(assets["qwen3"], nemo)
    assert out.returncode == 0, out.stderr[-3000:]

    def export(ckpt: Path, target: Path):
        return run_script(
            "convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(ckpt), "--output_dir", str(target)
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(nemo, empty).returncode == 0  # an empty directory is filled, not taken for an export
    assert (empty / "model.safetensors").is_file() and (empty / conv.EXPORT_RECORD).is_file()
    named = export(nemo, tmp_path / "nemo_logs--val_loss=0.5432-step=799-consumed_samples=12800.hf_model")
    assert named.returncode == 0, named.stderr[-3000:]
    assert "valid Python identifier" not in named.stdout + named.stderr  # transformers' warning for such a name
    nested = tmp_path / "a" / "b" / "hf"
    assert export(nemo, nested).returncode == 0 and (nested / "config.json").is_file()
    again = export(nemo, nested)
    assert again.returncode == 0 and f"export already present: {nested}" in again.stdout

    a_file = tmp_path / "hf.txt"
    a_file.write_text("not an export")
    result = export(nemo, a_file)
    assert result.returncode == 2 and f"--output_dir {a_file} is a file; give a directory path" in result.stderr
    refused = {}
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    refused["someone else's directory"] = (junk, "holds files this script did not write")
    truncated = tmp_path / "truncated"
    shutil.copytree(nested, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    refused["a truncated export"] = (truncated, "damaged export (model.safetensors is missing or its content has")
    damaged = tmp_path / "damaged"  # the same size and modification time, other bytes past the first MiB
    shutil.copytree(nested, damaged)
    edit_in_place(damaged / "model.safetensors", -1)
    refused["an export damaged in place"] = (damaged, "damaged export (model.safetensors is missing or its content")
    for what, (target, message) in refused.items():
        result = export(nemo, target)
        assert result.returncode == 1 and message in result.stderr, what
        # --overwrite replaces an export of this script, never anything else: advised only for its own
        assert ("--overwrite" in result.stderr) == (target != junk), what
    assert a_file.read_text() == "not an export" and (junk / "notes.txt").read_text() == "mine"  # nothing lost

    older = tmp_path / "older"  # an export whose record an earlier version wrote (sizes, first MiB of the inputs)
    shutil.copytree(nested, older)
    record = json.loads((older / conv.EXPORT_RECORD).read_text())
    sizes = {name: (older / name).stat().st_size for name in record["files"]}
    legacy = {**record, "files": sizes, "fingerprint": conv.legacy_fingerprint(nemo, None)}
    (older / conv.EXPORT_RECORD).write_text(json.dumps(legacy))
    upgraded = export(nemo, older)
    assert upgraded.returncode == 0 and f"export already present: {older}" in upgraded.stdout, upgraded.stderr[-2000:]
    assert json.loads((older / conv.EXPORT_RECORD).read_text()) == record  # its digests recorded

    # The checkpoint's weights rewritten in place (same sizes and times, other bytes past the first MiB): another
    # checkpoint, whose export the old one is not.
    shard = max((nemo / "weights").glob("*.distcp"), key=lambda p: p.stat().st_size)
    assert shard.stat().st_size > 1 << 20
    original = edit_in_place(shard, -4096)
    stale = export(nemo, nested)
    assert stale.returncode == 1
    assert (
        f"holds a full export of {nemo.resolve()}, not a full export of {nemo.resolve()} as it is now" in stale.stderr
    )
    assert (nested / "config.json").is_file()  # kept, untouched
    shard.write_bytes(original)

    # A killed export's leftovers are removed by the next one; two exports into one directory take turns.

    turns = tmp_path / "turns"
    (tmp_path / ".turns.k1ll3d.partial").mkdir()
    (tmp_path / ".turns.work.k1ll3d").mkdir()
    with output_files(tmp_path / "turns").locked(timeout_s=5, what="a test's export"):
        proc = start_script(
            "convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(nemo), "--output_dir", str(turns)
        )
        seen = []
        for line in proc.stdout:  # ends at EOF if the export never waits
            seen.append(line)
            if "waiting for another job's export" in line:
                break
        assert not turns.exists() and (tmp_path / ".turns.k1ll3d.partial").exists(), "".join(seen)[-2000:]
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and (turns / conv.EXPORT_RECORD).is_file(), rest[-2000:]
    assert "removed 2 unfinished export(s) left by killed runs" in rest
    assert not list(tmp_path.glob(".turns.*.partial")) and not list(tmp_path.glob(".turns.work.*"))


def test_import_is_reused_only_for_its_own_model_and_cleans_killed_imports(assets, tmp_path):
    import shutil

    nemo = tmp_path / "nemo"
    orphan = tmp_path / ".nemo.k1ll3d.partial"  # what atomic_dir leaves when an import is killed
    (orphan / "weights").mkdir(parents=True)
    orphan_lock = tmp_path / ".nemo.k1ll3d.partial.lock"  # and NeMo's import_ckpt beside it
    orphan_lock.touch()
    model = shutil.copytree(assets["qwen3"], tmp_path / "model")

    def import_only(model_dir: Path, recipe: str):
        return run_import(model_dir, nemo, recipe)

    first = import_only(model, "qwen3_600m")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        "removed 2 unfinished import(s) left by killed runs: .nemo.k1ll3d.partial, .nemo.k1ll3d.partial.lock"
        in first.stdout
    )
    assert "torch_dtype" not in first.stdout + first.stderr  # transformers' warnings: not on the default console
    assert not orphan.exists() and not orphan_lock.exists()
    record = json.loads((nemo / IMPORT_RECORD).read_text())
    assert record["model"] == str(model.resolve()) and record["recipe"] == "qwen3_600m"
    again = import_only(model, "qwen3_600m")
    assert again.returncode == 0 and "imported checkpoint already present" in again.stdout
    other = import_only(assets["llama"], "llama32_1b")
    assert other.returncode == 1
    assert (
        f"--nemo_ckpt_dir {nemo} holds an import of {model.resolve()} (recipe qwen3_600m), not of "
        f"{assets['llama'].resolve()} (recipe llama32_1b)"
    ) in other.stderr
    assert "remove it to import again" in other.stderr and is_nemo_checkpoint(nemo)  # refused, and nothing lost
    # New weights of the same size saved over the old ones (bytes past the first MiB, times put back): another model
    weights = model / "model.safetensors"
    assert weights.stat().st_size > 1 << 20
    original = edit_in_place(weights, -8)
    changed = import_only(model, "qwen3_600m")
    assert changed.returncode == 1 and "as it is now (differs in: files)" in changed.stderr
    weights.write_bytes(original)
    # A record an earlier version wrote ({file: [size, sha256 of its first MiB]}) of this model is kept, and its
    # files' digests recorded; of a since-changed model it is refused.
    (nemo / IMPORT_RECORD).write_text(json.dumps({**record, "files": legacy_heads(model, recursive=False)}))
    upgraded = import_only(model, "qwen3_600m")
    assert upgraded.returncode == 0 and "recording the model files' content digests" in upgraded.stdout
    assert json.loads((nemo / IMPORT_RECORD).read_text()) == record
    for damaged in ("[1, 2]", "{not json"):
        (nemo / IMPORT_RECORD).write_text(damaged)
        refused = import_only(model, "qwen3_600m")
        assert refused.returncode == 1 and f"{IMPORT_RECORD} is damaged (not a JSON object)" in refused.stderr
    (nemo / IMPORT_RECORD).write_text(json.dumps(record))
    # An import whose kept tokenizer is another's (written beside another import before private-tokenizer-assets)
    from transformers import AutoTokenizer

    kept = imported_tokenizer(nemo)
    shutil.copytree(kept, tmp_path / "kept")
    other = AutoTokenizer.from_pretrained(model)
    other.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    other.save_pretrained(kept)
    wrong = import_only(model, "qwen3_600m")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert (
        f"--nemo_ckpt_dir {nemo} holds an import of {model.resolve()} whose tokenizer differs from the model's in "
        "its vocabulary, special tokens (imported while another import ran on the machine?); remove it to import "
        "again"
    ) in wrong.stderr
    assert is_nemo_checkpoint(nemo) and AutoTokenizer.from_pretrained(kept).bos_token == "<|begin_of_text|>"
    shutil.rmtree(kept)
    shutil.copytree(tmp_path / "kept", kept)
    # An import from before the record, of a model directory whose tokenizer has gone since: used, with a warning
    (nemo / IMPORT_RECORD).rename(tmp_path / "record")
    tokenizer_files = [f for f in model.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "chat_tem"))]
    for f in tokenizer_files:
        f.rename(tmp_path / f.name)
    unchecked = import_only(model, "qwen3_600m")
    assert unchecked.returncode == 0 and "imported checkpoint already present" in unchecked.stdout
    assert f"{nemo}: its tokenizer not compared with the model's, which does not load (TypeError: " in unchecked.stdout
    for f in tokenizer_files:
        (tmp_path / f.name).rename(f)
    (tmp_path / "record").rename(nemo / IMPORT_RECORD)
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # the same path, another model
    changed = import_only(model, "qwen3_600m")
    assert changed.returncode == 1 and "as it is now (differs in: files)" in changed.stderr


def test_an_export_larger_than_the_free_space_is_refused_before_it_starts(assets, tmp_path, small_disk):
    from safetensors.torch import load_file

    nemo = tmp_path / "nemo"
    assert run_import(assets["qwen3"], nemo).returncode == 0
    hf_weights = load_file(assets["qwen3"] / "model.safetensors").values()
    assert sum(n * size for n, size in conv.model_tensors(nemo)) == sum(
        t.numel() * t.element_size() for t in hf_weights
    )
    needed = _size(conv.export_size("full", nemo, None, verify=True))
    hf = small_disk / "hf"
    out = run_script("convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(nemo), "--output_dir", str(hf))
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    assert (
        f"--output_dir {hf}: the full export needs about {needed} and the filesystem of {small_disk} has" in out.stderr
    )
    assert not hf.exists() and not list(small_disk.glob(".hf.*partial")) and not list(small_disk.glob(".hf.work*"))


def test_an_unreachable_hub_model_is_one_message_naming_the_flag(tmp_path):
    out = run_import("some-org/no-such-model", str(tmp_path / "nemo"), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "--hf_model_id some-org/no-such-model: could not read the model's configuration" in out.stderr
    assert "point --hf_model_id at a local directory" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "nemo").exists()


def test_damaged_checkpoints_are_named_before_any_loading(assets, tmp_path):
    """A checkpoint cut short (a shard shorter than its metadata says) or with unreadable metadata is refused by
    the export and by the import's reuse with the damage named, never a 200-line load traceback."""
    import shutil

    from nemo_finetune.checkpoints import checkpoint_damage

    nemo = tmp_path / "nemo"
    out = run_import(assets["qwen3"], nemo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert checkpoint_damage(nemo) is None
    damaged = {}
    for case in ("shard", "metadata_json", "dot_metadata"):
        copy = damaged[case] = shutil.copytree(nemo, tmp_path / case)
        weights = copy / "weights"
        if case == "shard":
            shard = sorted(weights.glob("*.distcp"))[0]
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        elif case == "metadata_json":
            (weights / "metadata.json").write_text('{"sharded_backend": ')
        else:
            (weights / ".metadata").write_bytes(b"\x80\x04 not a pickle")
    assert "is truncated (" in checkpoint_damage(damaged["shard"])
    assert "weights/metadata.json is unreadable" in checkpoint_damage(damaged["metadata_json"])
    assert "weights/.metadata is unreadable" in checkpoint_damage(damaged["dot_metadata"])
    export = run_script(
        "convert_checkpoint_to_hf.py",
        "--nemo_checkpoint_path",
        str(damaged["shard"]),
        "--output_dir",
        str(tmp_path / "hf"),
    )
    assert export.returncode == 1 and "Traceback" not in export.stderr
    assert f"{damaged['shard']} is damaged: weights/" in export.stderr and "export another checkpoint" in export.stderr
    assert not (tmp_path / "hf").exists()
    reuse = run_import(assets["qwen3"], damaged["dot_metadata"])
    assert reuse.returncode == 1 and "holds a damaged import: weights/.metadata is unreadable" in reuse.stderr
    for node in ("0", "1"):  # one verdict on every node: another node never accepts what global rank 0 refuses
        other = run_script(
            "peft_megatron.py", *import_args(assets["qwen3"], damaged["shard"]), "--num_nodes", "2", "--node_rank", node
        )
        assert other.returncode == 1 and "holds a damaged import: weights/" in other.stderr, (node, other.stderr)


def test_an_import_keeps_its_own_tokenizer_while_another_import_runs_on_the_machine(assets, tmp_path):
    """NeMo's importers save the tokenizer into /tmp/nemo_tokenizer, shared by every import on the machine, and the
    checkpoint copies it from there later: an import beside another took the other model's tokenizer (with the other
    one's BOS token past this model's embedding rows: an index assertion on the GPU)."""
    import inspect
    import threading

    from nemo.lightning.io.connector import ModelConnector
    from transformers import AutoTokenizer

    shared = inspect.signature(ModelConnector.save_hf_tokenizer_assets).parameters["save_path"].default
    other = AutoTokenizer.from_pretrained(assets["tokenizer"])
    other.add_special_tokens({"bos_token": "<|begin_of_text|>"})  # a Llama-3-style BOS: one id past the vocabulary
    own = AutoTokenizer.from_pretrained(assets["qwen3"])
    assert len(other) == len(own) + 1 and other.bos_token and not own.bos_token
    importing = threading.Event()

    def another_import() -> None:  # what a second job's import writes there, over and over
        while importing.is_set():
            other.save_pretrained(shared)

    temp = tmp_path / "temp"
    temp.mkdir()
    importing.set()
    writer = threading.Thread(target=another_import)
    writer.start()
    try:
        result = run_import(assets["qwen3"], tmp_path / "nemo", env={"TMPDIR": str(temp)})
    finally:
        importing.clear()
        writer.join()
    assert result.returncode == 0, result.stderr[-3000:]
    imported = AutoTokenizer.from_pretrained(imported_tokenizer(tmp_path / "nemo"))
    assert imported.get_vocab() == own.get_vocab() and imported.bos_token is None
    assert imported.chat_template == own.chat_template
    assert list(temp.iterdir()) == []  # the import's own tokenizer directory is gone with it


def test_an_import_that_kept_another_tokenizer_is_discarded_with_one_line(assets, tmp_path):
    """The check behind the shim: the race decided against this import (NeMo's tokenizer save handed another
    model's tokenizer), the real import runs, and nothing is kept."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(assets["qwen3"])
    other.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    other.save_pretrained(tmp_path / "other")
    nemo = tmp_path / "nemo"
    another_writer_wins = f"""
import contextlib, runpy, sys
from nemo.lightning.io.connector import ModelConnector
from nemo_finetune.compat import fixes

private = fixes.private_tokenizer_assets

@contextlib.contextmanager
def another_writer_wins(trust_remote_code):
    with private(trust_remote_code):
        save = ModelConnector.save_hf_tokenizer_assets
        other = {str(tmp_path / "other")!r}
        ModelConnector.save_hf_tokenizer_assets = lambda self, name, save_path=None: save(self, other, save_path)
        try:
            yield
        finally:
            ModelConnector.save_hf_tokenizer_assets = save

fixes.private_tokenizer_assets = another_writer_wins
sys.argv = ["peft_megatron.py", *{import_args(assets["qwen3"], nemo)!r}]
runpy.run_path("peft_megatron.py", run_name="__main__")
"""
    out = subprocess.run(
        [sys.executable, "-c", another_writer_wins], capture_output=True, text=True, env=script_env(None), cwd=REPO
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (
        f"the import of {assets['qwen3'].resolve()} kept a tokenizer that differs from the model's in its vocabulary, "
        "special tokens (another process wrote the importer's tokenizer directory meanwhile?); nothing was kept: run "
        "the import again"
    ) in out.stderr
    assert not nemo.exists() and not list(tmp_path.glob(".nemo.*.partial*"))  # no import, no partial one


def test_the_tokenizer_an_import_keeps_is_compared_with_the_models(assets, tmp_path):
    from transformers import AutoTokenizer

    from nemo_finetune.importer import tokenizer_differences

    assert tokenizer_differences(tmp_path / "import", str(assets["qwen3"])) == []  # keeps none: nothing to compare
    kept = imported_tokenizer(tmp_path / "import")
    AutoTokenizer.from_pretrained(assets["qwen3"]).save_pretrained(kept)
    assert tokenizer_differences(tmp_path / "import", str(assets["qwen3"])) == []  # the model's own
    other = AutoTokenizer.from_pretrained(assets["qwen3"])
    other.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    other.save_pretrained(kept)
    assert tokenizer_differences(tmp_path / "import", str(assets["qwen3"])) == ["vocabulary", "special tokens"]
    other.chat_template = "{{ messages }}"
    other.save_pretrained(kept)
    assert tokenizer_differences(tmp_path / "import", str(assets["qwen3"])) == [
        "vocabulary",
        "special tokens",
        "chat template",
    ]


def test_killed_import_and_export_leave_nothing_that_looks_complete_and_rerun_cleanly(assets, tmp_path):
    nemo, hf = tmp_path / "nemo", tmp_path / "hf"
    command = ("peft_megatron.py", *import_args(assets["qwen3"], nemo))
    proc = start_script(*command)
    kill_when(proc, lambda: any(tmp_path.glob(".nemo.*.partial/weights")))  # killed while writing the weights
    assert not nemo.exists() and list(tmp_path.glob(".nemo.*.partial"))
    rerun = run_script(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "unfinished import(s) left by killed runs: .nemo." in rerun.stdout
    assert is_nemo_checkpoint(nemo) and not list(tmp_path.glob(".nemo.*.partial*"))  # nor NeMo's lock beside it

    export_args = ("convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(nemo), "--output_dir", str(hf))
    proc = start_script(*export_args)
    kill_when(proc, lambda: any(tmp_path.glob(".hf.*.partial/*")))  # killed while writing the export
    assert not hf.exists()
    rerun = run_script(*export_args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "unfinished export(s) left by killed runs" in rerun.stdout
    assert (hf / conv.EXPORT_RECORD).is_file()
    assert not list(tmp_path.glob(".hf.*.partial")) and not list(tmp_path.glob(".hf.work.*"))
