"""1,000 simulated clients with client sampling (10 per round) on the tiny model: a real Flower
simulation (Ray backend) on this machine, run through the ``fedlora simulate`` CLI.

Memory and time at this scale are measured by ``benchmarks/sim_overhead.py``, not asserted here.
"""

from __future__ import annotations

import json
import math
import random
import re

from safetensors.torch import load_file

NUM_CLIENTS, PER_ROUND, ROUNDS = 1000, 10, 2


def test_thousand_clients_with_sampling(tmp_path, run_cli):
    # Prepare: the tiny model, one local step per client, no client-side evaluation.
    run_dir = tmp_path / "run"

    # Execute
    proc = run_cli("simulate", "model=tiny", "dataset.max_length=64", "train.local_steps=1", "train.batch_size=2",
                   "train.lr=0.01", "eval.max_examples=8", "eval.client_eval=false", f"num_clients={NUM_CLIENTS}",
                   f"num_rounds={ROUNDS}", f"strategy.fraction_train={PER_ROUND / NUM_CLIENTS}",
                   f"strategy.min_clients={PER_ROUND}", f"hydra.run.dir={run_dir}", cwd=tmp_path)

    # Assert: every round trained exactly the sampled 10 clients and aggregated their updates.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"fedlora: {NUM_CLIENTS} clients" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert [r["clients"] for r in rows[1:]] == [PER_ROUND] * ROUNDS
    assert all(r["rejected"] == 0 and not r.get("skipped") for r in rows[1:])
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["agg_error"] < 1 for r in rows[1:])

    # Each reply carries one client's A and B: bytes per round are 10 adapters' worth.
    factors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    factor_bytes = sum(t.numel() * 4 for t in factors.values())
    for r in rows[1:]:
        assert PER_ROUND * factor_bytes <= r["bytes_up"] <= PER_ROUND * (factor_bytes + len(factors) * 3 // 2 * 256)

    # 1,119 training rows over 1,000 clients: 119 clients hold two rows, the others one.
    stats = json.loads((run_dir / "partition_stats.json").read_text())
    sizes = sorted(c["examples"] for c in stats["clients"])
    assert len(sizes) == NUM_CLIENTS and sizes.count(2) == 119 and sizes.count(1) == 881

    # The server samples by partition id with random.Random(seed): the clients that reported
    # training (their progress lines, forwarded by Ray) are among that round's sample.
    rng = random.Random(0)
    expected = {rnd: set(rng.sample(range(NUM_CLIENTS), PER_ROUND)) for rnd in range(1, ROUNDS + 1)}
    seen = {(int(c), int(r)) for c, r in re.findall(r"client (\d+) round (\d+): step", proc.stdout + proc.stderr)}
    assert seen, "no client progress lines were forwarded"
    assert all(pid in expected[rnd] for pid, rnd in seen), sorted(seen)
