"""Diagnostics of the training workers: checks a run asks for (TRIAL_WORKER_SHIMS, through WORKER_TRIAL_ENV) to find
where a failure comes from; each says what it checks and costs."""

from __future__ import annotations

import collections
import importlib
import threading

from nemo_finetune.compat.base import Shim, mark, register, replace_attribute

SHIMS = register(
    {
        "token-id-check": Shim(
            "training workers that ask for it (PEFT_MEGATRON_WORKER_TRIAL=token-id-check)",
            "a token id outside the vocabulary stops a CUDA run with a device-side assertion of the embedding's "
            "gather kernel ('index out of bounds') and nothing of the batch, the step or where the id came from",
            "the intermittent device-side assertion of the demo task's parity runs (docs/gpu-validation.md) is "
            "explained and fixed",
        ),
    }
)

EMBEDDING_MODULE = "megatron.core.models.common.embeddings.language_model_embedding"
PIN_MEMORY_MODULE = "torch.utils.data._utils.pin_memory"
LOADER_BATCHES_KEPT = 32  # the pin thread runs ahead by num_workers x prefetch_factor batches, of two loaders


class TokenIdCheck:
    """Before each embedding lookup, whether every token id is inside the vocabulary, without a host sync: the count
    of ids outside is copied to pinned host memory as the step runs and read at the next lookup (by then long done),
    which then stops the run naming the lookup, the positions, the values, the row the GPU got and the row the data
    loader made (`loader_batches`: copies of the `tokens` of its last batches, taken before they were pinned). The
    ids outside are replaced by 0 meanwhile, so the gather kernel's own assertion cannot end the run first; a run's
    last lookup is not checked. Costs a few small kernels per lookup; not for --cuda_graphs runs."""

    def __init__(self) -> None:
        self.loader_batches: collections.deque = collections.deque(maxlen=LOADER_BATCHES_KEPT)
        self._lock = threading.Lock()  # the pin thread adds batches while a lookup reads them
        self.lookups = 0
        self._pending = None  # (lookup, phase, the ids as the GPU got them, vocabulary size)
        self._count = self._event = None  # the pending lookup's count of ids outside, in host memory; its event

    def before_lookup(self, input_ids, vocab_size: int, training: bool):
        import torch

        self.report()
        self.lookups += 1
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if self._count is None:
            on_gpu = input_ids.is_cuda
            self._count = torch.zeros((), dtype=torch.int64, pin_memory=on_gpu)  # one buffer and event per run
            self._event = torch.cuda.Event() if on_gpu else None
        self._count.copy_(outside.sum(), non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
        phase = "training" if training else "validation"
        self._pending = (self.lookups, phase, input_ids.clone(), vocab_size)
        return input_ids.masked_fill(outside, 0)

    def report(self) -> None:
        """Stop with what the previous lookup got, if any of its ids was outside the vocabulary."""
        if self._pending is None:
            return
        lookup, phase, ids, vocab_size = self._pending
        self._pending = None
        if self._event is not None:
            self._event.synchronize()  # recorded a step ago: long done
        count = int(self._count)
        if count:
            raise RuntimeError(self.describe(lookup, phase, count, ids.cpu(), vocab_size))

    def keep(self, tokens) -> None:
        """A copy of a batch's `tokens` as the data loader made it."""
        with self._lock:
            self.loader_batches.append(tokens.clone())

    def describe(self, lookup: int, phase: str, count: int, ids, vocab_size: int) -> str:
        flat = ids.reshape(ids.shape[0], -1) if ids.dim() > 1 else ids.reshape(1, -1)
        outside = ((flat < 0) | (flat >= vocab_size)).nonzero().tolist()
        row, position = outside[0]
        where = ", ".join(f"[{r}, {p}] = {int(flat[r, p])}" for r, p in outside[:8])
        message = (
            f"token-id-check: embedding lookup {lookup} ({phase}) got {count} of {flat.numel()} token ids outside the "
            f"vocabulary of {vocab_size}: {where}{' ...' if len(outside) > 8 else ''}. The GPU's row {row}: "
            f"{flat[row].tolist()}. "
        )
        made = self.loader_batch_like(flat)
        if made is None:
            return message + f"No batch of the data loader's last {len(self.loader_batches)} has this shape and rows."
        age, batch = made
        same = int((batch == flat).sum())
        return message + (
            f"The data loader made this batch (number {age} counting back from its newest) with row {row} = "
            f"{batch[row].tolist()}: "
            f"{same} of {flat.numel()} ids the same, id {int(batch[row, position])} at [{row}, {position}]; "
            + (
                "the ids changed between the data loader and the embedding."
                if bool(((batch >= 0) & (batch < vocab_size)).all())
                else "the data loader made the ids outside the vocabulary."
            )
        )

    def loader_batch_like(self, flat):
        """(how many batches ago, tokens) of the kept loader batch of this shape agreeing with the most ids."""
        with self._lock:
            batches = list(self.loader_batches)
        best = None
        for age, batch in enumerate(reversed(batches), start=1):
            if batch.numel() != flat.numel():
                continue
            batch = batch.reshape(flat.shape[0], -1)
            same = int((batch == flat).sum())
            if same * 2 > flat.numel() and (best is None or same > best[0]):
                best = (same, age, batch)
        return None if best is None else best[1:]


def check_token_ids() -> None:
    """Megatron's LanguageModelEmbedding looks its ids up through TokenIdCheck; the data loader's pin thread keeps a
    copy of each batch's `tokens` for its report."""
    module = importlib.import_module(EMBEDDING_MODULE)
    original = module.LanguageModelEmbedding.forward
    if getattr(original, "_nemo_compat", False):
        return
    check = TokenIdCheck()

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        input_ids = check.before_lookup(input_ids, self.word_embeddings.num_embeddings, self.training)
        return original(self, input_ids, position_ids, tokentype_ids)

    forward._nemo_compat = True
    forward._token_id_check = check
    replace_attribute("token-id-check", module.LanguageModelEmbedding, "forward", forward)
    keep_loader_tokens(check)
    mark("token-id-check", "each embedding lookup's token ids are checked against the vocabulary")


def keep_loader_tokens(check: TokenIdCheck) -> None:
    """The DataLoader's pin thread calls `pin_memory(data, device)` of its module for every batch (and for each of
    its items): the batch's `tokens` go to `check` first."""
    pinning = importlib.import_module(PIN_MEMORY_MODULE)
    original = pinning.pin_memory

    def pin_memory(data, device=None):
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if tokens is not None and hasattr(tokens, "clone"):
            check.keep(tokens)
        return original(data, device)

    replace_attribute("token-id-check", pinning, "pin_memory", pin_memory)
