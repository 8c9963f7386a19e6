"""`mot estimate` against the memory `mot-train sft` really takes, for random-weight Qwen2.5-shaped models.

For every --gradient-checkpointing x --size x --max-seq-length x --rows: write a random-weight
model folder (config.json + bf16 safetensors + the tiny arithmetic tokenizer) and arithmetic
chain-of-thought records (mot_trainer.tiny) whose rows fill --max-seq-length, as --rows says:

- long: each record is one long chain of thought (many problems' steps in one response), cut at
  --max-seq-length: every row is one whole-length sequence, trained without --packing;
- packed: short records packed (--packing) into rows within one record of --max-seq-length; the
  position ids restart per record, so transformers builds a block-diagonal S x S attention mask;

then

- estimate: mot_operator.estimate.estimate() in-process, for exactly the settings the trainer gets
  (one process, micro-batch, max-seq-length, checkpointing, precision, default loss chunk);
- measured: `mot-train sft` (mot_trainer.cli.main, in a child process) for --steps steps of
  --grad-accum micro-batches. 2 by default: from a step's second micro-batch on, the first one's
  gradients are held through a whole forward and backward, as in a real run (accumulation 16), and
  that is what the estimate's sum of terms describes; with 1, no gradient exists before the backward
  makes it and the estimate overcounts.
  On CUDA: metrics.peak_gpu_memory_bytes of its manifest (torch.cuda's peak allocated bytes over the
  training, the weights already on the device) against the estimate's total (the margin, for the
  CUDA context and fragmentation, left out of both; metrics.peak_gpu_reserved_bytes is kept too).
  On CPU: the child's peak resident memory during train() above what it held before it, plus the
  fp32 weights it already held then (the peak is reset at train()'s start through
  /proc/self/clear_refs), against the estimate's total for fp32; glibc's MALLOC_MMAP_THRESHOLD_ is
  fixed at 64 KiB there so that freed tensors leave the resident set.
  Both: metrics.sharded_state_bytes (weights + AdamW states, measured after step 1) against the
  estimate's weights + optimizer terms, which must agree exactly.

Prints a table and writes the results as JSON (--out), rewritten after every run so a run cut short
by a time limit still leaves the finished rows.

    .venv/bin/python bench/estimate/bench_estimate.py --size tiny --max-seq-length 1024,4096 \
        --rows long,packed --gradient-checkpointing off,on --out /tmp/estimate-cpu.json
    PYTHONPATH=trainer:operator python3 bench/estimate/bench_estimate.py --device cuda --size 0.5b,1.5b \
        --max-seq-length 4096,16384 --rows long,packed --gradient-checkpointing off,on \
        --budget-seconds 420 --workdir /tmp/be --out $OUT/estimate.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "sft"))
from bench_sft import SIZES as SFT_SIZES  # noqa: E402  (hidden, layers, heads, kv heads, intermediate, vocab)

GIB = 1024 ** 3
SIZES = {
    "tiny": SFT_SIZES["1m"],  # hidden 128, 4 layers, the tokenizer's ~500 tokens: seconds on CPU
    "0.5b": SFT_SIZES["0.5b"],  # Qwen2.5-0.5B (= Qwen2-0.5B's shape): 494 M parameters, tied
    "1.5b": (1536, 28, 12, 2, 8960, 151936),  # Qwen2.5-1.5B: 1.54 B parameters, tied
}


def csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=csv(str), default=["tiny"], help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--max-seq-length", type=csv(int), default=[1024, 4096], help="comma-separated")
    p.add_argument("--gradient-checkpointing", type=csv(str), default=["off"], help="off, on or off,on")
    p.add_argument("--rows", type=csv(str), default=["long"], help="long, packed or long,packed (see above)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (see above)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on cuda, fp32 on cpu (the trainer's auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer on cpu")
    p.add_argument("--budget-seconds", type=float, default=0,
                   help="start no run that the time so far and the last run's time would take past this")
    p.add_argument("--workdir", help="models, data and outputs (default: a temp dir)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for size in args.size:
        if size not in SIZES:
            p.error(f"--size {size}: not one of {', '.join(SIZES)}")
    for mode in args.gradient_checkpointing:
        if mode not in ("off", "on"):
            p.error(f"--gradient-checkpointing {mode}: use off, on or off,on")
    for rows in args.rows:
        if rows not in ("long", "packed"):
            p.error(f"--rows {rows}: use long, packed or long,packed")
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return args


# --- inputs ---------------------------------------------------------------------------------------


def tokenizer_for(work: Path):
    """The tiny arithmetic BPE tokenizer every size shares (bench_sft's), trained once."""
    from transformers import AutoTokenizer

    from mot_trainer.tiny import arithmetic_records, corpus_texts, train_tokenizer

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        records = arithmetic_records(256, seed=0, style="steps") + arithmetic_records(200, seed=1, style="short")
        train_tokenizer(corpus_texts(records)).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_model(size: str, work: Path, device: str, max_positions: int) -> Path:
    """A random-weight Qwen2 model folder of `size`, bf16 safetensors (initialised on the GPU if any)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = work / f"model-{size}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = tokenizer_for(work)
    hidden, layers, heads, kv_heads, inter, vocab = SIZES[size]
    config = Qwen2Config(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max(32768, max_positions), rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the trainer's process
    return folder


def write_data(work: Path, tokenizer, max_seq_length: int, rows: int, kind: str) -> Path:
    """Arithmetic CoT records for `rows` rows of max_seq_length tokens and one more. packed: short
    records, enough for that many packed rows (the last, the only one not full, is then never the only
    one trained on); long: rows + 1 records, each one response of many problems' steps, longer than
    max_seq_length (the trainer cuts it there)."""
    from mot_trainer import data
    from mot_trainer.tiny import arithmetic_records

    path = work / f"data-{kind}-{max_seq_length}-{rows}.jsonl"
    if path.exists():
        return path
    sample = arithmetic_records(64, seed=0, style="steps")
    examples, _ = data.tokenize_records(data.read_records(_jsonl(work / "sample.jsonl", sample)), tokenizer,
                                        max_seq_length)
    per_record = sum(len(e) for e in examples) / len(examples)
    # Joined into long responses, the records lose their chat-template tokens: 1.6x is ample.
    count = math.ceil((rows + 1) * max_seq_length / per_record * (1.6 if kind == "long" else 1.1)) + 8
    records = arithmetic_records(count, seed=0, style="steps")
    if kind == "long":
        per_row = math.ceil(len(records) / (rows + 1))
        records = [{"prompt": "Add each pair, one after the other.",
                    "response": " ".join(r["response"] for r in records[i:i + per_row])}
                   for i in range(0, len(records), per_row)]
    _jsonl(path, records)
    return path


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- the measurement ------------------------------------------------------------------------------


def trainer_flags(args, seq: int, checkpointing: bool, packing: bool) -> list[str]:
    flags = ["--steps", args.steps, "--micro-batch-size", args.micro_batch_size, "--grad-accum", args.grad_accum,
             "--max-seq-length", seq, "--precision", args.precision, "--log-every", 1]
    if packing:
        flags.append("--packing")
    if args.device == "cpu":
        flags += ["--threads", args.threads]
    if checkpointing:
        flags.append("--gradient-checkpointing")
    return [str(f) for f in flags]


def measure(args, model_dir: Path, data_path: Path, out: Path, seq: int, checkpointing: bool, packing: bool,
            timeout: float | None) -> dict:
    """One `mot-train sft` in a child process (this script's worker): its manifest's metrics and
    the worker's host-memory and row figures."""
    probe = out.with_suffix(".probe.json")
    argv = ["sft", "--init", str(model_dir), "--data", str(data_path), "--out", str(out),
            *trainer_flags(args, seq, checkpointing, packing)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.threads))
        # glibc returns every freed block of 64 KiB or more to the system at once (its default moves
        # this threshold up to 32 MiB as blocks are freed, keeping freed tensors resident), so the
        # resident memory follows the live tensors: 1.5-2.8x the estimate without it, tiny, 4k tokens.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE), "--_worker", json.dumps([str(probe), argv])], env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "seconds": seconds}
    metrics = json.loads((out / "mot-manifest.json").read_text())["metrics"]
    return {"metrics": metrics, "probe": json.loads(probe.read_text()), "seconds": seconds}


def worker(spec: str) -> int:
    """The child: mot-train's own main() with train() wrapped to see its rows and its host peak."""
    from mot_trainer import cli, sft

    probe_path, argv = json.loads(spec)
    real_train = sft.train
    probe: dict = {}

    def train(args, accelerator, model, tokenizer, rows, *rest, **kw):
        lengths = [len(r) for r in rows]
        probe.update(rows=len(lengths), row_tokens_max=max(lengths), row_tokens_min=min(lengths))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        probe["host_weight_bytes"] = weight_bytes
        reset = _reset_host_peak()
        rss_start = _status_kib("VmRSS") * 1024
        metrics, model = real_train(args, accelerator, model, tokenizer, rows, *rest, **kw)
        if reset:  # the peak during train(), less what was held before it but the weights
            probe["host_peak_bytes"] = _status_kib("VmHWM") * 1024 - rss_start + weight_bytes
        return metrics, model

    sft.train = train
    code = cli.main(argv)
    Path(probe_path).write_text(json.dumps(probe))
    return code


def _reset_host_peak() -> bool:
    try:  # Linux: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


# --- the comparison -------------------------------------------------------------------------------


def compare(args, size: str, seq: int, rows: str, checkpointing: bool, config: dict, result: dict) -> dict:
    from mot_operator.estimate import estimate

    est = estimate(config, gpus=1, micro_batch_size=args.micro_batch_size, max_seq_length=seq,
                   gradient_checkpointing=checkpointing, precision=args.precision, packing=rows == "packed")
    row = {"size": size, "device": args.device, "max_seq_length": seq, "rows_kind": rows,
           "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
           "gradient_checkpointing": checkpointing, "precision": est.precision, "parameters": est.parameters,
           "estimate_bytes": est.total, "estimate_margin_bytes": est.margin,
           "estimate_terms": {t.name: t.bytes for t in est.terms}, "estimate_state_bytes": est.state_bytes,
           "seconds": round(result["seconds"], 1)}
    if "error" in result:
        return {**row, "error": result["error"]}
    metrics, probe = result["metrics"], result["probe"]
    row.update(rows=probe["rows"], row_tokens_max=probe["row_tokens_max"], row_tokens_min=probe["row_tokens_min"],
               measured_state_bytes=metrics["sharded_state_bytes"], tokens_per_second=metrics["tokens_per_second"])
    if args.device == "cuda":
        row.update(measured_what="peak_gpu_memory_bytes (torch.cuda max allocated)",
                   measured_bytes=metrics["peak_gpu_memory_bytes"][0],
                   measured_reserved_bytes=metrics["peak_gpu_reserved_bytes"][0])
    else:
        row.update(measured_what="host peak RSS during train() above what it held before, plus the weights",
                   measured_bytes=probe.get("host_peak_bytes"))
    if row["measured_bytes"]:
        row["measured_over_estimate"] = round(row["measured_bytes"] / est.total, 3)
    return row


def machine() -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict]) -> None:
    print("\n| size | seq len | rows | checkpointing | estimate (GiB) | measured (GiB) | measured/estimate | "
          "weights+optimizer: estimate = measured |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['size']} | {r['max_seq_length']} | {r['rows_kind']} | "
                f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['estimate_bytes'] / GIB:.3f} |")
        if "error" in r:
            print(f"{head} failed | | |")
            continue
        measured = f"{r['measured_bytes'] / GIB:.3f}" if r.get("measured_bytes") else "n/a"
        same = "yes" if r["estimate_state_bytes"] == r["measured_state_bytes"] else "NO"
        print(f"{head} {measured} | {r.get('measured_over_estimate', 'n/a')} | {same} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    began = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-estimate-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"command": sys.argv, "machine": machine(), "steps": args.steps, "runs": []}
    tokenizer = tokenizer_for(work)
    last = 0.0
    # Checkpointing outermost: with a --budget-seconds, every size and length runs without it first.
    for mode, size, seq, rows in itertools.product(args.gradient_checkpointing, args.size, args.max_seq_length,
                                                   args.rows):
        model_dir = build_model(size, work, args.device, max(args.max_seq_length))
        config = json.loads((model_dir / "config.json").read_text())
        data_path = write_data(work, tokenizer, seq, args.steps * args.micro_batch_size * args.grad_accum, rows)
        checkpointing, name = mode == "on", f"{size} seq {seq} rows {rows} checkpointing {mode}"
        elapsed = time.monotonic() - began
        left = args.budget_seconds - elapsed if args.budget_seconds else None
        if left is not None and left < last:
            print(f"skipped {name}: {left:.0f} s of the budget left, the last run took {last:.0f} s", flush=True)
            report["runs"].append({"size": size, "max_seq_length": seq, "rows_kind": rows,
                                   "gradient_checkpointing": checkpointing, "skipped": "time budget"})
            continue
        out = work / f"out-{size}-{seq}-{rows}-{mode}"
        shutil.rmtree(out, ignore_errors=True)  # mot-train would reuse a finished identical output
        try:
            result = measure(args, model_dir, data_path, out, seq, checkpointing, rows == "packed", left)
        except subprocess.TimeoutExpired:
            result = {"error": "the time budget ran out", "seconds": left or 0}
        last = result["seconds"]
        row = compare(args, size, seq, rows, checkpointing, config, result)
        report["runs"].append(row)
        print(f"{name}: estimate {row['estimate_bytes'] / GIB:.3f} GiB, "
              + (f"failed: {row['error'][-500:]}" if "error" in row else
                 f"measured {(row['measured_bytes'] or 0) / GIB:.3f} GiB ({row.get('measured_over_estimate')}x), "
                 f"{row['rows']} rows of {row['row_tokens_min']}-{row['row_tokens_max']} tokens, "
                 f"{row['seconds']} s"), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    print_table([r for r in report["runs"] if "skipped" not in r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
