"""`mot-train eval`: exact-match accuracy on held-out problems and held-out loss on their references.

Each problem needs a reference `answer`; a reference response (any SFT record shape) also counts
toward the held-out loss. Accuracy is the mean over `--samples` generations per problem (the MoT
paper averages 16), with its standard deviation across samples. Generation stops at EOS; a generation
cut by `--max-new-tokens` without an explicit answer is counted as `truncated` (and not correct), so a
too-small limit shows up in the report instead of passing for a wrong answer.

Generation runs on one of two engines (engines.py, `--engine`): vLLM, tensor-parallel over the visible
GPUs, where it is installed (the trainer-vllm image) and a GPU is visible; else transformers. Both get
the same chat-template prompts and give the same kind of text, scored the same way; the result
records which one ran. The held-out loss is always computed with transformers (teacher-forced, which
vLLM does not do).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import shutil
import statistics
import tempfile
from pathlib import Path

# Generation, eos_ids and generate (one transformers sample) live in engines.py; named here too, as
# mot_eval.generate is the batch generator that run() hands to the transformers engine.
from mot_trainer import answers, data, engines, storage
from mot_trainer.engines import Generation, eos_ids, generate
from mot_trainer.errors import InvalidInput
from mot_trainer.models import fetch_model

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, local or s3:// (verified if it has a manifest)")
    p.add_argument("--data", required=True, help="JSONL or Parquet with held-out problems and an 'answer' each")
    p.add_argument("--out", required=True, help="result JSON, local path or s3:// URI")
    p.add_argument("--samples", type=int, default=1, help="generations per problem (accuracy is their mean)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--engine", choices=engines.ENGINES, default="auto",
                   help="generation engine: vllm (GPU, trainer-vllm image), transformers, or auto = vllm "
                        "where it imports and a CUDA GPU is visible, else transformers")
    p.add_argument("--tensor-parallel-size", type=int,
                   help="vllm: GPUs to shard the model over (default: the visible GPUs that divide its heads)")


def validate(args) -> None:
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise InvalidInput(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InvalidInput(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInput(f"--threads must be at least 1, got {args.threads}")
    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        raise InvalidInput(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")


def load_problems(uri: str) -> list[data.Record]:
    records = data.read_records(uri, require_response=False)
    for r in records:
        if r.answer is None or not r.answer.strip():
            raise InvalidInput(f"{r.where}: missing field 'answer' (the reference final answer)")
    return records


def heldout_loss(model, tokenizer, records: list[data.Record], max_length: int) -> float | None:
    """Mean per-token loss on the reference responses (None when no record has one)."""
    import torch  # not at import time: the CLI and preflight import this module without torch

    total, count = 0.0, 0
    for r in records:
        if not r.has_response:
            continue
        ex = data.encode_conversation(r.messages, tokenizer)
        ids, labels = ex.input_ids[:max_length], ex.labels[:max_length]
        n = sum(1 for lab in labels[1:] if lab != data.IGNORE)
        if not n:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=model.device),
                        labels=torch.tensor([labels], device=model.device), use_cache=False)
        total += out.loss.item() * n
        count += n
    return total / count if count else None


def score(records: list[data.Record], samples: list[list[Generation]]) -> dict:
    """Accuracy (mean and std over samples), truncation count and per-problem details."""
    per_sample_accuracy = []
    per_problem = [
        {"source": r.where, "reference": r.answer, "predictions": [], "correct": [], "truncated": [],
         "finished": [], "generations": []}
        for r in records
    ]
    truncated = 0
    for generations in samples:
        correct = 0
        for entry, r, g in zip(per_problem, records, generations, strict=True):
            predicted = answers.extract_answer(g.text, explicit_only=not g.finished)
            cut = not g.finished and predicted is None
            ok = answers.is_correct(predicted, r.answer)
            truncated += cut
            correct += ok
            entry["predictions"].append(predicted)
            entry["correct"].append(ok)
            entry["truncated"].append(cut)
            entry["finished"].append(g.finished)
            entry["generations"].append(g.text)
        per_sample_accuracy.append(correct / len(records))
    return {
        "accuracy": statistics.fmean(per_sample_accuracy),
        "accuracy_std": statistics.pstdev(per_sample_accuracy),
        "accuracy_per_sample": per_sample_accuracy,
        "samples": len(samples),
        "problems": len(records),
        "truncated": truncated,
        "per_problem": per_problem,
    }


def run(args) -> dict:
    import torch  # torch and transformers only when eval runs: the CLI and preflight import this module

    validate(args)
    engine_name = engines.choose(args.engine)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = load_problems(args.data)
    workdir = Path(tempfile.mkdtemp(prefix="mot-eval-"))
    try:
        source, manifest = fetch_model(args.model, workdir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"--model {args.model}: not a loadable causal LM ({exc})") from None
        if torch.cuda.is_available():
            model.to("cuda")
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = [data.generation_prompt_ids(r.prompt_messages, tokenizer) for r in records]
        max_length = getattr(model.config, "max_position_embeddings", None) or 4096
        # The held-out loss is teacher-forced, which vLLM does not do: transformers computes it with
        # either engine, first, so that with vLLM the model can leave the GPU before vLLM takes it.
        # (No RNG is drawn: the transformers engine's samples are seeded as before.)
        loss = heldout_loss(model, tokenizer, records, max_length)
        if engine_name == "vllm":
            stop = eos_ids(model, tokenizer)  # the same stop ids as the transformers engine's
            tensor_parallel = engines.tensor_parallel_size(args.tensor_parallel_size, engines.cuda_devices(),
                                                           getattr(model.config, "num_attention_heads", None))
            limit = getattr(model.config, "max_position_embeddings", None)
            needed = max(len(p) for p in prompts) + args.max_new_tokens
            del model  # vLLM loads its own copy from the folder and wants the GPU memory
            gc.collect()
            torch.cuda.empty_cache()
            engine = engines.VLLMEngine(source, tokenizer, stop, tensor_parallel_size=tensor_parallel, seed=args.seed,
                                        max_model_len=min(needed, limit) if limit else needed)
        else:
            # This module's `generate`: `mot_eval.generate` is the one batch generator (tests replace it).
            engine = engines.TransformersEngine(model, tokenizer, batch_size=args.batch_size, batch_generate=generate)
        samples = engine.generate(prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        result = score(records, samples)
        result["heldout_loss"] = loss
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(model=args.model, data=args.data, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, model_created=(manifest or {}).get("created"), engine=engine.name)
    storage.write_json(args.out, result)
    log.info("%s: accuracy %.4f ± %.4f over %d samples of %d problems; %d truncated; held-out loss %s",
             engine.name, result["accuracy"], result["accuracy_std"], result["samples"], result["problems"],
             result["truncated"], "n/a" if loss is None else f"{loss:.4f}")
    return {"accuracy": result["accuracy"], "heldout_loss": _finite(loss), "truncated": result["truncated"],
            "engine": engine.name}


def _finite(x):
    return x if x is None or math.isfinite(x) else None
