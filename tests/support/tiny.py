"""Session fixtures: a tiny Qwen2-shaped model folder and a small arithmetic chain-of-thought JSONL.

Built offline at test time by `mot_trainer.tiny` (BPE tokenizer trained in about a second; hidden
size 64, 2 layers), so every part's tests can train, merge and evaluate a real model on CPU.
"""

import json

import pytest

FIXTURES = ("tiny_model", "tiny_data", "tiny_records", "memorized")


@pytest.fixture(scope="session")
def tiny_records():
    """48 "steps"-style addition records: {prompt, response, answer}."""
    from mot_trainer.tiny import arithmetic_records

    return arithmetic_records(48, seed=0, style="steps")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a randomly initialised tiny HF model folder (tokenizer with chat template included)."""
    import torch

    from mot_trainer.tiny import arithmetic_records, build_tiny_model, corpus_texts

    torch.set_num_threads(1)
    corpus = arithmetic_records(300, seed=100, style="steps") + arithmetic_records(300, seed=101, style="short")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), corpus_texts(corpus), seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_records):
    """Path of a JSONL file with the `tiny_records` (one teacher's CoT data)."""
    path = tmp_path_factory.mktemp("tiny-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_records))
    return path


@pytest.fixture(scope="session")
def memorized(tiny_model, tmp_path_factory):
    """The tiny model trained until it (mostly) memorizes 8 short-format problems: (model, problems)."""
    from mot_trainer import cli
    from mot_trainer.tiny import arithmetic_records

    folder = tmp_path_factory.mktemp("memorized")
    problems = folder / "problems.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records(8, seed=5, style="short")))
    assert cli.main(["sft", "--init", str(tiny_model), "--data", str(problems), "--out", str(folder / "model"),
                     "--steps", "150", "--learning-rate", "1e-2", "--lr-schedule", "constant",
                     "--warmup-ratio", "0", "--micro-batch-size", "8", "--grad-accum", "1",
                     "--threads", "1"]) == 0
    return folder / "model", problems


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_eval(*args) -> int:
    """`mot-train eval ARGS` in this process; its exit code."""
    from mot_trainer import cli

    return cli.main(["eval", *map(str, args)])

