"""`mot-train eval --engine`: which engine runs, the vLLM engine against a stand-in `vllm` module at
its API boundary (what it is asked for, how its outputs become Generations), and the same result JSON
whichever engine generated the same tokens.

No GPU and no vLLM here: the stand-in records the `vllm.LLM` / `vllm.SamplingParams` arguments and
answers with RequestOutput-shaped objects built from given token ids. vLLM itself is not run."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from support.tiny import run_eval, write_jsonl
from transformers import AutoTokenizer
from transformers.generation.utils import GenerationMixin

from mot_trainer import engines
from mot_trainer import eval as mot_eval
from mot_trainer.errors import InvalidInput

torch.set_num_threads(1)


# -- a stand-in for the `vllm` package, at the API eval uses ----------------------------------------


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput, the fields eval reads
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class FakeVLLM:
    """`vllm` as a module: LLM(...) and SamplingParams(...) record their arguments; LLM.generate
    answers prompt i, completion j with `completions[i][j]` = (token ids, finish reason)."""

    def __init__(self, completions=None):
        self.completions = completions or {}
        self.llm_kwargs: list[dict] = []
        self.params: list[dict] = []
        self.prompts: list = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.llm_kwargs.append(kwargs)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.prompts.append(prompts)
                out = []
                for i, prompt in enumerate(prompts):
                    found = [CompletionOutput(j, "vLLM's own text, not used", ids, reason)
                             for j, (ids, reason) in enumerate(fake.completions[i][: sampling_params.n])]
                    out.append(RequestOutput(prompt["prompt_token_ids"], found[::-1]))  # any order: by .index
                return out

        class SamplingParams:
            def __init__(self, **kwargs):
                fake.params.append(kwargs)
                self.n = kwargs.get("n", 1)

        self.module = types.ModuleType("vllm")
        self.module.__version__ = "0.33.0"
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError


def install_fake_vllm(monkeypatch, fake: FakeVLLM, gpus: int):
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(engines, "cuda_devices", lambda: gpus)


# -- which engine ------------------------------------------------------------------------------------


def test_auto_picks_transformers_without_vllm_or_gpu(no_vllm, monkeypatch):
    assert engines.choose("auto") == "transformers" and engines.choose("transformers") == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM().module)
    monkeypatch.setattr(engines, "cuda_devices", lambda: 0)
    assert engines.choose("auto") == "transformers"  # vLLM importable but no GPU
    monkeypatch.setattr(engines, "cuda_devices", lambda: 2)
    assert engines.choose("auto") == "vllm" and engines.choose("vllm") == "vllm"


@pytest.mark.parametrize("has_vllm", [False, True])
def test_engine_vllm_without_vllm_or_gpu_exits_2(has_vllm, tiny_model, tmp_path, monkeypatch):
    if has_vllm:  # importable, but no GPU visible
        install_fake_vllm(monkeypatch, FakeVLLM(), gpus=0)
    else:
        monkeypatch.setitem(sys.modules, "vllm", None)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(log))
    problems = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    out = tmp_path / "e.json"
    assert run_eval("--model", tiny_model, "--data", problems, "--out", out, "--engine", "vllm") == 2
    message = log.read_text()
    assert "--engine" in message and "trainer-vllm" in message
    assert ("no CUDA GPU" in message) if has_vllm else ("not importable" in message)
    assert not out.exists()
    assert run_eval("--model", tiny_model, "--data", problems, "--out", out, "--engine", "tensorrt") == 2
    assert "--engine" in log.read_text()


def test_tensor_parallel_size():
    assert engines.tensor_parallel_size(None, 4, 32) == 4
    assert engines.tensor_parallel_size(None, 3, 32) == 2  # vLLM needs heads % size == 0
    assert engines.tensor_parallel_size(None, 8, 12) == 6
    assert engines.tensor_parallel_size(None, 1, None) == 1
    assert engines.tensor_parallel_size(2, 4, 32) == 2
    with pytest.raises(InvalidInput, match="--tensor-parallel-size 4"):
        engines.tensor_parallel_size(4, 2, 32)


def test_transformers_path_records_its_engine(no_vllm, tiny_model, tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(log))
    problems = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    out = tmp_path / "e.json"
    assert run_eval("--model", tiny_model, "--data", problems, "--out", out, "--max-new-tokens", 17,
                    "--threads", 1) == 0
    assert json.loads(out.read_text())["engine"] == "transformers"
    assert json.loads(log.read_text())["engine"] == "transformers"


# -- the vLLM engine at its boundary -----------------------------------------------------------------


class Tokenizer:
    """Decodes ids as letters; special ids (0, 1) are skipped as skip_special_tokens does."""

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens
        return "".join(chr(ord("a") + i) for i in ids if i not in (0, 1))


def test_vllm_engine_request_and_mapping(monkeypatch):
    stop = [0, 1]
    fake = FakeVLLM({
        0: [([5, 6, 0], "stop"), ([7, 1], "stop"), ([2, 3, 4], "length")],
        1: [([0], "stop"), ([8, 9, 10], "length"), ([11, 0, 12], "stop")],  # a stop id inside: cut there
    })
    install_fake_vllm(monkeypatch, fake, gpus=2)
    engine = engines.VLLMEngine("/models/m", Tokenizer(), stop, tensor_parallel_size=2, seed=7, max_model_len=99)
    assert fake.llm_kwargs == [{"model": "/models/m", "tokenizer": "/models/m", "tensor_parallel_size": 2,
                                "dtype": "auto", "seed": 7, "max_model_len": 99}]
    samples = engine.generate([[3, 4], [5]], samples=3, max_new_tokens=16, temperature=0.6, top_p=0.95, seed=7)
    assert fake.params == [{"n": 3, "temperature": 0.6, "top_p": 0.95, "max_tokens": 16, "seed": 7,
                            "stop_token_ids": [0, 1], "detokenize": False}]
    assert fake.prompts == [[{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [5]}]]
    G = engines.Generation
    assert samples == [
        [G("fg", True, 2), G("", True, 0)],
        [G("h", True, 1), G("ijk", False, 3)],
        [G("cde", False, 3), G("l", True, 1)],
    ]
    # Greedy: one completion per prompt, the same for every sample (as the transformers engine).
    samples = engine.generate([[3, 4], [5]], samples=3, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=7)
    assert fake.params[-1]["n"] == 1 and samples == [[G("fg", True, 2), G("", True, 0)]] * 3


def test_same_tokens_give_the_same_result_with_either_engine(memorized, tmp_path, monkeypatch):
    """The transformers engine generates with the real model (tokens recorded at model.generate);
    the stand-in vLLM returns those tokens as vLLM would (up to and including the first stop token,
    "stop"; else "length"). Everything eval writes is the same but the engine's name."""
    model, problems = memorized
    monkeypatch.setitem(sys.modules, "vllm", None)
    recorded = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        recorded.append((kwargs["eos_token_id"], out[:, kwargs["input_ids"].shape[1]:].tolist()))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    common = ["--model", model, "--data", problems, "--samples", 3, "--temperature", 0.8, "--top-p", 0.9,
              "--seed", 11, "--max-new-tokens", 17, "--threads", 1]
    by_transformers = tmp_path / "transformers.json"
    assert run_eval(*common, "--out", by_transformers, "--engine", "transformers") == 0
    assert len(recorded) == 3  # one batch (8 problems, --batch-size 8) per sample
    stop = recorded[0][0]

    completions = {}
    for _, rows in recorded:
        for i, row in enumerate(rows):
            end = next((k for k, tok in enumerate(row) if tok in stop), None)
            completions.setdefault(i, []).append((row, "length") if end is None else (row[: end + 1], "stop"))
    fake = FakeVLLM(completions)
    install_fake_vllm(monkeypatch, fake, gpus=2)
    by_vllm = tmp_path / "vllm.json"
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(log))
    assert run_eval(*common, "--out", by_vllm, "--engine", "auto") == 0

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    assert len(fake.llm_kwargs) == 1 and fake.llm_kwargs[0]["model"] == fake.llm_kwargs[0]["tokenizer"]
    assert fake.llm_kwargs[0]["tensor_parallel_size"] == (2 if config["num_attention_heads"] % 2 == 0 else 1)
    assert fake.llm_kwargs[0]["seed"] == 11 and fake.llm_kwargs[0]["max_model_len"] <= config["max_position_embeddings"]
    assert fake.params == [{"n": 3, "temperature": 0.8, "top_p": 0.9, "max_tokens": 17, "seed": 11,
                            "stop_token_ids": stop, "detokenize": False}]
    # The prompts are the chat-template ones the transformers engine got.
    from mot_trainer import data

    records = data.read_records(str(problems))
    assert fake.prompts == [[{"prompt_token_ids": data.generation_prompt_ids(r.prompt_messages, tokenizer)}
                             for r in records]]

    a, b = json.loads(by_transformers.read_text()), json.loads(by_vllm.read_text())
    assert a.pop("engine") == "transformers" and b.pop("engine") == "vllm"
    assert a == b
    # Not a vacuous comparison: some answers right, some generations ended at EOS ("stop") and some
    # cut by --max-new-tokens ("length"; 3-digit sums do not fit in 17 tokens).
    finished = [f for p in a["per_problem"] for f in p["finished"]]
    assert 0 < a["accuracy"] < 1 and any(finished) and not all(finished)
    assert json.loads(log.read_text())["engine"] == "vllm"


def test_eval_cli_engines_are_the_crd_enum():
    import yaml

    from mot_operator.spec import crd_path

    crd = yaml.safe_load(crd_path().read_text())
    evaluation = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "evaluation"]["properties"]["engine"]
    assert evaluation["enum"] == list(engines.ENGINES) and evaluation["default"] == "auto"
    assert mot_eval.engines is engines
