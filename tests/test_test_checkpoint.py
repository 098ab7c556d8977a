"""test_checkpoint.py: metrics, --evaluate_only, predictions files, the generation loop, and the GPU-less answer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import test_checkpoint as tc
from conftest import fake_checkpoint, lora_tensors, run_script, start_script
from nemo_finetune import generation
from nemo_finetune.compat import fixes
from nemo_finetune.records import output_files


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer trained here: a BERTScore model that needs no hub."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = ["the cat sat on the mat", "a dog ran in the park", "blue red green gold", "paris is in france"] * 20
    tok.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    )
    BertTokenizerFast(tokenizer_object=tok, model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    return path


PREDS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("a dog ran", "a dog ran in the park"),
    ("blue", "Blue "),
    ("green gold", "paris is in france"),
]


def write_predictions(path: Path, pairs=PREDS) -> Path:
    rows = [{"input": f"q{i}", "prediction": p, "label": t} for i, (p, t) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_exact_match_and_rouge_l_on_known_pairs():
    preds, labels = [p for p, _ in PREDS], [t for _, t in PREDS]
    assert tc.exact_match(preds, labels) == 0.5  # whitespace and case are normalised
    # ROUGE-L F: 1, 2*(1*0.5)/(1.5)=2/3 ("a dog ran" vs 6 tokens), 1, 0
    assert tc.rouge_l(preds, labels) == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)


def test_bertscore_matches_a_direct_bert_score_call(tiny_bert):
    from bert_score import score

    preds, labels = [p for p, _ in PREDS], [t for _, t in PREDS]
    ours = tc.bertscore(preds, labels, str(tiny_bert), 2)
    p, r, f = score(preds, labels, model_type=str(tiny_bert), num_layers=2, lang="en")
    assert ours["bertscore_f1"] == pytest.approx(float(f.mean()))
    assert ours["bertscore_precision"] == pytest.approx(float(p.mean()))
    assert ours["bertscore_recall"] == pytest.approx(float(r.mean()))


def evaluate_only(preds: Path, bertscore_model, layers: str):
    """test_checkpoint.py scoring an existing predictions file with the given BERTScore model and layers."""
    args = [
        "--predictions_file",
        str(preds),
        "--bertscore_model",
        str(bertscore_model),
        "--bertscore_num_layers",
        layers,
    ]
    return run_script("test_checkpoint.py", "--evaluate_only", *args)


def test_evaluate_only_end_to_end(tmp_path, tiny_bert):
    preds = write_predictions(tmp_path / "preds.jsonl")
    out = evaluate_only(preds, tiny_bert, "2")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["exact_match"] == 0.5
    assert 0 < metrics["bertscore_f1"] <= 1 and set(metrics) >= {"bertscore_precision", "bertscore_recall", "rouge_l"}
    assert "exact_match 0.5000" in out.stdout and "BERTScore F1:" in out.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"input": "a", "label": "b"}\n', "preds.jsonl:1: missing field(s) ['prediction']"),
        ('{"input": "a", "label": "b", "prediction": "c"}\nnot json\n', "preds.jsonl:2: malformed JSON line"),
        ("", "holds no predictions"),
        ('{"input": "a", "label": null, "prediction": "None"}\n', "preds.jsonl:1: field 'label' is null, not text"),
        (
            '{"input": "a", "label": "x", "prediction": ["x"]}\n',
            """preds.jsonl:1: field 'prediction' is ["x"], not text""",
        ),
    ],
)
def test_bad_predictions_file_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "preds.jsonl").write_text(content)
    out = run_script(
        "test_checkpoint.py",
        "--evaluate_only",
        "--predictions_file",
        str(tmp_path / "preds.jsonl"),
        "--bertscore_model",
        "none",
    )
    assert out.returncode == 1 and message in out.stderr
    assert not (tmp_path / "preds.metrics.json").exists()


def test_offline_bertscore_hub_name_says_how_to_fix(tmp_path):
    preds = write_predictions(tmp_path / "preds.jsonl")
    out = run_script("test_checkpoint.py", "--evaluate_only", "--predictions_file", str(preds))
    assert (
        out.returncode == 1
        and "pass a local directory with --bertscore_model DIR --bertscore_num_layers N" in out.stderr
    )


def test_an_unreachable_hub_for_bertscore_is_refused_before_any_work(tmp_path):
    preds = write_predictions(tmp_path / "preds.jsonl")
    no_network = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    out = run_script("test_checkpoint.py", "--evaluate_only", "--predictions_file", str(preds), env=no_network)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--bertscore_model roberta-large: the Hugging Face hub (http://127.0.0.1:9) could not be reached" in (
        out.stderr
    )
    assert "pass a local directory with --bertscore_model DIR --bertscore_num_layers N (or none)" in out.stderr
    assert not (tmp_path / "preds.metrics.json").exists()


def test_generation_refuses_without_a_gpu_after_naming_adapters_that_change_nothing(tmp_path):
    fake_checkpoint(tmp_path / "ckpt", adapter=True, tensors=lora_tensors(untrained_layer=1, damaged_layer=0))
    out = run_script(
        "test_checkpoint.py", "--nemo_checkpoint_path", str(tmp_path / "ckpt"), "--data_dir", str(tmp_path)
    )
    assert out.returncode == 1 and "generation needs a CUDA GPU" in out.stderr and "--evaluate_only" in out.stderr
    assert (
        "ckpt: 1 LoRA adapter(s) have an all-zero output matrix (B) and change nothing: "
        "decoder.layers.1.self_attention.linear_proj.adapter.linear_out.weight." in out.stdout
    ), out.stdout[-2000:]
    assert (
        "ckpt: 1 LoRA matrix(es) differ from the fp32 master copies saved beside them: "
        "decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight." in out.stdout
    )


def test_a_checkpoint_outside_a_run_needs_data_dir(tmp_path):
    fake_checkpoint(tmp_path / "ckpt")
    out = run_script("test_checkpoint.py", "--nemo_checkpoint_path", str(tmp_path / "ckpt"))
    assert out.returncode == 1 and "is not a checkpoint of a peft_megatron.py run" in out.stderr
    assert "pass --data_dir" in out.stderr


def test_usage_errors_exit_2(tmp_path):
    out = run_script(
        "test_checkpoint.py",
        "--evaluate_only",
        "--max_batch_size",
        "0",
        "--num_cuda_graphs",
        "-1",
        "--bertscore_num_layers",
        "0",
        "--metrics_file",
        str(tmp_path),
    )
    assert out.returncode == 2
    assert (
        "--evaluate_only needs --predictions_file" in out.stderr and "--max_batch_size 0 must be positive" in out.stderr
    )
    assert "--num_cuda_graphs -1 must be 0 (eager) or positive" in out.stderr
    assert "--bertscore_num_layers 0 must be a layer number" in out.stderr
    assert f"--metrics_file {tmp_path} is a directory; give a file path" in out.stderr


class StandInEngine:
    """The three calls GenerationLoop uses, with Megatron-Core 0.15.3's semantics: requests beyond the context's
    capacity wait in a queue, each step admits what fits, and requests finish out of order. (The real
    DynamicInferenceEngine allocates CUDA events and KV memory in its constructor, so it cannot be built on CPU;
    the real engine is exercised on a GPU, see docs/gpu-validation.md.)"""

    def __init__(self, capacity: int):
        self.capacity, self.waiting, self.active, self.added, self.sampling = capacity, [], {}, [], []

    def add_request(self, request_id, tokens, num_tokens_to_generate):
        self.added.append((request_id, list(tokens)))
        self.waiting.append((request_id, len(tokens) % 3 + 1, num_tokens_to_generate))

    def has_unfinished_requests(self):
        return bool(self.waiting or self.active)

    def step_modern(self, sampling_params):
        self.sampling.append(sampling_params)
        assert len(self.active) <= self.capacity
        while self.waiting and len(self.active) < self.capacity:
            rid, steps, n = self.waiting.pop(0)
            self.active[rid] = steps
        finished = []
        for rid in list(self.active):
            self.active[rid] -= 1
            if self.active[rid] == 0:
                del self.active[rid]
                finished.append(SimpleNamespace(request_id=rid, generated_tokens=[rid]))
        return {"finished_requests": finished[::-1]}


def test_generation_loop_keeps_input_order_and_truncates_long_prompts():
    engine = StandInEngine(capacity=3)
    loop = generation.GenerationLoop(engine, generation.Sampling(num_tokens_to_generate=4), max_sequence_length=10)
    prompts = [[1] * n for n in (2, 9, 4, 1, 6, 3, 12, 5)]
    results = loop.run(prompts)
    assert [r.request_id for r in results] == list(range(8))
    assert loop.truncated == 2  # prompts of 9 and 12 tokens exceed 10 - 4
    assert [len(t) for _, t in engine.added] == [2, 6, 4, 1, 6, 3, 6, 5]
    greedy = engine.sampling[0]  # Megatron's own SamplingParams, one object for every step
    assert all(p is greedy for p in engine.sampling)
    assert (greedy.top_k, greedy.num_tokens_to_generate) == (1, 4)


def test_generation_settings_take_the_flags_and_defaults_of_test_checkpoint():
    """benchmarks/generation_throughput.py builds the engine from nemo_finetune.generation's settings; their
    defaults are test_checkpoint.py's, so the benchmark measures what an evaluation runs."""
    import dataclasses

    defaults = tc.EvalConfig()
    for cls in (generation.EngineSettings, generation.Sampling):
        for f in dataclasses.fields(cls):
            assert f.default == getattr(defaults, f.name), (cls.__name__, f.name)
    cfg = tc.EvalConfig(max_batch_size=32, buffer_size_gb=2.0, top_k=5, temperature=0.7, num_cuda_graphs=0)
    assert tc.settings_of(generation.EngineSettings, cfg, max_batch_size=3) == generation.EngineSettings(
        max_batch_size=3, buffer_size_gb=2.0, num_cuda_graphs=0
    )
    assert tc.settings_of(generation.Sampling, cfg) == generation.Sampling(top_k=5, temperature=0.7)


@pytest.mark.parametrize(
    "requested, max_batch_size, tp, expected",
    [
        (8, 64, 1, 8),
        (8, 19, 1, 8),
        (8, 9, 1, 8),  # a step of 8 below max_requests (19 and 9 round up to 20 and 12)
        (8, 4, 1, 1),
        (8, 8, 1, 1),
        (8, 3, 1, 1),  # a step of 8 would not be below max_requests: one graph
        (8, 16, 3, 8),
        (8, 5, 3, 1),  # TP 3: max_requests 18 and 6 (multiples of 6), step 9
        (2, 40, 1, 2),
        (1, 64, 1, 1),
    ],
)
def test_decode_graph_count_avoids_megatrons_empty_graph_list(requested, max_batch_size, tp, expected):
    assert fixes.decode_graph_count(requested, max_batch_size, tp) == expected


def test_two_evaluations_of_one_predictions_file_take_turns(tmp_path):
    """While another job holds the predictions' lock, an evaluation waits and writes nothing; then it finishes."""

    preds = write_predictions(tmp_path / "preds.jsonl")
    with output_files(tmp_path / "preds.jsonl").locked(timeout_s=5, what="a test's evaluation"):
        proc = start_script(
            "test_checkpoint.py", "--evaluate_only", "--predictions_file", str(preds), "--bertscore_model", "none"
        )
        seen = []
        for line in proc.stdout:  # ends at EOF if the script never waits
            seen.append(line)
            if "waiting for another job's evaluation output" in line:
                break
        assert not (tmp_path / "preds.metrics.json").exists(), "".join(seen)[-2000:]
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-2000:]
    assert json.loads((tmp_path / "preds.metrics.json").read_text())["num_samples"] == 4


def test_a_local_bertscore_model_is_checked_before_scoring(tmp_path, tiny_bert):
    preds = write_predictions(tmp_path / "preds.jsonl")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = {
        (str(empty), "2"): f"--bertscore_model {empty}: no config.json there",
        (str(tiny_bert), "5"): f"--bertscore_num_layers 5 is beyond the 2 layers of {tiny_bert}; give 1-2",
    }
    for (model, layers), message in cases.items():
        out = evaluate_only(preds, model, layers)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "preds.metrics.json").exists()


def test_a_decoder_given_as_the_bertscore_model_gets_one_line_naming_the_flag(tmp_path, assets):
    """A causal LM (its tokenizer's model_max_length is "no limit") is no encoder bert_score can use."""
    preds = write_predictions(tmp_path / "preds.jsonl")
    out = evaluate_only(preds, assets["qwen3"], "2")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"--bertscore_model {assets['qwen3']}: bert_score cannot score with this model" in out.stderr
    assert "give an encoder such as roberta-large or bert-base-uncased, or --bertscore_model none" in out.stderr
    assert not (tmp_path / "preds.metrics.json").exists()


def test_absurd_numbers_are_refused_together_before_any_work(tmp_path):
    huge = "1000000000000000000000"
    args = ["--evaluate_only", "--predictions_file", str(tmp_path / "p.jsonl"), "--bertscore_model", "none"]
    for flag in ("temperature", "buffer_size_gb", "max_samples", "top_k", "max_batch_size", "num_cuda_graphs"):
        args += [f"--{flag}", "1e21" if flag in ("temperature", "buffer_size_gb") else huge]
    out = run_script("test_checkpoint.py", *args, "--random_seed", "-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--temperature 1e+21 is above 100.0 (sampling temperatures" in out.stderr
    assert "--buffer_size_gb 1e+21 is above 10,000.0 (more memory than any GPU has)" in out.stderr
    for flag in ("max_samples", "top_k", "max_batch_size", "num_cuda_graphs"):
        assert f"--{flag} {huge} is above" in out.stderr
    assert "--random_seed -1 must be 0 to 4294967295" in out.stderr


@pytest.mark.parametrize("content", ["huge", "binary"])
def test_a_predictions_file_no_evaluation_wrote_is_refused_in_one_line_without_scoring(tmp_path, content):
    """A row whose label or prediction is longer than any generation (ROUGE-L's cost is quadratic in it), or bytes
    that are not UTF-8: named with the file (and line), exit 1, no metrics file, bounded memory."""
    preds = tmp_path / "p.jsonl"
    if content == "huge":
        ok = json.dumps({"input": "q", "label": "a", "prediction": "a"})
        preds.write_text(ok + "\n" + json.dumps({"input": "q", "label": "a", "prediction": "x " * 1_000_000}) + "\n")
        message = f"{preds}:2: field 'prediction' holds 2,000,000 characters, over the 65,536 scored per row"
    else:
        preds.write_bytes(b"\x80\x81\xff\xfe" * 100)
        message = f"{preds} is not UTF-8 text"
    out = run_script(
        "test_checkpoint.py", "--evaluate_only", "--predictions_file", str(preds), "--bertscore_model", "none"
    )
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("*.metrics.json"))
