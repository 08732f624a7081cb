"""The nodes' node-info answers checked together (fedlora/node_check.py): each kind of inconsistent
node config is refused before round 1 with the node ids, partitions and the fix; partitions no node
holds are a warning; a node that joins later is checked against the nodes already in the run and
left out when it fails. The server's expected partition sizes are checked against what a node
computes for its partition of the same data (the real partitioning, not a copy)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedlora.config import ConfigError, FedloraConfig
from fedlora.data.partition import partition_dataset, partition_stats
from fedlora.data.splits import client_split, load_splits
from fedlora.node_check import NodeCheckError, NodeExpectation, NodeInfo, admit_nodes, expect_nodes, node_problems

RUN = NodeExpectation(num_partitions=3, ranks=(4, 8, 8), examples=(373, 373, 372), dataset="data/gsm8k.jsonl")


def shared(node_id: int, pid: int, rank: int | None = None, examples: int | None = None,
           num_partitions: int = 3) -> NodeInfo:
    """A node on the shared dataset that answers as a correctly configured node of RUN would."""
    return NodeInfo(node_id, pid, RUN.ranks[pid] if rank is None else rank,
                    RUN.examples[pid] if examples is None else examples, num_partitions, False)


def refusal(nodes, expected=RUN) -> str:
    with pytest.raises(NodeCheckError) as err:
        admit_nodes(nodes, expected)
    return str(err.value)


def test_consistent_nodes_are_admitted_without_warnings():
    nodes = [shared(303, 2), shared(101, 0), shared(202, 1)]
    assert admit_nodes(nodes, RUN) == (nodes, [])


def test_two_nodes_on_one_partition_are_refused_naming_both_and_the_free_partition():
    message = refusal([shared(101, 0), shared(202, 0)])
    assert isinstance(NodeCheckError(""), ConfigError)
    assert message.startswith("the connected nodes' configs are inconsistent (1 problem); the run is refused "
                              "before round 1:\n")
    assert ("  - partition 0 is claimed by 2 nodes (node 101, node 202): its rows would train twice; node 202 "
            "duplicates node 101; set partition-id=1 in the node config of node 202\n") in message


def test_three_nodes_on_one_partition_each_extra_gets_its_own_free_partition():
    problems = node_problems([shared(303, 0), shared(101, 0), shared(202, 0)], RUN)
    assert sorted(problems) == [202, 303]  # the lowest node id keeps partition 0
    assert problems[202] == ["partition 0 is claimed by 3 nodes (node 101, node 202, node 303): its rows would "
                             "train twice; node 202 duplicates node 101; set partition-id=1 in the node config of "
                             "node 202"]
    assert problems[303][0].endswith("node 303 duplicates node 101; set partition-id=2 in the node config of "
                                     "node 303")


def test_duplicates_beyond_the_partitions_say_to_stop_the_node_or_raise_num_clients():
    nodes = [shared(101, 0), shared(202, 1), shared(303, 2), shared(404, 1)]
    assert node_problems(nodes, RUN) == {404: [
        "partition 1 is claimed by 2 nodes (node 202, node 404): its rows would train twice; node 404 duplicates "
        "node 202; stop node 404, or raise num_clients in the run config (every partition 0..2 is held)"]}


def test_duplicate_identities_of_nodes_with_their_own_data():
    own = [NodeInfo(101, 0, 4, 50, 3, True), NodeInfo(202, 0, 4, 70, 3, True)]
    assert node_problems(own, RUN) == {202: [
        "partition 0 is claimed by 2 nodes (node 101, node 202): they would train under one identity (seeds, "
        "sampling order, the privacy ledger's client); node 202 duplicates node 101; set partition-id=1 in the "
        "node config of node 202"]}


def test_partition_id_out_of_range():
    problems = node_problems([shared(101, 0), NodeInfo(202, 3, 8, 280, 4, False)], RUN)
    assert problems[202][0] == ("node 202 has partition-id=3, outside 0..2 (num_clients=3): set partition-id=1 in "
                                "the node config of node 202, or num_clients=4 in the run config")
    assert len(problems[202]) == 1  # no partition 3 to compare its size or rank with; num-partitions too is 4
    full = [shared(101, 0), shared(202, 1), shared(303, 2), NodeInfo(404, 7, 8, 10, 8, True)]
    assert node_problems(full, RUN) == {404: [
        "node 404 has partition-id=7, outside 0..2 (num_clients=3): stop node 404, or num_clients=8 in the run "
        "config (every partition 0..2 is held)"]}
    assert "node 505 has partition-id=-1, outside 0..2 (num_clients=3): set partition-id=2" in refusal(
        [shared(101, 0), shared(202, 1), NodeInfo(505, -1, 8, 10, 3, False)])


def test_num_partitions_differs_from_num_clients():
    problems = node_problems([shared(101, 0), shared(202, 1, examples=280, num_partitions=4)], RUN)
    assert problems == {202: [
        "node 202 (partition 1) has num-partitions=4 but the run's num_clients=3, so it cuts the shared dataset "
        "into other partitions than the run's: set num-partitions=3 in the node config of node 202, or "
        "num_clients=4 in the run config"]}  # the size differs for that reason: named once
    own = NodeInfo(303, 2, 8, 55, 4, True)  # its own data-path file: num-partitions cuts nothing
    assert node_problems([own], RUN) == {}


def test_data_size_differs_from_the_servers_partitioning():
    problems = node_problems([shared(101, 0), shared(202, 1, examples=400)], RUN)
    assert problems == {202: [
        "node 202 (partition 1) has 400 training examples, but the server's partitioning of data/gsm8k.jsonl "
        "gives partition 1 373: the node reads other data (another file at that path, another partitioner or "
        "library version); give node 202 the server's data file and fedlora version, or its own file with "
        "data-path="]}
    assert node_problems([NodeInfo(101, 0, 4, 999, 3, True)], RUN) == {}  # its own file: any size
    assert node_problems([shared(101, 0, examples=999)], NodeExpectation(3, (4, 8, 8))) == {}  # sizes unknown


def test_rank_differs_from_client_ranks():
    problems = node_problems([shared(101, 0, rank=8), shared(202, 1)], RUN)
    assert problems == {101: [
        "node 101 (partition 0) trains rank 8, but the run config's client_ranks gives partition 0 rank 4: set "
        "lora-rank=4 in the node config of node 101 (or change client_ranks)"]}
    free_ranks = NodeExpectation(3, None, RUN.examples)  # no client_ranks: each node's lora-rank is its own
    assert node_problems([shared(101, 0, rank=16), shared(202, 1, rank=2)], free_ranks) == {}


def test_every_problem_of_every_node_is_listed_at_once():
    message = refusal([NodeInfo(303, 5, 8, 187, 6, False), shared(202, 0), shared(101, 0, rank=16, examples=10)])
    lines = message.splitlines()
    assert lines[0].endswith("(4 problems); the run is refused before round 1:")
    assert lines[1].startswith("  - node 101 (partition 0) has 10 training examples, but the server's partitioning")
    assert lines[2].startswith("  - node 101 (partition 0) trains rank 16, but the run config's client_ranks")
    assert lines[3].endswith("node 202 duplicates node 101; set partition-id=1 in the node config of node 202")
    assert lines[4] == ("  - node 303 has partition-id=5, outside 0..2 (num_clients=3): set partition-id=2 in the "
                        "node config of node 303, or num_clients=6 in the run config")
    assert lines[5] == ("(node ids as `flwr supernode ls` lists them; fix the node configs, restart those "
                        "SuperNodes, run again)")


def test_partitions_no_node_holds_are_a_warning():
    nodes = [shared(101, 0), shared(303, 2)]
    assert admit_nodes(nodes, RUN) == (nodes, [
        "partition(s) [1] of num_clients=3 are held by no connected node: their data (373 training examples) do "
        "not train until a node with that partition-id joins"])
    _, warnings = admit_nodes([shared(101, 0)], RUN)
    assert warnings == ["partition(s) [1, 2] of num_clients=3 are held by no connected node: their data (745 "
                        "training examples) do not train until a node with that partition-id joins"]


def test_a_node_that_joins_later_is_checked_against_the_nodes_in_the_run():
    known = [shared(101, 0), shared(202, 1)]
    late = [shared(505, 0), shared(606, 2)]
    nodes, warnings = admit_nodes(late, RUN, known=known)
    assert [n.node_id for n in nodes] == [101, 202, 606]
    assert warnings == [
        "node 505 joined but is left out of the run: partition 0 is claimed by 2 nodes (node 101, node 505): its "
        "rows would train twice; node 505 duplicates node 101; stop node 505, or raise num_clients in the run "
        "config (every partition 0..2 is held)"]
    # a partition whose node left is free again: a replacement takes it without a warning
    assert admit_nodes([shared(707, 1)], RUN, known=[shared(101, 0)]) == ([shared(101, 0), shared(707, 1)], [])
    # and a later node with a wrong rank is left out, the run goes on
    nodes, warnings = admit_nodes([shared(808, 2, rank=4)], RUN, known=known)
    assert nodes == known and warnings == [
        "node 808 joined but is left out of the run: node 808 (partition 2) trains rank 4, but the run config's "
        "client_ranks gives partition 2 rank 8: set lora-rank=8 in the node config of node 808 (or change "
        "client_ranks)"]


def test_expected_sizes_equal_what_each_node_computes_for_its_partition():
    """The server's expectation comes from the same partitioning a node on the shared data runs:
    GSM8K's 1,119 training rows in 3 IID partitions of 373, and 4 Dirichlet partitions over
    answer_steps whose sizes each node computes alone."""
    iid = FedloraConfig(num_clients=3)
    dirichlet = FedloraConfig(num_clients=4, dataset=replace(iid.dataset, partitioner="dirichlet",
                                                              partition_by="answer_steps"))
    for cfg in (iid, dirichlet):
        train, _ = load_splits(cfg)
        stats = partition_stats(partition_dataset(train, cfg.dataset, cfg.num_clients), cfg.dataset)
        expected = expect_nodes(cfg, stats)
        nodes = [NodeInfo(100 + i, i, cfg.adapter.rank, len(client_split(cfg, i, cfg.num_clients)), cfg.num_clients,
                          False) for i in range(cfg.num_clients)]
        assert sum(expected.examples) == 1119
        assert [n.num_examples for n in nodes] == list(expected.examples)
        assert admit_nodes(nodes, expected) == (nodes, [])
    assert expect_nodes(iid, partition_stats(partition_dataset(load_splits(iid)[0], iid.dataset, 3),
                                             iid.dataset)).examples == (373, 373, 373)
    with pytest.raises(ValueError, match="partition_stats has 4 partitions but num_clients=3"):
        expect_nodes(FedloraConfig(num_clients=3), {"clients": [{"examples": 1}] * 4})
