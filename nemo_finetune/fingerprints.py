"""What a file holds, by content: the identity the records (import, data, packing, export) keep of their inputs and
outputs, so that new bytes under an old name are never taken for the old ones.

A file is hashed whole (sha256, one read). A large file's digest is cached under its device, inode, size and
modification and change times, so an unchanged multi-GB model is read once, not on every run; any write to the file,
even one that puts its modification time back, moves its change time, which the user cannot set, and so misses the
cache. The cache is one small JSON file per large file, in $NEMO_FINETUNE_CACHE (default
$XDG_CACHE_HOME/nemo_finetune or ~/.cache/nemo_finetune); deleting it only costs a re-read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from nemo_finetune.files import atomic_write_text

log = logging.getLogger("peft_megatron")

CACHE_ENV = "NEMO_FINETUNE_CACHE"
CACHED_FROM_BYTES = 8 << 20  # smaller files are hashed on every call: cheaper than a cache entry
# A file changed within the last seconds is not cached: a second write in the same timestamp tick would leave the
# times as they were (git's "racily clean" index entries), so its digest is only trusted once the file has settled.
SETTLED_S = 2.0
ANNOUNCE_FROM_BYTES = 1 << 30  # hashing a file this large takes seconds: say so once


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemo_finetune"
    return Path(root) / "sha256"


def digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest of the whole file}; large files through the cache."""
    path = Path(path)
    before = os.stat(path)
    if before.st_size < CACHED_FROM_BYTES:
        return _hash(path, before.st_size)
    resolved = path.resolve()
    entry = cache_dir() / hashlib.sha256(f"{resolved}\0{before.st_dev}\0{before.st_ino}".encode()).hexdigest()
    key = _stat_key(before)
    cached = _read_entry(entry)
    if cached is not None and cached.get("key") == key and isinstance(cached.get("sha256"), str):
        return {"bytes": before.st_size, "sha256": cached["sha256"]}
    if before.st_size >= ANNOUNCE_FROM_BYTES:
        log.info("hashing %s (%.1f GB) once; later runs read its digest from the cache", path, before.st_size / 1e9)
    result = _hash(path, before.st_size)
    settled = time.time() - before.st_ctime_ns / 1e9 > SETTLED_S
    if settled and _stat_key(os.stat(path)) == key:  # unchanged while it was read
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(entry, json.dumps({"path": str(resolved), "key": key, "sha256": result["sha256"]}))
        except OSError as e:  # a read-only home: every run reads the file again, nothing worse
            log.debug("digest cache %s not written: %s", entry, e)
    return result


def digests(root: Path, recursive: bool = True) -> dict[str, dict]:
    """{relative path: digest()} of every file under `root` (sorted; the same on every node's copy)."""
    root = Path(root)
    return {str(p.relative_to(root)): digest(p) for p in _files(root, recursive)}


def legacy_heads(root: Path, recursive: bool = True) -> dict[str, list]:
    """{relative path: [size, sha256 of the first MiB]}: how records written before whole-file digests identified
    files; read only to recognise such a record's files (and then record their digests)."""
    heads = {}
    for path in _files(root, recursive):
        with open(path, "rb") as fh:
            heads[str(path.relative_to(root))] = [path.stat().st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest()]
    return heads


def _files(root: Path, recursive: bool) -> list[Path]:
    return sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())


def _hash(path: Path, size: int) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            sha.update(block)
    return {"bytes": size, "sha256": sha.hexdigest()}


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_entry(entry: Path) -> dict | None:
    try:
        content = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None
