"""Quiet logs: no run_simulation deprecation notice, no per-load transformers/datasets bars, and each
client's truncation line once per run, in a real tiny simulation and in the functions behind it."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

import datasets
import pytest
from flwr.common.logger import warn_deprecated_feature

from fedlora.commands.simulate import without_run_simulation_notice
from fedlora.config import DatasetConfig, ModelConfig
from fedlora.data.records import REPORTS_DIR_ENV, reports_shared_by_run, share_reports_within_run, tokenize_dataset
from fedlora.model.loading import load_model
from fedlora.model.tiny import build_tiny_model
from fedlora.worker_cache import REPORTED

TRUNCATED = re.compile(r"(\d+ of \d+ examples exceed dataset\.max_length=\d+.*)")
ROWS = [{"question": "q" * (20 + i), "answer": "a" * (30 + i)} for i in range(6)]


def test_simulation_output_is_quiet(tmp_path, run_cli):
    # Prepare/Execute: the tiny model, 2 clients, 2 rounds; max_length 64 truncates every example
    proc = run_cli("simulate", "model=tiny", "num_rounds=2", "num_clients=2", "train.local_steps=2",
                   "dataset.max_length=64", "eval.max_examples=8", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # Assert: no deprecation notice, no per-load progress bars
    assert "DEPRECATED" not in out and "run_simulation" not in out, out[-5000:]
    assert "Loading weights" not in out and "Generating train split" not in out
    # each client's truncation line at most once (whichever worker trains it), the server's once
    client_lines = [m.group(1) for line in out.splitlines() if "ClientAppActor" in line
                    for m in [TRUNCATED.search(line)] if m]
    server_lines = [line for line in out.splitlines() if TRUNCATED.search(line) and "ClientAppActor" not in line]
    assert 1 <= len(client_lines) <= 2 and len(set(client_lines)) == len(client_lines), client_lines
    assert len(server_lines) <= 1, server_lines
    assert (tmp_path / "run" / "summary.json").is_file()


def test_only_the_run_simulation_notice_is_withheld(caplog):
    other = "The `start_simulation` function is deprecated"
    with caplog.at_level(logging.WARNING, logger="flwr"), without_run_simulation_notice():
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        warn_deprecated_feature(other)
        logging.getLogger("flwr").warning("an ordinary Flower warning")
    assert "run_simulation" not in caplog.text
    assert other in caplog.text and "an ordinary Flower warning" in caplog.text
    # outside the block the notice is logged again
    with caplog.at_level(logging.WARNING, logger="flwr"):
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    assert "run_simulation" in caplog.text


def _truncation_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exceed dataset.max_length" in r.getMessage()]


def test_truncation_is_reported_once_per_data_and_config(tokenizer, caplog):
    REPORTED.clear()
    ds, cfg = datasets.Dataset.from_list(ROWS), DatasetConfig(max_length=40)
    with caplog.at_level(logging.WARNING, logger="fedlora.data.records"):
        for _ in range(3):  # every round tokenises the same rows again
            tokenize_dataset(ds, tokenizer, cfg)
        tokenize_dataset(ds.select(range(4)), tokenizer, cfg)  # another client's rows
        tokenize_dataset(ds, tokenizer, DatasetConfig(max_length=48))  # another config
    lines = _truncation_lines(caplog)
    assert lines[0].startswith("6 of 6 examples exceed dataset.max_length=40: responses truncated")
    assert len(lines) == 3 and lines[1].startswith("4 of 4 ") and "max_length=48" in lines[2], lines


def test_truncation_is_reported_once_across_processes_of_a_run(tokenizer, caplog):
    REPORTED.clear()
    ds, cfg = datasets.Dataset.from_list(ROWS), DatasetConfig(max_length=40)
    with caplog.at_level(logging.WARNING, logger="fedlora.data.records"):
        with reports_shared_by_run():
            tokenize_dataset(ds, tokenizer, cfg)
            REPORTED.clear()  # as if another worker of the same run tokenised them
            tokenize_dataset(ds, tokenizer, cfg)
        assert len(_truncation_lines(caplog)) == 1
        with reports_shared_by_run():  # the next run says it again
            tokenize_dataset(ds, tokenizer, cfg)
    assert len(_truncation_lines(caplog)) == 2


def test_loading_a_model_directory_prints_no_progress_bars(tmp_path, tokenizer, capfd, caplog):
    # Prepare: a saved tiny model without its final norm (a weight transformers must initialise)
    model = build_tiny_model(len(tokenizer), seed=0)
    model.save_pretrained(tmp_path / "m", state_dict={k: v for k, v in model.state_dict().items()
                                                      if k != "model.norm.weight"})
    tokenizer.save_pretrained(tmp_path / "m")
    capfd.readouterr()
    # Execute: three loads, as three clients of one worker would
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            loaded, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), device="cpu", dtype="float32"))
    # Assert: no bars or LOAD REPORT tables; the missing weight said once, in one line
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "LOAD REPORT" not in err + caplog.text, err
    missing = [r.getMessage() for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert len(missing) == 1 and "model.norm.weight" in missing[0], missing
    from transformers.utils import logging as hf_logging

    assert hf_logging.get_verbosity() < hf_logging.ERROR  # the verbosity is restored after the load
    assert loaded.get_output_embeddings() is not None


@pytest.fixture(autouse=True)
def _default_verbosity():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(level)


def test_a_deployed_node_reports_truncation_once_per_run(tokenizer, caplog, monkeypatch):
    # Prepare: no folder chosen (a SuperNode's flwr-clientapp process); each message is a new process
    monkeypatch.delenv(REPORTS_DIR_ENV, raising=False)
    ds, cfg = datasets.Dataset.from_list(ROWS), DatasetConfig(max_length=40)
    run_ids = [987_654_001, 987_654_001, 987_654_001, 987_654_002]  # three messages of one run, then a new run
    with caplog.at_level(logging.WARNING, logger="fedlora.data.records"):
        for run_id in run_ids:
            REPORTED.clear()
            monkeypatch.delenv(REPORTS_DIR_ENV, raising=False)
            # Execute
            share_reports_within_run(run_id)
            tokenize_dataset(ds, tokenizer, cfg)
    # Assert: once for the first run, once for the next
    assert len(_truncation_lines(caplog)) == 2
    for run_id in set(run_ids):
        shutil.rmtree(Path(tempfile.gettempdir()) / f"fedlora-reports-run{run_id}")
