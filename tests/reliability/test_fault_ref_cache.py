"""Fault injection on the reference log-prob cache: every damaged entry is a miss that is recomputed (never a silent
hit with wrong numbers, never a crash), and a cache that cannot be written leaves training uncached."""

from __future__ import annotations

import errno
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.data import PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.train import reference
from chipo.train.reference import cached_reference_logps

SETTINGS = {"max_length": 96}


@pytest.fixture(scope="module")
def setup(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    source = str(tiny_dir / "train.jsonl")
    data, _ = prepare_preference_dataset(load_preference_dataset(source, max_rows=6), tokenizer, source=source,
                                         max_length=96)
    return model, data, PreferenceCollator(pad_token_id=tokenizer.pad_token_id)


def _entry(cache):
    (path,) = cache.glob("*.safetensors")
    return path


def _flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40  # inside the last float of `rejected`: the header still parses, only the checksum can tell
    path.write_bytes(bytes(raw))


def _retype(path, dtype=None, shape=None, drop=None):
    """Rewrite the entry with its own metadata but tensors of another dtype / shape, or without one tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if shape is not None:
        tensors = {k: v.reshape(shape) for k, v in tensors.items()}
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(path), metadata=meta)


def _replace_by_directory(path):
    path.unlink()
    (path / "junk").mkdir(parents=True)


CORRUPTIONS = {
    "flipped byte": _flip_last_byte,
    "int64 entry": lambda p: _retype(p, dtype=torch.int64),
    "2-D entry": lambda p: _retype(p, shape=(-1, 1)),
    "missing key": lambda p: _retype(p, drop="rejected"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "directory": _replace_by_directory,
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_entry_is_a_miss_recomputed_with_one_warning(setup, tmp_path, caplog, case):
    model, data, collator = setup
    good_c, good_r, hit = cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)
    assert not hit
    path = _entry(tmp_path)
    CORRUPTIONS[case](path)
    with caplog.at_level(logging.WARNING, logger="chipo.train.reference"):
        c, r, hit = cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)
    assert not hit
    torch.testing.assert_close((c, r), (good_c, good_r), rtol=0, atol=0)  # same batches: bit-identical
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    # The entry was rewritten: the next run is a verified hit again.
    c, r, hit = cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)
    assert hit and path.is_file()
    torch.testing.assert_close((c, r), (good_c, good_r), rtol=0, atol=0)


def test_entry_of_an_older_format_without_checksum_is_a_miss(setup, tmp_path):
    """What the cache wrote before integrity checks (no checksum metadata) is not trusted."""
    model, data, collator = setup
    cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)
    path = _entry(tmp_path)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"rows": str(len(data))})
    assert not cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)[2]


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_unwritable_cache_trains_without_caching(setup, tmp_path, caplog, monkeypatch, error):
    """Read-only (EACCES, EROFS) or full (ENOSPC) cache directory, injected at the write: the numbers come back,
    one warning, no entry and no temporary file left. (Injected, since chmod does not stop root.)"""
    model, data, collator = setup

    def failing_save(*args, **kwargs):
        raise OSError(error, "injected")

    monkeypatch.setattr(reference, "save_file", failing_save)
    with caplog.at_level(logging.WARNING, logger="chipo.train.reference"):
        c, r, hit = cached_reference_logps(model, data, collator, tmp_path, SETTINGS, progress=False)
    assert not hit and c.shape == (len(data),) and torch.isfinite(r).all()
    (warning,) = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert "training without caching" in warning and str(tmp_path) in warning
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_that_cannot_be_created_trains_without_caching(setup, tmp_path, caplog):
    model, data, collator = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="chipo.train.reference"):
        _, _, hit = cached_reference_logps(model, data, collator, blocker / "cache", SETTINGS, progress=False)
    assert not hit and "training without caching" in caplog.text
