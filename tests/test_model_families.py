"""Hugging Face causal LMs of every common family, out of the box: ``all-linear`` resolved per model,
GPT-2's transposed ``Conv1D`` layers under every adapter kind, merge, exact base terms (FedEx-LoRA,
FLoRA), quantization, DP per-example gradients, Fed-SB's dense gradients and the PEFT export, and a
real 2-round FedEx simulation per family on the defaults with a PEFT round trip of its result.

Models are tiny random-weight ones built from configs (:data:`fedlora.model.tiny.FAMILIES`: 2
layers, hidden size 64), saved as local model directories with the character tokenizer; nothing is
downloaded. References are float64 and built here from the raw tensors.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from fedlora.adapters import (
    FrozenALoRALinear,
    LoRALinear,
    LoraFactors,
    SBLinear,
    adapter_modules,
    get_adapter_state,
    inject_adapters,
    set_adapter_state,
    trainable_parameters,
)
from fedlora.adapters.base_terms import apply_base_terms
from fedlora.adapters.targets import resolve_module_targets
from fedlora.aggregation import GlobalState, fedex, flora
from fedlora.config import AdapterConfig, QuantConfig, config_from_dict
from fedlora.data.records import collate, tokenize_example
from fedlora.linear_layout import features, weight_view
from fedlora.model.build import build_model
from fedlora.model.peft_export import export_state, peft_fan_in_fan_out, save_peft_adapter
from fedlora.model.tiny import FAMILIES, build_tiny_family, build_tiny_tokenizer, save_tiny_family
from fedlora.privacy.dp_training import per_example_losses
from fedlora.privacy.grad_samplers import GradSampleCollector
from fedlora.quant import QuantLinear, quantize_model, quantize_weight
from fedlora.rundir.checkpoint import load_checkpoint, round_dirs
from fedlora.rundir.files import read_config, read_metrics
from fedlora.training.local import dense_gradients
from fedlora.training.loss import response_loss

ALPHA = 8.0
ALL_LINEAR = AdapterConfig(rank=4, alpha=ALPHA, target_modules=["all-linear"])
KINDS = {"lora": LoRALinear, "frozen_a": FrozenALoRALinear, "sb": SBLinear}

LAYERS = {  # what all-linear adapts in each family, per decoder block
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
LAYERS["mistral"] = LAYERS["qwen2"] = LAYERS["llama"]
BLOCKS = {"gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}


def expected_layers(family: str) -> list[str]:
    prefix = BLOCKS.get(family, "model.layers")
    return [f"{prefix}.{i}.{name}" for i in range(2) for name in LAYERS[family]]


@pytest.fixture(scope="module")
def vocab() -> int:
    return len(build_tiny_tokenizer())


def _randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=gen))


def _conv1d(d_out: int, d_in: int, seed: int = 7) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.bias.normal_(std=0.1)
    return layer.requires_grad_(False)  # frozen, as inject_adapters leaves a base


def _dense(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """float64 x·(W + Δ)ᵀ + b with W the layer's (d_out, d_in) matrix, read from the raw storage."""
    w = (layer.weight.t() if isinstance(layer, Conv1D) else layer.weight).double()
    if delta is not None:
        w = w + delta
    return x.double() @ w.t() + layer.bias.double()


# ---------------------------------------------------------------------------------------------
# all-linear per family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_linear_adapts_every_block_projection_and_never_the_head(family, vocab):
    with torch.device("meta"):
        model = build_tiny_family(family, vocab)
    report = resolve_module_targets(model, ["all-linear"])
    assert list(report.layers) == expected_layers(family)
    assert report.types == {("Conv1D" if family == "gpt2" else "Linear"): len(expected_layers(family))}
    assert report.linear_layers == len(report.layers)  # nothing linear outside the blocks but the head
    assert report.patterns[0].kind == "all-linear"
    head = model.get_output_embeddings()
    assert all(model.get_submodule(n) is not head for n in report.layers)


def test_every_saved_family_tokenizes_like_the_tiny_tokenizer(tmp_path, vocab):
    # transformers loads a qwen2 directory with Qwen2Tokenizer whatever tokenizer_config.json says
    from transformers import AutoTokenizer

    text = "Natalia sold 48 clips in April,\nand half as many in May. #### 72"
    expected = build_tiny_tokenizer()(text).input_ids
    for family in ("qwen2", "gpt2"):
        directory = save_tiny_family(family, tmp_path / family)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert tokenizer(text).input_ids == expected and len(tokenizer) == vocab
        assert tokenizer.decode(expected) == text


# ---------------------------------------------------------------------------------------------
# Conv1D: one layer, every adapter kind


@pytest.mark.parametrize("shape", [(12, 12), (20, 12), (12, 28)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conv1d_adapter_output_merge_and_unmerge(kind, shape):
    d_out, d_in = shape
    base = _conv1d(d_out, d_in)
    w0 = base.weight.detach().clone()
    layer = KINDS[kind](base, 4, ALPHA, generator=torch.Generator().manual_seed(0))
    _randomize(layer)
    x = torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(2))
    assert (layer.in_features, layer.out_features) == features(base) == (d_in, d_out)
    delta = layer.delta_weight().double()  # (d_out, d_in)
    assert delta.shape == (d_out, d_in) and delta.abs().max() > 1e-3
    reference = _dense(base, x) + x.double() @ delta.t()
    with torch.no_grad():
        assert (layer(x).double() - reference).abs().max() < 1e-5
        layer.merge()
        assert (weight_view(base).double() - (w0.t().double() + delta)).abs().max() < 1e-6
        assert (layer(x).double() - reference).abs().max() < 1e-5
        layer.unmerge()
        assert (base.weight - w0).abs().max() < 1e-6
        assert (layer(x).double() - reference).abs().max() < 1e-5


def _client_round(d_out: int, d_in: int, ranks=(4, 2, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    updates = [{"l": LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), ALPHA / r)}
               for r in ranks]
    weights = [5.0, 1.0, 2.0]
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    ideal = sum(p[i] * u["l"].scale * u["l"].B.double() @ u["l"].A.double() for i, u in enumerate(updates))
    return updates, weights, ideal


@pytest.mark.parametrize("shape", [(12, 12), (20, 12)], ids=["square", "tall"])
@pytest.mark.parametrize("method", [fedex, flora], ids=["fedex", "flora"])
def test_merged_conv1d_layer_applies_w_plus_the_ideal_update(method, shape):
    # A square layer is where a transposed residual (added to the (d_in, d_out) storage as if it
    # were (d_out, d_in)) would go unnoticed by shapes; the output shows it.
    d_out, d_in = shape
    updates, weights, ideal = _client_round(d_out, d_in)
    before = GlobalState(adapter={})
    after = method.METHOD.aggregate(before, updates, weights)
    base = _conv1d(d_out, d_in)
    reference_base = copy.deepcopy(base)
    model = nn.ModuleDict({"l": LoRALinear(base, 4, ALPHA)})  # the global model at rank 4
    apply_base_terms(model, {"l": after.base_terms["l"]})
    set_adapter_state(model, method.METHOD.slice_for_rank(after, 4, scale=ALPHA / 4))
    x = torch.randn(7, d_in, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = _dense(reference_base, x, ideal)  # W·x + ΔW*·x + b in float64
    with torch.no_grad():
        rel = lambda y: float((y.double() - expected).norm() / (expected - _dense(reference_base, x)).norm())  # noqa: E731
        assert rel(model["l"](x.float())) < 1e-5
        model["l"].merge()
        assert rel(model["l"](x.float())) < 1e-5
        # the transposed trap: the same terms added to the raw (d_in, d_out) storage are wrong
        if d_out == d_in:
            wrong = copy.deepcopy(reference_base)
            wrong.weight.add_(sum(t.delta(torch.float32) for t in after.base_terms["l"]))
            assert float((_dense(wrong, x) - expected).norm() / expected.norm()) > 1e-2


# ---------------------------------------------------------------------------------------------
# Conv1D in a whole GPT-2: quantization, DP, Fed-SB gradients, PEFT


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_conv1d_is_the_quantized_transposed_weight(fmt, vocab):
    model = build_tiny_family("gpt2", vocab).eval()
    original = {n: copy.deepcopy(model.get_submodule(n)) for n in expected_layers("gpt2")}
    inject_adapters(model, ALL_LINEAR, LoRALinear)
    report = quantize_model(model, QuantConfig(format=fmt), ALL_LINEAR.target_modules)
    assert report["layers"] == 8
    for name, conv in original.items():
        x = torch.randn(2, 3, features(conv)[0], generator=torch.Generator().manual_seed(4))
        q = adapter_modules(model)[name].base
        assert isinstance(q, QuantLinear) and (q.in_features, q.out_features) == features(conv)
        expected_w = quantize_weight(conv.weight.detach().t().float(), QuantConfig(format=fmt)).dequantize()
        assert torch.equal(q.dequantize(), expected_w)
        with torch.no_grad():
            assert (q(x) - (x @ expected_w.t() + conv.bias)).abs().max() < 1e-4
            assert (q(x) - conv(x)).abs().max() < (0.05 if fmt == "int8" else 0.5) * conv(x).abs().max()


def test_dp_per_example_gradients_on_gpt2_match_a_per_example_loop(vocab):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_family("gpt2", vocab)
    inject_adapters(model, ALL_LINEAR, LoRALinear)
    _randomize(model, std=0.3)
    examples = [tokenize_example(f"Q: {i}+{i}?\nA: ", f"{2 * i}" + "!" * (i % 3), tokenizer, 48) for i in range(1, 5)]
    params = trainable_parameters(model)
    model.train()
    with GradSampleCollector(model) as collector:
        losses, _ = per_example_losses(model, collate(examples, 0))
        losses.sum().backward()
    for i, ex in enumerate(examples):
        for p in params:
            p.grad = None
        per_example_losses(model, collate([ex], 0))[0].sum().backward()
        for p in params:
            assert (collector.grads[p][i] - p.grad).abs().max() < 1e-5
    assert len(params) == 16 and max(float(p.grad.abs().max()) for p in params) > 1e-4


def test_fedsb_dense_gradients_of_conv1d_are_d_out_by_d_in(vocab):
    # ∂L/∂B = s·G·Aᵀ for G = ∂L/∂W (d_out, d_in): the layout of G is checked through the LoRA factor
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_family("gpt2", vocab)
    inject_adapters(model, ALL_LINEAR, LoRALinear)
    examples = [tokenize_example(f"Q: {i}?\nA: ", f"{3 * i}", tokenizer, 32) for i in range(1, 4)]
    grads = dense_gradients(model, examples, batch_size=8, pad_id=0)
    tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    summed, _ = response_loss(model, collate(examples, 0))
    (summed / tokens).backward()
    for name, m in adapter_modules(model).items():
        assert grads[name].shape == (m.out_features, m.in_features)
        assert (m.scale * grads[name] @ m.lora_A.detach().t() - m.lora_B.grad).abs().max() < 1e-6
        assert m.lora_B.grad.abs().max() > 1e-6


def test_peft_export_of_gpt2_with_base_terms_loads_with_identical_outputs(tmp_path, vocab):
    model = build_tiny_family("gpt2", vocab).eval()
    inject_adapters(model, ALL_LINEAR, LoRALinear)
    _randomize(model)
    state = get_adapter_state(model)
    g = torch.Generator().manual_seed(3)
    terms = {name: [LoraFactors(0.05 * torch.randn(3, f.A.shape[1], generator=g),
                                0.05 * torch.randn(f.B.shape[0], 3, generator=g), 0.7)] for name, f in state.items()}
    apply_base_terms(model, terms)  # what FedEx/FLoRA fold into the Conv1D bases
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    report = resolve_module_targets(build_tiny_family("gpt2", vocab), ["all-linear"])
    save_peft_adapter(export_state(GlobalState(state, terms), ALPHA, False), ALL_LINEAR, tmp_path, base_model="gpt2",
                      fan_in_fan_out=peft_fan_in_fan_out(report))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fan_in_fan_out is set to False" correction
        peft_model = PeftModel.from_pretrained(build_tiny_family("gpt2", vocab), tmp_path).eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model.merge_and_unload()(ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a real 2-round FedEx simulation per family, on the defaults, and a PEFT round trip of its result

SIM = ["model=tiny", "strategy=fedex", "dataset.max_length=96", "eval.max_examples=8", "train.local_steps=2",
       "train.lr=0.01", "train.batch_size=4", "num_rounds=2", "num_clients=2", "client_cpus=2"]
"""Overrides on the defaults (adapter.target_modules stays all-linear): 2 clients, 2 rounds of 2 local
steps; ``model=tiny`` only sets float32 and no GGUF package, ``model.name_or_path`` picks the family.
``client_cpus=2``: one Ray worker runs both clients, so each run starts (imports) one worker, not two:
the start of the engine and its workers, not the rounds, is what a run of a tiny model costs."""


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, run_cli) -> dict[str, tuple[Path, Path]]:
    """family → (model directory, run directory): every family in one ``fedlora simulate --multirun``
    (one process start; Flower's Ray engine starts once per run)."""
    base = tmp_path_factory.mktemp("families")
    models = {f: save_tiny_family(f, base / "models" / f) for f in FAMILIES}
    proc = run_cli("simulate", "--multirun", *SIM, "model.name_or_path=" + ",".join(str(d) for d in models.values()),
                   f"hydra.sweep.dir={base / 'runs'}", cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = {}
    for run_dir in sorted((base / "runs").iterdir()):
        if (run_dir / "config.yaml").is_file():
            name_or_path = read_config(run_dir)["model"]["name_or_path"]
            runs[Path(name_or_path).name] = (Path(name_or_path), run_dir)
    assert sorted(runs) == sorted(FAMILIES)
    return runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fedex_on_the_defaults_is_exact_and_learns(family_runs, family):
    _, run_dir = family_runs[family]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 for r in rows[1:])
    assert max(r["agg_error"] for r in rows[1:]) <= 1e-6  # fp32 round-off (measured ~1e-8)
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    adapted = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert adapted == sorted(expected_layers(family))  # all-linear, resolved for this family
    targets = json.loads((run_dir / "adapter_targets.json").read_text())  # recorded in the run directory
    assert sorted(targets["adapted"]) == sorted(expected_layers(family))
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")  # GPT-2's Conv1D stores W transposed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_exported_adapter_gives_fedloras_merged_model_in_peft(family_runs, family):
    model_dir, run_dir = family_runs[family]
    cfg = config_from_dict(read_config(run_dir))
    state = load_checkpoint(round_dirs(run_dir)[-1]).state  # round 2: adapter + FedEx residuals
    assert state.base_terms and all(state.base_terms.values())
    model, _ = build_model(cfg, rank=max(f.rank for f in state.adapter.values()), kind="lora")
    apply_base_terms(model, state.base_terms)
    set_adapter_state(model, state.adapter)
    for layer in adapter_modules(model).values():
        layer.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fedlora's export leaves fan_in_fan_out to PEFT's per-layer check
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir / "adapter")
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        assert (expected - AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(peft_model.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
