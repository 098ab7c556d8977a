"""The GPU path through the real CLI and NeMo-Run's torchrun launcher, on a tiny model (1 GPU).

Run on a CUDA machine: `python -m pytest -m gpu tests/gpu`; skipped elsewhere with a reason (conftest).
The record of the GPU runs is docs/gpu-validation.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import failure, qa_job, run_script, wandb_history
from nemo_finetune import compat
from nemo_finetune import report as run_report
from nemo_finetune.checkpoints import adapters_unlike_their_master_copies, read_adapter_tensors, untrained_adapters

pytestmark = pytest.mark.gpu


STEPS_30 = "--max_steps 30 --val_check_interval 10 --learning_rate 5e-3".split()  # learns the tiny task


def tiny_job(assets, out: Path, *extra: str) -> list[str]:
    settings = "--recipe_cls_name qwen3_600m --val_fraction 0.2 --micro_batch_size 8 --accumulate_grad_batches 1"
    settings += " --limit_val_batches 2 --max_seq_length 64"
    # One HF -> NeMo import per session (~20 s a run): the first run makes it, the others reuse it
    job = [*settings.split(), "--nemo_ckpt_dir", str(assets["root"] / "qwen3_imported"), *extra]
    return qa_job(assets["qwen3"], out, *job, dataset=assets["data"])


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    return run_report.read_scalars(run_dir).get(tag, {})


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "nemo_logs" / "checkpoints").iterdir() if (p / "weights").is_dir())


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory) -> dict:
    """One 30-step LoRA run with every monitor and the profiler; the tests below read it in file order (the resume
    test, which extends it, comes last)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets,
            out,
            *STEPS_30,
            "--enable_memory_monitor",
            "--enable_speed_monitor",
            "--enable_runtime_estimator",
            "--enable_megatron_progress_bar",
            "--enable_pytorch_profiler",
        ),
    )
    assert result.returncode == 0, failure(result)
    return {"out": out, "train": scalars(out, "reduced_train_loss"), "val": scalars(out, "val_loss")}


def test_lora_trains_checkpoints_logs_and_profiles(lora_run):
    out, val, train = lora_run["out"], lora_run["val"], lora_run["train"]
    assert len(val) >= 3 and val[max(val)] < val[min(val)], val
    assert max(train) == 29 and all(v == v and v > 0 for v in train.values())
    names = [p.name for p in checkpoints(out)]
    best = [n for n in names if not n.endswith("-last")]
    assert len(best) == 1 and f"val_loss={min(val.values()):.4f}" in best[0]
    assert any(n.endswith("-last") and "step=29" in n for n in names)
    for ckpt in checkpoints(out):  # every adapter trained and was written (GPU runs 51-53 lost one)
        assert untrained_adapters(read_adapter_tensors(ckpt)) == [], ckpt.name
    assert list((out / "profiles").rglob("*.json")) or list((out / "profiles").rglob("*.pt.trace.json*"))
    # Without TE the default run trains with SDPA core attention: the model config saved with it says so.
    context = "".join(p.read_text(errors="replace") for p in checkpoints(out)[0].glob("context/*") if p.is_file())
    assert "sdpa_attention" in context and "layer_spec" in context
    logged = (out / "peft_megatron.log").read_text()
    missing = [s for s in compat.OPTIONAL_WORKER_SHIMS if f"compat: {s} (" not in logged]
    assert missing == [], missing
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert (summary["steps"], summary["early_stopped"], summary["token_slots_seen"]) == (30, False, 30 * 8 * 64)
    # real tokens: the training rows' mean length from the data record, not the padded slots
    mean = json.loads((out / "data" / ".data_ready.json").read_text())["summary"]["tokens"]["mean"]
    assert summary["tokens_per_row"] == mean and mean < 64
    assert summary["tokens_seen"] == round(30 * 8 * summary["tokens_per_row"])
    assert summary["tokens_per_s"] == pytest.approx(summary["token_slots_per_s"] * mean / 64, rel=1e-3)
    assert summary["best_checkpoint"]["val_loss"] == pytest.approx(min(val.values()), abs=5e-5)
    assert summary["last_checkpoint"]["path"].endswith("-last") and summary["tokens_per_s"] > 0
    assert 0 < summary["peak_gpu_mem_gib"] < 80 and (out / "report" / "loss_curve.png").stat().st_size > 10_000


def test_a_settings_file_with_epochs_warmup_and_dropout_reaches_the_checkpoints_saved_config(assets, tmp_path):
    """A LoRA run from --config (keys = flag names) with --num_train_epochs, --warmup_steps and --lora_dropout, one
    of its values overridden by a flag: the steps are the epochs' over the prepared rows, and the values are in the
    config NeMo saves with every checkpoint (context/)."""
    import math

    settings = tmp_path / "run.yaml"
    settings.write_text("num_train_epochs: 2\nwarmup_steps: 7\nlora_dropout: 0.07\nlearning_rate: 0.01\n")
    out = tmp_path / "epochs"
    job = tiny_job(assets, out, "--val_check_interval", "5", "--learning_rate", "5e-3")
    result = run_script("peft_megatron.py", "--config", str(settings), *job)
    assert result.returncode == 0, failure(result)
    rows = json.loads((out / "data" / ".data_ready.json").read_text())["summary"]["rows"]["train"]
    steps = math.ceil(2 * rows / 8)  # 8 rows per step
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["max_steps"] == steps and 0 < summary["steps"] <= steps
    for ckpt in checkpoints(out):
        saved = saved_settings(ckpt / "context" / "io.json")
        for name, value in (("max_steps", steps), ("warmup_steps", 7), ("dropout", 0.07), ("lr", 0.005)):
            assert value in saved.get(name, set()), (ckpt.name, name, value, saved.get(name))


def saved_settings(io_json: Path) -> dict[str, set]:
    """{attribute: the values it has anywhere} in NeMo's saved context (fiddle's JSON: each argument an
    ["Attr(name='lr')", {"value": 0.005, ...}] pair)."""
    found: dict[str, set] = {}

    def walk(node) -> None:
        if isinstance(node, list):
            if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], dict) and "value" in node[1]:
                name = re.fullmatch(r"Attr\(name='(\w+)'\)", node[0])
                if name and isinstance(node[1]["value"], (int, float, str)):
                    found.setdefault(name.group(1), set()).add(node[1]["value"])
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(json.loads(io_json.read_text()))
    return found


def test_every_checkpoint_written_while_training_goes_on_is_intact(assets, tmp_path):
    """NeMo writes checkpoints asynchronously while training goes on, and Megatron-Core 0.15.3 let torch reuse their
    staged copies before the writer had read them (GPU runs 51 and 53 lost an adapter;
    compat.fixes.hold_async_save_buffers). Eight saves during training, all kept: each holds every trained adapter,
    each equal to the fp32 master copy saved with it."""
    out = tmp_path / "run"
    steps = "--max_steps 160 --val_check_interval 20 --learning_rate 5e-3 --early_stopping_patience 20".split()
    result = run_script("peft_megatron.py", *tiny_job(assets, out, *steps, "--save_top_k", "-1"))
    assert result.returncode == 0, failure(result)
    saved = [p for p in checkpoints(out) if not p.name.endswith("-last")]
    assert len(saved) == 8, [p.name for p in saved]
    for ckpt in saved:
        adapter = read_adapter_tensors(ckpt)
        assert untrained_adapters(adapter) == [] and adapters_unlike_their_master_copies(ckpt, adapter) == [], ckpt.name
    logged = (out / "peft_megatron.log").read_text()
    assert "compat: async-save-staged-buffers (" in logged and "compat: torch-optimizer-kernels (" in logged


def test_sdpa_attention_trains_like_megatrons_unfused_attention(assets, tmp_path):
    """Same data, seed and steps with --core_attention sdpa (the default without TE) and unfused (Megatron's local
    DotProductAttention): the training losses agree within bf16 noise at every one of 20 steps."""
    losses = {}
    for attention in ("unfused", "sdpa"):
        out = tmp_path / attention
        result = run_script(
            "peft_megatron.py",
            *tiny_job(
                assets,
                out,
                "--max_steps",
                "20",
                "--val_check_interval",
                "20",
                "--log_every_n_steps",
                "1",
                "--learning_rate",
                "5e-3",
                "--core_attention",
                attention,
            ),
        )
        assert result.returncode == 0, failure(result)
        losses[attention] = scalars(out, "reduced_train_loss")
    sdpa, unfused = losses["sdpa"], losses["unfused"]
    print("\n".join(f"step {s:2d}: sdpa {sdpa[s]:.5f} unfused {unfused[s]:.5f}" for s in sorted(sdpa)))
    steps = sorted(set(sdpa) & set(unfused))
    assert len(steps) >= 19 and set(sdpa) == set(unfused), (sorted(sdpa), sorted(unfused))
    assert unfused[steps[-1]] < 0.8 * unfused[steps[0]]  # it trained: the comparison covers changing weights
    for step in steps:
        assert abs(sdpa[step] - unfused[step]) <= 0.02 * unfused[step], (step, sdpa[step], unfused[step])


def bf16_tie(a: float, b: float) -> bool:
    """Two logits closer than two bfloat16 steps at their magnitude: greedy may pick either."""
    import math

    magnitude = max(abs(a), abs(b), 1e-3)
    return abs(a - b) <= 2 * 2.0 ** (math.floor(math.log2(magnitude)) - 7)


def generate_predictions(out: Path, predictions: Path, graphs: str, *extra: str) -> list[dict]:
    """test_checkpoint.py on the run's test split; `graphs` is what its summary line must say of decode CUDA graphs."""
    result = run_script(
        "test_checkpoint.py",
        "--nemo_logs_dir",
        str(out / "nemo_logs"),
        "--data_dir",
        str(out / "data"),
        "--predictions_file",
        str(predictions),
        "--num_tokens_to_generate",
        "8",
        "--bertscore_model",
        "none",
        *extra,
    )
    assert result.returncode == 0, failure(result)
    summary = next(line for line in result.stdout.splitlines() if "generated tokens/s" in line)
    print(summary)
    assert f"decode CUDA graphs: {graphs}" in summary
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows
    return rows


def differences_from_hf_generate(rows: list[dict], model, tokenizer) -> tuple[int, int, list[str]]:
    """(rows equal token for token, rows that differ only at a bf16 tie, a report line per differing row)."""
    import torch

    eos = tokenizer.eos_token_id
    equal, ties, report = 0, 0, []
    for n, row in enumerate(rows):
        prompt = tokenizer(row["input"], add_special_tokens=False).input_ids
        assert len(prompt) == row["prompt_tokens"], "NeMo and HF tokenize the prompt differently"
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            hf = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(prompt) :].tolist()
        ours = list(row["generated_token_ids"])
        if ours == hf:
            equal += 1
            continue
        pos = next((i for i, (a, b) in enumerate(zip(ours, hf, strict=False)) if a != b), min(len(ours), len(hf)))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:pos]], device="cuda")).logits[0, -1].float()
        ours_tok = ours[pos] if pos < len(ours) else eos
        hf_tok = hf[pos] if pos < len(hf) else eos
        a, b = float(logits[ours_tok]), float(logits[hf_tok])
        ties += bf16_tie(a, b)
        report.append(
            f"row {n}: first difference at generated position {pos}: ours {ours_tok} "
            f"(HF logit {a:.4f}) vs HF {hf_tok} (HF logit {b:.4f}); tie={bf16_tie(a, b)}"
        )
    return equal, ties, report


def test_generation_is_greedy_equal_to_hf_generate_on_the_export(lora_run, tmp_path):
    """test_checkpoint.py's dynamic engine (paged attention, in-flight batching), with decode CUDA graphs (the
    default) and eager, against transformers' generate() on the merged HF export of the same checkpoint, token for
    token; a difference passes only as a bf16 tie, shown with both logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora_run["out"]
    runs = {
        "CUDA graphs": generate_predictions(out, tmp_path / "graphs.jsonl", "["),
        "eager": generate_predictions(out, tmp_path / "eager.jsonl", "off", "--num_cuda_graphs", "0"),
    }
    exported = run_script("convert_checkpoint_to_hf.py", "--nemo_logs_dir", str(out / "nemo_logs"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    export = next(out.glob("nemo_logs/exports/*.hf_model"))
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.bfloat16).cuda().eval()
    failures = []
    for mode, rows in runs.items():
        equal, ties, report = differences_from_hf_generate(rows, model, tokenizer)
        print(f"{mode}: greedy token-for-token equal to HF generate: {equal}/{len(rows)}; bf16 ties: {ties}")
        print("\n".join(report))
        if equal + ties != len(rows):
            failures.append(f"{mode}:\n" + "\n".join(report))
    assert not failures, "\n".join(failures)


def test_lora_resumes_from_last_with_its_optimizer_and_data_position(assets, lora_run):
    out, train = lora_run["out"], lora_run["train"]
    resumed = run_script(
        "peft_megatron.py",
        *tiny_job(assets, out, "--max_steps", "40", "--val_check_interval", "10", "--learning_rate", "5e-3"),
    )
    assert resumed.returncode == 0, failure(resumed)
    assert "Restoring states from the checkpoint path" in resumed.stdout
    assert "`max_steps=40` reached" in resumed.stdout
    train_after = scalars(out, "reduced_train_loss")
    assert min(s for s in train_after if s not in train) == 30  # continues at step 30, not from 0
    # The weights, optimizer and data position came back: the loss continues near step 29's and below the first
    # logged one (step 9), towards which a restart from the base model would jump back.
    assert abs(train_after[30] - train[29]) < 0.25 * train[29] and train_after[30] < train[min(train)]


def test_resume_from_a_chosen_checkpoint_continues_at_its_step_with_the_global_batch_given(assets, tmp_path):
    """--global_batch_size 16 over micro-batches of 8 (accumulation 2) is what trains and what the checkpoints
    count (consumed samples); --resume_from an earlier checkpoint, into a new --output_dir, continues at that
    checkpoint's step with its weights, optimizer and data position: its first step repeats the first run's."""
    job = tiny_job(assets, tmp_path / "first", "--max_steps", "12", "--val_check_interval", "4", "--save_top_k", "-1")
    at = job.index("--accumulate_grad_batches")
    job[at : at + 2] = ["--global_batch_size", "16", "--learning_rate", "5e-3", "--log_every_n_steps", "1"]
    first = run_script("peft_megatron.py", *job)
    assert first.returncode == 0, failure(first)
    summary = json.loads((tmp_path / "first" / "report" / "summary.json").read_text())
    assert (summary["steps"], summary["token_slots_seen"]) == (12, 12 * 16 * 64)
    names = [p.name for p in checkpoints(tmp_path / "first")]
    consumed = {int(m[1]): float(m[2]) for m in (re.search(r"step=(\d+)-consumed_samples=([\d.]+)", n) for n in names)}
    assert consumed == {step: (step + 1) * 16.0 for step in (3, 7, 11)}, names  # 16 rows a step, in the checkpoints
    assert "global_batch_size: 16 |" in (tmp_path / "first" / "peft_megatron.log").read_text()
    train = scalars(tmp_path / "first", "reduced_train_loss")

    chosen = next(p for p in checkpoints(tmp_path / "first") if "step=3" in p.name and not p.name.endswith("-last"))
    job = [a if a != str(tmp_path / "first") else str(tmp_path / "second") for a in job]
    resumed = run_script("peft_megatron.py", *job, "--resume_from", str(chosen))
    assert resumed.returncode == 0, failure(resumed)
    assert "Restoring states from the checkpoint path" in resumed.stdout
    train_after = scalars(tmp_path / "second", "reduced_train_loss")
    assert min(train_after) == 4 and max(train_after) == 11, sorted(train_after)  # not 0 (base), not 12 (-last)
    assert train_after[4] == pytest.approx(train[4], rel=0.02), (train_after[4], train[4])


def test_the_seed_reaches_the_adapters_initialisation(assets, tmp_path):
    """LoRA's A matrices come from Megatron's generators, which the workers seed with --seed (NeMo's strategy alone
    uses 1234); B starts at zero, so after one step A is still its initialisation but for weight decay: two runs
    that differ only in --seed start from different adapters."""
    import torch

    adapters = {}
    for seed in (7, 8):
        out = tmp_path / f"seed{seed}"
        job = tiny_job(assets, out, "--max_steps", "1", "--val_check_interval", "1", "--seed", str(seed))
        result = run_script("peft_megatron.py", *job)
        assert result.returncode == 0, failure(result)
        logged = (out / "peft_megatron.log").read_text()
        assert f"compat: model-init-seed (Megatron's generators seeded with --seed {seed})" in logged
        tensors = read_adapter_tensors(checkpoints(out)[-1])
        adapters[seed] = {k: v for k, v in tensors.items() if k.endswith("linear_in.weight")}
    assert adapters[7] and adapters[7].keys() == adapters[8].keys()
    assert not [k for k in adapters[7] if torch.equal(adapters[7][k], adapters[8][k])]


def test_full_fine_tuning_reduces_val_loss_and_exports(assets, tmp_path):
    out = tmp_path / "full"
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets, out, "--full_ft", "--max_steps", "30", "--val_check_interval", "10", "--learning_rate", "1e-4"
        ),
    )
    assert result.returncode == 0, failure(result)
    val = scalars(out, "val_loss")
    assert val[max(val)] < val[min(val)], val
    export = run_script("convert_checkpoint_to_hf.py", "--nemo_logs_dir", str(out / "nemo_logs"))
    assert export.returncode == 0, export.stderr[-4000:]
    assert list(out.glob("nemo_logs/exports/*.hf_model/model.safetensors"))
    assert not list(out.glob("nemo_logs/checkpoints/*.hf_*"))  # NeMo would take an export there for a checkpoint


def test_packed_sequences_train_validate_and_checkpoint(assets, tmp_path):
    """--packed_sequence end to end: NeMo's packer on the prepared JSONL, packed rows through the SDPA core
    attention's flash varlen path and the workers' sync-free RoPE; the loss falls and the best checkpoint is kept."""
    out = tmp_path / "packed"
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets,
            out,
            "--packed_sequence",
            "--micro_batch_size",
            "1",
            "--accumulate_grad_batches",
            "2",
            "--max_seq_length",
            "64",
            *STEPS_30,
            "--log_every_n_steps",
            "1",
        ),
    )
    assert result.returncode == 0, failure(result)
    assert "packed train" in result.stdout and "rows of <= 64 tokens" in result.stdout
    train, val = scalars(out, "reduced_train_loss"), scalars(out, "val_loss")
    print({s: round(v, 4) for s, v in sorted(train.items())}, val)
    assert train[max(train)] < 0.8 * train[min(train)] and val[max(val)] < val[min(val)]  # as the unpacked runs
    best = [p.name for p in checkpoints(out) if not p.name.endswith("-last")]
    assert len(best) == 1 and f"val_loss={min(val.values()):.4f}" in best[0]


@pytest.mark.parametrize("mode", [[], ["--full_ft"]], ids=["lora", "full_ft"])
def test_cuda_graphs_train_packed_rows_like_eager_layers(assets, tmp_path, mode):
    """--cuda_graphs: after the first step every transformer layer's forward and backward replay CUDA graphs (the
    workers' graph-safe RNG tracker, rows and sequence boundaries padded to one shape, the varlen kernel's grid sized
    for the row inside the capture); the losses follow the eager run's on the same rows, validation replays the
    forward graphs, and the best checkpoint is kept, with a model config that loads without graphs."""
    steps = ["--max_steps", "12", "--val_check_interval", "6", "--learning_rate", "5e-3" if not mode else "1e-4"]
    packed = "--packed_sequence --micro_batch_size 1 --accumulate_grad_batches 2 --log_every_n_steps 1".split()
    losses = {}
    for name, extra in (("eager", []), ("graphs", ["--cuda_graphs"])):
        out = tmp_path / name
        result = run_script("peft_megatron.py", *tiny_job(assets, out, *packed, *steps, *mode, *extra))
        assert result.returncode == 0, failure(result)
        losses[name] = (scalars(out, "reduced_train_loss"), scalars(out, "val_loss"))
    logged = (tmp_path / "graphs" / "peft_megatron.log").read_text()
    assert "compat: graph-safe-rng (" in logged and "compat: local-cuda-graphs (" in logged
    assert "Creating 4 CUDA graphs" in logged  # a forward and a backward graph for each of the 2 layers
    saved = checkpoints(tmp_path / "graphs")[0]
    context = "".join(p.read_text(errors="replace") for p in saved.glob("context/*") if p.is_file())
    assert context and not re.search(r"cuda_graph_impl\W+local", context), "checkpoints must load without graphs"
    (train, val), (eager_train, eager_val) = losses["graphs"], losses["eager"]
    print({s: (round(train[s], 4), round(eager_train[s], 4)) for s in sorted(train)}, val, eager_val)
    assert set(train) == set(eager_train) and len(train) >= 11, (sorted(train), sorted(eager_train))
    for step in sorted(train):  # graphs replay from the second step on
        assert train[step] == pytest.approx(eager_train[step], rel=0.02), (step, train[step], eager_train[step])
    assert val == pytest.approx(eager_val, rel=0.02)
    best = [p.name for p in checkpoints(tmp_path / "graphs") if not p.name.endswith("-last")]
    assert len(best) == 1 and f"val_loss={min(val.values()):.4f}" in best[0]


def test_cuda_graphs_lora_resumes_from_last_and_graphs_again(assets, tmp_path):
    """A graphed run resumed from its -last checkpoint: the restored process captures its own graphs after its first
    step (graphs hold device pointers and do not travel in checkpoints) and the loss continues where it stopped."""
    out = tmp_path / "graphs"
    packed = "--packed_sequence --micro_batch_size 1 --accumulate_grad_batches 2 --log_every_n_steps 1".split()
    common = [*packed, "--val_check_interval", "6", "--learning_rate", "5e-3", "--cuda_graphs"]
    first = run_script("peft_megatron.py", *tiny_job(assets, out, *common, "--max_steps", "12"))
    assert first.returncode == 0, failure(first)
    train = scalars(out, "reduced_train_loss")
    resumed = run_script("peft_megatron.py", *tiny_job(assets, out, *common, "--max_steps", "18"))
    assert resumed.returncode == 0, failure(resumed)
    assert "Restoring states from the checkpoint path" in resumed.stdout
    assert "`max_steps=18` reached" in resumed.stdout
    assert (out / "peft_megatron.log").read_text().count("Creating 4 CUDA graphs") == 2  # once in each run
    train_after = scalars(out, "reduced_train_loss")
    print({s: round(v, 4) for s, v in sorted(train_after.items())})
    assert min(s for s in train_after if s not in train) == 12
    assert abs(train_after[12] - train[11]) < 0.25 * train[11] and train_after[12] < train[min(train)]


def test_early_stopping_ends_a_run_that_cannot_improve(assets, tmp_path):
    out = tmp_path / "stop"
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets,
            out,
            "--max_steps",
            "200",
            "--val_check_interval",
            "5",
            "--learning_rate",
            "1e-12",
            "--early_stopping_patience",
            "2",
        ),
    )
    assert result.returncode == 0, failure(result)
    assert "did not improve in the last 2 records" in result.stdout
    assert max(scalars(out, "reduced_train_loss")) < 30
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["early_stopped"] is True and summary["steps"] < 200 and "(early-stopped)" in result.stdout


def test_wandb_offline_run_holds_the_train_and_validation_losses(assets, tmp_path):
    """--use_wandb with WANDB_MODE=offline through the real launch; needs wandb on the node (the offline bundle
    built with --include wandb)."""
    pytest.importorskip("wandb", reason="wandb is not installed here (tools/build_offline_bundle.py --include wandb)")
    out = tmp_path / "wandb"
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets, out, "--max_steps", "20", "--val_check_interval", "10", "--learning_rate", "5e-3", "--use_wandb"
        ),
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, failure(result)
    (run_dir,) = out.rglob("offline-run-*")
    rows = wandb_history(run_dir)
    val = scalars(out, "val_loss")
    logged = [r["val_loss"] for r in rows if "val_loss" in r]
    assert logged and all(any(abs(v - w) <= 1e-6 * abs(v) for w in logged) for v in val.values()), (logged, val)
    assert len([r for r in rows if "reduced_train_loss" in r]) >= 2


def test_training_failure_exits_non_zero_with_the_error(assets, tmp_path):
    """Rows of ~108k tokens cannot train on one GPU without TE: NeMo's SFT collate builds a 108k x 108k attention
    mask on the host (on the H100 the data loader worker was killed for memory), and the unfused attention would
    need a ~93 GB score tensor. Either way the launcher must exit 1 and show the worker's error."""
    import json

    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": "What is the code for " * 18000, "answer": f"red-{i}"}) + "\n" for i in range(10)
        )
    )
    result = run_script(
        "peft_megatron.py",
        *tiny_job(
            assets,
            tmp_path / "oom",
            "--max_steps",
            "10",
            "--val_check_interval",
            "5",
            "--max_seq_length",
            "131072",
            "--micro_batch_size",
            "1",
            "--val_fraction",
            "0.3",
            "--dataset_name",
            str(data),
        ),
    )
    assert result.returncode == 1, result.stdout[-3000:]
    output = result.stdout + result.stderr
    assert any(e in output for e in ("OutOfMemoryError", "out of memory", "RuntimeError: DataLoader worker")), output[
        -6000:
    ]
    assert "error: training failed: " in result.stderr and "combined.log" in result.stderr
