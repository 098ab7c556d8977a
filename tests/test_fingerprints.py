"""nemo_finetune/fingerprints.py: files identified by their whole content, large ones through a cache that any write
to the file misses."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from conftest import edit_in_place
from nemo_finetune import fingerprints


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprints.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "sha256"


def large_file(path, size=fingerprints.CACHED_FROM_BYTES + 1):
    path.write_bytes(os.urandom(size))
    return path


def test_a_change_past_the_first_mib_with_the_time_put_back_is_a_new_digest(tmp_path, cache):
    weights = large_file(tmp_path / "model.safetensors", 3 << 20)
    before = fingerprints.digest(weights)
    assert before == {"bytes": 3 << 20, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    edit_in_place(weights, -1)
    after = fingerprints.digest(weights)
    assert after["bytes"] == before["bytes"] and after["sha256"] != before["sha256"]
    assert after["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_settled_large_file_is_read_once_and_any_write_to_it_misses_the_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(fingerprints, "SETTLED_S", -1.0)  # the file below was written just now
    weights = large_file(tmp_path / "model.safetensors")
    true = fingerprints.digest(weights)["sha256"]
    (entry,) = cache.iterdir()
    recorded = json.loads(entry.read_text())
    assert recorded["sha256"] == true and recorded["path"] == str(weights.resolve())
    entry.write_text(json.dumps({**recorded, "sha256": "planted"}))  # what the next call answers if it reads the cache
    assert fingerprints.digest(weights)["sha256"] == "planted"
    monkeypatch.setattr(fingerprints, "SETTLED_S", 2.0)  # as the scripts run: the writes below are not cached
    time.sleep(0.05)  # past the filesystem's timestamp tick
    original = edit_in_place(weights, -1)
    changed = fingerprints.digest(weights)["sha256"]
    assert changed == hashlib.sha256(weights.read_bytes()).hexdigest() != true
    edit_in_place(weights, -1, original[-1:])  # the content as it was, times as they were: read again, not trusted
    assert fingerprints.digest(weights)["sha256"] == true


def test_a_file_written_in_the_last_seconds_and_small_files_are_not_cached(tmp_path, cache, monkeypatch):
    fingerprints.digest(large_file(tmp_path / "fresh.safetensors"))  # a second write could still keep its times
    assert not cache.exists()
    monkeypatch.setattr(fingerprints, "SETTLED_S", -1.0)
    fingerprints.digest(large_file(tmp_path / "config.json", fingerprints.CACHED_FROM_BYTES - 1))
    assert not cache.exists()


def test_a_damaged_or_unwritable_cache_costs_a_read_and_nothing_else(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(fingerprints, "SETTLED_S", -1.0)
    weights = large_file(tmp_path / "model.safetensors")
    true = fingerprints.digest(weights)["sha256"]
    (entry,) = cache.iterdir()
    entry.write_text("[not a record")
    assert fingerprints.digest(weights)["sha256"] == true
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv(fingerprints.CACHE_ENV, str(blocked))
    assert fingerprints.digest(weights)["sha256"] == true


def test_digests_of_a_directory_name_every_file_by_its_relative_path(tmp_path, cache):
    (tmp_path / "m" / "weights").mkdir(parents=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "weights" / "a.distcp").write_bytes(b"abc")
    found = fingerprints.digests(tmp_path / "m")
    assert found == {
        "config.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "weights/a.distcp": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
    }
    assert list(fingerprints.digests(tmp_path / "m", recursive=False)) == ["config.json"]
