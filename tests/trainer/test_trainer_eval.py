"""`mot-train eval`: answer extraction, accuracy as computed by hand, generation that stops at EOS,
truncation reported as such, held-out loss, bad input refused."""

import json
import math

import pytest
import torch
from support.tiny import run_eval, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import answers, data
from mot_trainer import eval as mot_eval

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "text, explicit_only, expected",
    [
        ("so 3 + 4 = 7. \\boxed{7}", False, "7"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}} done", False, "\\frac{1}{2}"),
        ("12 + 30 = 42.\nAnswer: 42.", False, "42"),
        ("The final answer is 1,234", False, "1,234"),
        ("we get 5 and then 17 apples", False, "17"),
        ("we get 5 and then 17 apples", True, None),
        ("cut inside \\boxed{12", True, None),
        ("no digits here", False, None),
    ],
)
def test_extract_answer(text, explicit_only, expected):
    assert answers.extract_answer(text, explicit_only=explicit_only) == expected


def test_exact_match_normalizes_numbers():
    assert answers.is_correct("1,234", "1234") and answers.is_correct("68.0", "68") and answers.is_correct("$5$", "5")
    assert not answers.is_correct("67", "68") and not answers.is_correct(None, "68")


def test_accuracy_std_and_truncation_computed_by_hand(tiny_model, tmp_path, monkeypatch):
    """Generation faked at its boundary only: the scoring is checked against numbers done by hand."""
    problems = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 1 + 1?", "answer": "2"},
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": "What is 3 + 3?", "answer": "6"},
        {"prompt": "What is 4 + 4?", "answer": "8"},
    ])
    G = mot_eval.Generation
    canned = [
        # sample 1: right (boxed), right (Answer:), wrong (last number), cut with no answer -> 2/4
        [G("1 + 1 = \\boxed{2}", True, 5), G("Answer: 4", True, 3), G("3 + 3 = 7", True, 4),
         G("3 + 3 is", False, 4)],
        # sample 2: right, wrong, right (last number), cut but already boxed -> counts -> 3/4
        [G("\\boxed{2}", True, 2), G("Answer: 5", True, 3), G("it is 6", True, 3), G("so \\boxed{8} and", False, 4)],
    ]
    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append(kw)
        return canned[len(calls) - 1]

    monkeypatch.setattr(mot_eval, "generate", fake_generate)
    out = tmp_path / "eval.json"
    assert run_eval("--model", tiny_model, "--data", problems, "--out", out, "--samples", 2,
                    "--temperature", 0.7, "--threads", 1) == 0
    result = json.loads(out.read_text())
    assert len(calls) == 2 and calls[0]["temperature"] == 0.7
    assert result["accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert result["accuracy_std"] == pytest.approx(0.125)  # population std of 0.5 and 0.75
    assert result["samples"] == 2 and result["problems"] == 4
    assert result["truncated"] == 1
    assert result["per_problem"][3]["truncated"] == [True, False]
    assert result["per_problem"][3]["finished"] == [False, False]
    assert result["per_problem"][2]["predictions"] == ["7", "6"]
    assert result["heldout_loss"] is None  # no reference responses in this file


def test_real_generation_accuracy_matches_a_recount(memorized, tiny_model, tmp_path):
    model, problems = memorized
    out = tmp_path / "eval.json"
    assert run_eval("--model", model, "--data", problems, "--out", out, "--max-new-tokens", 64,
                    "--batch-size", 3, "--threads", 1) == 0
    result = json.loads(out.read_text())
    references = [json.loads(line)["answer"] for line in problems.read_text().splitlines()]
    # Recount by hand from the raw generations: the format is "a + b = c. Answer: c".
    recount = [p["generations"][0].rsplit("Answer: ", 1)[-1] == ref
               for p, ref in zip(result["per_problem"], references, strict=True)]
    assert result["accuracy"] == pytest.approx(sum(recount) / len(recount))
    assert result["accuracy"] >= 0.5  # it learned the problems
    assert result["truncated"] == 0 and result["accuracy_std"] == 0.0

    # Generation stopped at EOS: one answer, nothing generated after it.
    for p in result["per_problem"]:
        assert p["generations"][0].count("Answer:") == 1 and "<|im_end|>" not in p["generations"][0]
    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    records = data.read_records(problems)
    gens = mot_eval.generate(lm, tokenizer, [data.generation_prompt_ids(r.prompt_messages, tokenizer) for r in records],
                             max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=8)
    assert all(g.finished and g.tokens < 30 for g in gens)

    # The held-out loss on the reference responses: low after training, high for the random model.
    untrained = tmp_path / "untrained.json"
    assert run_eval("--model", tiny_model, "--data", problems, "--out", untrained, "--max-new-tokens", 4,
                    "--threads", 1) == 0
    assert result["heldout_loss"] < 0.5 < json.loads(untrained.read_text())["heldout_loss"]


def fp32_loss_tolerance(max_abs_logit: float, vocab: int, tokens: int, loss: float) -> float:
    """How far an fp32 mean cross-entropy may lie from the exact one, whatever the CPU's kernels.

    A token's loss is logsumexp(z) - z_target, two terms of about max|z| + log V each: their fp32
    rounding leaves an absolute error of a few eps times that (at a memorized model's loss of ~1e-4
    this is most of the relative precision, and AVX-512, AVX2 and plain kernels round differently);
    averaging `tokens` losses in fp32 adds at most tokens * eps * the mean."""
    eps = torch.finfo(torch.float32).eps
    return eps * (8 * (max_abs_logit + math.log(vocab)) + tokens * loss)


@pytest.mark.parametrize("which", ["untrained", "memorized"])
def test_heldout_loss_is_the_mean_response_token_loss(which, request):
    """Scored on the response tokens only (after the generation prompt), averaged over tokens:
    on the untrained model (loss ~ log V: a wrong token range is far off) and on the memorized
    one (loss ~1e-4: where fp32 rounding differs between CPUs)."""
    model_dir, problems = request.getfixturevalue("memorized")
    if which == "untrained":
        model_dir = request.getfixturevalue("tiny_model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    records = data.read_records(problems)[:2]
    # By hand, in float64 from the same fp32 logits: log-probability of each token given the ones
    # before it, scored from the first token after the generation prompt.
    rows = []
    for r in records:
        start = len(data.generation_prompt_ids(r.prompt_messages, tokenizer))
        full = data.encode_conversation(r.messages, tokenizer).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]
        rows.append((torch.log_softmax(logits.double(), -1), full, start, logits.abs().max().item()))

    def mean_loss(offset: int = 0) -> float:
        losses = [-logp[pos - 1, full[pos]].item() for logp, full, start, _ in rows
                  for pos in range(start + offset, len(full) + offset)]
        return sum(losses) / len(losses)

    expected = mean_loss()
    count = sum(len(full) - start for _, full, start, _ in rows)
    tolerance = fp32_loss_tolerance(max(row[3] for row in rows), model.config.vocab_size, count, expected)
    assert mot_eval.heldout_loss(model, tokenizer, records, 512) == pytest.approx(expected, rel=0, abs=tolerance)
    if which == "untrained":  # the bound still tells the response tokens from a range one token off
        assert abs(mean_loss(offset=-1) - expected) > 10 * tolerance


def test_too_small_max_new_tokens_is_reported_as_truncated(memorized, tmp_path, monkeypatch):
    model, problems = memorized
    out = tmp_path / "eval.json"
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(log))
    assert run_eval("--model", model, "--data", problems, "--out", out, "--max-new-tokens", 4,
                    "--samples", 3, "--threads", 1) == 0
    result = json.loads(out.read_text())
    assert result["truncated"] == 8 * 3 and result["accuracy"] == 0.0
    assert all(p["predictions"] == [None] * 3 for p in result["per_problem"])
    summary = json.loads(log.read_text())
    assert summary["truncated"] == 24 and summary["accuracy"] == 0.0 and math.isfinite(summary["heldout_loss"])


def test_problem_without_answer_exits_2(tiny_model, tmp_path, monkeypatch):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"},
                                                  {"prompt": "What is 2 + 2?"}])
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(log))
    assert run_eval("--model", tiny_model, "--data", problems, "--out", tmp_path / "e.json") == 2
    assert f"{problems} line 2" in log.read_text() and "'answer'" in log.read_text()
    assert not (tmp_path / "e.json").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    assert run_eval("--model", tmp_path / "nope", "--data", good, "--out", tmp_path / "e.json") == 2
    assert "nope" in log.read_text() and not (tmp_path / "e.json").exists()
