"""Nothing the user owns is destroyed: no script writes where its inputs are (the output path equal to, inside or
holding an input), and --overwrite replaces only what the script wrote itself. Each case runs the real script and
asserts the user's files are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import qa_flags, run_script


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (or of the file itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def imported(assets, tmp_path_factory) -> Path:
    """The tiny Qwen3 model imported to a NeMo checkpoint (a full checkpoint the converter exports)."""
    nemo = tmp_path_factory.mktemp("import") / "ckpt"
    args = ["--import_only", "--hf_model_id", str(assets["qwen3"]), "--recipe_cls_name", "qwen3_600m"]
    result = run_script("peft_megatron.py", *args, "--nemo_ckpt_dir", str(nemo))
    assert result.returncode == 0, result.stderr[-3000:]
    return nemo


@pytest.mark.parametrize("where", ["the checkpoint", "its parent", "inside it"])
def test_an_export_is_never_written_where_the_checkpoint_is(imported, where):
    target = {"the checkpoint": imported, "its parent": imported.parent, "inside it": imported / "hf"}[where]
    before = snapshot(imported.parent)
    result = run_script(
        "convert_checkpoint_to_hf.py",
        "--nemo_checkpoint_path",
        str(imported),
        "--output_dir",
        str(target),
        "--overwrite",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    how = {"the checkpoint": "is", "its parent": "contains", "inside it": "lies inside"}[where]
    assert f"--output_dir {target} {how} the checkpoint {imported}" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(imported.parent) == before  # nothing changed, nothing added


def test_overwrite_replaces_only_an_export_and_never_a_users_directory(imported, tmp_path):
    mine = tmp_path / "my_model"
    mine.mkdir()
    (mine / "notes.txt").write_text("three weeks of work\n")
    before = snapshot(mine)
    args = ["convert_checkpoint_to_hf.py", "--nemo_checkpoint_path", str(imported), "--output_dir", str(mine)]
    for extra in ([], ["--overwrite"]):
        result = run_script(*args, *extra)
        assert result.returncode == 1, result.stderr[-2000:]
        assert f"--output_dir {mine} holds files this script did not write" in result.stderr
        assert "pass --overwrite" not in result.stderr  # the flag would not help and is not suggested
        assert snapshot(mine) == before

    export = tmp_path / "export"
    assert run_script(*args[:3], "--output_dir", str(export)).returncode == 0
    first = snapshot(export)
    again = run_script(*args[:3], "--output_dir", str(export), "--overwrite")
    assert again.returncode == 0 and f"exported {imported} -> {export}" in again.stdout  # its own export: replaced
    assert set(snapshot(export)) == set(first)


def test_metrics_never_replace_the_predictions_they_score(tmp_path):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"input": "q", "label": "a", "prediction": "a"}) + "\n")
    before = snapshot(tmp_path)
    args = ["--predictions_file", str(predictions), "--metrics_file", str(tmp_path / "." / "preds.jsonl")]
    result = run_script("test_checkpoint.py", "--evaluate_only", "--bertscore_model", "none", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is the predictions file: the metrics would replace the predictions" in result.stderr
    assert snapshot(tmp_path) == before


def test_evaluation_never_writes_into_the_checkpoint_or_over_the_test_split(imported, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps({"input": "q", "output": "a"}) + "\n")
    before = snapshot(imported) | snapshot(data)
    for predictions, how in (
        (data / "test.jsonl", "is the test split"),
        (imported / "p.jsonl", "lies inside the checkpoint"),
    ):
        args = ["--nemo_checkpoint_path", str(imported), "--data_dir", str(data), "--bertscore_model", "none"]
        result = run_script("test_checkpoint.py", *args, "--predictions_file", str(predictions))
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"--predictions_file {predictions} {how}" in result.stderr
        assert snapshot(imported) | snapshot(data) == before


def user_dataset(assets, directory: Path, name: str = "training.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(assets["data"].read_text())
    return path


@pytest.mark.parametrize("mode", ["--prepare_data_only", "--dry_run"])
def test_data_is_never_prepared_where_the_dataset_or_the_model_is(assets, tmp_path, mode):
    """The same refusal from the plan as from the preparation, before any work, whatever --overwrite_data says."""
    source = user_dataset(assets, tmp_path / "mydata")
    before = snapshot(source.parent) | snapshot(assets["qwen3"])
    cases = [
        (source.parent, f"--data_dir {source.parent} contains the dataset file {source}"),
        (source.parent / "prepared", f"--data_dir {source.parent / 'prepared'} lies inside the dataset directory"),
        (assets["qwen3"], f"--data_dir {assets['qwen3']} is the model directory"),
    ]
    for data_dir, message in cases:
        dataset = source.parent if "directory" in message else source
        args = [*qa_flags(tmp_path / "run", assets["qwen3"], dataset), "--data_dir", str(data_dir), "--overwrite_data"]
        result = run_script("peft_megatron.py", mode, *args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert snapshot(source.parent) | snapshot(assets["qwen3"]) == before
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_data_script_refuses_the_same_overlaps(assets, tmp_path):
    source = user_dataset(assets, tmp_path / "mydata")
    before = snapshot(source.parent)
    args = ["--dataset_name", str(source), "--input_column", "question", "--output_column", "answer"]
    args += ["--data_dir", str(source.parent), "--tokenizer", str(assets["qwen3"]), "--overwrite_data"]
    result = run_script("dataset_module.py", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--data_dir {source.parent} contains the dataset file {source}" in result.stderr
    assert snapshot(source.parent) == before


def test_the_import_and_the_run_never_land_on_the_model(assets, tmp_path):
    model = assets["qwen3"]
    before = snapshot(model)
    for output_dir, extra, message in (
        (tmp_path / "run", ["--nemo_ckpt_dir", str(model)], f"--nemo_ckpt_dir {model} is the model directory"),
        (model / "run", [], f"--output_dir {model / 'run'} lies inside the model directory"),
    ):
        flags = qa_flags(output_dir, model, assets["data"])
        result = run_script("peft_megatron.py", "--dry_run", *flags, *extra)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr
    assert snapshot(model) == before
