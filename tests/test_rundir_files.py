"""fedlora.rundir.files is the one home of the run directory's names: no other module spells them,
and its readers read back what the writers write."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from fedlora.rundir import files
from fedlora.rundir.writer import RunWriter, completion, write_report
from fedlora.rundir.files import (
    CONFIG_FILE,
    LEDGER_FILE,
    LOSS_PLOT_FILE,
    METRICS_FILE,
    PARTITION_STATS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    RunDirError,
    ledger_entries_since,
    ledger_position,
    read_config,
    read_manifest,
    read_metrics,
    read_partition_stats,
    read_summary,
)

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fedlora", "server", "client")
HOME = ROOT / "fedlora" / "rundir" / "files.py"
GENERIC = {files.ADAPTER_DIR, files.CLIENTS_DIR, files.HYDRA_DIR}
"""Names that are also ordinary words and dict keys ("adapter", "clients"): not scanned for."""


def _names() -> list[str]:
    return sorted({v for k, v in vars(files).items() if k.isupper() and isinstance(v, str)} - GENERIC)


def _docstrings(tree: ast.AST) -> set[int]:
    """Bare string statements: module/class/function docstrings and attribute docstrings."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _spelled(path: Path, patterns: dict[str, re.Pattern]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):  # f-strings included: their literal parts are Constant nodes
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name, pat in patterns.items()
                      if pat.search(node.value)]
    return found


def test_names_are_spelled_only_in_rundir_files():
    names = _names()
    assert {"metrics.jsonl", "config.yaml", "privacy_ledger.jsonl", "global_adapter.pb", "checkpoints"} <= set(names)
    # a file name as a whole word, in messages too ("report.md" is not found inside "privacy_report.md",
    # nor "epsilon.png" inside "compare_epsilon.png"); a folder name ("checkpoints") only as the whole
    # string, since it is also an ordinary word in messages
    patterns = {n: re.compile(rf"(?<![\w.-]){re.escape(n)}(?![\w-])" if "." in n else rf"^{re.escape(n)}$")
                for n in names}
    offending = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == HOME or "proto/v1" in path.as_posix():  # generated protobuf code
                continue
            offending += _spelled(path, patterns)
    assert not offending, (
        "run-directory file names spelled outside fedlora/rundir/files.py (import the constant from there):\n  "
        + "\n  ".join(offending))


def test_every_name_has_a_docstring():
    tree = ast.parse(HOME.read_text())
    body = tree.body
    documented = {stmt.targets[0].id for stmt, nxt in zip(body, body[1:], strict=False)
                  if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
                  and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}
    constants = {k for k, v in vars(files).items() if k.isupper() and isinstance(v, str)}
    assert constants and constants <= documented


def test_readers_read_what_the_writer_wrote(tmp_path: Path):
    from fedlora.data.partition import save_partition_stats
    from fedlora.privacy.ledger import append_entry, read_ledger
    from fedlora.rundir.writer import RunWriter, manifest, write_report

    config = {"strategy": {"name": "fedavg"}, "adapter": {"rank": 4}, "num_rounds": 2, "seed": 0}
    rows = [{"round": 0, "strategy": "fedavg", "clients": 0, "eval_loss": 2.5},
            {"round": 1, "strategy": "fedavg", "clients": 2, "train_loss": 2.4, "eval_loss": 2.0, "bytes_up": 10},
            {"round": 2, "strategy": "fedavg", "clients": 2, "train_loss": 2.1, "eval_loss": 1.5, "bytes_up": 10}]
    stats = {"clients": [{"client": 0, "examples": 3}, {"client": 1, "examples": 4}], "total_examples": 7}

    writer = RunWriter(tmp_path)
    assert read_metrics(tmp_path, live=True) == []  # a run that has not written a row yet
    assert writer.write_config(config).name == CONFIG_FILE
    for row in rows:
        writer.log_round(row)
    summary_path = writer.write_summary({"strategy": "fedavg"})
    run_manifest = manifest(config, stats, "cpu")
    writer.write_manifest(run_manifest)
    assert save_partition_stats(stats, tmp_path).name == PARTITION_STATS_FILE
    report = write_report(tmp_path, config, "partitions", rows, read_summary(tmp_path), run_manifest)

    assert writer.metrics_path.name == METRICS_FILE and summary_path.name == SUMMARY_FILE
    assert report.name == REPORT_FILE and f"({LOSS_PLOT_FILE})" in report.read_text()
    assert read_config(tmp_path) == config
    assert read_metrics(tmp_path) == rows == read_metrics(tmp_path, live=True)
    summary = read_summary(tmp_path)
    assert (summary["rounds"], summary["final_eval_loss"], summary["total_bytes_up"], summary["strategy"]) == (2, 1.5, 20, "fedavg")
    assert read_partition_stats(tmp_path) == stats
    assert read_manifest(tmp_path) == json.loads(json.dumps(run_manifest))

    # a row being appended: a live reader leaves it out, a strict one names the file and line
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"round": 3, "strat')
    assert read_metrics(tmp_path, live=True) == rows
    with pytest.raises(RunDirError, match=rf"{re.escape(str(tmp_path / METRICS_FILE))} line 4 is not JSON"):
        read_metrics(tmp_path)
    writer.restore(rows[:2], wall_seconds=5.0)  # a resume drops the rows past its checkpoint, torn ones too
    assert read_metrics(tmp_path) == rows[:2] and writer.rows == rows[:2]
    (tmp_path / SUMMARY_FILE).unlink()
    with pytest.raises(RunDirError, match=rf"{SUMMARY_FILE} does not exist"):
        read_summary(tmp_path)

    # the privacy ledger: its name comes from files, and the checkpoint's position helpers agree with
    # fedlora.privacy.ledger's reader
    assert ledger_position(tmp_path) == {"bytes": 0, "entries": 0}
    append_entry(tmp_path, {"kind": "run"})
    start = ledger_position(tmp_path)
    append_entry(tmp_path, {"kind": "example", "client": "0"})
    append_entry(tmp_path, {"kind": "run"})
    assert (tmp_path / LEDGER_FILE).is_file() and len(read_ledger(tmp_path)) == 3
    assert start["entries"] == 1 and ledger_position(tmp_path)["entries"] == 3
    assert ledger_entries_since(tmp_path, start) == 1


def test_completion_counts_rounds_replies_and_node_warnings_from_the_rows():
    # Prepare: round 0, a clean round, a skipped round with rejections, a round with node warnings;
    # 5 rounds planned
    rows = [{"round": 0, "node_warnings": ["partition 2 is held by no node: its 373 examples never train"]},
            {"round": 1, "rejected": 0}, {"round": 2, "skipped": True, "rejected": 2},
            {"round": 3, "rejected": 1, "node_warnings": ["node 7 left out", "node 9 left out"]}]
    # Execute
    done, clean = completion(rows, planned_rounds=5), completion([{"round": 0}, rows[1]])
    # Assert
    assert (done["planned_rounds"], done["completed_rounds"], done["skipped_rounds"], done["rejected_replies"]) == (
        5, 2, [2], 3)
    assert done["caveats"] == [
        "round 2 skipped (too few usable replies; the previous global adapter stayed)",
        "3 client replies rejected (see rejected_reasons in metrics.jsonl)",
        "3 node warnings (e.g. a partition no node holds; see node_warnings in metrics.jsonl)",
        "3 of 5 planned rounds ran",
    ]
    assert clean == {"planned_rounds": 1, "completed_rounds": 1, "skipped_rounds": [], "rejected_replies": 0,
                     "caveats": []}


def test_summary_and_report_name_rows_left_out_by_bad_rows_skip(tmp_path):
    # Prepare: a clean two-round run whose data lost 3 rows to dataset.bad_rows=skip
    writer = RunWriter(tmp_path / "run")
    for rnd, loss in enumerate((2.0, 1.5, 1.25)):
        writer.log_round({"round": rnd, "eval_loss": loss, "train_loss": None if rnd == 0 else loss + 0.1})
    # Execute
    summary = json.loads(writer.write_summary({"skipped_data_rows": 3, "strategy": "fedavg"}, planned_rounds=2)
                         .read_text())
    report = write_report(writer.dir, {}, "", writer.rows, summary, {}).read_text()
    # Assert
    assert summary["caveats"] == ["3 data rows left out (dataset.bad_rows=skip; see the log, or rerun with "
                                  "dataset.bad_rows=error to have them listed)"]
    assert (summary["final_eval_loss"], summary["final_eval_round"], summary["final_train_round"]) == (1.25, 2, 2)
    assert "2 of 2 rounds completed; eval loss 2.0000 → 1.2500; " in report
    assert "> **Not a clean run**: 3 data rows left out" in report
