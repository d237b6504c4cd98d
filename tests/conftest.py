"""Shared fixtures: a tiny Llama + tokenizer saved as an HF directory, and preference files built locally."""

import os

import pytest
from hypothesis import settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

# Property tests draw the same examples on every run and every machine: a failure is reproducible and the test
# command cannot fail by chance on a fresh clone. derandomize=True seeds each test from its own name; no example
# database (nothing carried between runs); no deadline (2 shared cores make timings meaningless). A test's own
# @settings(max_examples=...) still overrides the count and inherits the rest from this profile.
settings.register_profile("chipo", derandomize=True, database=None, max_examples=100, deadline=None,
                          print_blob=True)
settings.load_profile("chipo")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A directory with a tiny random Llama (hidden 64, 2 layers) and its BPE tokenizer, plus data files."""
    from chipo.io import write_jsonl
    from chipo.toy import save_tiny_model, toy_preference_rows

    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "model")
    write_jsonl(root / "train.jsonl", toy_preference_rows(32, seed=0))
    write_jsonl(root / "test.jsonl", toy_preference_rows(16, seed=1))
    return root
