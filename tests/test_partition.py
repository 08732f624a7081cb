"""fedlora.data.partition: iid / dirichlet / natural splits through flwr-datasets, and their statistics."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest

from fedlora.config import DatasetConfig
from fedlora.data.records import DataError, load_records, split_train_eval
from fedlora.data.partition import (
    format_partition_stats,
    partition_dataset,
    partition_stats,
    save_partition_stats,
)


def _rows(n: int) -> datasets.Dataset:
    """n rows: an id, a 4-valued label (n/4 each), a distinct float, a 3-valued user, and an
    answer of 2 + (i % 3) lines."""
    return datasets.Dataset.from_dict(
        {
            "id": list(range(n)),
            "question": [f"q{i}" for i in range(n)],
            "answer": ["\n".join(["step"] * (1 + i % 3) + [f"#### {i}"]) for i in range(n)],
            "label": [i % 4 for i in range(n)],
            "difficulty": [(i * 37 % n) / n for i in range(n)],
            "user": [["ann", "bob", "cy"][i % 3] for i in range(n)],
        }
    )


def _ids(partitions: list[datasets.Dataset]) -> list[list[int]]:
    return [list(p["id"]) for p in partitions]


# ---------------------------------------------------------------------------------------------
# iid


def test_iid_sizes_differ_by_at_most_one_and_partitions_cover_the_data():
    # Prepare
    ds = _rows(103)
    # Execute
    partitions = partition_dataset(ds, DatasetConfig(), num_partitions=4)
    # Assert
    ids = _ids(partitions)
    assert [len(p) for p in ids] == [26, 26, 26, 25]
    assert sorted(i for p in ids for i in p) == list(range(103))  # disjoint and covering
    assert ids[0] != list(range(26))  # shuffled first (IidPartitioner alone cuts contiguous shards)


def test_iid_is_deterministic_for_a_seed():
    ds = _rows(60)
    first = _ids(partition_dataset(ds, DatasetConfig(seed=3), 3))
    again = _ids(partition_dataset(ds, DatasetConfig(seed=3), 3))
    other = _ids(partition_dataset(ds, DatasetConfig(seed=4), 3))
    assert first == again
    assert first != other


def test_iid_gsm8k_default_split_four_clients():
    # Prepare
    cfg = DatasetConfig()
    train, _ = split_train_eval(load_records(cfg), cfg)
    # Execute
    partitions = partition_dataset(train, cfg, num_partitions=4)
    # Assert
    assert [len(p) for p in partitions] == [280, 280, 280, 279]
    questions = [q for p in partitions for q in p["question"]]
    assert sorted(questions) == sorted(train["question"])


# ---------------------------------------------------------------------------------------------
# dirichlet


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    # Prepare
    ds = _rows(400)
    skewed_cfg = DatasetConfig(partitioner="dirichlet", partition_by="label", dirichlet_alpha=0.1)
    even_cfg = DatasetConfig(partitioner="dirichlet", partition_by="label", dirichlet_alpha=100.0)
    # Execute
    skewed = partition_stats(partition_dataset(ds, skewed_cfg, 4), skewed_cfg)
    even = partition_stats(partition_dataset(ds, even_cfg, 4), even_cfg)
    # Assert: total variation from the pooled label mix (0 = identical mix)
    assert skewed["mean_tv_distance"] > 0.4
    assert even["mean_tv_distance"] < 0.1
    max_share = [max(c["histogram"].values()) / c["examples"] for c in skewed["clients"]]
    assert max(max_share) > 0.6  # some client is dominated by one label (uniform mix: 0.25)
    assert skewed["total_examples"] == even["total_examples"] == 400
    assert min(c["examples"] for c in skewed["clients"]) >= 10  # flwr's min_partition_size


def test_dirichlet_is_deterministic_for_a_seed_and_disjoint():
    ds = _rows(200)
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="label", dirichlet_alpha=0.5, seed=1)
    first = _ids(partition_dataset(ds, cfg, 3))
    again = _ids(partition_dataset(ds, cfg, 3))
    other = _ids(partition_dataset(ds, dataclasses.replace(cfg, seed=2), 3))
    assert first == again
    assert first != other
    assert sorted(i for p in first for i in p) == list(range(200))


def test_dirichlet_over_a_numeric_column_uses_quantile_buckets():
    # Prepare: 400 distinct difficulties → 4 buckets of 100
    ds = _rows(400)
    cfg = DatasetConfig(
        partitioner="dirichlet", partition_by="difficulty", num_buckets=4, dirichlet_alpha=1.0
    )
    # Execute
    partitions = partition_dataset(ds, cfg, 3)
    stats = partition_stats(partitions, cfg)
    # Assert
    assert stats["partition_by"] == "difficulty_bucket"
    assert stats["histogram_total"] == {"0": 100, "1": 100, "2": 100, "3": 100}
    assert stats["bucket_ranges"]["0"] == [0.0, 0.2475]
    assert stats["bucket_ranges"]["3"] == [0.75, 0.9975]


def test_answer_steps_is_derived_from_response_lines_and_bucketed_on_gsm8k():
    # Prepare: GSM8K answers have 3..12 non-empty lines; 4 quantiles merge into 3 buckets
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="answer_steps", dirichlet_alpha=0.3)
    train, _ = split_train_eval(load_records(cfg), cfg)
    # Execute
    partitions = partition_dataset(train, cfg, 4)
    stats = partition_stats(partitions, cfg)
    # Assert
    assert stats["total_examples"] == 1119
    assert stats["histogram_total"] == {"0": 599, "1": 250, "2": 270}
    assert stats["bucket_ranges"] == {"0": [3, 4], "1": [5, 5], "2": [6, 12]}
    assert partitions[0].column_names == ["question", "answer", "answer_steps", "answer_steps_bucket"]


def test_dirichlet_that_cannot_fill_every_client_is_a_data_error():
    # Prepare: one label and a tiny alpha put (almost) all rows on one client, every draw
    ds = _rows(40).map(lambda _: {"label": 0})
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="label", dirichlet_alpha=0.01)
    # Execute / Assert
    with pytest.raises(DataError, match="raise dataset.dirichlet_alpha, reduce num_clients"):
        partition_dataset(ds, cfg, 4)


def test_dirichlet_over_free_text_is_a_data_error():
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="question")
    with pytest.raises(DataError, match="text with 200 distinct values.*answer_steps"):
        partition_dataset(_rows(200), cfg, 2)


# ---------------------------------------------------------------------------------------------
# natural


def test_natural_gives_one_partition_per_value():
    # Prepare
    ds = _rows(30)
    cfg = DatasetConfig(partitioner="natural", partition_by="user")
    # Execute
    partitions = partition_dataset(ds, cfg, 3)
    stats = partition_stats(partitions, cfg)
    # Assert: clients ordered by sorted value, 10 rows each
    assert [sorted(set(p["user"])) for p in partitions] == [["ann"], ["bob"], ["cy"]]
    assert [len(p) for p in partitions] == [10, 10, 10]
    assert stats["clients"][1]["histogram"] == {"ann": 0, "bob": 10, "cy": 0}


def test_natural_count_mismatch_names_both_numbers():
    cfg = DatasetConfig(partitioner="natural", partition_by="user")
    with pytest.raises(DataError, match="3 distinct values but num_clients=2"):
        partition_dataset(_rows(30), cfg, 2)


def test_natural_over_derived_answer_steps():
    cfg = DatasetConfig(partitioner="natural", partition_by="answer_steps")
    partitions = partition_dataset(_rows(30), cfg, 3)  # answers of 2, 3, 4 lines
    assert [sorted(set(p["answer_steps"])) for p in partitions] == [[2], [3], [4]]


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "cfg",
    [DatasetConfig(), DatasetConfig(partitioner="dirichlet", partition_by="label")],
)
def test_too_few_rows_for_the_clients_is_a_data_error(cfg):
    with pytest.raises(DataError, match="3 rows but there are 4 clients"):
        partition_dataset(_rows(3), cfg, 4)


def test_unknown_column_lists_the_columns():
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="topic")
    with pytest.raises(DataError, match=r"'topic' is not a column.*'label'.*partition_by=<column>"):
        partition_dataset(_rows(20), cfg, 2)


def test_one_row_per_client_is_enough():
    partitions = partition_dataset(_rows(4), DatasetConfig(), 4)
    assert [len(p) for p in partitions] == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# statistics


def test_stats_totals_json_table_and_file(tmp_path):
    # Prepare
    ds = _rows(101)
    cfg = DatasetConfig(partitioner="dirichlet", partition_by="label", dirichlet_alpha=1.0)
    partitions = partition_dataset(ds, cfg, 3)
    # Execute
    stats = partition_stats(partitions, cfg)
    table = format_partition_stats(stats)
    path = save_partition_stats(stats, tmp_path / "run")
    # Assert
    assert stats["total_examples"] == 101 == sum(c["examples"] for c in stats["clients"])
    assert sum(stats["histogram_total"].values()) == 101
    assert stats["histogram_total"] == {"0": 26, "1": 25, "2": 25, "3": 25}
    for client in stats["clients"]:
        assert sum(client["histogram"].values()) == client["examples"]
    assert path.name == "partition_stats.json"
    assert json.loads(path.read_text()) == stats
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1  # header, column names, 3 clients, total
    assert lines[-1].split()[:6] == ["total", "101", "26", "25", "25", "25"]


def test_stats_without_a_column_only_count_examples():
    stats = partition_stats(partition_dataset(_rows(10), DatasetConfig(), 3), DatasetConfig())
    assert [c["examples"] for c in stats["clients"]] == [4, 3, 3]
    assert stats["partition_by"] is None and "histogram_total" not in stats
    assert format_partition_stats(stats).splitlines()[-1].split() == ["total", "10"]
