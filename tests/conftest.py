"""Shared fixtures: the tiny model and tokenizer (built from code, no download)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model(len(tokenizer), seed=0)


def _run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fedlora.commands.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def run_cli():
    """Run the ``fedlora`` CLI in a subprocess (a real Flower simulation when ``simulate``)."""
    return _run_cli


TINY_SIM = ["model=tiny", "dataset.max_length=96", "eval.max_examples=8", "train.local_steps=4",
            "train.lr=0.01", "train.batch_size=4", "num_rounds=2", "num_clients=2"]
"""Overrides for a fast 2-client, 2-round simulation on the tiny model."""
