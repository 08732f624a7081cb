"""Every experiment suite expands into the runs it promises, and each run is a valid configuration;
bad sweeps fail before the first run with the problem and the fix."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fedlora.aggregation import METHODS
from fedlora.commands.cli import conf_dir, main
from fedlora.config import FedloraConfig, config_from_dict
from fedlora.commands.sweep import SweepError, check_job, sweep_jobs, sweep_note

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
MIXED = sorted(name for name, method in METHODS.items() if method.mixed_ranks)

EXPECTED_RUNS = {"strategies": 7, "hetero_ranks": 15, "non_iid": 12, "communication": 21, "privacy": 16}


def expand(*overrides: str) -> list[FedloraConfig]:
    """The configs of every run ``fedlora simulate --multirun OVERRIDES`` launches."""
    parser = OverridesParser.create()
    single = [o for o in overrides if not parser.parse_override(o).is_sweep_override()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        master = compose("config", overrides=single, return_hydra_config=True)
        jobs = sweep_jobs(master.hydra.sweeper.params, list(overrides))
        configs = []
        for job in jobs:
            dcfg = compose("config", overrides=job)
            configs.append(config_from_dict(OmegaConf.to_container(dcfg, resolve=True)))
    return configs


@pytest.fixture(scope="module")
def suites() -> dict[str, list[FedloraConfig]]:
    return {name: expand(f"+experiment={name}") for name in EXPERIMENTS}


def test_every_suite_has_its_expected_number_of_runs(suites):
    assert {name: len(cfgs) for name, cfgs in suites.items()} == EXPECTED_RUNS


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_every_run_of_every_suite_passes_the_preflight(suites, name):
    for cfg in suites[name]:
        check_job(cfg)  # strategy known, ranks fit the strategy, data readable, partitions non-empty


def test_suites_share_partitions_and_seeds_within_themselves(suites):
    for name, cfgs in suites.items():
        pinned = {(c.seed, c.dataset.seed, c.adapter.init_seed, c.num_clients, c.num_rounds, c.train.local_steps)
                  for c in cfgs}
        assert pinned == {(0, 42, 0, cfgs[0].num_clients, cfgs[0].num_rounds, cfgs[0].train.local_steps)}, name
        assert all(c.model.name_or_path == "gemma3-270m" for c in cfgs)  # the default model unless model=tiny


def test_strategies_suite_runs_every_strategy_once(suites):
    assert sorted(c.strategy.name for c in suites["strategies"]) == sorted(METHODS)
    assert {c.adapter.rank for c in suites["strategies"]} == {8}


def test_hetero_ranks_suite_mixes_ranks_for_every_mixed_rank_strategy(suites):
    cfgs = suites["hetero_ranks"]
    assert "hetlora" in MIXED and {"fedavg", "lorafair"}.isdisjoint(MIXED)
    assert sorted({c.strategy.name for c in cfgs}) == MIXED
    for strategy in MIXED:
        ranks = sorted(tuple(c.client_ranks) for c in cfgs if c.strategy.name == strategy)
        assert ranks == [(4, 4, 4, 32), (4, 8, 16, 32), (16, 16, 16, 16)], strategy


def test_non_iid_suite_sweeps_alpha_for_three_strategies(suites):
    cfgs = suites["non_iid"]
    assert all(c.dataset.partitioner == "dirichlet" and c.dataset.partition_by == "answer_steps" for c in cfgs)
    grid = sorted((c.strategy.name, c.dataset.dirichlet_alpha) for c in cfgs)
    assert grid == sorted((s, a) for s in ("fedavg", "fedex", "fedsb") for a in (0.1, 0.5, 1.0, 100.0))


def test_communication_suite_crosses_strategies_and_ranks_and_measures_accuracy(suites):
    cfgs = suites["communication"]
    assert sorted((c.strategy.name, c.adapter.rank) for c in cfgs) == sorted(
        (s, r) for s in METHODS for r in (4, 16, 64))
    assert all(c.eval.gsm8k_problems == 50 for c in cfgs)


def test_privacy_suite_crosses_strategies_with_epsilon_targets(suites):
    grid = sorted((c.strategy.name, c.dp.mode, c.dp.target_epsilon or 0.0) for c in suites["privacy"])
    assert grid == sorted([(s, "none", 0.0) for s in ("fedavg", "ffa", "fedex", "fedsb")]
                          + [(s, "example", e) for s in ("fedavg", "ffa", "fedex", "fedsb") for e in (1.0, 3.0, 8.0)])


def test_every_experiment_file_has_an_expected_run_count():
    assert sorted(EXPECTED_RUNS) == EXPERIMENTS  # a new suite gets its count (and a test) here


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_commands_in_each_header_expand_to_the_same_suite(name):
    # line 2 is the command that runs the suite; the "Tiny smoke variant" line runs it on the tiny model
    lines = (conf_dir() / "experiment" / f"{name}.yaml").read_text().splitlines()
    commands = [line[line.index("fedlora simulate"):] for line in lines
                if line.startswith("#") and "fedlora simulate" in line]
    assert commands[0] == f"fedlora simulate --multirun +experiment={name}"
    smoke = next(c for c in commands if "model=tiny" in c)
    args = shlex.split(smoke)[2:]
    assert args[0] == "--multirun"
    tiny = expand(*args[1:])
    assert len(tiny) == EXPECTED_RUNS[name]
    assert all(c.model.name_or_path == "tiny" for c in tiny)


def test_command_line_values_replace_a_swept_key():
    cfgs = expand("+experiment=non_iid", "strategy=fedavg", "dataset.dirichlet_alpha=0.5,100")
    assert [(c.strategy.name, c.dataset.dirichlet_alpha) for c in cfgs] == [("fedavg", 0.5), ("fedavg", 100.0)]


def test_a_suite_run_without_multirun_says_so():
    note = sweep_note(conf_dir(), "config", ["+experiment=strategies"])
    assert note and "strategy=fedavg,ffa,fedex,flora,fedsb,lorafair,hetlora" in note and "--multirun" in note
    assert sweep_note(conf_dir(), "config", ["model=tiny"]) is None


@pytest.mark.parametrize(
    "args,message",
    [
        # zero runs: an empty range or glob, an empty sweeper value
        (["model=tiny", "num_rounds=range(5,1)"], "the sweep has zero runs: 'num_rounds=range(5,1)' expands to no values"),
        (["model=tiny", "strategy=glob(nomatch*)"], "the sweep has zero runs: 'strategy=glob(nomatch*)'"),
        (["+experiment=strategies", "hydra.sweeper.params.strategy="],
         "hydra.sweeper.params.strategy is empty; list its values"),
        # an unknown strategy, model or dataset group option lists the options
        (["+experiment=strategies", "strategy=fedavg,nope"], "run 2 of 2 (strategy=nope): In 'config': Could not find 'strategy/nope'"),
        (["+experiment=strategies", "model=nope"], "Could not find 'model/nope'\n\nAvailable options in 'model':\n\tgemma3-270m\n\ttiny"),
        (["+experiment=non_iid", "dataset=nope"], "Available options in 'dataset':\n\tgsm8k"),
        (["+experiment=nope"], "Available options in 'experiment':"),
        # an unknown strategy name, or one that cannot take the suite's mixed ranks, names the run
        (["+experiment=strategies", "strategy=fedavg", "strategy.name=fedavg,fedmagic"],
         "run 2 of 2 (strategy.name=fedmagic): strategy='fedmagic' is unknown; choose one of fedavg, fedex"),
        (["+experiment=hetero_ranks", "strategy=fedavg"],
         "run 1 of 3 (client_rank_tiers=[4,8,16,32]): strategy=fedavg cannot aggregate clients of different ranks"),
        (["+experiment=non_iid", "num_clients=200", "strategy=fedavg", "dataset.dirichlet_alpha=0.1"],
         "run 1 of 1: Dirichlet partitioning of 1119 rows over 'answer_steps_bucket' into 200 clients with alpha=0.1"),
    ],
)
def test_a_bad_sweep_fails_before_the_first_run(tmp_path, args, message):
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}"])
    assert message in str(exc.value)
    assert str(exc.value).startswith("fedlora: error: ")
    assert not sweep_dir.exists()  # Hydra never started: not even multirun.yaml


def test_an_interval_sweep_is_refused_with_the_fix():
    with pytest.raises(SweepError, match=re.escape("interval sweep")):
        sweep_jobs({}, ["train.lr=interval(0.001,0.01)"])
