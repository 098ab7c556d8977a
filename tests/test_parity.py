"""Forward parity with HF + TRL's conventions (benchmarks/parity.py): the loss of a job's first micro-batch, before
any update, equals the reference's on the same rows, for Qwen3 and a Llama-3-style tokenizer (BOS by default),
plain and chat rows, unpacked and packed. CPU, fp32, the real scripts."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import REPO, run_script
from nemo_finetune.demo_assets import build_hf_model

pytest.importorskip("nemo")
sys.path.insert(0, str(REPO / "benchmarks"))

import parity  # noqa: E402


@pytest.fixture(scope="module")
def jobs(assets, tmp_path_factory) -> dict:
    """For each family, the HF model, the project's import of it and the prepared plain and chat data."""
    root = tmp_path_factory.mktemp("parity")
    chats = root / "chat.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["question"]},
                        {"role": "assistant", "content": r["answer"]},
                    ]
                }
            )
            + "\n"
            for r in assets["rows"]
        )
    )
    llama_tokenizer = parity.with_bos(assets["tokenizer"], root / "llama_tokenizer")
    models = {
        "qwen3": assets["qwen3"],
        "llama": build_hf_model(root / "llama", llama_tokenizer, "llama", num_layers=2, hidden_size=128, seed=2),
    }
    out = {}
    for family, model in models.items():
        nemo = root / f"{family}_nemo"
        imported = run_script(
            "peft_megatron.py", "--import_only", "--hf_model_id", str(model),
            "--recipe_cls_name", parity.RECIPES[family], "--nemo_ckpt_dir", str(nemo),
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr[-3000:]
        data = {}
        for kind, source in (("plain", ["--dataset_name", str(assets["data"]), "--input_column", "question",
                                        "--output_column", "answer"]),
                             ("chat", ["--dataset_name", str(chats), "--chat"])):  # fmt: skip
            data[kind] = root / f"{family}_{kind}"
            prepared = run_script(
                "dataset_module.py", *source, "--data_dir", str(data[kind]), "--tokenizer", str(model)
            )
            assert prepared.returncode == 0, prepared.stderr[-3000:]
        out[family] = {"model": model, "nemo": nemo, "data": data}
    return out


def forward(job: dict, family: str, chat: bool, packed: bool, out: Path) -> dict:
    data = job["data"]["chat" if chat else "plain"]
    args = ["forward", "--hf_model", str(job["model"]), "--nemo_ckpt", str(job["nemo"]),
            "--recipe", parity.RECIPES[family], "--data_dir", str(data), "--out", str(out)]  # fmt: skip
    result = run_script("benchmarks/parity.py", *args, *(["--chat"] if chat else []), *(["--packed"] if packed else []))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_the_first_micro_batch_loss_equals_the_references(jobs, family, chat, packed, tmp_path):
    result = forward(jobs[family], family, chat, packed, tmp_path / "parity.json")
    assert result["loss_tokens"]["ours"] == result["loss_tokens"]["reference"]  # the same tokens carry the loss
    # One micro-batch of 8 rows, or one packed row of many samples, each matched to a prepared row by its tokens.
    assert result["rows"] > 8 if packed else result["rows"] == 8
    assert result["relative_difference"] < 1e-4, result
    assert 4 < result["ours"] < 8  # a random model's loss over a vocabulary of a few hundred tokens


def test_plain_rows_start_with_bos_in_training_and_evaluation_where_the_tokenizer_adds_one(jobs):
    """Llama 3's tokenizer adds BOS, Qwen's has none: a job's rows and test_checkpoint.py's prompts follow it."""
    from nemo.collections.common.tokenizers import AutoTokenizer
    from nemo.collections.llm.inference.base import MCoreTokenizerWrappper

    import dataset_module
    import test_checkpoint

    for family, first in (("llama", "bos"), ("qwen3", "text")):
        job = jobs[family]
        config = parity.job_config(job["model"], job["nemo"], job["data"]["plain"], parity.RECIPES[family])
        batch, rows = parity.first_micro_batch(config)
        tokenizer = AutoTokenizer(str(job["model"]))
        hf = tokenizer.tokenizer
        assert dataset_module.adds_bos(hf) == (first == "bos")
        starts = batch["tokens"][:, 0].tolist()
        assert (starts == [hf.bos_token_id] * 8) == (first == "bos"), starts
        prompt = test_checkpoint.prompt_ids({"input": "What is the code for x?"}, MCoreTokenizerWrappper(tokenizer))
        assert prompt == hf("What is the code for x?")["input_ids"]  # what HF's generate() would be given


def test_the_references_schedule_is_nemos_cosine_with_warmup():
    import torch
    from nemo.core.optim.lr_scheduler import CosineAnnealing

    case = parity.CURVES["lora"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=case.learning_rate)
    scheduler = CosineAnnealing(optimizer, max_steps=case.steps, warmup_steps=case.warmup_steps, min_lr=0.0)
    nemo = []
    for _ in range(case.steps):
        nemo.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [parity.nemo_lr(step, case) for step in range(case.steps)]
    assert ours == pytest.approx(nemo, rel=1e-12)
    assert ours[0] == pytest.approx(case.learning_rate / (case.warmup_steps + 1))  # not 0 as HF's warm-up starts


def exported_style_adapter(model: Path, out: Path) -> Path:
    """An HF PEFT adapter as the project's export writes one: the fused layers' A repeated for q/k/v and gate/up,
    B not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    with torch.no_grad():
        for layer in peft.base_model.model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for name in ("k_proj", "v_proj"):
                getattr(attention, name).lora_A["default"].weight.copy_(attention.q_proj.lora_A["default"].weight)
            mlp.up_proj.lora_A["default"].weight.copy_(mlp.gate_proj.lora_A["default"].weight)
            attention.o_proj.lora_B["default"].weight.fill_(1.0)
    peft.save_pretrained(out)
    return out


def test_the_reference_lora_model_shares_one_a_where_nemo_fuses_and_starts_from_b_zero(jobs, tmp_path):
    """Loaded into HF + PEFT, each fused layer has one A Parameter, so its gradient is the sum NeMo's fused A gets."""
    import torch

    model = jobs["llama"]["model"]
    adapter = exported_style_adapter(model, tmp_path / "adapter")
    reference = parity.reference_model({"model": model}, parity.CURVES["lora"], adapter)
    layer = reference.base_model.model.model.layers[0]
    shared = layer.self_attn.q_proj.lora_A["default"].weight
    assert layer.self_attn.k_proj.lora_A["default"].weight is shared
    assert layer.self_attn.v_proj.lora_A["default"].weight is shared
    assert layer.mlp.up_proj.lora_A["default"].weight is layer.mlp.gate_proj.lora_A["default"].weight
    assert shared.dtype == torch.float32  # PEFT's adapters in fp32 over the bf16 base
    trainable = dict(reference.named_parameters())
    assert all(not p.any() for n, p in trainable.items() if "lora_B" in n)
    assert sum("lora_A" in n for n in trainable) == 2 * 4  # per layer: q/k/v, o, gate/up, down: each A once


def test_the_reference_trains_on_the_jobs_rows_in_the_jobs_order_with_nemos_schedule(jobs, tmp_path):
    job = jobs["llama"]
    ws = {"root": tmp_path, "model": job["model"], "data": tmp_path / "unused.jsonl"}
    case = parity.CurveCase("lora", 6, 1e-3, 2)
    flags = parity.job_flags(ws, "llama", case, tmp_path / "run", case.steps, seed=1234)
    flags[flags.index("--data_dir") + 1] = str(job["data"]["plain"])
    config, order = parity.training_order(flags)
    assert len(order) == case.steps * parity.BATCH
    first = parity.job_config(job["model"], job["nemo"], job["data"]["plain"], "llama32_1b", max_steps=case.steps,
                              micro_batch_size=parity.BATCH, accumulate_grad_batches=1)  # fmt: skip
    assert order[: parity.BATCH] == parity.first_micro_batch(first)[1]  # the forward test's batch: the first step's
    curve = parity.reference_curve(ws, case, config, order, exported_style_adapter(job["model"], tmp_path / "a"))
    assert curve["lr"] == [parity.nemo_lr(step, case) for step in range(case.steps)]
    assert curve["loss"][-1] < curve["loss"][0]  # it trains
    assert curve["val_loss"] is None  # the tiny validation split holds no whole batch of 8


def test_a_reference_whose_adapter_a_differs_across_a_fused_layer_is_refused(jobs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = jobs["qwen3"]["model"]
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AssertionError, match="k_proj A differs from q_proj's"):
        parity.reference_model({"model": model}, parity.CURVES["lora"], tmp_path / "adapter")


# --------------------------------------------------------------------------------------------------------------------
# Quality parity on the demo task (its GPU runs: docs/PARITY.md): the job and the reference's training, on the CPU
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_job(tmp_path_factory):
    """The quality comparison's job for one seed, its data prepared by peft_megatron.py from the settings file our
    side runs with."""
    from nemo_finetune.cli import settings_yaml

    root = tmp_path_factory.mktemp("quality")
    config = parity.demo_job(root, 77)
    settings = root / "job.yaml"
    settings.write_text(settings_yaml(config, parity.SETTINGS_LEFT_OUT))
    prepared = run_script("peft_megatron.py", "--config", str(settings), "--prepare_data_only")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    return config, settings


def test_the_quality_job_is_the_demos_with_its_seed_and_runs_from_its_settings_file(demo_job, tmp_path):
    import peft_megatron
    from nemo_finetune import demo

    config, settings = demo_job
    assert peft_megatron.parse_config(["--config", str(settings)]) == dataclasses.replace(config, config=str(settings))
    with mock.patch.object(demo, "DEMO_DIR", tmp_path / "demo"):
        demos = demo.demo_config(peft_megatron.parse_config(["--demo"]))
    paths = ("output_dir", "data_dir", "nemo_ckpt_dir", "hf_model_id", "demo", "data")
    assert {k: v for k, v in vars(config).items() if k not in paths} == {
        k: v for k, v in vars(demos).items() if k not in paths
    }
    assert config.data.seed == 77 and not config.demo
    assert len((config.data_path / "test.jsonl").read_text().splitlines()) == 19


def test_the_quality_reference_trains_with_the_recipes_settings_and_keeps_its_best_validation(demo_job):
    config, _ = demo_job
    hp = parity.recipe_training(config)
    assert (hp["learning_rate"], hp["lora_dim"], hp["lora_alpha"]) == (5e-3, 32, 64)  # the demo's flags reach it
    short = dataclasses.replace(config, max_steps=6, val_check_interval=2)
    result = parity.reference_quality(short, seed=77)
    case = parity.CurveCase("lora", 6, hp["learning_rate"], hp["warmup_steps"])
    assert result["lr"] == [parity.nemo_lr(step, case, hp["min_lr"]) for step in range(6)]
    assert sorted(result["val_loss"]) == [2, 4, 6]
    assert result["best_step"] == min(result["val_loss"], key=result["val_loss"].get)
    assert result["num_samples"] == len(result["predictions"]) == 19


def test_the_references_batched_greedy_answers_are_each_prompts_own(demo_job):
    """Left padding changes no answer: each prompt alone gives what it gives in the batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_finetune import scoring

    config, _ = demo_job
    tokenizer = AutoTokenizer.from_pretrained(config.hf_model_id)
    model = AutoModelForCausalLM.from_pretrained(config.hf_model_id, dtype=torch.float32)
    predictions, labels = parity.reference_predictions(model, tokenizer, config, "cpu")
    examples = scoring.load_test_examples(config.data_path, tokenizer, 19)
    assert labels == [e["label"] for e in examples]
    for example, batched in list(zip(examples, predictions, strict=True))[:6]:
        ids = torch.tensor([tokenizer(example["input"])["input_ids"]])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
        out = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert tokenizer.decode(out, skip_special_tokens=True).strip() == batched


def test_the_quality_summary_counts_only_seeds_both_sides_ran():
    results = {"ours": {"1": {"exact_match": 0.9}, "2": {"exact_match": 0.7}, "3": {"exact_match": 0.1}},
               "reference": {"1": {"exact_match": 0.8}, "2": {"exact_match": 0.6}}}  # fmt: skip
    summary = parity.quality_summary(results)
    assert summary["seeds"] == ["1", "2"]
    assert summary["ours"] == {"mean": pytest.approx(0.8), "min": 0.7, "max": 0.9}
    assert summary["mean_difference"] == pytest.approx(0.1)


def test_curves_run_again_replace_their_earlier_results_in_place_and_new_ones_follow():
    def run(family, mode, tag):
        return {"family": family, "mode": mode, "tag": tag}

    previous = [run("qwen3", "lora", "old"), run("qwen3", "full", "old"), run("llama", "lora", "old")]
    merged = parity.merge_curves(previous, [run("llama", "full", "new"), run("qwen3", "lora", "new")])
    assert [(r["family"], r["mode"], r["tag"]) for r in merged] == [
        ("qwen3", "lora", "new"), ("qwen3", "full", "old"), ("llama", "lora", "old"), ("llama", "full", "new")
    ]  # fmt: skip
    assert parity.merge_curves([], previous) == previous


def test_the_full_fine_tuning_reference_starts_from_the_bf16_weights_our_import_trains_from(jobs):
    """fp32 master weights on bf16's grid, as Megatron's main params copied from the bf16 model are."""
    import torch

    reference = parity.reference_model({"model": jobs["qwen3"]["model"]}, parity.CURVES["full"], None)
    weight = reference.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, weight.bfloat16().float())


def test_a_failing_script_stops_the_comparison_with_the_end_of_its_log(tmp_path):
    log = tmp_path / "job.log"
    expected = r"failed \(exit 2\); the end of .*job\.log:\n(.|\n)*--max_steps 0 must be a positive integer"
    with pytest.raises(parity.ScriptFailed, match=expected):
        parity.run_script(str(REPO / "peft_megatron.py"), "--max_steps", "0", "--dry_run", log=log)


def test_a_failed_quality_run_of_ours_is_recorded_and_the_next_seed_goes_on(tmp_path, monkeypatch):
    """The GPU halves (training, generation) stand aside: what is checked is the record a failure leaves and that a
    later call with it runs that seed again, keeping the side that had finished."""
    calls = []

    def ours(config, flags):
        calls.append(("ours", config.data.seed))
        assert flags == ("--sync_checkpoint_save",)  # given to every run of ours
        if config.data.seed == 1 and len(calls) == 1:
            raise parity.ScriptFailed("peft_megatron.py --config failed (exit 1); the end of job.log:\nCUDA error")
        return {"exact_match": 0.5}

    def reference(config, seed):
        calls.append(("reference", seed))
        return {"exact_match": 0.75}

    monkeypatch.setattr(parity, "our_quality", ours)
    monkeypatch.setattr(parity, "reference_quality", reference)
    out = tmp_path / "quality.json"
    flags = ("--sync_checkpoint_save",)
    first = parity.quality_parity(tmp_path / "runs", [1, 2], None, out, flags)
    assert calls == [("ours", 1), ("ours", 2), ("reference", 2)]
    assert set(first["ours"]) == {"2"} and first["summary"]["seeds"] == ["2"]
    (failure,) = first["failures"]["1"]
    assert failure["error"].endswith("CUDA error") and {"device", "date"} <= set(failure)
    assert failure["flags"] == first["ours"]["2"]["flags"] == ["--sync_checkpoint_save"]
    assert json.loads(out.read_text()) == first
    again = parity.quality_parity(tmp_path / "runs", [1, 2], json.loads(out.read_text()), out, flags)
    assert calls[3:] == [("ours", 1), ("reference", 1)]  # seed 2 is kept; seed 1 runs again
    assert again["summary"]["seeds"] == ["1", "2"] and len(again["failures"]["1"]) == 1
    alone = parity.quality_parity(tmp_path / "runs", [3, 3], None, tmp_path / "alone.json", flags, ours_only=True)
    assert calls[5:] == [("ours", 3)] and alone["reference"] == {} and alone["summary"]["seeds"] == []

    def cut(config, seed):
        raise KeyboardInterrupt  # the reference's run stopped by a time limit

    monkeypatch.setattr(parity, "reference_quality", cut)
    with pytest.raises(KeyboardInterrupt):
        parity.quality_parity(tmp_path / "runs", [4], None, tmp_path / "cut.json", flags)
    assert json.loads((tmp_path / "cut.json").read_text())["ours"]["4"]["exact_match"] == 0.5  # ours is kept
