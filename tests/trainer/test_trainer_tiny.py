"""The tiny-model factory gives a loadable Qwen2-shaped folder with a usable chat tokenizer."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_folder_loads_and_tokenizes_digits(tiny_model, tiny_data):
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)

    # Digits are single tokens; the role markers and EOS are atomic special tokens.
    assert tok.convert_ids_to_tokens(tok("1234")["input_ids"]) == ["1", "2", "3", "4"]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None

    first = json.loads(tiny_data.read_text().splitlines()[0])
    assert set(first) == {"prompt", "response", "answer"} and first["response"].endswith(f"\\boxed{{{first['answer']}}}")
