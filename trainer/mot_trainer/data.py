"""Chain-of-thought data: read JSONL/Parquet (local or s3://), tokenize with loss on responses only,
truncate, pack.

Accepted record shapes: `{prompt|question|problem, response|completion|solution|cot [, answer]}` and
chat `{"messages": [{"role", "content"}, ...] [, "answer"]}`. Prompt/response records become a
two-turn conversation, so both shapes go through the tokenizer's chat template when it has one.
Labels are -100 everywhere except on assistant turns (the template's end-of-turn token included, so
the model learns to stop).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from mot_trainer import storage
from mot_trainer.errors import InvalidInput

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "question", "problem")
RESPONSE_FIELDS = ("response", "completion", "solution", "cot")
IGNORE = -100  # label value the loss skips


@dataclass
class Record:
    where: str  # "data.jsonl line 3", for error messages
    messages: list[dict]  # chat turns; the last is the assistant's reference when there is one
    answer: str | None = None

    @property
    def has_response(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1] if self.has_response else self.messages


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)  # set for packed rows only

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0  # kept, but cut at max_seq_length
    dropped: int = 0  # no response token left within max_seq_length
    tokens: int = 0


# --- reading -----------------------------------------------------------------------------------


def read_raw(uri, raw: bytes | None = None) -> list[tuple[str, object]]:
    """(where, raw record) pairs from a JSONL or Parquet file, local or s3:// (or its bytes `raw`)."""
    uri = str(uri)
    name = PurePosixPath(uri).name
    data = storage.read_bytes(uri) if raw is None else raw
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as exc:
            raise InvalidInput(f"{uri}: not a readable Parquet file ({exc})") from None
        return [(f"{uri} row {i}", row) for i, row in enumerate(rows, 1)]
    out = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{uri} line {i}", json.loads(line)))
        except ValueError as exc:
            raise InvalidInput(f"{uri} line {i}: not valid JSON ({exc})") from None
    return out


def to_record(raw, where: str, *, require_response: bool = True) -> Record:
    """Normalise one raw record; InvalidInput naming `where` and the missing field otherwise."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    answer = raw.get("answer")
    answer = None if answer is None else str(answer)
    if "messages" in raw:
        return Record(where, _check_messages(raw["messages"], where, require_response), answer)
    prompt = next((raw[k] for k in PROMPT_FIELDS if raw.get(k) is not None), None)
    if not isinstance(prompt, str):
        raise InvalidInput(
            f"{where}: missing field 'prompt' (or 'question', 'problem', or a 'messages' list); "
            f"the record has {sorted(raw)}"
        )
    response = next((raw[k] for k in RESPONSE_FIELDS if raw.get(k) is not None), None)
    messages = [{"role": "user", "content": prompt}]
    if isinstance(response, str):
        messages.append({"role": "assistant", "content": response})
    elif require_response or response is not None:
        raise InvalidInput(
            f"{where}: missing field 'response' (or 'completion', 'solution', 'cot'); the record has {sorted(raw)}"
        )
    return Record(where, messages, answer)


def _check_messages(messages, where: str, require_response: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidInput(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
    if require_response and not any(m["role"] == "assistant" for m in messages):
        raise InvalidInput(f"{where}: field 'messages' has no 'assistant' turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_records(uri, *, require_response: bool = True, raw: bytes | None = None) -> list[Record]:
    pairs = read_raw(uri, raw)
    records = [to_record(rec, where, require_response=require_response) for where, rec in pairs]
    if not records:
        raise InvalidInput(f"{uri}: no records")
    return records


# --- tokenizing --------------------------------------------------------------------------------


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(messages: list[dict], tokenizer, *, generation_prompt: bool = False) -> str:
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    # No template (a base model): contents one per line, each assistant turn closed by EOS.
    eos = tokenizer.eos_token or ""
    text = "".join(m["content"] + (eos if m["role"] == "assistant" else "") + "\n" for m in messages)
    return text


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(messages, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(messages[:i], tokenizer, generation_prompt=True) if i else ""
        upto = _render(messages[: i + 1], tokenizer)
        # Common prefixes rather than lengths: a template may render earlier turns differently
        # once later ones follow (e.g. dropping reasoning), and the span must index `full`.
        start = _common_prefix(before, full)
        end = _common_prefix(upto, full)
        spans.append((start, max(start, end)))
    return full, spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_conversation(messages: list[dict], tokenizer) -> Example:
    """Token ids of the whole conversation; labels only on assistant turns (no truncation)."""
    text, spans = _assistant_spans(messages, tokenizer)
    special = not _has_template(tokenizer)  # a template writes its own special tokens
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(s <= start < e for s, e in spans) and end > start else IGNORE
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return Example(ids, labels)


def generation_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids that prompt the model to answer the conversation's last user turn."""
    if _has_template(tokenizer):
        text = _render(messages, tokenizer, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(_render(messages, tokenizer), add_special_tokens=True)["input_ids"])


def tokenize_records(records: list[Record], tokenizer, max_seq_length: int) -> tuple[list[Example], TokenizeStats]:
    """Encode, cut at max_seq_length; examples with no response token left are dropped (counted)."""
    stats = TokenizeStats(records=len(records))
    examples = []
    for record in records:
        ex = encode_conversation(record.messages, tokenizer)
        if len(ex) > max_seq_length:
            ex = Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length])
            # The first label is never predicted (labels shift by one), so it does not count.
            if all(lab == IGNORE for lab in ex.labels[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append(ex)
        stats.tokens += len(ex)
    stats.examples = len(examples)
    if stats.truncated or stats.dropped:
        log.warning(
            "max_seq_length %d: %d of %d examples truncated, %d dropped (no response token left)",
            max_seq_length, stats.truncated, stats.records, stats.dropped,
        )
    if not examples:
        raise InvalidInput(f"no example has a response token within --max-seq-length {max_seq_length}")
    return examples, stats


def pack(examples: list[Example], max_seq_length: int) -> list[Example]:
    """Concatenate consecutive short examples into rows of at most max_seq_length tokens.

    Position ids restart at 0 for every example: transformers then builds a block-diagonal causal
    mask (no attention across examples), and the first token of each example carries no label, so
    no example is ever predicted from the previous one.
    """
    rows: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current) + len(ex) > max_seq_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += [IGNORE] + ex.labels[1:]
        current.position_ids += list(range(len(ex)))
    if current.input_ids:
        rows.append(current)
    return rows


def collate(rows: list[Example], pad_id: int) -> dict:
    """Right-padded tensors. Packed rows get position_ids and no attention mask (transformers derives
    the per-example mask from the position ids); the padding forms its own segment."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    packed = any(r.position_ids for r in rows)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(r.position_ids or list(range(n)))
        positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch
