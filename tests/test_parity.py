"""Forward parity with HF + TRL's conventions (benchmarks/parity.py): the loss of a job's first micro-batch, before
any update, equals the reference's on the same rows, for Qwen3 and a Llama-3-style tokenizer (BOS by default),
plain and chat rows, unpacked and packed. CPU, fp32, the real scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
