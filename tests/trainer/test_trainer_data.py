"""SFT data: record shapes, loss only on response tokens, truncation/drop counts, packing without
cross-contamination, and bad records named by file, line and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import data
from mot_trainer.errors import InvalidInput

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def labelled_text(example, tokenizer):
    """The text of exactly the tokens that carry loss."""
    return tokenizer.decode([lab for lab in example.labels if lab != data.IGNORE])


def prompt_text(example, tokenizer):
    return tokenizer.decode([tok for tok, lab in zip(example.input_ids, example.labels, strict=True)
                             if lab == data.IGNORE])


def test_only_response_tokens_carry_loss(tokenizer):
    record = data.to_record({"prompt": "What is 12 + 34?", "response": "12 + 34 = 46. Answer: 46"}, "x")
    ex = data.encode_conversation(record.messages, tokenizer)
    assert labelled_text(ex, tokenizer) == "12 + 34 = 46. Answer: 46<|im_end|>\n"
    assert prompt_text(ex, tokenizer) == "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n"
    # Labels are the input ids themselves where they count (the model shifts them).
    assert all(lab in (data.IGNORE, tok) for tok, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_multi_turn_chat_labels_every_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And 3 + 4?"},
        {"role": "assistant", "content": "Answer: 7"},
    ]
    record = data.to_record({"messages": messages, "answer": 7}, "x")
    assert record.answer == "7" and record.prompt_messages == messages[:-1]
    ex = data.encode_conversation(record.messages, tokenizer)
    assert labelled_text(ex, tokenizer) == "3<|im_end|>\nAnswer: 7<|im_end|>\n"


def test_without_chat_template_response_and_eos_carry_loss(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    record = data.to_record({"question": "What is 5 + 5?", "solution": "\\boxed{10}"}, "x")
    ex = data.encode_conversation(record.messages, tokenizer)
    assert prompt_text(ex, tokenizer) == "What is 5 + 5?\n"
    assert labelled_text(ex, tokenizer) == "\\boxed{10}<|im_end|>\n"
    assert tokenizer.decode(data.generation_prompt_ids(record.prompt_messages, tokenizer)) == "What is 5 + 5?\n"


@pytest.mark.parametrize(
    "raw",
    [
        {"prompt": "P", "response": "R"},
        {"question": "P", "completion": "R"},
        {"problem": "P", "solution": "R", "answer": 4},
        {"problem": "P", "cot": "R"},
        {"messages": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}]},
    ],
)
def test_record_shapes(raw):
    record = data.to_record(raw, "x")
    assert record.messages == [{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}]


def test_jsonl_and_parquet_give_the_same_records(tmp_path, tiny_records):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in tiny_records) + "\n")  # a blank line is fine
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(tiny_records), parquet)
    from_jsonl, from_parquet = data.read_records(jsonl), data.read_records(parquet)
    assert [r.messages for r in from_jsonl] == [r.messages for r in from_parquet]
    assert [r.answer for r in from_parquet] == [r["answer"] for r in tiny_records]
    assert from_jsonl[1].where == f"{jsonl} line 2" and from_parquet[1].where == f"{parquet} row 2"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"text": "hello"}), "missing field 'prompt'"),
        (json.dumps({"prompt": "P", "answer": "1"}), "missing field 'response'"),
        (json.dumps({"messages": [{"role": "user", "content": "P"}]}), "no 'assistant' turn"),
        (json.dumps({"messages": [{"role": "user"}]}), "messages[0] needs string fields"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "teacher.jsonl"
    path.write_text(json.dumps({"prompt": "P", "response": "R"}) + "\n" + line + "\n")
    with pytest.raises(InvalidInput) as info:
        data.read_records(path)
    assert f"{path} line 2" in str(info.value) and expected in str(info.value)


def test_truncated_and_dropped_are_counted(tokenizer, tiny_records):
    records = [data.to_record(r, str(i)) for i, r in enumerate(tiny_records[:6])]
    full = [len(data.encode_conversation(r.messages, tokenizer)) for r in records]
    prompts = [len(data.generation_prompt_ids(r.prompt_messages, tokenizer)) for r in records]
    limit = max(prompts) + 2  # every prompt fits; no full example does
    examples, stats = data.tokenize_records(records, tokenizer, limit)
    assert min(full) > limit
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (6, 6, 6, 0)
    assert all(len(e) == limit for e in examples)
    with pytest.raises(InvalidInput, match="--max-seq-length"):
        data.tokenize_records(records, tokenizer, min(prompts))  # no response token left anywhere


def test_packing_does_not_mix_examples(tiny_model, tokenizer, tiny_records):
    records = [data.to_record(r, str(i)) for i, r in enumerate(tiny_records[:5])]
    examples, _ = data.tokenize_records(records, tokenizer, 512)
    rows = data.pack(examples, max_seq_length=3 * max(len(e) for e in examples))
    assert len(rows) == 2 and sum(len(r) for r in rows) == sum(len(e) for e in examples)

    # Position ids restart per example, and each example's first token carries no label.
    row = rows[0]
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    assert starts == [0, len(examples[0]), len(examples[0]) + len(examples[1])]
    assert all(row.labels[s] == data.IGNORE for s in starts)

    # Logits inside a packed row equal those of each example alone: no attention across examples.
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    batch = data.collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["labels"][1, len(rows[1]):].eq(data.IGNORE).all()
    with torch.no_grad():
        # use_cache=False as in training: transformers derives the per-example mask only without a cache.
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        plain_logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one long sequence
        for ex, start in zip(examples[:3], starts, strict=True):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(ex)], alone, atol=1e-4, rtol=1e-4)
        second = slice(starts[1], starts[1] + len(examples[1]))
        assert not torch.allclose(plain_logits[second], packed_logits[second], atol=1e-2)  # the check can fail


def test_collate_pads_right_with_ignored_labels(tokenizer, tiny_records):
    records = [data.to_record(r, str(i)) for i, r in enumerate(tiny_records[:2])]
    short = data.Example([5, 6, 7], [data.IGNORE, 6, 7])
    long_ = data.encode_conversation(records[0].messages, tokenizer)
    batch = data.collate([short, long_], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long_))
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * (len(long_) - 3)
    assert batch["labels"][0, 3:].eq(data.IGNORE).all()
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()
