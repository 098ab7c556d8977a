"""The bundled demo, `python peft_megatron.py --demo`: a tiny Qwen3 model and a key->code recall task run through
the whole pipeline on one GPU in a few minutes (import -> base-model evaluation beside LoRA training -> evaluation
-> merged export), its result printed as exact match before -> after. The assets come from demo_assets.py; on a
machine without a GPU it prepares them, prints the plan and exits 3.

    python peft_megatron.py --demo
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nemo_finetune.console import phase
from nemo_finetune.data import prepare_data
from nemo_finetune.errors import EXIT_NO_GPU, PipelineError
from nemo_finetune.importer import import_hf_checkpoint
from nemo_finetune.launch import configure_executor, launch_training
from nemo_finetune.layout import REPO_DIR, RunLayout
from nemo_finetune.plan import dry_run
from nemo_finetune.recipe import configure_recipe
from nemo_finetune.rendezvous import environ_without_rendezvous
from nemo_finetune.report import write_report

log = logging.getLogger("peft_megatron")

# ./demo: the repository's own from a checkout (README runs it there), the current directory's for an installed copy.
DEMO_DIR = Path.cwd() / "demo"


def demo_config(config):
    """The demo job: a tiny Qwen3 model and a key->code recall task, one GPU, a few minutes."""
    from nemo_finetune.demo_assets import build_demo_workspace

    paths = build_demo_workspace(DEMO_DIR)
    data = dataclasses.replace(
        config.data,
        dataset_name=str(paths["dataset"]),
        input_column="question",
        output_column="answer",
        prompt_template="Question: {question}\nAnswer:",
        val_fraction=0.1,
        test_fraction=0.1,
    )
    return dataclasses.replace(
        config,
        hf_model_id=str(paths["model"]),
        recipe_cls_name="qwen3_600m",
        num_nodes=1,
        gpus_per_node=1,
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        context_parallel_size=1,
        # 2,000 steps: a 2-layer random-init model needs them to answer held-out phrasings (exact match ~0.5 after
        # 800 steps, ~0.9 after 2,000 in a CPU replica of this recipe); about a minute of training on one GPU.
        max_steps=2000,
        val_check_interval=250,
        log_every_n_steps=10,
        micro_batch_size=16,
        accumulate_grad_batches=1,
        requested_global_batch_size=None,  # the demo sets its batch itself
        limit_val_batches=2,
        max_seq_length=64,
        learning_rate=5e-3,
        lora_dim=32,
        lora_alpha=64,
        output_dir=str(DEMO_DIR / "run"),
        data_dir=str(RunLayout(DEMO_DIR / "run").data),
        nemo_ckpt_dir=str(RunLayout(DEMO_DIR / "run").imported),
        data=data,
    )


def run_demo(config) -> int:
    from nemo_finetune import compat

    env = compat.detect_environment()
    if not env.has_cuda:
        prepare_data(config)
        dry_run(config)
        print(
            f"\ndemo: prepared {DEMO_DIR} and printed the plan; training needs a CUDA GPU, and this machine has none "
            f"(exit code {EXIT_NO_GPU}). Run the same command on a GPU machine to train, evaluate and export.",
            flush=True,
        )
        return EXIT_NO_GPU
    with phase("HF -> NeMo import"):
        import_hf_checkpoint(config)
    with phase("data preparation"):
        summary = prepare_data(config)
    # The base model's evaluation and the training launch share only the imported checkpoint, which both read; each
    # spends most of its time importing NeMo, so the evaluation runs beside the launch (its output to a log file).
    before_eval = BackgroundScript.start(
        config.output_path / "evaluate_before.log",
        "test_checkpoint.py",
        *demo_evaluation_args(config, config.nemo_ckpt_path, "before"),
    )
    try:
        with phase("training (the base model's evaluation runs beside it)"):
            wall_time_s = launch_training(config, configure_recipe(config, env), configure_executor(config, env))
    except BaseException:
        before_eval.stop()
        raise
    write_report(config, summary, wall_time_s)
    before_eval.wait()
    before = _demo_metrics(config, "before")
    from nemo_finetune import report as run_report

    run_report.add_evaluation(
        config.output_path,
        "base model (imported_hf_ckpt, before fine-tuning)",
        {"checkpoint": str(config.nemo_ckpt_path), **before},
    )
    print(
        f"demo: before fine-tuning, exact match {before['exact_match']:.3f} (log: {before_eval.log_file})", flush=True
    )
    with phase("evaluation of the fine-tuned checkpoint"):
        _run_script("test_checkpoint.py", *demo_evaluation_args(config, None, "after"))
    after = _demo_metrics(config, "after")
    with phase("export to Hugging Face format"):
        _run_script("convert_checkpoint_to_hf.py", "--nemo_logs_dir", str(config.layout.logs), "--overwrite")
    print(
        f"\ndemo: exact match on {summary['rows']['test']} held-out questions: before {before['exact_match']:.3f} "
        f"-> after {after['exact_match']:.3f}",
        flush=True,
    )
    failure = demo_failure(before, after)
    if failure:
        print(f"demo: FAILED: {failure} (full log: {config.output_path / 'peft_megatron.log'})", flush=True)
        return 1
    return 0


def demo_failure(before: dict, after: dict) -> str | None:
    """Why the demo's result does not show fine-tuning working (its tiny model answers 0.84-1.00 of the held-out
    questions after training, none before), or None."""
    lost = after.get("untrained_adapters") or []
    if lost:
        return f"the evaluated checkpoint has {len(lost)} LoRA adapter(s) with all-zero weights ({', '.join(lost)})"
    damaged = after.get("adapters_unlike_master_copies") or []
    if damaged:
        return (
            f"the evaluated checkpoint has {len(damaged)} LoRA matrix(es) unlike the fp32 master copies saved beside "
            f"them ({', '.join(damaged)})"
        )
    if after["exact_match"] <= before["exact_match"]:
        return "fine-tuning did not raise exact match; the evaluation's predictions are in predictions_after.jsonl"
    return None


def demo_evaluation_args(config, checkpoint: Path | None, tag: str) -> list[str]:
    """test_checkpoint.py on the demo's 19 test questions: 8 new tokens each, a 1 GB KV cache, and no CUDA graphs
    (capturing them takes longer than generating all 19 answers eagerly)."""
    predictions = config.output_path / f"predictions_{tag}.jsonl"
    args = [
        "--predictions_file",
        str(predictions),
        "--data_dir",
        str(config.data_path),
        "--num_tokens_to_generate",
        "8",
        "--buffer_size_gb",
        "1",
        "--num_cuda_graphs",
        "0",
        "--bertscore_model",
        "none",
    ]
    if checkpoint:
        return args + ["--nemo_checkpoint_path", str(checkpoint)]
    return args + ["--nemo_logs_dir", str(config.layout.logs)]


def _demo_metrics(config, tag: str) -> dict:
    return json.loads((config.output_path / f"predictions_{tag}.metrics.json").read_text())


def _script_command(script: str, *args: str) -> tuple[list[str], dict]:
    cmd = [sys.executable, str(REPO_DIR / script), *args]
    log.info("running %s", " ".join(cmd))
    # The import above left this process's rendezvous variables in os.environ with the port still bound.
    return cmd, environ_without_rendezvous()


def _run_script(script: str, *args: str) -> None:
    cmd, env = _script_command(script, *args)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise PipelineError(f"{script} failed (command: {' '.join(cmd)})")


@dataclass
class BackgroundScript:
    """One of the scripts running beside this process, its output going to `log_file`."""

    process: subprocess.Popen
    log_file: Path

    @classmethod
    def start(cls, log_file: Path, script: str, *args: str) -> BackgroundScript:
        cmd, env = _script_command(script, *args)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as out:
            return cls(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), log_file)

    def wait(self) -> None:
        """Returns once it exits 0; otherwise prints its last lines and raises."""
        if self.process.wait() != 0:
            print("\n".join(self.log_file.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
            raise PipelineError(
                f"{Path(self.process.args[1]).name} failed (exit {self.process.returncode}; full log: "
                f"{self.log_file}; command: {' '.join(self.process.args)})"
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # e.g. stuck in a CUDA call: never leave the caller waiting on it
            self.process.kill()
            self.process.wait()
