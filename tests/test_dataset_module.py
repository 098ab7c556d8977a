"""dataset_module.py: sources, rows, splits, fingerprinted idempotent preparation, bad input, real NeMo batches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import dataset_module as dm
from conftest import edit_in_place, qa_flags, qa_job, run_script
from nemo_finetune.errors import PipelineError
from nemo_finetune.records import data_files, packing_files

ROWS = [{"question": f"What is {i} plus one?", "answer": str(i + 1), "ctx": f"Count #{i}"} for i in range(40)]


ONE_SAMPLE_STEPS = ("--micro_batch_size", "1", "--accumulate_grad_batches", "1")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(source, **kw) -> dm.HFDatasetConfig:
    base = dict(
        dataset_name=str(source), input_column="question", output_column="answer", val_fraction=0.1, test_fraction=0.1
    )
    return dm.HFDatasetConfig(**{**base, **kw})


def prepare(cfg, data_dir, tokenizer, max_seq_length=64, **kw):
    return dm.prepare_dataset(cfg, dm.DataTarget(Path(data_dir), str(tokenizer), max_seq_length, **kw))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_template_rows_are_exact_and_splits_sized(tmp_path, assets):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src, prompt_template="### Question:\n{question}\n\n### Answer:", system_column="ctx")
    summary = prepare(cfg, tmp_path / "out", assets["tokenizer"])
    assert summary["rows"] == {"train": 32, "val": 4, "test": 4}
    rows = (
        read(tmp_path / "out" / "training.jsonl")
        + read(tmp_path / "out" / "validation.jsonl")
        + read(tmp_path / "out" / "test.jsonl")
    )
    assert len(rows) == 40
    expected = {f"Count #{i}\n\n### Question:\nWhat is {i} plus one?\n\n### Answer:": str(i + 1) for i in range(40)}
    assert {r["input"]: r["output"] for r in rows} == expected
    assert set(rows[0]) == {"input", "output"}


def test_preparation_is_deterministic_byte_for_byte(tmp_path, assets):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    prepare(config(src), tmp_path / "a", assets["tokenizer"])
    prepare(config(src), tmp_path / "b", assets["tokenizer"])
    for name in dm.SPLIT_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prepare(config(src, seed=7), tmp_path / "c", assets["tokenizer"])
    assert (tmp_path / "a" / "training.jsonl").read_bytes() != (tmp_path / "c" / "training.jsonl").read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "save_to_disk", "jsonl_dir"])
def test_local_formats_give_the_same_rows(tmp_path, assets, fmt):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "csv":
        ds.to_csv(str(tmp_path / "src.csv"))
        source = tmp_path / "src.csv"
    elif fmt == "parquet":
        ds.to_parquet(str(tmp_path / "src.parquet"))
        source = tmp_path / "src.parquet"
    elif fmt == "save_to_disk":
        datasets.DatasetDict(
            {"train": ds.select(range(30)), "validation": ds.select(range(30, 35)), "test": ds.select(range(35, 40))}
        ).save_to_disk(str(tmp_path / "dd"))
        source = tmp_path / "dd"
    else:
        (tmp_path / "dir").mkdir()
        write_jsonl(tmp_path / "dir" / "train.jsonl", ROWS[:30])
        write_jsonl(tmp_path / "dir" / "test.jsonl", ROWS[30:])
        source = tmp_path / "dir"
    summary = prepare(config(source), tmp_path / "out", assets["tokenizer"])
    out = {r["input"] for s in dm.SPLIT_FILES.values() for r in read(tmp_path / "out" / s)}
    assert out == {r["question"] for r in ROWS}
    if fmt == "save_to_disk":  # existing splits are used as they are
        assert summary["rows"] == {"train": 30, "val": 5, "test": 5}
        assert summary["sources"] == {"train": "train", "val": "validation", "test": "test"}
    if fmt == "jsonl_dir":
        assert summary["rows"]["test"] == 10 and summary["sources"]["val"] == "carved from train"


def test_chat_rows_and_nemo_chat_dataset(tmp_path, assets):
    chats = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(20)
    ]
    chats.append({"messages": [{"role": "user", "content": "no answer"}]})
    src = write_jsonl(tmp_path / "chat.jsonl", chats)
    summary = prepare(config(src, chat=True), tmp_path / "out", assets["tokenizer"])
    assert summary["dropped"] == {"train: last message is not from the assistant": 1}
    assert sum(summary["rows"].values()) == 20
    assert read(tmp_path / "out" / "training.jsonl")[0]["messages"][1]["role"] == "assistant"


def test_fingerprint_skips_same_settings_and_refuses_changed_ones(tmp_path, assets, caplog):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    before = (out / "training.jsonl").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        prepare(config(src), out, assets["tokenizer"])
    assert "already prepared with these settings" in caplog.text
    assert (out / "training.jsonl").stat().st_mtime_ns == before
    with pytest.raises(PipelineError, match=r"--val_fraction: 0.1 -> 0.2.*--overwrite_data"):
        prepare(config(src, val_fraction=0.2), out, assets["tokenizer"])
    write_jsonl(src, ROWS[:30])
    with pytest.raises(PipelineError, match="the source files changed"):
        prepare(config(src), out, assets["tokenizer"])
    summary = prepare(config(src, overwrite_data=True), out, assets["tokenizer"])
    assert sum(summary["rows"].values()) == 30
    marker = json.loads((out / dm.MARKER).read_text())
    assert marker["fingerprint"]["config"]["val_fraction"] == 0.1 and marker["summary"]["rows"]["train"] == 24


def test_a_same_size_edit_of_the_source_with_its_time_put_back_is_a_change(tmp_path, assets):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    edit_in_place(src, src.read_bytes().index(b'"answer": "4"') + len('"answer": "'), b"K")
    with pytest.raises(PipelineError, match=r"the source files changed \(their content, or which files\)"):
        prepare(config(src), out, assets["tokenizer"])
    prepare(config(src, overwrite_data=True), out, assets["tokenizer"])
    rows = [r for split in dm.SPLIT_FILES.values() for r in read(out / split)]
    assert [r["output"] for r in rows if r["input"].startswith("What is 3 plus")] == ["K"]


def test_data_an_earlier_version_prepared_with_the_same_settings_is_prepared_again_not_refused(
    tmp_path, assets, caplog
):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    marker = json.loads((out / dm.MARKER).read_text())
    older = {**marker["fingerprint"], "format": 1, "sha256": "0" * 64}  # as version 1 wrote it: times, not content
    older["source"] = {"files": [{"path": str(src.resolve()), "size": src.stat().st_size, "mtime_ns": 1}]}
    data_files(out).write({**marker, "fingerprint": older})
    with caplog.at_level("INFO"):
        prepare(config(src), out, assets["tokenizer"])
    assert "prepared with these settings by an earlier version of this script; preparing again" in caplog.text
    assert json.loads((out / dm.MARKER).read_text())["fingerprint"] == marker["fingerprint"]
    for damaged in ("[1, 2]", "{not json", json.dumps({**marker, "fingerprint": "?"})):
        (out / dm.MARKER).write_text(damaged)
        with pytest.raises(PipelineError, match=r"its .data_ready.json is damaged\); pass --overwrite_data"):
            prepare(config(src), out, assets["tokenizer"])
    data_files(out).write({**marker, "fingerprint": {**older, "config": {**older["config"], "val_fraction": 0.2}}})
    with pytest.raises(PipelineError, match=r"--val_fraction: 0.2 -> 0.1.*--overwrite_data"):  # other settings
        prepare(config(src), out, assets["tokenizer"])


def test_interrupted_write_leaves_no_marker_and_no_half_file(tmp_path, assets, monkeypatch):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    real = dm.atomic_write_jsonl
    calls = {"n": 0}

    def crash_on_second(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:

            def boom():
                yield next(iter(rows))
                raise KeyboardInterrupt("killed mid-write")

            return real(path, boom())
        return real(path, rows)

    monkeypatch.setattr(dm, "atomic_write_jsonl", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(src), out, assets["tokenizer"])
    assert not (out / dm.MARKER).exists()
    assert not (out / "validation.jsonl").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    assert "killed mid-write" in (data_files(out).failed).read_text()


def test_waiting_rank_fails_fast_on_rank0_failure_and_times_out(tmp_path, assets):
    import os
    import threading
    import time

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="timed out after 1s waiting for data preparation"):
        prepare(config(src), out, assets["tokenizer"], global_rank=1, wait_timeout_s=1)

    def wait_in_thread() -> dict:
        result: dict = {}

        def run():
            try:
                result["summary"] = prepare(config(src), out, assets["tokenizer"], global_rank=1, wait_timeout_s=60)
            except PipelineError as e:
                result["error"] = str(e)

        result["thread"] = threading.Thread(target=run)
        result["thread"].start()
        time.sleep(0.5)  # the waiter has begun
        return result

    # A failure written while the other node waits stops it at once, with rank 0's error.
    waiter = wait_in_thread()
    (data_files(out).failed).write_text("ValueError: bad column\n")
    waiter["thread"].join(timeout=10)
    assert "failed on global rank 0: ValueError: bad column" in waiter["error"]

    # An earlier attempt's failure does not stop the next attempt: rank 0 clears it and prepares.
    os.utime(data_files(out).failed, (time.time() - 3600, time.time() - 3600))
    waiter = wait_in_thread()
    summary = prepare(config(src), out, assets["tokenizer"])
    waiter["thread"].join(timeout=30)
    assert waiter.get("summary") == summary and "error" not in waiter
    assert not (data_files(out).failed).exists()


def test_an_old_failure_marker_is_believed_after_a_grace_period(tmp_path):
    import os

    from nemo_finetune.files import wait_for_file

    failed = tmp_path / "x.failed"
    failed.write_text("ValueError: old\n")
    an_hour_ago = failed.stat().st_mtime - 3600
    os.utime(failed, (an_hour_ago, an_hour_ago))
    with pytest.raises(
        PipelineError,
        match=r"failed on global rank 0: ValueError: old .*written before this node "
        r"started; rank 0 began no new attempt in 1s",
    ):
        wait_for_file(tmp_path / "done", failed, timeout_s=30, what="x", poll_s=0.1, stale_grace_s=1)


BAD_INPUT = [
    ("missing_column", "has no column(s) ['answer']; its columns are ['ctx', 'question', 'reply']"),
    ("all_empty", "every row of split 'train' was dropped"),
    ("malformed", "src.jsonl:3: malformed JSON line"),
    ("tiny", "the train split is empty after filtering and splitting (1 usable rows"),
    ("hub_offline", "Without network access, point --dataset_name at local files"),
    ("latin1_csv", "src.csv: line 3 is not UTF-8 (byte 0xe9 at byte 9 of the line); re-save the file as UTF-8"),
    ("empty_file", "src.jsonl is empty; give files that hold rows"),
    ("unreadable_parquet", "could not read the local dataset"),
]


@pytest.mark.parametrize("case, message", BAD_INPUT)
def test_bad_input_is_a_clear_error(tmp_path, assets, case, message, monkeypatch):
    src = tmp_path / "src.jsonl"
    if case == "missing_column":
        write_jsonl(src, [{"question": "q", "reply": "a", "ctx": "c"}])
    elif case == "all_empty":
        write_jsonl(src, [{"question": "q", "answer": "  "}, {"question": None, "answer": "a"}])
    elif case == "malformed":
        src.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"}\n{"question": oops}\n')
    elif case == "tiny":
        write_jsonl(src, ROWS[:1])
    elif case == "empty_file":
        src.write_text("")
    elif case == "unreadable_parquet":
        src = tmp_path / "src.parquet"
        src.write_bytes(b"not a parquet file")
    elif case == "latin1_csv":
        src = tmp_path / "src.csv"
        src.write_bytes("question,answer\nWhat is one?,1\nWhat caf\u00e9?,2\n".encode("latin-1"))
    cfg = config(src, val_fraction=0.1)
    if case == "hub_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        cfg = config("some-org/some-dataset")
    with pytest.raises(PipelineError) as err:
        prepare(cfg, tmp_path / "out", assets["tokenizer"])
    assert message in str(err.value)
    assert case == "hub_offline" or "network" not in str(err.value)  # local files get no network hint


@pytest.mark.parametrize(
    "template, reason",
    [
        ("{row.question}", "field {row.question} is not a column name"),
        ("{question[0]}", "field {question[0]} is not a column name"),
        ("{}", "field {} is not a column name"),
        ("{question:d}", "Unknown format code 'd' for object of type 'str'"),
        ("{question!x}", "Unknown conversion specifier x"),
        ("{question:{width}}", "{width} in a format spec"),
    ],
)
def test_templates_that_are_no_format_string_over_text_columns_are_refused_before_loading(tmp_path, template, reason):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)  # a local file: its columns are checked against the template too
    problems = config(src, prompt_template=template).problems()
    assert problems == [
        f"--prompt_template {template!r} is not a format string over column names ({reason}); write columns as "
        "{name} (their values go in as text) and literal braces as {{ }}"
    ]
    out = run_script("dataset_module.py", "--dataset_name", str(src), "--prompt_template", template, "--output_column",
                     "answer", "--data_dir", str(tmp_path / "out"), "--tokenizer", "unused")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and reason in out.stderr
    assert not (tmp_path / "out").exists()


def test_template_values_go_in_as_text_whatever_their_json_type(tmp_path, assets):
    rows = [{"n": i, "ok": i % 2 == 0, "answer": f"a{i}"} for i in range(40)]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    prepare(config(src, prompt_template="{n:>3}|{ok}", output_column="answer"), tmp_path / "out", assets["tokenizer"])
    prepared = read(tmp_path / "out" / "training.jsonl")
    assert {r["input"] for r in prepared} <= {f"{i:>3}|{i % 2 == 0}" for i in range(40)} and len(prepared) == 32


def test_config_problems_name_the_flags():
    problems = dm.HFDatasetConfig(
        val_fraction=0.5, test_fraction=0.5, max_samples=0, prompt_template="{0} {x y}", dataset_name="nope.jsonl"
    ).problems()
    joined = "\n".join(problems)
    for fragment in (
        "leaves no training rows",
        "--max_samples 0",
        "--prompt_template '{0} {x y}' is not a format string over column names",
        "nope.jsonl does not exist",
    ):
        assert fragment in joined


def test_summary_warns_about_truncation(tmp_path, assets):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    summary = prepare(config(src), tmp_path / "out", assets["tokenizer"], max_seq_length=4)
    text = dm.format_summary(summary)
    assert "p50" in text and "WARNING: 100.0% of rows exceed --max_seq_length 4" in text


def test_the_summary_gives_the_mean_tokens_a_training_row_holds_after_truncation(tmp_path, assets):
    """What the run report turns into real tokens/s: prompt + answer + end-of-text, cut at --max_seq_length."""
    from transformers import AutoTokenizer

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    for max_seq_length in (4, 4096):
        summary = prepare(config(src), tmp_path / f"out{max_seq_length}", assets["tokenizer"], max_seq_length)
        train = [json.loads(line) for line in (tmp_path / f"out{max_seq_length}" / "training.jsonl").open()]
        lengths = [
            len(tokenizer(f"{r['input']} {r['output']}", add_special_tokens=False)["input_ids"]) + 1 for r in train
        ]
        expected = sum(min(n, max_seq_length) for n in lengths) / len(lengths)
        assert summary["tokens"]["mean"] == round(expected, 2) and summary["tokens"]["counted"] == len(train)
    assert summary["tokens"]["mean"] > 4  # untruncated rows are longer than the 4-token cut


def test_the_dataset_cli_prepares_data_that_a_training_run_reuses(tmp_path, assets):
    help_text = run_script("dataset_module.py", "--help")
    assert help_text.returncode == 0 and "--tokenizer TOKENIZER" in help_text.stdout
    assert (
        "--input_column INPUT_COLUMN" in help_text.stdout and "python dataset_module.py --data_dir" in help_text.stdout
    )
    data_dir = tmp_path / "run" / "data"
    flags = ["--dataset_name", str(assets["data"]), "--input_column", "question", "--output_column", "answer"]
    out = run_script("dataset_module.py", "--data_dir", str(data_dir), "--tokenizer", str(assets["qwen3"]), *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((data_dir / ".data_ready.json").read_text())["summary"]["rows"]
    assert dm.format_summary(json.loads((data_dir / ".data_ready.json").read_text())["summary"]) in out.stdout
    assert rows["train"] > 0
    before = {p.name: p.read_bytes() for p in data_dir.glob("*.jsonl")}
    job = qa_job(assets["qwen3"], tmp_path / "run", "--micro_batch_size", "1", "--accumulate_grad_batches", "1")
    job += ["--dataset_name", str(assets["data"])]
    reused = run_script("peft_megatron.py", "--prepare_data_only", *job)
    assert reused.returncode == 0, reused.stderr[-2000:]
    assert "already prepared with these settings" in reused.stdout + reused.stderr
    assert {p.name: p.read_bytes() for p in data_dir.glob("*.jsonl")} == before
    refused = run_script("dataset_module.py", "--dataset_name", str(assets["data"]))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--data_dir is required" in refused.stderr and "--tokenizer is required" in refused.stderr


def test_prepare_data_only_cli(tmp_path, assets):
    job = qa_job(assets["qwen3"], tmp_path, *"--val_fraction 0.25 --micro_batch_size 4".split(), dataset=assets["data"])
    out = run_script("peft_megatron.py", "--prepare_data_only", *job, "--accumulate_grad_batches", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "train       67 rows" in out.stdout
        and "val         24 rows" in out.stdout
        and "test         5 rows" in out.stdout
    )
    bad = run_script(
        "peft_megatron.py",
        "--prepare_data_only",
        "--hf_model_id",
        str(assets["qwen3"]),
        "--dataset_name",
        str(assets["data"]),
        "--input_column",
        "nope",
        "--output_dir",
        str(tmp_path / "bad"),
    )
    assert bad.returncode == 2 and "has no column(s) ['nope', 'output']" in bad.stderr  # before any loading
    assert not (tmp_path / "bad" / "data").exists()


def test_validation_smaller_than_a_global_batch_is_refused(tmp_path, assets):
    out = run_script("peft_megatron.py", "--prepare_data_only", *qa_flags(tmp_path, assets["qwen3"], assets["data"]))
    assert out.returncode == 1
    # Defaults on a GPU-less machine: one 8-GPU node planned, TP auto = 2 (the model's 2 KV heads), so DP 4:
    # micro-batch 8 x accumulate 8 x DP 4.
    assert "validation split has 5 rows, fewer than one global batch (256)" in out.stderr
    # The dry run refuses what the launch would, once it can know it (the data is prepared with these settings).
    plan = run_script("peft_megatron.py", "--dry_run", *qa_flags(tmp_path, assets["qwen3"], assets["data"]))
    assert plan.returncode == 2, plan.stderr[-2000:]
    assert "validation split has 5 rows, fewer than one global batch (256)" in plan.stderr
    smaller = ["--micro_batch_size", "1", "--accumulate_grad_batches", "1"]  # 1 x 1 x DP 4 = 4 rows
    plan = run_script("peft_megatron.py", "--dry_run", *smaller, *qa_flags(tmp_path, assets["qwen3"], assets["data"]))
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "not checked here: the validation split" not in plan.stdout and "  epochs: " in plan.stdout


def test_nemo_datamodule_batches_mask_the_prompt(tmp_path, assets):
    """The real FineTuningDataModule machinery reads our JSONL: loss on answer tokens only."""
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src, prompt_template="Q: {question}\nA:")
    prepare(cfg, tmp_path / "out", assets["tokenizer"])
    from dataset_module import GeneralizedHFDataModule

    module = GeneralizedHFDataModule(
        dataset_config=vars(cfg),
        tokenizer_name_or_path=str(assets["qwen3"]),
        dataset_root=str(tmp_path / "out"),
        seq_length=64,
        micro_batch_size=4,
        global_batch_size=4,
        num_workers=0,
        pin_memory=False,
    )
    dataset = module._create_dataset(module.train_path)
    batch = dataset.collate_fn([dataset[i] for i in range(4)])
    hf = module.tokenizer.tokenizer
    for i in range(4):
        row = read(tmp_path / "out" / "training.jsonl")[i]
        tokens, labels, mask = batch["tokens"][i].tolist(), batch["labels"][i].tolist(), batch["loss_mask"][i].tolist()
        answer_positions = [j for j, m in enumerate(mask) if m]
        target_text = hf.decode([labels[j] for j in answer_positions])
        assert target_text == f" {row['output']}<|endoftext|>"
        prompt_len = len(hf(row["input"], add_special_tokens=False)["input_ids"])
        assert answer_positions[0] == prompt_len - 1 and not any(mask[: prompt_len - 1])
        assert hf.decode(tokens[:prompt_len]) == row["input"]


def files_match_marker(out: Path) -> bool:
    marker = json.loads((out / dm.MARKER).read_text())
    return all(dm.digest(out / name) == marker["files"][name] for name in dm.SPLIT_FILES.values())


def test_changed_files_under_a_valid_marker_are_never_taken_for_prepared_data(tmp_path, assets, caplog):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    good = (out / "training.jsonl").read_bytes()
    assert files_match_marker(out) and oct((out / "training.jsonl").stat().st_mode & 0o777) != "0o600"
    (out / "training.jsonl").write_bytes(good[: len(good) // 2])  # truncated under its marker
    with pytest.raises(PipelineError, match=r"training.jsonl differ\(s\) from what .data_ready.json records"):
        prepare(
            config(src, dataset_name=None), out, assets["tokenizer"]
        )  # no --dataset_name: would train on the files as they are
    with caplog.at_level("INFO"):
        prepare(config(src), out, assets["tokenizer"])
    assert "['training.jsonl'] no longer match(es) what .data_ready.json records; preparing again" in caplog.text
    assert (out / "training.jsonl").read_bytes() == good and files_match_marker(out)


def test_an_interrupted_preparation_is_cleaned_up_by_the_next_run(tmp_path, assets, monkeypatch, caplog):
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    real = dm.atomic_write_jsonl

    def killed_after_training(path, rows):  # --overwrite_data dies after writing the new training split
        if path.name == "validation.jsonl":
            raise KeyboardInterrupt("killed")
        return real(path, rows)

    monkeypatch.setattr(dm, "atomic_write_jsonl", killed_after_training)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(src, seed=7, overwrite_data=True), out, assets["tokenizer"])
    monkeypatch.setattr(dm, "atomic_write_jsonl", real)
    assert (out / dm.PREPARING_MARKER).exists() and not (out / dm.MARKER).exists()
    with pytest.raises(PipelineError, match="holds what an interrupted preparation left"):
        prepare(
            config(src, dataset_name=None), out, assets["tokenizer"]
        )  # new training split beside old validation: never used
    with caplog.at_level("INFO"):
        summary = prepare(config(src), out, assets["tokenizer"])  # no --overwrite_data needed: its own leftovers
    assert (
        "an earlier preparation was interrupted; removed what it left (training.jsonl, validation.jsonl" in caplog.text
    )
    assert summary["rows"] == {"train": 32, "val": 4, "test": 4} and files_match_marker(out)
    assert not (out / dm.PREPARING_MARKER).exists() and not (data_files(out).failed).exists()


def test_two_preparations_of_one_directory_never_interleave(tmp_path, assets):
    """The second job waits for the first one's lock, then refuses its data (other seed) with the difference; the
    directory holds one consistent set: the first job's files, matching its marker, no row in two splits."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    src = tmp_path / "big.csv"
    src.write_text("question,answer\n" + "".join(f"What is the code for item {i}?,code-{i}\n" for i in range(300_000)))
    out = tmp_path / "data"

    def start(seed: int) -> subprocess.Popen:
        job = qa_job(assets["qwen3"], tmp_path / "run", "--data_dir", str(out), "--seed", str(seed), dataset=src)
        cmd = [sys.executable, str(REPO / "peft_megatron.py"), "--prepare_data_only", *job, *ONE_SAMPLE_STEPS]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(1)
    deadline = time.monotonic() + 120
    while not (out / dm.PREPARING_MARKER).exists():  # the first job is inside its preparation
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = start(2)
    (_, err1), (_, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 1 and "holds data prepared with other settings (--seed: 1 -> 2)" in err2, err2[-2000:]
    assert json.loads((out / dm.MARKER).read_text())["fingerprint"]["config"]["seed"] == 1 and files_match_marker(out)
    train = {row["input"] for row in read(out / "training.jsonl")}
    assert not train & {row["input"] for row in read(out / "validation.jsonl")}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_files_are_checked_before_loading(tmp_path, fmt):
    src = tmp_path / f"src.{fmt}"
    if fmt == "jsonl":
        write_jsonl(src, [{"question": "q", "answer": "a"}])
    else:
        src.write_text("question,answer\nq,a\n")
    problems = "\n".join(
        dm.HFDatasetConfig(
            dataset_name=str(src),
            val_fraction=0.0,
            input_column="question",
            output_column="answer",
            prompt_template="Q: {question} ({topic})",
        ).problems()
    )
    assert "--val_fraction 0: local files have no validation split" in problems
    assert f"--dataset_name {src} has no column(s) ['topic']" in problems and "['answer', 'question']" in problems
    fine = dm.HFDatasetConfig(
        dataset_name=str(src), input_column="question", output_column="answer", prompt_template="Q: {question}"
    )
    assert fine.problems() == []


def test_a_tokenizer_that_cannot_load_fails_before_any_split_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    with pytest.raises(PipelineError) as err:
        prepare(config(src), tmp_path / "out", "some-org/no-such-model")
    assert "--hf_model_id some-org/no-such-model: could not read the model's configuration or tokenizer" in str(
        err.value
    )
    assert not list((tmp_path / "out").glob("*.jsonl"))


def test_a_preparation_killed_between_its_splits_is_never_used_and_the_rerun_cleans_it(tmp_path, assets):
    from conftest import kill_when, run_script, start_script

    src = tmp_path / "big.csv"
    src.write_text("question,answer\n" + "".join(f"What is the code for item {i}?,code-{i}\n" for i in range(300_000)))
    out = tmp_path / "data"
    args = [
        "--prepare_data_only",
        *qa_job(assets["qwen3"], tmp_path / "run", "--data_dir", str(out)),
        *ONE_SAMPLE_STEPS,
    ]
    proc = start_script("peft_megatron.py", *args, "--dataset_name", str(src))
    kill_when(proc, lambda: (out / "training.jsonl").exists())  # SIGKILL: no cleanup code runs
    assert (out / dm.PREPARING_MARKER).exists() and not (out / dm.MARKER).exists()
    reuse = run_script("peft_megatron.py", *args)
    assert reuse.returncode == 1 and "holds what an interrupted preparation left" in reuse.stderr
    again = run_script("peft_megatron.py", *args, "--dataset_name", str(src))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "an earlier preparation was interrupted; removed what it left" in again.stdout + again.stderr
    assert files_match_marker(out) and not (out / dm.PREPARING_MARKER).exists()


# ---------------------------------------------------------------------------------------------------------------------
# --packed_sequence: NeMo's packer on the prepared JSONL, atomic and keyed on what it is made from
# ---------------------------------------------------------------------------------------------------------------------
def packed_module(cfg, root: Path, model: Path, seq_length: int = 64, one_shape: bool = False):
    from dataset_module import GeneralizedHFDataModule

    return GeneralizedHFDataModule(
        dataset_config=vars(cfg),
        tokenizer_name_or_path=str(model),
        dataset_root=str(root),
        seq_length=seq_length,
        micro_batch_size=1,
        global_batch_size=1,
        num_workers=0,
        pin_memory=False,
        packed_sequence=True,
        one_shape=one_shape,
    )


def segments(batch) -> list[tuple]:
    """(tokens, labels, loss mask) of each sample in a packed collate's row, cut at cu_seqlens."""
    cu = batch["cu_seqlens"][0]
    cu = cu[: int(batch["cu_seqlens_argmin"][0])].tolist()
    out = []
    for start, end in itertools.pairwise(cu):
        out.append(tuple(tuple(batch[k][0, start:end].tolist()) for k in ("tokens", "labels", "loss_mask")))
    return out


def test_packed_rows_hold_exactly_the_unpacked_samples_and_loss_masks(tmp_path, assets):
    """Every training sample appears once across the packed rows, with the tokens, labels and loss mask NeMo's
    unpacked collate gives it (so a packed step trains on the same targets); positions restart per sample."""
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src, prompt_template="Q: {question}\nA:")
    prepare(cfg, tmp_path / "out", assets["tokenizer"])
    module = packed_module(cfg, tmp_path / "out", assets["qwen3"])
    summary = module.prepare_packed()
    train_rows = len(read(tmp_path / "out" / "training.jsonl"))
    assert summary["train"]["samples"] == train_rows and summary["val"]["samples"] == 4
    assert 1 <= summary["train"]["packs"] < train_rows and 0 < summary["train"]["fill"] <= 1

    unpacked = packed_module(cfg, tmp_path / "out", assets["qwen3"])
    unpacked.packed_sequence_size = -1  # the same module reading the JSONL unpacked
    plain = unpacked._create_dataset(unpacked.train_path)
    expected = []
    for i in range(len(plain)):
        b = plain.collate_fn([plain[i]])
        n = len(plain[i]["input_ids"]) - 1  # inputs and labels are the ids shifted by one; the rest is padding
        expected.append(tuple(tuple(b[k][0, :n].tolist()) for k in ("tokens", "labels", "loss_mask")))

    packed = module._create_dataset(module.train_path_packed, pack_metadata_path=module.pack_metadata)
    got = []
    for i in range(len(packed)):
        batch = packed.collate_fn([packed[i]])
        assert batch["tokens"].shape[1] <= 64
        samples = len(packed[i]["seq_boundaries"]) - 1  # segments after these are the row's padding
        got.extend(segments(batch)[:samples])
        cu = batch["cu_seqlens"][0, : int(batch["cu_seqlens_argmin"][0])].tolist()
        for start, end in list(itertools.pairwise(cu))[:samples]:
            assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
    assert sorted(got) == sorted(expected)


def test_one_shape_packed_batches_keep_their_samples_and_share_one_shape(tmp_path, assets):
    """--cuda_graphs: every packed row, training and validation, collates to seq_length tokens and one
    cu_seqlens length (zero-length sequences pad it), with one max_seqlen; the samples and loss masks are the
    unpadded rows', and both read the same packed files."""
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src, prompt_template="Q: {question}\nA:")
    prepare(cfg, tmp_path / "out", assets["tokenizer"])
    plain = packed_module(cfg, tmp_path / "out", assets["qwen3"])
    fixed = packed_module(cfg, tmp_path / "out", assets["qwen3"], one_shape=True)
    plain.prepare_packed()
    fixed.prepare_packed()
    assert fixed.packed_dir() == plain.packed_dir()  # padding happens in the collate: one pack serves both

    shapes = set()
    for path in (fixed.train_path_packed, fixed.validation_path_packed):
        unpadded = plain._create_dataset(path, pack_metadata_path=plain.pack_metadata, is_test=True)
        padded = fixed._create_dataset(
            path, pack_metadata_path=fixed.pack_metadata, is_test=True, **fixed.dataset_kwargs
        )
        assert len(padded) == len(unpadded) > 0
        for i in range(len(padded)):
            want, got = unpadded.collate_fn([unpadded[i]]), padded.collate_fn([padded[i]])
            samples = len(padded[i]["seq_boundaries"]) - 1
            assert segments(got)[:samples] == segments(want)[:samples]
            assert int(got["loss_mask"].sum()) == int(want["loss_mask"].sum())
            cu = got["cu_seqlens"][0, : int(got["cu_seqlens_argmin"][0])]
            assert cu[-1] == 64 and bool((cu.diff() >= 0).all())  # trailing zero-length sequences
            shapes.add((tuple(got["tokens"].shape), len(cu), int(got["max_seqlen"].flatten()[0])))
    assert len(shapes) == 1 and next(iter(shapes))[0] == (1, 64)


def test_packing_gives_the_same_rows_for_a_seed_whatever_numpy_holds(tmp_path, assets):
    """NeMo's packer shuffles with numpy's global generator, which nothing seeds: two runs of one command must
    still pack the same rows (the --cuda_graphs GPU test compares two runs step by step), and the caller's numpy
    state comes back untouched."""
    import numpy as np

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src)
    rows, draws = [], []
    for run, state in enumerate((1, 2)):
        prepare(cfg, tmp_path / f"run{run}", assets["tokenizer"])
        np.random.seed(state)
        summary = packed_module(cfg, tmp_path / f"run{run}", assets["qwen3"]).prepare_packed()
        draws.append(np.random.random())
        packed = np.load(Path(summary["directory"]) / "training.npy", allow_pickle=True)
        rows.append([(list(p["input_ids"]), list(p["seq_start_id"])) for p in packed])
    assert len(rows[0]) > 2 and rows[0] == rows[1]
    assert draws == [np.random.RandomState(s).random() for s in (1, 2)]


def test_packing_is_reused_while_nothing_changes_and_replaced_when_the_data_does(tmp_path, assets, caplog):
    import logging

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src)
    prepare(cfg, tmp_path / "out", assets["tokenizer"])
    module = packed_module(cfg, tmp_path / "out", assets["qwen3"])
    first = module.prepare_packed()
    location = Path(first["directory"])
    assert sorted(p.name for p in location.iterdir()) == [
        dm.PACKED_MARKER,
        "metadata.jsonl",
        "training.npy",
        "validation.npy",
    ]
    with caplog.at_level(logging.INFO, logger="peft_megatron.data"):
        assert packed_module(cfg, tmp_path / "out", assets["qwen3"]).prepare_packed() == first
    assert "already made with these settings; reusing it" in caplog.text

    (location / "training.npy").write_bytes(b"damaged")  # a marker must prove its files: packed again
    assert packed_module(cfg, tmp_path / "out", assets["qwen3"]).prepare_packed() == first
    assert (
        dm.digest(location / "training.npy")
        == json.loads((location / dm.PACKED_MARKER).read_text())["files"]["training.npy"]
    )

    killed_pack = location.parent / f".{location.name}.99999.partial"  # a packing killed mid-way leaves its work
    (killed_pack / "training.npy").parent.mkdir()
    (killed_pack / "training.npy").write_bytes(b"half")
    killed_write = tmp_path / "out" / ".training.jsonl.k1ll3d.tmp"  # and a preparation its atomic write's temporary
    killed_write.write_text('{"input": "half')
    changed = config(src, prompt_template="Question: {question}\nAnswer:", overwrite_data=True)
    with caplog.at_level(logging.WARNING, logger="peft_megatron"):
        prepare(changed, tmp_path / "out", assets["tokenizer"])
        second = packed_module(changed, tmp_path / "out", assets["qwen3"])
        assert second.packed_dir() != location  # the JSONL changed, so the pack's key did
        second.prepare_packed()
    assert [p.name for p in (tmp_path / "out" / dm.PACKED_DIR).iterdir()] == [second.packed_dir().name]
    assert not killed_write.exists()
    assert "removed 1 unfinished data file(s) left by killed runs: .training.jsonl.k1ll3d.tmp" in caplog.text
    assert f"removed 1 unfinished sequence packing(s) left by killed runs: {killed_pack.name}" in caplog.text


def test_a_failed_packing_leaves_nothing_that_looks_packed(tmp_path, assets, monkeypatch):
    import nemo.collections.llm.gpt.data.packed_sequence as nemo_packing

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src)
    prepare(cfg, tmp_path / "out", assets["tokenizer"])
    module = packed_module(cfg, tmp_path / "out", assets["qwen3"])
    real = nemo_packing.prepare_packed_sequence_data
    calls = []

    def fail_on_validation(**kwargs):
        calls.append(kwargs["output_path"].name)
        if kwargs["output_path"].name == "validation.npy":
            raise OSError("disk full")
        return real(**kwargs)

    monkeypatch.setattr(nemo_packing, "prepare_packed_sequence_data", fail_on_validation)
    with pytest.raises(OSError, match="disk full"):
        module.prepare_packed()
    assert calls == ["training.npy", "validation.npy"]
    assert not module.packed_dir().exists() and not list((tmp_path / "out" / dm.PACKED_DIR).iterdir())
    assert "disk full" in (packing_files(tmp_path / "out", tmp_path / "out" / "packed").failed).read_text()
    monkeypatch.setattr(nemo_packing, "prepare_packed_sequence_data", real)
    assert module.prepare_packed()["train"]["samples"] == 32  # the next attempt packs, and clears the failure
    assert not (packing_files(tmp_path / "out", tmp_path / "out" / "packed").failed).exists()


def test_packed_sequence_cli_prepares_packs_and_refuses_a_micro_batch_above_one(tmp_path, assets):
    packed = "--val_fraction 0.25 --packed_sequence --max_seq_length 128".split()
    common = [
        "peft_megatron.py",
        "--prepare_data_only",
        *qa_job(assets["qwen3"], tmp_path, *packed, dataset=assets["data"]),
    ]
    bad = run_script(*common, "--micro_batch_size", "2")
    assert bad.returncode == 2
    assert (
        "--packed_sequence with --micro_batch_size 2: a packed row of --max_seq_length tokens is the micro-batch"
        in bad.stderr
    )
    out = run_script(*common, "--micro_batch_size", "1", "--accumulate_grad_batches", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train       67 rows" in out.stdout
    assert "packed train     67 samples ->" in out.stdout and "packed val       24 samples ->" in out.stdout
    marker = next((tmp_path / "data" / dm.PACKED_DIR).glob("128-*/" + dm.PACKED_MARKER))
    assert json.loads(marker.read_text())["summary"]["train"]["samples"] == 67


def test_a_re_prepared_split_is_never_read_through_nemos_old_index(tmp_path, assets):
    """NeMo indexes each JSONL once (<file>.idx.npy beside it) and trusts the index while it exists; after
    --overwrite_data the new rows must be read at their own offsets."""
    from dataset_module import GeneralizedHFDataModule

    src = write_jsonl(tmp_path / "src.jsonl", ROWS)

    def first_prompt(cfg):
        module = GeneralizedHFDataModule(
            dataset_config=vars(cfg),
            tokenizer_name_or_path=str(assets["qwen3"]),
            dataset_root=str(tmp_path / "out"),
            seq_length=64,
            micro_batch_size=1,
            global_batch_size=1,
            num_workers=0,
            pin_memory=False,
        )
        sample = module._create_dataset(module.train_path)[0]
        return module.tokenizer.tokenizer.decode(sample["input_ids"][: sample["answer_start_idx"]])

    prepare(config(src, prompt_template="Q: {question}\nA:"), tmp_path / "out", assets["tokenizer"])
    assert first_prompt(config(src)).startswith("Q: What is")
    assert (tmp_path / "out" / "training.jsonl.idx.npy").exists()
    longer = config(src, prompt_template="A longer question, to move every offset: {question}\nA:", overwrite_data=True)
    prepare(longer, tmp_path / "out", assets["tokenizer"])
    assert first_prompt(longer).startswith("A longer question, to move every offset: What is")


@pytest.mark.parametrize("value", [{"text": "q83", "lang": "en"}, ["q83", "q84"]])
def test_a_nested_prompt_or_answer_is_refused_naming_column_and_row_and_nothing_is_written(tmp_path, assets, value):
    rows = [dict(r) for r in ROWS]
    rows[3]["question"] = value
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    with pytest.raises(PipelineError) as err:
        prepare(config(src), tmp_path / "out", assets["tokenizer"])
    kind = type(value).__name__
    assert f"split 'train' row 3: column 'question' holds a {kind} ({value!r}), not text" in str(err.value)
    leftovers = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert not [n for n in leftovers if n.endswith(".jsonl") or n in (dm.PREPARING_MARKER, dm.MARKER)], leftovers


def test_a_preparation_killed_after_its_marker_leaves_data_that_both_kinds_of_run_use_and_clear(tmp_path, assets):
    """Killed between writing the marker and removing PREPARING_MARKER: the files are complete and match the marker,
    so a run with --dataset_name reuses them and a run without it reads them, and either clears the stale file."""
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(config(src), out, assets["tokenizer"])
    for again in (config(src), config(src, dataset_name=None)):
        (out / dm.PREPARING_MARKER).write_text('{"pid": 1, "started": 0}\n')  # as the killed run left it
        before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
        summary = prepare(again, out, assets["tokenizer"])
        assert summary["rows"]["train"] == 32 and not (out / dm.PREPARING_MARKER).exists()
        assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before  # reused, not rewritten
    (out / dm.PREPARING_MARKER).write_text('{"pid": 1, "started": 0}\n')
    (out / "validation.jsonl").write_text("")  # now the files do not match: an interrupted preparation
    with pytest.raises(PipelineError, match="holds what an interrupted preparation left"):
        prepare(config(src, dataset_name=None), out, assets["tokenizer"])


def test_a_new_tokenizer_saved_under_the_same_name_never_reuses_the_old_ones_packs(tmp_path, assets):
    """Packs hold token ids: a tokenizer with another vocabulary at the same path gets packs of its own."""
    import shutil

    from nemo_finetune.demo_assets import build_tokenizer

    model = shutil.copytree(assets["qwen3"], tmp_path / "model")
    src = write_jsonl(tmp_path / "src.jsonl", ROWS)
    cfg = config(src)
    prepare(cfg, tmp_path / "out", model)
    first = packed_module(cfg, tmp_path / "out", model)
    first.prepare_packed()
    again = packed_module(cfg, tmp_path / "out", model)
    assert again.packed_dir() == first.packed_dir()  # the same tokenizer: its packs are reused
    other = build_tokenizer(tmp_path / "other", [f"{r['question']} {r['answer']}" for r in ROWS], vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, model / name)
    replaced = packed_module(cfg, tmp_path / "out", model)
    assert replaced.packed_dir() != first.packed_dir()
    replaced.prepare_packed()
    assert [p.name for p in (tmp_path / "out" / dm.PACKED_DIR).iterdir()] == [replaced.packed_dir().name]
