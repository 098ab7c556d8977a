"""Phase 1: the Hugging Face model imported into a NeMo checkpoint (--nemo_ckpt_dir). Global rank 0 imports,
atomically and under a lock; the other nodes wait for it and check what it imported."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from nemo_finetune.checkpoints import attention_head_dim, checkpoint_damage, hf_load_error, is_nemo_checkpoint
from nemo_finetune.console import library_logs_through_ours, prints_to_log_file
from nemo_finetune.errors import PipelineError
from nemo_finetune.files import atomic_dir, atomic_write_text, remove_leftovers
from nemo_finetune.fingerprints import digests, legacy_heads
from nemo_finetune.hub import hub_problem
from nemo_finetune.recipe import assign, recipe_module
from nemo_finetune.records import IMPORT_RECORD, import_files
from nemo_finetune.resolve import imported_tokenizer, is_local_model, model_location

log = logging.getLogger("peft_megatron")


def import_hf_checkpoint(config) -> Path:
    """Import `hf_model_id` into `nemo_ckpt_dir` unless a complete checkpoint is there; atomic, rank 0 only."""
    target = config.nemo_ckpt_path
    files = import_files(target)
    if config.node_rank != 0:
        files.wait(config.wait_timeout_s, "the HF -> NeMo import", is_done=lambda: is_nemo_checkpoint(target))
        check_existing_import(target, import_source(config), config.trust_remote_code)  # rank 0's verdict
        return target
    with files.attempt(config.wait_timeout_s, "HF -> NeMo import"):
        _import_on_rank0(config, target)
    return target


def _import_on_rank0(config, target: Path) -> None:
    source = import_source(config)
    if is_nemo_checkpoint(target):
        check_existing_import(target, source, config.trust_remote_code)
        log.info("imported checkpoint already present: %s", target)
        return
    if target.exists() and any(target.iterdir()):
        raise PipelineError(
            f"--nemo_ckpt_dir {target} exists but is not a complete NeMo checkpoint (no context/ + weights/"
            "metadata.json); remove it or choose another --nemo_ckpt_dir"
        )
    # atomic_dir's temporary directory, and the lock NeMo's import_ckpt holds beside it (`<tmp>.lock`)
    remove_leftovers(target, "import", ("*.partial", "*.partial.lock"))
    _run_import(config, target, source)


def import_source(config) -> dict:
    """What an import is made from: the recipe and the model, a hub id or a local directory (every file's content
    digest: new weights saved over the old ones are a new model, whatever their size)."""
    identity: dict[str, Any] = {"model": model_location(config), "recipe": config.recipe_cls_name}
    model_dir = Path(identity["model"])
    if is_local_model(config.hf_model_id) and model_dir.is_dir():
        identity["files"] = digests(model_dir, recursive=False)
    return identity


def check_existing_import(target: Path, source: dict, trust_remote_code: bool = False) -> None:
    """The verdict on a complete checkpoint in --nemo_ckpt_dir, the same on every node: an import of this model as
    it is now, undamaged, and (for a local model) keeping the model's own tokenizer."""
    check_import_source(target, source)
    damage = checkpoint_damage(target)
    if damage:
        raise PipelineError(f"--nemo_ckpt_dir {target} holds a damaged import: {damage}; remove it to import again")
    if Path(source["model"]).is_dir():  # a hub id is not fetched again just for this
        try:
            differs = tokenizer_differences(target, source["model"], trust_remote_code)
        except Exception as e:  # the model's tokenizer gone since (transformers: a TypeError): use the import
            first = (str(e).strip().splitlines() or [""])[0]
            log.warning(
                "%s: its tokenizer not compared with the model's, which does not load (%s: %s)",
                target,
                type(e).__name__,
                first,
            )
            differs = []
        if differs:  # an import written beside another one before the private-tokenizer-assets fix
            raise PipelineError(
                f"--nemo_ckpt_dir {target} holds an import of {source['model']} whose tokenizer differs from the "
                f"model's in its {', '.join(differs)} (imported while another import ran on the machine?); remove "
                "it to import again"
            )


def check_import_source(target: Path, source: dict) -> None:
    """Refuse an existing import of another model (or of the same directory since changed)."""
    files = import_files(target)
    if not files.record.is_file():
        log.warning(
            "%s has no %s (imported before this check existed); using it as the import of %s — remove it if it is not",
            target,
            IMPORT_RECORD,
            source["model"],
        )
        return
    recorded = files.read()
    if recorded is None:
        raise PipelineError(
            f"--nemo_ckpt_dir {target}: its {IMPORT_RECORD} is damaged (not a JSON object), so what it was imported "
            "from is unknown; remove the directory to import again, or choose another --nemo_ckpt_dir"
        )
    if recorded != source and _legacy_record_matches(recorded, source):
        log.info("%s: recording the model files' content digests (its record held their first MiB's)", target)
        with contextlib.suppress(OSError):  # a read-only copy keeps the older record: it is checked the same way
            files.write(source)
        return
    if recorded != source:
        changed = sorted(k for k in set(recorded) | set(source) if recorded.get(k) != source.get(k))
        raise PipelineError(
            f"--nemo_ckpt_dir {target} holds an import of {recorded.get('model')} (recipe {recorded.get('recipe')}), "
            f"not of {source['model']} (recipe {source['recipe']}) as it is now (differs in: {', '.join(changed)}); "
            "choose another --nemo_ckpt_dir, or remove it to import again"
        )


def _legacy_record_matches(recorded: dict, source: dict) -> bool:
    """A record written before whole-file digests ({name: [size, sha256 of the first MiB]}) of this model and recipe
    whose files still match it."""
    files = recorded.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, list) for v in files.values()):
        return False
    if set(recorded) != set(source) or any(recorded[k] != source[k] for k in source if k != "files"):
        return False
    return legacy_heads(Path(source["model"]), recursive=False) == files


def _run_import(config, target: Path, identity: dict) -> None:
    from nemo_finetune import compat

    if not is_local_model(config.hf_model_id):  # before NeMo loads: seconds, not a minute of retries
        problem = hub_problem(
            "--hf_model_id", config.hf_model_id, "point --hf_model_id at a local directory (save_pretrained output)"
        )
        if problem:
            raise PipelineError(problem)
    env = compat.prepare_process()
    import fiddle as fdl
    from nemo.collections import llm

    library_logs_through_ours()  # NeMo's importer passes transformers the deprecated torch_dtype=
    recipe = recipe_module(config.recipe_cls_name).finetune_recipe(num_nodes=1, num_gpus_per_node=1)
    assign(recipe.model.config, **compat.model_config_overrides(env))  # e.g. RoPE fusion needs TE
    model = fdl.build(recipe.model)  # picks the importer; the sizes come from the HF config
    source = f"hf://{model_location(config)}"
    check_importer_head_dim(model, source, config.trust_remote_code)
    log.info("importing %s -> %s (%s)", source, target, env.describe())
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()  # empty (checked by the caller); import writes to a temporary sibling and renames
    tokenizer_assets = compat.fixes.private_tokenizer_assets(config.trust_remote_code)  # not NeMo's /tmp/nemo_tokenizer
    with atomic_dir(target) as tmp, compat.cpu_checkpoint_io(env), tokenizer_assets:
        # Some importers (Qwen3) take trust_remote_code, others (Llama) do not and never run remote code.
        accepts = "trust_remote_code" in inspect.signature(type(model.importer(source)).apply).parameters
        extra = {"trust_remote_code": config.trust_remote_code} if accepts else {}
        with prints_to_log_file("nemo.import_ckpt", config.log_level):  # its tree of the files it wrote
            llm.import_ckpt(model=model, source=source, output_path=tmp, overwrite=True, **extra)
        if not is_nemo_checkpoint(tmp):
            raise PipelineError(f"llm.import_ckpt finished but {tmp} is not a complete checkpoint")
        differs = tokenizer_differences(tmp, identity["model"], config.trust_remote_code)
        if differs:
            raise PipelineError(
                f"the import of {identity['model']} kept a tokenizer that differs from the model's in its "
                f"{', '.join(differs)} (another process wrote the importer's tokenizer directory meanwhile?); "
                "nothing was kept: run the import again"
            )
        atomic_write_text(tmp / IMPORT_RECORD, json.dumps(identity, indent=2) + "\n")  # written last
    log.info("imported checkpoint written to %s", target)


def tokenizer_differences(checkpoint: Path, model: str, trust_remote_code: bool = False) -> list[str]:
    """What differs between the tokenizer an import keeps (context/nemo_tokenizer, which training and generation
    read) and the model's: its vocabulary, special tokens, chat template. Empty when they agree, or when the
    importer keeps no Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    kept = imported_tokenizer(checkpoint)
    if not kept.is_dir():
        return []
    ours, theirs = (AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code) for p in (kept, model))
    return [
        what
        for what, a, b in (
            ("vocabulary", ours.get_vocab(), theirs.get_vocab()),
            ("special tokens", ours.special_tokens_map, theirs.special_tokens_map),
            ("chat template", ours.chat_template, theirs.chat_template),
        )
        if a != b
    ]


def check_importer_head_dim(model, source: str, trust_remote_code: bool = False) -> None:
    """NeMo's importers ignore HF `head_dim` (Qwen3's fixes kv_channels=128): refuse rather than write a wrong model."""
    from transformers import AutoConfig

    connector = model.importer(source)
    connector.trust_remote_code = trust_remote_code  # read by connector.config; normally set inside apply()
    hf_path = str(connector)
    try:
        nemo_cfg = connector.config
        hf = AutoConfig.from_pretrained(hf_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(hf_load_error(hf_path, e)) from None
    hf_head_dim, nemo_head_dim = attention_head_dim(hf), attention_head_dim(nemo_cfg)
    if hf_head_dim != nemo_head_dim:
        raise PipelineError(
            f"{hf_path}: head_dim {hf_head_dim} but NeMo's importer would build head_dim {nemo_head_dim}; this "
            "checkpoint cannot be converted correctly by NeMo 2.7.3"
        )
