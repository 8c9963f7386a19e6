"""The chunked lm_head + cross-entropy (mot_trainer.loss) equals transformers' loss in value and
gradients, on raw tensors and on the tiny model (padded and packed rows), and an SFT with it trains
like one without it."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import cli, data, loss
from mot_trainer.storage import read_checkpoint_manifest

pytestmark = pytest.mark.numerics

torch.set_num_threads(1)
EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_linear_cross_entropy_equals_torch_in_value_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::5] = loss.IGNORE
    labels[8:16] = loss.IGNORE  # a whole chunk of 7 with nothing to learn

    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=loss.IGNORE,
                                                 reduction="sum") * 0.3
    expected.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = loss.linear_cross_entropy(hidden, weight, labels, chunk=chunk, scale=0.3)
    (2.0 * got).backward()  # the incoming gradient is applied

    eps64 = torch.finfo(torch.float64).eps
    assert got.item() == pytest.approx(expected.item(), rel=100 * eps64)
    assert torch.allclose(hidden.grad, 2 * want_h, rtol=0, atol=1e3 * eps64)
    assert torch.allclose(weight.grad, 2 * want_w, rtol=0, atol=1e3 * eps64)


def test_only_the_gradients_asked_for_are_computed():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # frozen head
    labels = torch.tensor([1, 2, 3, loss.IGNORE, 4])
    loss.linear_cross_entropy(hidden, weight, labels, chunk=2).backward()
    assert hidden.grad is not None and weight.grad is None


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        loss.linear_cross_entropy(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), chunk=0)


def _batches(tiny_model, tiny_records):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = [data.to_record(r, f"line {i + 1}") for i, r in enumerate(tiny_records[:6])]
    examples, _ = data.tokenize_records(records, tokenizer, 256)
    padded = data.collate(examples[:4], tokenizer.pad_token_id)
    packed = data.collate(data.pack(examples, 256)[:2], tokenizer.pad_token_id)
    return padded, packed


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_patched_tiny_model_matches_transformers_loss_and_gradients(tiny_model, tiny_records, layout):
    padded, packed = _batches(tiny_model, tiny_records)
    batch = padded if layout == "padded" else packed
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    chunked = copy.deepcopy(reference)
    assert loss.patch_model(chunked, chunk=16)
    reference.train()
    chunked.train()
    num_items = torch.tensor(float((batch["labels"][:, 1:] != loss.IGNORE).sum()))

    want = reference(**batch, use_cache=False, num_items_in_batch=num_items)
    want.loss.backward()
    got = chunked(**batch, use_cache=False, num_items_in_batch=num_items)
    got.loss.backward()
    assert got.logits is None  # never materialised

    # fp32 sums over the vocabulary and the tokens: a few ulps of the terms per element added.
    vocab = reference.config.vocab_size
    tokens = int(num_items)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=EPS32 * (vocab + tokens))
    for (name, p_ref), (_, p_got) in zip(reference.named_parameters(), chunked.named_parameters(), strict=True):
        scale = p_ref.grad.abs().max().item() + 1e-12
        diff = (p_ref.grad - p_got.grad).abs().max().item()
        assert diff <= EPS32 * (vocab + tokens) * scale, (name, diff, scale)


def test_evaluation_and_unlabelled_calls_keep_transformers_forward(tiny_model, tiny_records):
    padded, _ = _batches(tiny_model, tiny_records)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert loss.patch_model(model)
    model.eval()
    out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"])
    assert out.logits is not None and out.logits.shape[-1] == model.config.vocab_size


def test_models_with_a_biased_head_or_soft_capping_are_left_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    assert not loss.supports(model) and not loss.patch_model(model)


def test_sft_with_the_chunked_loss_trains_like_transformers_loss(tiny_model, tiny_data, tmp_path):
    common = ["--init", str(tiny_model), "--data", str(tiny_data), "--steps", "3", "--threads", "1",
              "--learning-rate", "3e-3", "--micro-batch-size", "4", "--grad-accum", "2", "--warmup-ratio", "0"]
    histories = {}
    for chunk in ("0", "16"):
        out = tmp_path / f"chunk-{chunk}"
        assert cli.main(["sft", *common, "--out", str(out), "--loss-chunk-tokens", chunk]) == 0
        histories[chunk] = [value for _, value in read_checkpoint_manifest(str(out))["metrics"]["loss_history"]]
    # Step 1 sees the same weights; later steps differ by Adam's reaction to last-bit differences.
    assert histories["16"][0] == pytest.approx(histories["0"][0], rel=1e-5)
    assert histories["16"] == pytest.approx(histories["0"], rel=1e-3), json.dumps(histories)
