"""Does pinned host memory stay what the GPU reads when the process forks while another thread writes it?

The training workers do both: the DataLoader's pin thread copies every batch into pinned memory while the main
thread forks (NeMo's asynchronous checkpoint writer; the validation loader's worker processes). If a fork lets the
parent's next write to a pinned page land in a copy of the page (copy-on-write) while the GPU's DMA still reads the
page the driver pinned, the GPU gets what the page held before: an earlier batch, or staged checkpoint weights read
as token ids. This probe measures it on the machine it runs on, without NeMo:

    raw          one thread writes a counter into pinned buffers and copies each to the GPU, comparing what arrives;
                 the main thread forks short-lived children meanwhile (and, as a control, does not)
    dataloader   a DataLoader (pin_memory, 2 workers) of known rows; each batch goes to the GPU as NeMo's data step
                 sends it and is compared with the batch as the host sees it; the main thread stages "checkpoint"
                 tensors into pinned memory and forks a reader of them every few batches, as Megatron's writer does
    lagging      the same with the GPU behind the host, as in training (the two cases above wait for each copy):
                 a sleep kernel before each copy, the pinned batch dropped as soon as its copy is queued, what
                 arrived compared with the host's rows at the epoch's end; the demo's 154 rows in batches of 16,
                 so a new iterator, with new worker processes, every 9 batches (NeMo's loaders keep no workers
                 across epochs)

    python tools/pinned_fork_probe.py --seconds 20 --out probe.json

Prints one JSON line per case and writes them to --out; exit 0 either way (the counts are the finding)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

ROWS, ROW_TOKENS, BUFFERS, BUFFER_INTS = 4096, 64, 16, 1 << 17  # 1 MiB buffers
DEMO_ROWS = 154  # the demo's training split
LAG_CYCLES = 4_000_000  # GPU clock cycles of sleep before each batch's copy: about 2 ms


def _sleep_and_exit(seconds: float, staged=None) -> None:
    if staged is not None:
        sum(float(t.sum()) for t in staged)  # the writer reads what was staged
    time.sleep(seconds)


class Forks:
    """Short-lived children forked from the calling thread, at most one every `every_s` seconds."""

    def __init__(self, every_s: float, child_s: float) -> None:
        self.every_s, self.child_s, self.count, self.last, self.children = every_s, child_s, 0, 0.0, []
        self.context = multiprocessing.get_context("fork")

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def start(self, staged=None) -> None:
        self.last = time.monotonic()
        child = self.context.Process(target=_sleep_and_exit, args=(self.child_s, staged), daemon=True)
        child.start()
        self.count += 1
        for ended in [c for c in self.children if not c.is_alive()]:
            ended.join()
            self.children.remove(ended)
        self.children.append(child)

    def write_checkpoint(self, weights) -> None:
        """Stage `weights` into pinned memory and fork a reader of them, as Megatron's asynchronous save does; the
        copies are dropped while the child may still read them (Megatron-Core 0.15's caller)."""
        import torch

        staged = [w.to("cpu", non_blocking=True) for w in weights]  # Megatron's preload_tensors
        torch.cuda.synchronize()
        self.start(staged)

    def close(self) -> None:
        for child in self.children:
            child.join()


def raw_case(seconds: float, fork: bool) -> dict:
    import torch

    buffers = [torch.empty(BUFFER_INTS, dtype=torch.int64, pin_memory=True) for _ in range(BUFFERS)]
    stop, copies, wrong = threading.Event(), [0], []

    def writer() -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            value = 0
            while not stop.is_set():
                value += 1
                buffer = buffers[value % BUFFERS]
                buffer.fill_(value)
                arrived = buffer.to("cuda", non_blocking=True)
                low, high = int(arrived.min()), int(arrived.max())  # waits for the copy
                copies[0] += 1
                if (low, high) != (value, value):
                    bad = int((arrived != value).sum())
                    wrong.append({"copy": value, "min": low, "max": high, "ints_wrong": bad})

    thread = threading.Thread(target=writer, daemon=True)
    forks = Forks(every_s=0.05, child_s=0.3)
    thread.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if fork and forks.due():
            forks.start()
        time.sleep(0.005)
    stop.set()
    thread.join()
    forks.close()
    return {"case": "raw", "forks": forks.count, "copies": copies[0], "copies_wrong": len(wrong), "first": wrong[:5]}


class KnownRows:
    """Row i is ROW_TOKENS ids i*7+j mod 512 (a 512-token vocabulary), with its labels the same ids shifted."""

    def __init__(self, rows: int = ROWS) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        import torch

        tokens = (torch.arange(ROW_TOKENS) + i * 7) % 512
        return {"tokens": tokens, "labels": tokens.roll(-1), "loss_mask": torch.ones(ROW_TOKENS)}


def dataloader_case(seconds: float, fork: bool) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(KnownRows(), batch_size=16, shuffle=True, num_workers=2, pin_memory=True)
    weights = [torch.randn(1 << 16, device="cuda") for _ in range(8)]  # "checkpoint" tensors, 256 KiB each
    forks = Forks(every_s=0.25, child_s=0.5)
    batches, wrong, outside = 0, [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for batch in loader:
            host = batch["tokens"].clone()  # what the host holds, before the copy is queued
            tokens = batch["tokens"].cuda(non_blocking=True)
            labels = batch["labels"].cuda(non_blocking=True)
            arrived = tokens.cpu()
            batches += 1
            if not torch.equal(arrived, host):
                wrong.append({"batch": batches, "ints_wrong": int((arrived != host).sum()), "max": int(arrived.max())})
            outside += int(((arrived < 0) | (arrived >= 512)).sum())
            del labels
            if fork and forks.due():
                forks.write_checkpoint(weights)
            if time.monotonic() > end:
                break
    forks.close()
    return {
        "case": "dataloader",
        "forks": forks.count,
        "batches": batches,
        "batches_wrong": len(wrong),
        "ids_outside_vocabulary": outside,
        "first": wrong[:5],
    }


def lagging_case(seconds: float, fork: bool) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(
        KnownRows(DEMO_ROWS), batch_size=16, shuffle=True, drop_last=True, num_workers=2, pin_memory=True
    )
    weights = [torch.randn(1 << 16, device="cuda") for _ in range(8)]
    forks = Forks(every_s=0.25, child_s=0.5)
    batches, epochs, ints_wrong, wrong = 0, 0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        epochs += 1
        sent = []  # (what the GPU got, what the host held) for this epoch's batches, compared at its end
        for batch in loader:  # a new iterator each epoch: new worker processes and a new pin thread
            torch.cuda._sleep(LAG_CYCLES)  # the GPU still busy with the step before
            sent.append((batch["tokens"].cuda(non_blocking=True), batch["tokens"].clone()))
            del batch  # the data step keeps no host batch
            batches += 1
            if fork and forks.due():
                forks.write_checkpoint(weights)
        for index, (arrived, host) in enumerate(sent):  # .cpu() waits for the copies queued behind the sleeps
            bad = int((arrived.cpu() != host).sum())
            if bad:
                ints_wrong += bad
                wrong.append({"epoch": epochs, "batch": index, "ints_wrong": bad})
    forks.close()
    return {
        "case": "lagging",
        "forks": forks.count,
        "epochs": epochs,
        "batches": batches,
        "batches_wrong": len(wrong),
        "ints_wrong": ints_wrong,
        "first": wrong[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="per case")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: the probe needs a CUDA GPU (it measures pinned host memory against what the GPU reads)")
        return 2
    results = []
    card = {"device": torch.cuda.get_device_name(0), "gpu_uuid": str(torch.cuda.get_device_properties(0).uuid)}
    for run in (raw_case, dataloader_case, lagging_case):
        for fork in (False, True):
            result = {**run(args.seconds, fork), "fork": fork, **card}
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
