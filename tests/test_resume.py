"""Checkpoint and resume in real Flower simulations on the tiny model.

A run killed (SIGKILL of its whole process group) while its clients train round 2, then resumed
with ``fedlora simulate resume=RUN_DIR``, must equal the same run left alone: every metric, the
final adapter and the whole server state (base terms, strategy extras). Under example-level DP a
run stopped after round 1 and resumed to round 2 continues each client's ε. Damaged and
incompatible checkpoints are refused before any work, with the run directory unchanged, and so is
a resume whose data, model or tokenizer files changed since the checkpoint, unless
``resume_allow_changed`` names the kind (the change is then recorded in the checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fault_tolerance import TINY, run_faulty

from fedlora.config import DatasetConfig
from fedlora.data.records import resolve_path
from fedlora.rundir.checkpoint import CheckpointError, load_checkpoint, prepare_resume, round_dirs

COMPARED = ("round", "clients", "rejected", "train_loss", "eval_loss", "eval_token_accuracy", "agg_error",
            "bytes_up", "bytes_down", "epsilon")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree_hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def flat_tensors(value, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) server state, by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}/{k}"))
    return out


def assert_same_run(resumed: Path, straight: Path, rounds: int):
    """Equal metrics, final adapter and final server state; returns both final checkpoints."""
    a, b = rows(resumed), rows(straight)
    assert [r["round"] for r in a] == [r["round"] for r in b] == list(range(rounds + 1))
    for ra, rb in zip(a, b):
        for key in COMPARED:
            if isinstance(rb.get(key), float):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-9), (ra["round"], key)
            else:
                assert ra.get(key) == rb.get(key), (ra["round"], key)
    # The update each layer applies, s·B·A, within float round-off: FedEx-LoRA's server arithmetic is
    # not bitwise reproducible here even without a resume (two uninterrupted runs differ by ~1e-7 in
    # round 1's eval loss), and the factors of its residual terms differ far more than their product.
    fa, fb = load_file(str(resumed / "adapter/adapter_model.safetensors")), load_file(str(straight / "adapter/adapter_model.safetensors"))
    assert fa.keys() == fb.keys() and fa
    for k in (k for k in fa if ".lora_A." in k):
        b = k.replace(".lora_A.", ".lora_B.")
        assert_same_update(fa[b] @ fa[k], fb[b] @ fb[k], k)
    sa, sb = load_checkpoint(round_dirs(resumed)[-1]), load_checkpoint(round_dirs(straight)[-1])
    assert sa.round == sb.round == rounds
    assert sa.state.adapter.keys() == sb.state.adapter.keys()
    for name, f in sa.state.adapter.items():
        assert_same_update(f.delta(torch.float64), sb.state.adapter[name].delta(torch.float64), name)
        terms_a, terms_b = sa.state.base_terms.get(name, []), sb.state.base_terms.get(name, [])
        assert len(terms_a) == len(terms_b)
        for k, (ta, tb) in enumerate(zip(terms_a, terms_b)):
            assert_same_update(ta.delta(torch.float64), tb.delta(torch.float64), f"{name} base term {k}")
    ea, eb = flat_tensors(sa.state.extras), flat_tensors(sb.state.extras)  # Fed-SB frame and R, …
    assert ea.keys() == eb.keys()
    for k in ea:
        assert_same_update(ea[k].double(), eb[k].double(), k)
    return sa, sb


def assert_same_update(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """‖a − b‖_F ≤ rel·‖b‖_F (and exactly equal when b is 0)."""
    err, norm = float(torch.linalg.norm((a - b).double())), float(torch.linalg.norm(b.double()))
    assert err <= rel * norm if norm > 0 else err == 0, f"{what}: relative difference {err / max(norm, 1e-300):.2e}"


def interrupted_and_resumed(tmp: Path, run_cli, overrides: list[str]) -> Path:
    """Kill the run while its clients train round 2, check what it left, resume it to the end."""
    proc = run_faulty(tmp, overrides, {0: {2: "kill_driver"}})
    run_dir = tmp / "run"
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [p.name for p in round_dirs(run_dir)] == ["round-00000", "round-00001"]
    assert [r["round"] for r in rows(run_dir)] == [0, 1]
    assert not (run_dir / "summary.json").exists()
    with open(run_dir / "metrics.jsonl", "a") as f:  # as if killed while writing a row it never checkpointed
        f.write('{"round": 2, "strategy": "x", "clients": 2, "eval_lo')
    proc = run_cli("simulate", f"resume={run_dir}", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resuming after round 1" in proc.stdout
    return run_dir


@pytest.fixture(scope="module")
def resumed_pair(tmp_path_factory, run_cli):
    """``pair(strategy)`` → (resumed run, uninterrupted run), each made once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def pair(strategy: str) -> tuple[Path, Path]:
        if strategy not in made:
            overrides = [*TINY, f"strategy={strategy}", "num_rounds=3"]
            straight = tmp_path_factory.mktemp(f"straight-{strategy}")
            proc = run_faulty(straight, overrides, {})
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
            resumed = interrupted_and_resumed(tmp_path_factory.mktemp(f"resumed-{strategy}"), run_cli, overrides)
            made[strategy] = (resumed, straight / "run")
        return made[strategy]

    return pair


@pytest.mark.parametrize("strategy", ["fedavg", "fedex"])
def test_a_killed_and_resumed_run_equals_the_uninterrupted_run(resumed_pair, strategy):
    resumed, straight = resumed_pair(strategy)
    sa, _ = assert_same_run(resumed, straight, rounds=3)
    if strategy == "fedex":  # the state that must survive: residual terms folded into the base
        assert sum(len(t) for t in sa.state.base_terms.values()) > 0
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["rounds"] == 3 and (resumed / "report.md").is_file()
    assert [p.name for p in round_dirs(resumed)] == ["round-00002", "round-00003"]  # the newest two are kept


def test_example_level_dp_epsilon_continues_across_a_resume(tmp_path, run_cli):
    """Also the one end-to-end check of changed inputs: the resumed run's data file is rewritten
    between its two parts (the same rows, other bytes), so the resume is refused until
    ``resume_allow_changed=[data]``, which the resumed run's checkpoints then record."""
    dp = [*TINY, "strategy=ffa", "dp=example", "dp.noise_multiplier=1.0", "dp.target_epsilon=null"]
    straight = tmp_path / "straight"
    proc = run_cli("simulate", *dp, "num_rounds=2", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    resumed = tmp_path / "resumed"
    data = tmp_path / "gsm8k.jsonl"
    shutil.copyfile(resolve_path(DatasetConfig().path), data)
    proc = run_cli("simulate", *dp, f"dataset.path={data}", "num_rounds=1", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    eps_round1 = rows(resumed)[1]["epsilon"]
    old_sha = sha256_file(data)
    assert newest_manifest(resumed)["inputs"]["entries"]["data"]["digest"] == old_sha
    data.write_text("".join(json.dumps(json.loads(line), separators=(",", ":")) + "\n"
                            for line in data.read_text().splitlines()))  # the same rows, written compactly
    new_sha = sha256_file(data)
    config = load_checkpoint(round_dirs(resumed)[-1]).config
    with pytest.raises(CheckpointError, match=r"data file .*gsm8k\.jsonl'\) changed: .* resume_allow_changed=\[data\]"):
        prepare_resume(resumed, {**config, "resume": str(resumed), "num_rounds": 2})
    proc = run_cli("simulate", f"resume={resumed}", "num_rounds=2", "resume_allow_changed=[data]",  # more rounds than planned
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resume_allow_changed=[data]: continuing after round 1 with changed inputs" in proc.stdout
    inputs = newest_manifest(resumed)["inputs"]
    assert inputs["round"] == 2 and inputs["entries"]["data"]["digest"] == new_sha
    (change,) = inputs["changes"]
    assert (change["after_round"], change["allowed_by"]) == (1, "resume_allow_changed=[data]")
    assert (change["items"][0]["old"]["digest"], change["items"][0]["new"]["digest"]) == (old_sha, new_sha)
    assert "resume_allow_changed:\n- data" in (resumed / "config.yaml").read_text()

    eps = [r["epsilon"] for r in rows(resumed)[1:]]
    eps_straight = [r["epsilon"] for r in rows(straight)[1:]]
    assert eps[0] == eps_round1
    assert eps == pytest.approx(eps_straight, rel=1e-9)  # the same composition: σ, q and steps
    assert 0 < eps[0] < eps[1]  # cumulative, not restarted at round 2
    for client in ("0", "1"):  # each client's accountant holds both rounds' steps
        state = json.loads((resumed / "clients" / client / "privacy.json").read_text())
        assert sum(h[2] for h in state["history"]) == 2 * 2  # 2 rounds × train.local_steps=2
    report = json.loads((resumed / "privacy_report.json").read_text())
    assert report["worst_client"]["epsilon"] == pytest.approx(eps[1], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# refusals: before any work, nothing in the run directory changed


@pytest.fixture
def finished_run(resumed_pair, tmp_path) -> Path:
    """A copy of the resumed fedavg run (3 rounds, checkpoints of rounds 2 and 3)."""
    copy = tmp_path / "run"
    shutil.copytree(resumed_pair("fedavg")[0], copy)
    return copy


def refuse(run_cli, run_dir: Path, *overrides: str) -> str:
    before = tree_hashes(run_dir)
    proc = run_cli("simulate", f"resume={run_dir}", *overrides, cwd=run_dir.parent)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ClientAppActor" not in proc.stdout + proc.stderr  # refused before the simulation started
    assert tree_hashes(run_dir) == before  # nothing overwritten, truncated or deleted
    return proc.stdout + proc.stderr


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_older_one(finished_run, run_cli):
    state = round_dirs(finished_run)[-1] / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    out = refuse(run_cli, finished_run, "num_rounds=4")
    assert f"{state} fails its sha256 check" in out
    assert "The older checkpoint round-00002 verifies: move" in out and "to resume from round 2" in out


def test_a_truncated_checkpoint_is_refused(finished_run, run_cli):
    state = round_dirs(finished_run)[-1] / "state.safetensors"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 3])
    out = refuse(run_cli, finished_run, "num_rounds=4")
    assert f"has {size // 3} bytes, the manifest says {size} (truncated or damaged)" in out


@pytest.mark.parametrize("override,message", [
    ("strategy=fedex", "strategy.name: checkpoint 'fedavg', now 'fedex'"),
    ("adapter.rank=4", "adapter.rank: checkpoint 8, now 4"),
    ("seed=1", "seed: checkpoint 0, now 1"),
    ("model=gemma3-270m", "model.name_or_path: checkpoint 'tiny', now 'gemma3-270m'"),
])
def test_an_incompatible_checkpoint_is_refused_with_the_difference_and_the_fix(finished_run, run_cli, override, message):
    out = refuse(run_cli, finished_run, override)
    assert "belongs to a different run configuration" in out and message in out
    assert "Resume with the settings in" in out


def test_resume_checks_rounds_budget_and_ledger(finished_run):
    config = load_checkpoint(round_dirs(finished_run)[-1]).config
    with pytest.raises(CheckpointError, match="num_rounds=2 is below the checkpoint's round 3"):
        prepare_resume(finished_run, {**config, "num_rounds": 2})
    dp = {**config["dp"], "mode": "example", "target_epsilon": 8.0}
    with pytest.raises(CheckpointError, match="different run configuration: dp.mode"):
        prepare_resume(finished_run, {**config, "dp": dp})
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        prepare_resume(finished_run / "adapter", config)
    assert prepare_resume(finished_run, {**config, "num_rounds": 5, "eval": {**config["eval"], "max_examples": 2}}).round == 3


# ---------------------------------------------------------------------------------------------
# the checkpoint format itself (no simulation)


def synthetic_checkpoint(tmp_path: Path, rnd: int = 1, **config):
    from fedlora.aggregation import fedsb
    from fedlora.aggregation.terms import DenseTerm
    from fedlora.rundir.checkpoint import Checkpoint, capture_rng, save_checkpoint
    import random

    gen = torch.Generator().manual_seed(0)
    frame = {"l0": (torch.randn(6, 4, generator=gen), torch.randn(4, 5, generator=gen))}
    state = fedsb.initial_state(frame, 2.0, seed=3, min_rank=4)
    state.base_terms["l0"] = [DenseTerm(torch.randn(6, 5, generator=gen))]
    state.extras["rank_scales"] = {4: 2.0, 8: 1.0}
    cfg = {"num_rounds": 3, "seed": 0, "model": {"name_or_path": "tiny", "device": "auto"},
           "dp": {"mode": "none", "target_epsilon": None}, "eval": {"max_examples": 8}, **config}
    rng_state, rng_tensors = capture_rng(random.Random(0))
    save_checkpoint(tmp_path, Checkpoint(rnd, state, cfg, [{"round": i} for i in range(rnd + 1)], rng_state, rng_tensors))
    return state, cfg


def test_a_checkpoint_round_trips_the_state_exactly(tmp_path):
    state, cfg = synthetic_checkpoint(tmp_path)
    ckpt = prepare_resume(tmp_path, {**cfg, "num_rounds": 9, "eval": {"max_examples": 2}})  # may change
    assert ckpt.round == 1 and ckpt.metrics == [{"round": 0}, {"round": 1}]
    assert ckpt.state.extras["rank_scales"] == {4: 2.0, 8: 1.0}  # int keys stay ints
    assert type(ckpt.state.base_terms["l0"][0]).__name__ == "DenseTerm"
    assert flat_tensors(ckpt.state.extras).keys() == flat_tensors(state.extras).keys()
    for k, t in flat_tensors({"a": state.adapter, "b": state.base_terms, "e": state.extras}).items():
        assert torch.equal(flat_tensors({"a": ckpt.state.adapter, "b": ckpt.state.base_terms, "e": ckpt.state.extras})[k], t), k


def test_an_edited_manifest_and_a_changed_dp_plan_are_refused(tmp_path):
    _, cfg = synthetic_checkpoint(tmp_path, dp={"mode": "example", "target_epsilon": 8.0})
    with pytest.raises(CheckpointError, match="calibrated σ for num_rounds=3; .* Keep num_rounds=3"):
        prepare_resume(tmp_path, {**cfg, "num_rounds": 4})
    manifest = round_dirs(tmp_path)[-1] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"round": 1', '"round": 2', 1))
    with pytest.raises(CheckpointError, match="manifest.json fails its sha256 check"):
        prepare_resume(tmp_path, cfg)
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        prepare_resume(tmp_path, cfg)


def test_a_shortened_privacy_ledger_is_refused(tmp_path):
    from fedlora.rundir.checkpoint import Checkpoint, ledger_position, save_checkpoint

    state, cfg = synthetic_checkpoint(tmp_path)
    (tmp_path / "privacy_ledger.jsonl").write_text('{"kind": "run"}\n{"kind": "example"}\n')
    ckpt = load_checkpoint(round_dirs(tmp_path)[-1])
    save_checkpoint(tmp_path, Checkpoint(2, state, cfg, ckpt.metrics + [{"round": 2}], ckpt.rng, ckpt.rng_tensors,
                                         ledger_position(tmp_path)))
    (tmp_path / "privacy_ledger.jsonl").write_text('{"kind": "run"}\n')
    with pytest.raises(CheckpointError, match="truncated or replaced, and the privacy loss"):
        prepare_resume(tmp_path, cfg)


# ---------------------------------------------------------------------------------------------
# the run's inputs: data, model and tokenizer files are recorded and checked on resume


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_rows(path: Path, answers: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    return path


def newest_manifest(run_dir: Path) -> dict:
    return json.loads((round_dirs(run_dir)[-1] / "manifest.json").read_text())


def test_a_rewritten_data_file_is_refused_unless_allowed_and_the_change_is_recorded(tmp_path, capsys):
    from fedlora.rundir.checkpoint import Checkpoint, save_checkpoint

    data = write_rows(tmp_path / "data.jsonl", ["1", "2", "3"])
    run = tmp_path / "run"
    state, cfg = synthetic_checkpoint(run, dataset={"path": str(data), "split": "train"})
    old_sha = sha256_file(data)
    entry = newest_manifest(run)["inputs"]["entries"]["data"]
    assert (entry["path"], entry["bytes"], entry["method"], entry["digest"]) == (str(data), len(data.read_bytes()), "sha256", old_sha)

    ckpt = prepare_resume(run, cfg)  # unchanged: resumes as before
    assert ckpt.round == 1 and ckpt.inputs["changes"] == [] and ckpt.inputs["entries"]["data"]["digest"] == old_sha

    write_rows(data, ["1", "2", "4"])  # rewritten: same size, other contents
    new_sha = sha256_file(data)
    before = tree_hashes(run)
    with pytest.raises(CheckpointError) as err:
        prepare_resume(run, cfg)
    msg = str(err.value)
    assert f"data file (dataset.path={str(data)!r}) changed: sha256 {old_sha[:16]}" in msg
    assert f"sha256 {new_sha[:16]}, {len(data.read_bytes())} bytes" in msg
    assert "pass resume_allow_changed=[data]" in msg
    assert tree_hashes(run) == before  # a refused resume writes nothing

    allowed = {**cfg, "resume": str(run), "resume_allow_changed": ["data"]}
    ckpt = prepare_resume(run, allowed)
    assert "resume_allow_changed=[data]: continuing after round 1 with changed inputs" in capsys.readouterr().out
    (change,) = ckpt.inputs["changes"]
    assert (change["after_round"], change["allowed_by"]) == (1, "resume_allow_changed=[data]")
    assert [(i["name"], i["old"]["digest"], i["new"]["digest"]) for i in change["items"]] == [("data", old_sha, new_sha)]
    # the resumed run's next checkpoint carries the change, and the new file is now the run's
    save_checkpoint(run, Checkpoint(2, state, allowed, ckpt.metrics + [{"round": 2}], ckpt.rng, ckpt.rng_tensors,
                                    inputs=ckpt.inputs))
    saved = newest_manifest(run)["inputs"]
    assert saved["round"] == 2 and saved["entries"]["data"]["digest"] == new_sha and saved["changes"] == [change]
    assert prepare_resume(run, cfg).inputs["changes"] == [change]  # no override needed for the file it recorded

    # a file rewritten while the run goes on is seen at the next save: printed and recorded, not allowed
    write_rows(data, ["1", "2", "5", "6"])
    save_checkpoint(run, Checkpoint(3, state, cfg, ckpt.metrics + [{"round": 2}, {"round": 3}], ckpt.rng, ckpt.rng_tensors))
    assert "the run's inputs changed while it ran, after round 2" in capsys.readouterr().out
    seen = newest_manifest(run)["inputs"]["changes"][-1]
    assert (seen["after_round"], seen["seen_at_round"], seen["allowed_by"]) == (2, 3, None)
    assert (seen["items"][0]["old"]["digest"], seen["items"][0]["new"]["digest"]) == (new_sha, sha256_file(data))


def test_a_checkpoint_without_input_digests_resumes_with_a_note(tmp_path, capsys):
    from fedlora.rundir.checkpoint import _manifest_digest

    data = write_rows(tmp_path / "data.jsonl", ["1", "2"])
    _, cfg = synthetic_checkpoint(tmp_path, dataset={"path": str(data)})
    path = round_dirs(tmp_path)[-1] / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["inputs"]  # as written by fedlora before it recorded inputs
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    assert load_checkpoint(path.parent).inputs is None
    ckpt = prepare_resume(tmp_path, cfg)
    assert "could not be verified" in capsys.readouterr().out
    assert ckpt.inputs["entries"]["data"]["digest"] == sha256_file(data)  # recorded from now on
    assert ckpt.inputs["changes"] == [{"after_round": 1, "unverified": "the checkpoint recorded no input digests"}]


def test_model_directory_files_are_recorded_by_kind_and_a_changed_tokenizer_is_refused(tmp_path):
    from fedlora.rundir.inputs import SAMPLE_BYTES, SAMPLED, file_digest, input_entries

    model = tmp_path / "model"
    model.mkdir()
    for name, text in {"config.json": "{}", "tokenizer.json": '{"v": 1}', "model.safetensors": "w" * 100,
                       "README.md": "docs", "LICENSE": "terms"}.items():
        (model / name).write_text(text)
    run = tmp_path / "run"
    _, cfg = synthetic_checkpoint(run, model={"name_or_path": str(model), "device": "auto"})
    entries = newest_manifest(run)["inputs"]["entries"]
    assert {k: (e["kind"], e["digest"]) for k, e in entries.items()} == {
        "model/config.json": ("model", sha256_file(model / "config.json")),
        "model/model.safetensors": ("model", sha256_file(model / "model.safetensors")),
        "tokenizer/tokenizer.json": ("tokenizer", sha256_file(model / "tokenizer.json")),
    }  # README and LICENSE are not inputs
    (model / "README.md").write_text("other docs")
    assert prepare_resume(run, cfg).inputs["changes"] == []
    (model / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(CheckpointError, match=r"tokenizer file .*tokenizer\.json changed: .* resume_allow_changed=\[tokenizer\]"):
        prepare_resume(run, cfg)
    with pytest.raises(CheckpointError, match="tokenizer file"):  # allowing another kind is not enough
        prepare_resume(run, {**cfg, "resume": str(run), "resume_allow_changed": ["data", "model"]})
    assert prepare_resume(run, {**cfg, "resume": str(run), "resume_allow_changed": ["tokenizer"]}).round == 1

    # the sampled digest of large weight files: sha256 of the size and 16 blocks at evenly spaced offsets
    big = tmp_path / "big.bin"
    body = bytes(range(256)) * (3 * SAMPLE_BYTES // 256 + 7)
    big.write_bytes(body)
    last = len(body) - SAMPLE_BYTES
    ref = hashlib.sha256(len(body).to_bytes(8, "little"))
    for i in range(16):
        ref.update(body[last * i // 15: last * i // 15 + SAMPLE_BYTES])
    assert file_digest(big, SAMPLED) == ref.hexdigest()
    assert input_entries({"model": {"name_or_path": "tiny"}}) == {}  # built from code and the config


def test_resume_allow_changed_is_checked_and_applies_to_one_resume(tmp_path):
    from fedlora.config import ConfigError, config_from_dict
    from fedlora.rundir.checkpoint import resume_config

    with pytest.raises(ConfigError, match="'weights' is not an input kind; use some of data, model, tokenizer"):
        config_from_dict({"resume": str(tmp_path), "resume_allow_changed": ["weights"]})
    with pytest.raises(ConfigError, match="applies only to a resume; give resume=RUN_DIR"):
        config_from_dict({"resume_allow_changed": ["data"]})
    saved = {"num_rounds": 2, "resume": str(tmp_path), "resume_allow_changed": ["data"]}
    composed = {"num_rounds": 3, "resume": str(tmp_path), "resume_allow_changed": []}
    assert resume_config(saved, composed, ["num_rounds=3"])["resume_allow_changed"] == []
    assert resume_config(saved, {**composed, "resume_allow_changed": ["model"]},
                         ["resume_allow_changed=[model]"])["resume_allow_changed"] == ["model"]

