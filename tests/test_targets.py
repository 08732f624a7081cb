"""``adapter.target_modules``: the matching rule (fedlora.module_patterns), the check on the model's
weightless skeleton (fedlora.model.targets) and its refusals, for every model source.

Models are tiny and built from configs (Llama from fedlora.model.tiny, a 2-layer Phi-3 whose
attention is one fused ``qkv_proj``, a 2-layer Gemma 3 with the head tied to the embeddings, a
2-layer Llama GGUF written into tmp_path), so the file runs in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3TextConfig, Phi3Config, Phi3ForCausalLM

from fedlora.adapters import LoRALinear, inject_adapters
from fedlora.adapters.targets import TargetError, resolve_module_targets
from fedlora.config import AdapterConfig, ConfigError, FedloraConfig, ModelConfig, QuantConfig
from fedlora.model.build import build_model
from fedlora.model.loading import ModelError, load_model
from fedlora.model.targets import check_targets, model_skeleton, resolve_targets
from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer
from fedlora.module_patterns import PatternError, compile_pattern
from fedlora.quant import QuantError, quantize_model
from fedlora.worker_cache import clear_worker_cache

DEFAULT = AdapterConfig().target_modules
TINY_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven projections per layer that the default adapted before ``all-linear`` (and still does on
Llama, Gemma 3, Mistral, Qwen2)."""


def tiny_cfg(target_modules: list[str], **model) -> FedloraConfig:
    return FedloraConfig(model=ModelConfig(**({"name_or_path": "tiny", "device": "cpu"} | model)),
                         adapter=AdapterConfig(target_modules=target_modules))


def phi3_config() -> Phi3Config:
    return Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize(("pattern", "name", "hit"), [
    ("v_proj", "model.layers.0.self_attn.v_proj", True),
    ("v_proj", "model.layers.0.self_attn.qkv_proj", False),  # re.search found it: the old bug
    ("v_proj", "v_proj", True),
    ("v_proj", "model.layers.0.self_attn.v_proj.base", False),  # an adapter's inner layer
    ("self_attn.v_proj", "model.layers.3.self_attn.v_proj", True),
    ("layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj", False),  # components, not characters
    ("layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj", True),
    (r".*\.layers\.[0-3]\..*_proj", "model.layers.2.mlp.up_proj", True),
    (r".*\.layers\.[0-3]\..*_proj", "model.layers.12.mlp.up_proj", False),
    (r"layers\.0\..*_proj", "model.layers.0.mlp.up_proj", False),  # a regex matches the whole name
    ("q_proj|v_proj", "model.layers.0.self_attn.v_proj", False),
    (".*(q_proj|v_proj)", "model.layers.0.self_attn.v_proj", True),
])
def test_plain_names_match_trailing_components_and_regexes_the_whole_name(pattern, name, hit):
    assert compile_pattern(pattern).matches(name) is hit
    assert compile_pattern(pattern).kind == ("name" if pattern.replace(".", "").replace("_", "").isalnum() else "regex")


def test_invalid_or_empty_patterns_are_config_errors():
    with pytest.raises(ConfigError, match=r"adapter.target_modules pattern '\(q_proj' is not a valid regular "
                                          r"expression \(missing \), unterminated subpattern"):
        AdapterConfig(target_modules=["q_proj", "(q_proj"])
    with pytest.raises(PatternError, match="empty pattern"):
        compile_pattern("")
    with pytest.raises(QuantError, match="not a valid regular expression"):
        quantize_model(torch.nn.Linear(4, 4), QuantConfig(format="int8"), ["[q"])


# ---------------------------------------------------------------------------------------------
# what the check reports


def test_named_patterns_on_the_tiny_model_count_every_layer():
    report = check_targets(tiny_cfg(TINY_LINEARS))
    assert [(p.pattern, p.kind, len(p.layers), p.types) for p in report.patterns] == [
        (name, "name", 2, {"Linear": 2}) for name in TINY_LINEARS]
    assert len(report.layers) == report.linear_layers == 14  # 7 per layer × 2 layers; lm_head not counted
    assert report.types == {"Linear": 14}
    assert report.patterns[0].layers == ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    d = json.loads(json.dumps(report.to_dict()))
    assert (d["architecture"], d["layers"], d["linear_layers"], d["types"]) == ("LlamaForCausalLM", 14, 14, {"Linear": 14})
    assert d["patterns"][2] == {"pattern": "v_proj", "kind": "name", "count": 2, "types": {"Linear": 2},
                                "names": {"v_proj": 2},
                                "layers": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]}
    assert report.format().startswith("adapters on 14 of 14 linear layers of LlamaForCausalLM (Linear: 14); "
                                      "layers per pattern: q_proj: 2, k_proj: 2, v_proj: 2")


def test_the_default_all_linear_adapts_every_block_projection_and_says_which():
    assert DEFAULT == ["all-linear"]
    report = check_targets(tiny_cfg(DEFAULT))
    assert report.layers == resolve_targets(tiny_cfg(TINY_LINEARS)).layers  # the same 14 layers, same order
    assert [(p.pattern, p.kind, len(p.layers), p.names) for p in report.patterns] == [
        ("all-linear", "all-linear", 14, {name: 2 for name in TINY_LINEARS})]
    assert report.format() == (
        "adapters on 14 of 14 linear layers of LlamaForCausalLM (Linear: 14); layers per pattern: all-linear: 14 "
        "(q_proj 2, k_proj 2, v_proj 2, o_proj 2, gate_proj 2, up_proj 2, down_proj 2)")
    assert report.to_dict()["patterns"][0]["kind"] == "all-linear"


def test_all_linear_on_gemma3_is_exactly_the_seven_projections_the_old_default_named():
    # Gemma3ForCausalLM as the main job loads it (2 layers here: the names per layer are the model's);
    # the real 270M skeleton gives the same 126 = 18 × 7 layers.
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=64, tie_word_embeddings=True)
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        gemma = Gemma3ForCausalLM(config)
    new, old = resolve_module_targets(gemma, ["all-linear"]), resolve_module_targets(gemma, TINY_LINEARS)
    assert new.layers == old.layers and len(new.layers) == 14
    assert "lm_head" not in new.layers and new.types == {"Linear": 14}


def test_all_linear_takes_only_linears_inside_the_blocks():
    # a linear outside the decoder blocks (a projection after the embeddings) is not all-linear's
    model = build_tiny_model(len(build_tiny_tokenizer()), seed=0)
    model.model.embed_proj = torch.nn.Linear(64, 64)
    report = resolve_module_targets(model, ["all-linear"])
    assert len(report.layers) == 14 and report.linear_layers == 15
    assert "model.embed_proj" in resolve_module_targets(model, ["all-linear", "embed_proj"]).layers
    with pytest.raises(TargetError) as err:  # a model without blocks
        resolve_module_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["all-linear"])
    assert str(err.value) == (
        "adapter.target_modules pattern 'all-linear' matches no linear layer of Sequential: it takes the linear "
        "layers inside the decoder blocks (the elements of an nn.ModuleList such as model.layers), and Sequential "
        "has none; its linear layers, all outside them, are named like: 0 (full names like '0'): name them instead")


def test_all_linear_on_an_adapted_model_is_refused():
    model = build_tiny_model(len(build_tiny_tokenizer()), seed=0)
    inject_adapters(model, AdapterConfig(target_modules=["all-linear"]), LoRALinear)
    with pytest.raises(TargetError, match="'all-linear' matches 14 layer.s. that already carry an adapter"):
        inject_adapters(model, AdapterConfig(target_modules=["all-linear"]), LoRALinear)


def test_the_report_is_saved_in_the_run_directory(tmp_path):
    from fedlora.model.targets import save_target_report
    from fedlora.rundir.files import ADAPTER_TARGETS_FILE

    report = resolve_targets(tiny_cfg(["all-linear"]))
    path = save_target_report(report, tmp_path)
    assert path == tmp_path / ADAPTER_TARGETS_FILE == tmp_path / "adapter_targets.json"
    saved = json.loads(path.read_text())
    assert saved == report.to_dict()
    assert (saved["architecture"], saved["layers"], saved["patterns"][0]["names"]["down_proj"]) == ("LlamaForCausalLM", 14, 2)


def test_a_pattern_for_some_layers_is_fine_and_counted():
    report = resolve_targets(tiny_cfg(["layers.0.self_attn.q_proj", r".*\.layers\.1\.mlp\..*_proj"]))
    assert [len(p.layers) for p in report.patterns] == [1, 3]
    assert report.layers == ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
                             "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj")
    assert report.linear_layers == 14


def test_the_skeleton_holds_no_weights_and_names_what_load_model_gives():
    skeleton = model_skeleton(ModelConfig(name_or_path="tiny"))
    loaded, _ = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert [(n, type(m)) for n, m in skeleton.named_modules()] == [(n, type(m)) for n, m in loaded.named_modules()]


# ---------------------------------------------------------------------------------------------
# refusals


def test_output_head_is_refused_by_name_before_any_change(tiny_model):
    with pytest.raises(TargetError) as err:
        resolve_targets(tiny_cfg(["q_proj", "v_proj", "lm_head"]))
    assert str(err.value) == (
        "adapter.target_modules pattern 'lm_head' matches the output head 'lm_head', which fedlora does not "
        "adapt: the loss and evaluation form logits from the head's weight directly, in chunks "
        "(fedlora.training.loss), so an adapter there would be neither trained nor applied; remove it from "
        "adapter.target_modules")
    with pytest.raises(TargetError, match="matches the output head 'lm_head'"):
        inject_adapters(tiny_model, AdapterConfig(target_modules=["q_proj", "lm_head"]), LoRALinear)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())


def test_tied_head_and_embeddings_are_refused_naming_the_tie():
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=64, tie_word_embeddings=True)
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        gemma = Gemma3ForCausalLM(config)
    with pytest.raises(TargetError) as err:
        resolve_module_targets(gemma, ["q_proj", "lm_head", "embed_tokens"])
    head, embeddings = str(err.value).split("\n")
    assert "Gemma3ForCausalLM ties it to the input embeddings 'model.embed_tokens', so an adapter would change both" in head
    assert embeddings == (
        "adapter.target_modules pattern 'embed_tokens' matches the input embeddings 'model.embed_tokens' "
        "(Gemma3TextScaledWordEmbedding), which fedlora does not adapt: adapters wrap linear layers only, and "
        "Gemma3ForCausalLM ties them to the output head 'lm_head'; remove it from adapter.target_modules")
    assert resolve_module_targets(gemma, DEFAULT).linear_layers == 14


def test_a_pattern_that_matches_nothing_lists_the_linear_layer_names():
    with pytest.raises(TargetError) as err:
        resolve_targets(tiny_cfg(["q_proj", "attention.query"]))
    assert str(err.value) == (
        "adapter.target_modules pattern 'attention.query' matches no linear layer of LlamaForCausalLM; its linear "
        "layers are named like: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (full names like "
        "'model.layers.0.self_attn.q_proj')")


def test_a_regex_that_only_a_search_would_match_gets_the_full_match_hint():
    with pytest.raises(TargetError, match=r"a regex must match the whole dotted module name \(re.fullmatch\): "
                                          r"'\.\*layers\\\\.0\\\\..\*_proj' would match 7 linear layer\(s\)"):
        resolve_targets(tiny_cfg([r"layers\.0\..*_proj"]))
    with pytest.raises(TargetError, match="'proj' is only part of 'q_proj', 'k_proj', 'v_proj', 'o_proj', "
                                          "'gate_proj', 'up_proj', 'down_proj': to adapt such a layer, name it whole"):
        resolve_targets(tiny_cfg(["proj"]))


@pytest.mark.parametrize(("pattern", "what"), [
    ("mlp", "matches 2 module(s) that are not linear layers (LlamaMLP ×2: 'model.layers.0.mlp', "
            "'model.layers.1.mlp'); adapters wrap linear layers only (nn.Linear, Conv1D, QuantLinear): name the linear "
            "layers inside instead: gate_proj, up_proj, down_proj"),
    ("input_layernorm", "matches 2 module(s) that are not linear layers (LlamaRMSNorm ×2: "
                        "'model.layers.0.input_layernorm', 'model.layers.1.input_layernorm')"),
    ("layers.1", "(LlamaDecoderLayer ×1: 'model.layers.1'); adapters wrap linear layers only (nn.Linear, "
                 "Conv1D, QuantLinear): name the linear layers inside instead: " + ", ".join(TINY_LINEARS)),
    (r".*self_attn.*", "matches 2 module(s) that are not linear layers (LlamaAttention ×2"),
])
def test_non_linear_modules_are_refused_naming_their_type(pattern, what):
    with pytest.raises(TargetError) as err:
        resolve_targets(tiny_cfg([pattern]))
    assert str(err.value).startswith(f"adapter.target_modules pattern {pattern!r} ")
    assert what in str(err.value)


def test_every_bad_pattern_is_named_at_once():
    with pytest.raises(TargetError) as err:
        resolve_targets(tiny_cfg(["q_proj", "lm_head", "nothing_here", "mlp"]))
    assert [line.split("'")[1] for line in str(err.value).split("\n")] == ["lm_head", "nothing_here", "mlp"]


# ---------------------------------------------------------------------------------------------
# fused projections (Phi-3): v_proj no longer finds qkv_proj


def test_v_proj_does_not_match_a_fused_qkv_proj(tmp_path):
    phi3_config().save_pretrained(tmp_path)  # a local model directory: config only, the skeleton needs no weights
    cfg = FedloraConfig(model=ModelConfig(name_or_path=str(tmp_path)), adapter=AdapterConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(TargetError) as err:
        resolve_targets(cfg)
    no_match = ("matches no linear layer of Phi3ForCausalLM; its linear layers are named like: o_proj, qkv_proj, "
                "gate_up_proj, down_proj (full names like 'model.layers.0.self_attn.o_proj')")
    assert str(err.value).split("\n") == [
        f"adapter.target_modules pattern 'q_proj' {no_match}",
        f"adapter.target_modules pattern 'v_proj' {no_match}; a name matches whole trailing name components, and "
        "'v_proj' is only part of 'qkv_proj': to adapt such a layer, name it whole"]
    cfg.adapter = AdapterConfig(target_modules=["qkv_proj", "gate_up_proj"])
    report = resolve_targets(cfg)
    assert [(p.pattern, len(p.layers)) for p in report.patterns] == [("qkv_proj", 2), ("gate_up_proj", 2)]
    assert (len(report.layers), report.linear_layers) == (4, 8)


def test_quantization_and_private_copies_use_the_same_rule():
    from fedlora.model.build import private_copy

    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(phi3_config()).eval().requires_grad_(False)
    with pytest.raises(QuantError, match=r"quantization targets \['v_proj'\] match no linear layer"):
        quantize_model(phi3, QuantConfig(format="int8"), ["v_proj"])
    assert quantize_model(phi3, QuantConfig(format="int8"), ["qkv_proj"])["layers"] == 2
    assert quantize_model(Phi3ForCausalLM(phi3_config()), QuantConfig(format="int8"), ["all-linear"])["layers"] == 8
    owned = private_copy(phi3, ["all-linear"])
    # all-linear owns every block linear (base terms and merges write there) and aliases the rest
    assert owned.model.layers[0].mlp.gate_up_proj.weight.data_ptr() != phi3.model.layers[0].mlp.gate_up_proj.weight.data_ptr()
    assert owned.model.layers[1].mlp.down_proj.weight.data_ptr() != phi3.model.layers[1].mlp.down_proj.weight.data_ptr()
    assert owned.model.embed_tokens.weight.data_ptr() == phi3.model.embed_tokens.weight.data_ptr()
    copy = private_copy(phi3, ["o_proj"])
    # owned: the two o_proj layers; aliased: every other frozen tensor (e.g. the fused up/gate weights)
    assert copy.model.layers[0].self_attn.o_proj.weight.data_ptr() != phi3.model.layers[0].self_attn.o_proj.weight.data_ptr()
    assert copy.model.layers[0].mlp.gate_up_proj.weight.data_ptr() == phi3.model.layers[0].mlp.gate_up_proj.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# model sources and build_model


def test_gguf_sources_resolve_from_the_header_then_the_converted_copy(tmp_path, monkeypatch):
    from test_models import write_tiny_gguf

    path = tmp_path / "models" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    package = tmp_path / "pkgs" / "tiny_targets_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"def assemble():\n    return {str(path)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    cache = str(tmp_path / "cache")
    by_file = ModelConfig(name_or_path=str(path), cache_dir=cache, device="cpu")
    by_package = ModelConfig(name_or_path="label", gguf_package="tiny_targets_gguf_pkg", cache_dir=cache, device="cpu")
    for model in (by_file, by_package):  # not converted yet: the config comes from the .gguf header
        cfg = FedloraConfig(model=model, adapter=AdapterConfig(target_modules=["q_proj", "lm_head"]))
        with pytest.raises(TargetError, match="ties it to the input embeddings 'model.embed_tokens'"):
            resolve_targets(cfg)
    assert not (tmp_path / "cache").exists()  # the check converted nothing
    loaded, _ = load_model(by_file)
    report = resolve_targets(FedloraConfig(model=by_package))  # now from the converted copy
    assert (report.architecture, len(report.layers), report.linear_layers) == ("LlamaForCausalLM", 14, 14)
    assert [n for n, _ in model_skeleton(by_package).named_modules()] == [n for n, _ in loaded.named_modules()]


def test_unreadable_model_sources_are_model_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="(?s)could not read the config of 'someorg/no-such-model'.*No hub is reachable"):
        model_skeleton(ModelConfig(name_or_path="someorg/no-such-model"))
    with pytest.raises(ModelError, match="does not exist"):
        model_skeleton(ModelConfig(name_or_path=str(tmp_path / "absent" / "model")))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_build_model_refuses_bad_patterns_before_quantizing_or_adapting(quant):
    clear_worker_cache()
    cfg = tiny_cfg(["q_proj", "lm_head"])
    cfg.quant = QuantConfig(format=quant)
    for _ in range(2):  # the first build is a plain one, the second loads the base for the worker cache
        with pytest.raises(TargetError, match="matches the output head 'lm_head'"):
            build_model(cfg, reuse=True)
    clear_worker_cache()
