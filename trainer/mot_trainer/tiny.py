"""Tiny Qwen2-shaped models built offline, for tests and the demo (no model hub involved).

`train_tokenizer` trains a byte-level BPE tokenizer on the given texts in about a second: digits are
split one by one (so arithmetic is learnable at this size) and the ChatML role markers are special
tokens with a chat template, like Qwen2. `build_tiny_model` writes a complete Hugging Face folder:
config, safetensors, tokenizer files and generation config. `arithmetic_records` makes small
chain-of-thought data sets to train such a model on.
"""

from __future__ import annotations

import random
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
ROLES = ("system", "user", "assistant")

# ChatML, as Qwen2 writes it; `<|im_end|>` ends every turn and is the EOS generation stops at.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _role_texts() -> list[str]:
    """Role markers as they appear in chat-formatted text, so role names become single tokens."""
    return [f"{IM_START}{role}\n{IM_END}\n" for role in ROLES] * 8


def train_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` (digits split, chat template set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts + _role_texts(), trainer=trainer)
    # transformers 5: build from the object; GPT2TokenizerFast(vocab_file=..) silently comes out empty.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=PAD_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir,
    texts,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a randomly initialised Qwen2-shaped causal LM folder with its tokenizer; return its path."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # like the small Qwen2 models: merges must handle tied weights
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def arithmetic_records(n: int, *, seed: int = 0, style: str = "steps", low: int = 10, high: int = 99) -> list[dict]:
    """`n` two-number addition problems with a chain of thought and the reference `answer`.

    style "steps" adds ones then tens and ends with `\\boxed{..}`; style "short" states the sum and
    ends with `Answer: ..`. Two styles let tests and the demo play teachers with different formats.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        total = a + b
        if style == "steps":
            ones = a % 10 + b % 10
            tens = a // 10 + b // 10 + ones // 10
            cot = (
                f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} + {ones // 10} = {tens}. "
                f"So {a} + {b} = {total}. \\boxed{{{total}}}"
            )
        elif style == "short":
            cot = f"{a} + {b} = {total}. Answer: {total}"
        else:
            raise ValueError(f"unknown style {style!r}: use 'steps' or 'short'")
        records.append({"prompt": f"What is {a} + {b}?", "response": cot, "answer": str(total)})
    return records


def corpus_texts(records) -> list[str]:
    """Plain texts of prompt/response records, for training a tokenizer that covers them."""
    return [f"{r['prompt']}\n{r['response']}" for r in records]
