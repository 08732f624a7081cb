"""The connected nodes' answers checked together, against each other and against the run, before
they train: :func:`admit_nodes`.

Each node's own config is checked on the node (:func:`fedlora.config.node_settings`), but a node
cannot see the others: two SuperNodes copy-pasted with ``partition-id=0`` both train partition 0,
partition 1 never trains, and the run reports "2 clients". The server asks every node for its
partition, rank and data size (a node-info query); this module checks the answers whole.

The policy (``docs/deployment.md``, "Node identities"); "shared data" means a node without
``data-path``, which trains its partition of the run's dataset:

- two or more nodes claim one ``partition-id``: refused (its rows would train twice, under one
  identity: seeds, sampling order, the privacy ledger's client);
- a ``partition-id`` outside ``0..num_clients-1``: refused;
- shared data, ``num-partitions`` ≠ the run's ``num_clients``: refused (the node cuts the shared
  dataset into other partitions than the run's);
- shared data, training examples ≠ what the server's partitioning of the same data gives that
  partition: refused (another data file at that path, another partitioner or library version);
- the run config sets ``client_ranks`` and a node's rank differs from its partition's: refused
  (without ``client_ranks`` each node's ``lora-rank`` is its own choice);
- partitions no connected node holds, before round 1: a warning (their data do not train until a
  node holding them joins).

A node with its own ``data-path`` file uses all of it, so ``num-partitions`` and the server's
partition sizes say nothing about it, but its ``partition-id`` is still its identity in the run
(sampling order, seeds, the privacy ledger's client and accountant file) and must be unique and in
range. Before round 1 any refusal refuses the run (:class:`NodeCheckError`, naming every node, its
partition and the fix). A node that joins later is checked against the nodes already admitted and,
if it fails, is left out of the run with a warning (the run goes on with the others); it is asked
again before the next round, so the warning repeats until its config is fixed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.config import ConfigError, FedloraConfig


class NodeCheckError(ConfigError):
    """The connected nodes' configs are inconsistent (the message lists each node and the fix)."""


@dataclass
class NodeInfo:
    """What a node told the server when it was discovered (its node-info reply)."""

    node_id: int
    """Flower's node id (``flwr supernode ls`` lists it beside the node's key)."""
    partition_id: int
    rank: int
    num_examples: int
    """The node's training examples (rows of its partition, or of its own ``data-path`` file)."""
    num_partitions: int | None = None
    """The node's ``num-partitions`` (None: the node did not say)."""
    own_data: bool | None = None
    """Whether the node trains its own ``data-path`` file (None: the node did not say)."""


@dataclass(frozen=True)
class NodeExpectation:
    """What the run expects of its nodes (:func:`expect_nodes`)."""

    num_partitions: int
    """The run's ``num_clients``: partition ids lie in 0..num_partitions-1."""
    ranks: tuple[int, ...] | None = None
    """The rank of each partition when the run config sets ``client_ranks`` (None: nodes choose)."""
    examples: tuple[int, ...] | None = None
    """Training examples of each partition by the server's own partitioning (None: not checked)."""
    dataset: str = ""
    """The shared dataset's path, named in the fix for a size mismatch."""


def expect_nodes(cfg: FedloraConfig, partition_stats: dict[str, Any] | None = None) -> NodeExpectation:
    """The expectation for ``cfg``'s nodes; ``partition_stats`` (:func:`fedlora.data.partition.partition_stats`
    of the run's partitioning, ``RunPlan.partition_stats``) adds each partition's example count.
    Raises ValueError when the stats describe another number of partitions than ``num_clients``."""
    examples = None
    if partition_stats is not None:
        examples = tuple(int(c["examples"]) for c in partition_stats["clients"])
        if len(examples) != cfg.num_clients:
            raise ValueError(f"partition_stats has {len(examples)} partitions but num_clients={cfg.num_clients}")
    return NodeExpectation(cfg.num_clients, tuple(cfg.client_ranks) if cfg.client_ranks else None, examples,
                           cfg.dataset.path)


def _node(n: NodeInfo) -> str:
    return f"node {n.node_id}"


def _fix(setting: str, n: NodeInfo) -> str:
    return f"set {setting} in the node config of node {n.node_id}"


def node_problems(nodes: Sequence[NodeInfo], expected: NodeExpectation,
                  known: Sequence[NodeInfo] = ()) -> dict[int, list[str]]:
    """Node id → what is wrong with that node of ``nodes`` (nodes without problems are absent), each
    problem a sentence naming the node, its partition and the fix. ``known`` are nodes already in
    the run: a node of ``nodes`` that claims one of their partitions is the one at fault. Among
    ``nodes`` themselves, the node with the lowest id keeps a contested partition and the others
    are told which free partition to take."""
    n_parts = expected.num_partitions
    problems: dict[int, list[str]] = defaultdict(list)
    taken = {n.partition_id for n in known}
    free = [p for p in range(n_parts) if p not in taken and p not in {n.partition_id for n in nodes}]
    by_partition: dict[int, list[NodeInfo]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: n.node_id):
        by_partition[n.partition_id].append(n)
    holders = {n.partition_id: n for n in known}

    def move(n: NodeInfo, num_clients: int | None = None) -> str:
        """The fix for node ``n``: a free partition, else stopping it; ``num_clients`` would also fix it."""
        raise_it = (f"num_clients={num_clients} in the run config" if num_clients
                    else "raise num_clients in the run config")
        if free:
            return _fix(f"partition-id={free.pop(0)}", n) + (f", or {raise_it}" if num_clients else "")
        return f"stop node {n.node_id}, or {raise_it} (every partition 0..{n_parts - 1} is held)"

    for pid in sorted(by_partition):
        group = by_partition[pid]
        if not 0 <= pid < n_parts:
            for n in group:
                problems[n.node_id].append(
                    f"{_node(n)} has partition-id={pid}, outside 0..{n_parts - 1} (num_clients={n_parts}): "
                    f"{move(n, pid + 1 if pid >= n_parts else None)}")
            continue
        keeper = holders.get(pid)
        extra = group if keeper is not None else group[1:]
        keeper = keeper or group[0]
        if not extra:
            continue
        claimants = [keeper, *extra]
        harm = ("they would train under one identity (seeds, sampling order, the privacy ledger's client)"
                if all(c.own_data for c in claimants) else "its rows would train twice")
        for n in extra:
            problems[n.node_id].append(
                f"partition {pid} is claimed by {len(claimants)} nodes "
                f"({', '.join(_node(c) for c in claimants)}): {harm}; "
                f"{_node(n)} duplicates {_node(keeper)}; {move(n)}")
    for n in nodes:
        if not 0 <= n.partition_id < n_parts:
            continue
        pid = n.partition_id
        moving = n.node_id in problems  # told to take another partition: its partition's size and rank do not apply
        if not n.own_data and n.num_partitions is not None and n.num_partitions != n_parts:
            problems[n.node_id].append(
                f"{_node(n)} (partition {pid}) has num-partitions={n.num_partitions} but the run's "
                f"num_clients={n_parts}, so it cuts the shared dataset into other partitions than the run's: "
                f"{_fix(f'num-partitions={n_parts}', n)}, or num_clients={n.num_partitions} in the run config")
        elif (not moving and n.own_data is False and expected.examples is not None
              and n.num_examples != expected.examples[pid]):
            problems[n.node_id].append(
                f"{_node(n)} (partition {pid}) has {n.num_examples} training examples, but the server's partitioning "
                f"of {expected.dataset or 'the shared dataset'} gives partition {pid} {expected.examples[pid]}: the "
                f"node reads other data (another file at that path, another partitioner or library version); give "
                f"node {n.node_id} the server's data file and fedlora version, or its own file with data-path=")
        if not moving and expected.ranks is not None and n.rank != expected.ranks[pid]:
            problems[n.node_id].append(
                f"{_node(n)} (partition {pid}) trains rank {n.rank}, but the run config's client_ranks gives "
                f"partition {pid} rank {expected.ranks[pid]}: {_fix(f'lora-rank={expected.ranks[pid]}', n)} "
                f"(or change client_ranks)")
    return dict(problems)


def unheld_partitions(nodes: Sequence[NodeInfo], expected: NodeExpectation) -> str | None:
    """The warning for partitions 0..num_partitions-1 that no node of ``nodes`` holds, or None."""
    held = {n.partition_id for n in nodes}
    missing = [p for p in range(expected.num_partitions) if p not in held]
    if not missing:
        return None
    lost = ""
    if expected.examples is not None and not all(n.own_data for n in nodes):
        lost = f" ({sum(expected.examples[p] for p in missing)} training examples)"
    return (f"partition(s) {missing} of num_clients={expected.num_partitions} are held by no connected node: "
            f"their data{lost} do not train until a node with that partition-id joins")


def admit_nodes(new: Sequence[NodeInfo], expected: NodeExpectation,
                known: Sequence[NodeInfo] | None = None) -> tuple[list[NodeInfo], list[str]]:
    """Check newly discovered nodes (:func:`node_problems`) and apply the policy: returns the nodes
    admitted (``known`` first, then the new ones that pass) and the warnings to print and record.

    ``known`` None means the run has not started: any problem raises :class:`NodeCheckError` with
    every problem listed, and partitions no node holds become a warning. With ``known`` (the nodes
    of the rounds so far), a failing new node is left out and each of its problems becomes a
    warning ``node N joined but is left out of the run: …``."""
    problems = node_problems(new, expected, known or ())
    if known is None:
        if problems:
            lines = [p for n in sorted(new, key=lambda n: n.node_id) for p in problems.get(n.node_id, [])]
            raise NodeCheckError(
                f"the connected nodes' configs are inconsistent ({len(lines)} problem{'s' * (len(lines) != 1)}); "
                "the run is refused before round 1:\n" + "\n".join(f"  - {line}" for line in lines)
                + "\n(node ids as `flwr supernode ls` lists them; fix the node configs, restart those SuperNodes, "
                "run again)")
        unheld = unheld_partitions(new, expected)
        return list(new), [unheld] if unheld else []
    admitted = list(known) + [n for n in new if n.node_id not in problems]
    warnings = [f"node {n.node_id} joined but is left out of the run: {p}"
                for n in new for p in problems.get(n.node_id, [])]
    return admitted, warnings


__all__ = ["NodeCheckError", "NodeExpectation", "NodeInfo", "admit_nodes", "expect_nodes", "node_problems",
           "unheld_partitions"]
