"""Inference engines for `mot-train eval`: transformers' generate (the CPU path and the default where
vLLM is absent) and vLLM (tensor-parallel over the eval Job's GPUs, in the trainer-vllm image).

Both take the same tokenized prompts (the chat template applied by eval.py) and return the same
`Generation`s: the generated token ids up to the first EOS, decoded by the model's own tokenizer with
special tokens skipped, so answer extraction and scoring see the same kind of text whichever engine
ran. `generate` returns one list per sample, each with one Generation per prompt.

Neither torch nor vllm is imported here at import time: the CLI and preflight import eval.py (and so
this module) without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mot_trainer.errors import InvalidInput

log = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "transformers")
VLLM_IMAGE_HINT = "vLLM ships in the trainer-vllm image (Dockerfile target trainer-vllm, extra mot-operator[vllm])"


@dataclass
class Generation:
    text: str
    finished: bool  # ended with EOS (not cut by --max-new-tokens)
    tokens: int


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def until_stop(tokens, stop) -> tuple[list[int], bool]:
    """The generated tokens before the first stop id, and whether there was one."""
    tokens = list(tokens)
    end = next((i for i, tok in enumerate(tokens) if tok in stop), None)
    return (tokens, False) if end is None else (tokens[:end], True)


def decode(tokenizer, kept: list[int], finished: bool) -> Generation:
    return Generation(tokenizer.decode(kept, skip_special_tokens=True), finished, len(kept))


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, batch_size: int) -> list[Generation]:
    """One sample with transformers: tokenized prompts in left-padded batches, each sequence stopped
    at its EOS."""
    import torch  # not at import time: the CLI and preflight import this module without torch

    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad, **sampling)
        for row in out[:, width:].tolist():
            kept, finished = until_stop(row, stop)
            results.append(decode(tokenizer, kept, finished))
    return results


class TransformersEngine:
    """transformers' generate, one sample at a time: sample s is drawn after torch.manual_seed(seed + s);
    at temperature 0 (greedy) every sample is the first one, generated once."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, batch_size: int, batch_generate=generate):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.batch_generate = batch_generate  # one sample for every prompt; `generate` above

    def generate(self, prompts: list[list[int]], *, samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> list[list[Generation]]:
        import torch

        out: list[list[Generation]] = []
        for s in range(samples):
            if temperature == 0 and out:  # greedy: every sample is the same
                out.append(out[0])
                continue
            torch.manual_seed(seed + s)
            out.append(self.batch_generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, batch_size=self.batch_size))
        return out


class VLLMEngine:
    """vLLM's offline LLM on the model folder, tensor-parallel over `tensor_parallel_size` GPUs; every
    sample of every prompt in one `LLM.generate` call.

    Written against vLLM 0.33 (the Dockerfile's VLLM_VERSION), using only API that 0.11 and later share:
    `vllm.LLM(model=, tokenizer=, tensor_parallel_size=, dtype=, seed=, max_model_len=)`,
    `vllm.SamplingParams(n=, temperature=, top_p=, max_tokens=, seed=, stop_token_ids=, detokenize=)`,
    pre-tokenized prompts as `{"prompt_token_ids": [...]}` (the `vllm.inputs.TokensPrompt` TypedDict),
    and `LLM.generate(prompts, params, use_tqdm=)` returning one `RequestOutput` per prompt, in order,
    whose `.outputs` are `CompletionOutput`s with `.index`, `.token_ids` and `.finish_reason` ("stop"
    at EOS or a stop token id, "length" at max_tokens). With a seed and n > 1, vLLM gives child i the
    seed `seed + i` (vllm/v1/engine/parallel_sampling.py), as TransformersEngine seeds sample i.

    The text is decoded here with the same tokenizer and `skip_special_tokens=True` as the
    transformers path (vLLM's own detokenization is switched off), from the tokens before the first
    stop id, so answer extraction sees the same text for the same tokens."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer, stop: list[int], *, tensor_parallel_size: int,
                 seed: int, max_model_len: int | None = None):
        import vllm  # only here: the trainer image has no vLLM

        self._vllm = vllm
        self.tokenizer, self.stop = tokenizer, list(stop)
        log.info("vLLM %s: tensor_parallel_size=%d, max_model_len=%s", getattr(vllm, "__version__", "?"),
                 tensor_parallel_size, max_model_len)
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=tensor_parallel_size,
                            dtype="auto", seed=seed, max_model_len=max_model_len)

    def generate(self, prompts: list[list[int]], *, samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> list[list[Generation]]:
        n = samples if temperature > 0 else 1  # greedy: every sample is the same, generated once
        params = self._vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                           seed=seed, stop_token_ids=self.stop, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        per_prompt = []
        for request in outputs:
            completions = sorted(request.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} completions per prompt, expected {n}")
            per_prompt.append([self._generation(c) for c in completions])
        out = [[gens[s] for gens in per_prompt] for s in range(n)]
        return out + [out[0]] * (samples - n)

    def _generation(self, completion) -> Generation:
        kept, _ = until_stop(completion.token_ids, self.stop)
        return decode(self.tokenizer, kept, completion.finish_reason == "stop")


def vllm_importable() -> str | None:
    """None when `import vllm` works, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install (say, a torch it was not built for) counts as absent
        return f"vLLM is not importable ({type(exc).__name__}: {exc})"
    return None


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose(requested: str) -> str:
    """The engine `--engine requested` runs: auto is vllm where vLLM imports and a CUDA GPU is visible,
    else transformers; an explicit vllm without them is refused (InvalidInput, exit 2)."""
    if requested not in ENGINES:
        raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested == "transformers":
        return "transformers"
    missing = vllm_importable()
    if missing is None and not cuda_devices():
        missing = "no CUDA GPU is visible"
    if missing is None:
        return "vllm"
    if requested == "vllm":
        raise InvalidInput(f"--engine vllm: {missing}. {VLLM_IMAGE_HINT} and needs a GPU; "
                           "use --engine transformers (or auto) elsewhere")
    log.info("--engine auto: transformers (%s)", missing)
    return "transformers"


def tensor_parallel_size(requested: int | None, devices: int, attention_heads: int | None) -> int:
    """GPUs vLLM shards the model over: `requested`, else the most visible GPUs that divide the
    model's attention heads (vLLM needs heads % size == 0)."""
    if requested is not None:
        if requested > devices:
            raise InvalidInput(f"--tensor-parallel-size {requested}: only {devices} CUDA GPU(s) visible")
        return requested
    size = max(devices, 1)
    while attention_heads and size > 1 and attention_heads % size:
        size -= 1
    if size != devices:
        log.info("tensor parallel over %d of %d GPUs (%s attention heads)", size, devices, attention_heads)
    return size
