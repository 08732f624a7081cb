"""Expand a ``fedlora simulate --multirun`` sweep into its runs and check every one before the first starts.

Hydra's basic sweeper takes the cartesian product of ``hydra.sweeper.params`` (what an experiment
config under ``simulations/conf/experiment/`` declares) and the command line's overrides, one run
per combination. Left to itself it validates only that each combination composes, so a bad
strategy/rank pairing in run 12 of 21 fails an hour in, and a sweep over an empty range
(``num_rounds=range(5,1)``, ``strategy=glob(nomatch*)``) launches nothing and exits 0. Here every
combination goes through :func:`fedlora.config.config_from_dict` and the simulation's preflight
(strategy, ranks, data, partitioning) first, and zero runs is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from fedlora.config import ConfigError, FedloraConfig, config_from_dict

# Hydra flags after which the command does not launch the sweep (or reads configs elsewhere):
# leave those to Hydra.
MULTIRUN_FLAGS = ("--multirun", "-m")


class SweepError(ValueError):
    """A sweep expands to no runs, or one of its runs is invalid; the message names it and the fix."""


def sweep_jobs(params: Mapping[str, Any] | None, arguments: Sequence[str], config_loader: Any = None) -> list[list[str]]:
    """The runs Hydra's basic sweeper launches for ``hydra.sweeper.params`` and the command line's
    ``arguments``: one list of ``key=value`` overrides per run, in launch order.

    A key given both in ``params`` and on the command line takes the command line's values (as in
    Hydra). ``config_loader`` lets ``glob(...)`` see a group's options.
    """
    blank = [k for k, v in (params or {}).items() if v is None or str(v).strip() == ""]
    if blank:
        raise SweepError(
            f"the sweep has zero runs: hydra.sweeper.params.{blank[0]} is empty; "
            f"list its values (e.g. {blank[0]}: a,b,c) or remove the key"
        )
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    parser = OverridesParser.create(config_loader=config_loader)
    # The same product as hydra's BasicSweeper.split_arguments: one value list per key, later wins.
    per_key: dict[str, tuple[str, list[str]]] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise SweepError(
                    f"{override.input_line!r} is an interval sweep, which Hydra's basic sweeper cannot run; "
                    "list the values (a=1,2,3) or use range(start,stop,step)"
                )
            per_key[key] = (override.input_line, [f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            per_key[key] = (override.input_line, [f"{key}={override.get_value_element_as_str()}"])
    empty = [line for line, values in per_key.values() if not values]
    if empty:
        raise SweepError(
            f"the sweep has zero runs: {', '.join(repr(e) for e in empty)} expands to no values; "
            "give at least one value (e.g. strategy=fedavg,ffa or num_rounds=range(1,4))"
        )
    jobs: list[list[str]] = [[]]
    for _, values in per_key.values():
        jobs = [job + [v] for job in jobs for v in values]
    return jobs


def job_config(dcfg: Any) -> FedloraConfig:
    """A composed Hydra config (``hydra`` node dropped) → validated :class:`FedloraConfig`."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(dcfg, resolve=False)
    data.pop("hydra", None)
    return config_from_dict(OmegaConf.to_container(OmegaConf.create(data), resolve=True))


def check_job(cfg: FedloraConfig) -> None:
    """Everything a run checks before the simulation engine starts (strategy, ranks, DP pairing,
    data readable, partitions non-empty), without the datasets library's progress bars."""
    from datasets.utils import logging as ds_logging

    from fedlora.commands.simulate import preflight

    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        preflight(cfg)
    finally:
        if shown:
            ds_logging.enable_progress_bar()


def _swept(jobs: list[list[str]]) -> list[set[str]]:
    """Per run, the overrides that differ between runs (what names a run in a message)."""
    common = set.intersection(*(set(j) for j in jobs)) if jobs else set()
    return [set(j) - common for j in jobs]


def check_multirun(config_dir: str | Path, config_name: str, argv: Sequence[str]) -> int:
    """Expand ``fedlora simulate --multirun ARGV`` as Hydra will and check every run; returns the
    number of runs or raises :class:`SweepError` naming the first bad run and the problem."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode

    from fedlora.adapters import AdapterError
    from fedlora.data.records import DataError

    arguments = [a for a in argv if a not in MULTIRUN_FLAGS]
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        gh = GlobalHydra.instance()
        assert gh.hydra is not None
        loader = gh.config_loader()
        try:
            master = gh.hydra.compose_config(config_name, arguments, run_mode=RunMode.MULTIRUN,
                                             with_log_configuration=False)
            params = master.hydra.sweeper.get("params") or {}
            jobs = sweep_jobs(params, list(master.hydra.overrides.task), config_loader=loader)
        except HydraException as err:
            raise SweepError(str(err)) from None
        labels = _swept(jobs)
        for i, (job, label) in enumerate(zip(jobs, labels)):
            where = f"run {i + 1} of {len(jobs)}" + (f" ({' '.join(sorted(label))})" if label else "")
            try:
                check_job(job_config(loader.load_sweep_config(master, job)))
            except HydraException as err:
                raise SweepError(f"{where}: {err}") from None
            except (ConfigError, DataError, AdapterError) as err:
                raise SweepError(f"{where}: {err}") from None
    return len(jobs)


def sweep_note(config_dir: str | Path, config_name: str, argv: Sequence[str]) -> str | None:
    """For a single run (no ``--multirun``) whose config declares ``hydra.sweeper.params`` — an
    experiment suite run without ``--multirun`` — the note that only one run of it happens."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            master = compose(config_name, overrides=list(argv), return_hydra_config=True)
    except HydraException:
        return None  # hydra.main reports it
    params = master.hydra.sweeper.get("params") or {}
    if not params:
        return None
    swept = " ".join(f"{k}={v}" for k, v in params.items())
    return (f"fedlora: note: this config sweeps {swept}, but without --multirun only one run happens; "
            f"add --multirun to run the whole suite")
