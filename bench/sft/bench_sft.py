"""Training throughput and peak memory of `mot-train sft` against transformers' Trainer and TRL's SFTTrainer.

`mot-train sft` runs against a plain transformers `Trainer` and, when asked (`--peers trainer,trl`),
TRL's `SFTTrainer`, on the same model, data and settings, side by side in one run (each goes first in
turn, so a busy machine hurts all alike).

All train the same randomly initialised Qwen2-shaped model on the same tokenized examples (the
response-only labels from mot_trainer.data) with the same micro-batch, accumulation, optimizer,
schedule, precision and thread count. Throughput is real (non-padding) tokens per second of the
training loop only (model loading and saving excluded, for all). Peak memory: each process's own peak
RSS (os.wait4 gives the rusage of that one child, not the max over all children so far), and on CUDA
the peak allocated GPU memory from the start of the training loop: torch.cuda.max_memory_allocated()
in the Trainer/TRL workers, the manifest's peak_gpu_memory_bytes (rank 0) for mot-train, "n/a" where
a mot-train without that metric ran.

TRL gets the very rows the others get, as a datasets.Dataset of input_ids + labels with TRL's dataset
preparation skipped (the rows are already tokenized, truncated and filtered): TRL's own tokenization,
chat template and bfd packing would train on other rows (other examples per packed row, another number
of rows), so tokens/s would no longer compare the trainers alone. TRL's gradient checkpointing (on by
default in SFTConfig) is turned off, as it is for the others. TRL's modes:
- padding_free (`--padding-free auto`): on with --packing, where it is the only way TRL keeps packed
  examples apart (the packed rows carry seq_lengths; its collator turns them into restarting
  position_ids and flattens the micro-batch into one row; with padding TRL sends an attention mask and
  the examples of a row would attend to each other), and on CUDA; off otherwise, so that on CPU TRL
  pads each micro-batch to its longest row exactly like the other two. Without flash attention (not
  installed here) transformers runs a flattened row through SDPA with a dense block-diagonal mask over
  the whole micro-batch, which costs more attention work than separate rows, not less.
- use_liger_kernel (`--liger auto`): on CUDA when liger_kernel is importable (TRL then applies Liger's
  RMSNorm/SwiGLU/RoPE kernels; it keeps its own chunked LM-head loss instead of Liger's fused linear
  cross-entropy); never on CPU (Liger is Triton, GPU-only).

    .venv/bin/python bench/sft/bench_sft.py                      # CPU, 1 thread, ~1M-parameter model
    PYTHONPATH=/tmp/trl-site:trainer .venv/bin/python bench/sft/bench_sft.py --peers trainer,trl
    .venv/bin/python bench/sft/bench_sft.py --device cuda --size 0.5b --steps 30 --micro-batch-size 8 \
        --max-seq-length 2048 --packing                           # one GPU: tokens/s and MFU
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (hidden, layers, heads, kv heads, intermediate, config vocab or None = tokenizer's)
SIZES = {
    "1m": (128, 4, 4, 4, 384, None),
    "0.5b": (896, 24, 14, 2, 4864, 151936),  # Qwen2-0.5B's shape
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU
PEERS = {"trainer": "transformers Trainer", "trl": "TRL SFTTrainer"}
MOT = "mot-train sft"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="1m")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each, first place in turn; the median is reported")
    p.add_argument("--peers", default="trainer",
                   help="comma-separated, from: trainer, trl (trl needs trl + datasets importable)")
    p.add_argument("--padding-free", choices=["auto", "on", "off"], default="auto",
                   help="TRL's padding_free; auto: on with --packing or on cuda")
    p.add_argument("--liger", choices=["auto", "on", "off"], default="auto",
                   help="TRL's use_liger_kernel; auto: on cuda when liger_kernel is importable")
    p.add_argument("--workdir", help="keep the model, data and outputs here (default: a temp dir)")
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    if unknown := [name for name in args.peers if name not in PEERS]:
        p.error(f"--peers: unknown {unknown}; choose from {sorted(PEERS)}")
    if args.packing and args.padding_free == "off" and "trl" in args.peers:
        p.error("--packing needs TRL's padding_free (with padding, its packed examples would attend to each other)")
    return args


def trl_modes(args) -> tuple[bool, bool]:
    """(padding_free, use_liger_kernel) for TRL's SFTConfig; see the module docstring."""
    padding_free = args.padding_free == "on" or (args.padding_free == "auto" and (args.packing or args.device == "cuda"))
    liger = args.liger == "on" or (args.liger == "auto" and args.device == "cuda"
                                   and importlib.util.find_spec("liger_kernel") is not None)
    return padding_free, liger


def build_inputs(args, work: Path) -> tuple[Path, Path]:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from mot_trainer.tiny import arithmetic_records, corpus_texts, train_tokenizer

    records = arithmetic_records(args.records, seed=0, style="steps")
    data_path = work / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    model_dir = work / f"model-{args.size}"
    if not (model_dir / "config.json").exists():
        tokenizer = train_tokenizer(corpus_texts(records + arithmetic_records(200, seed=1, style="short")))
        hidden, layers, heads, kv_heads, inter, vocab = SIZES[args.size]
        config = Qwen2Config(
            vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max(2048, args.max_seq_length), tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir, data_path


def common_flags(args) -> list[str]:
    flags = ["--steps", args.steps, "--micro-batch-size", args.micro_batch_size, "--grad-accum", args.grad_accum,
             "--max-seq-length", args.max_seq_length, "--threads", args.threads]
    return [str(f) for f in flags] + (["--packing"] if args.packing else [])


def run_child(args, cmd: list[str]) -> tuple[str, int]:
    """Run one contender's process; its stdout and its own peak RSS in bytes (wait4: this child's rusage)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    with proc.stdout:
        stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout)
    return stdout, usage.ru_maxrss * 1024  # Linux: KiB


def run_mot_train(args, model_dir: Path, data_path: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mot_trainer.cli", "--log-level", "WARNING", "sft", "--init", str(model_dir),
           "--data", str(data_path), "--out", str(out), "--learning-rate", "1e-4", "--log-every", "10",
           *common_flags(args)]
    _, peak_rss = run_child(args, cmd)
    metrics = json.loads((out / "mot-manifest.json").read_text())["metrics"]
    return {"tokens": metrics["tokens_seen"], "seconds": metrics["train_seconds"],
            "cpu_seconds": metrics["train_cpu_seconds"], "final_loss": metrics["final_loss"],
            "peak_rss": peak_rss, "peak_cuda": metrics.get("peak_gpu_memory_bytes", [None])[0]}


def run_peer(peer: str):
    def run(args, model_dir: Path, data_path: Path, out: Path) -> dict:
        cmd = [sys.executable, __file__, "--_worker", json.dumps([peer, str(model_dir), str(data_path), str(out)]),
               "--device", args.device, "--size", args.size, "--padding-free", args.padding_free,
               "--liger", args.liger, *common_flags(args)]
        stdout, peak_rss = run_child(args, cmd)
        return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": peak_rss}
    return run


def worker(args) -> None:
    """A plain transformers Trainer or TRL's SFTTrainer with the same settings `mot-train sft` uses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from mot_trainer import data

    torch.set_num_threads(args.threads)
    peer, model_dir, data_path, out = json.loads(args.worker)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = data.tokenize_records(data.read_records(data_path), tokenizer, args.max_seq_length)
    rows = data.pack(examples, args.max_seq_length) if args.packing else examples
    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=1e-4, lr_scheduler_type="cosine",
        warmup_steps=0.05, adam_beta1=0.9, adam_beta2=0.95, weight_decay=1e-4, max_grad_norm=1.0, seed=0,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, save_strategy="no", report_to="none",
        logging_steps=min(10, args.steps), remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    if peer == "trainer":
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=rows,
                          data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id))
    else:  # trl: imported only here, so that nothing else needs it
        import datasets
        from trl import SFTConfig, SFTTrainer

        padding_free, liger = trl_modes(args)
        columns = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
        if args.packing:  # each packed example's length: TRL's collator restarts the position ids from these
            starts = [[i for i, p in enumerate(r.position_ids) if p == 0] + [len(r)] for r in rows]
            columns["seq_lengths"] = [[b - a for a, b in itertools.pairwise(s)] for s in starts]
        # SFTConfig checkpoints activations by default; newer transformers call it activation_checkpointing.
        renamed = hasattr(TrainingArguments, "activation_checkpointing")
        no_checkpointing = "activation_checkpointing" if renamed else "gradient_checkpointing"
        config = SFTConfig(**settings, **{no_checkpointing: False}, max_length=None, padding_free=padding_free,
                           use_liger_kernel=liger, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict(columns),
                             processing_class=tokenizer)

    # Count the real tokens of the rows each micro-batch is made of, whatever padding the collator adds.
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(batch):
        counted["tokens"] += sum(len(r["input_ids"]) if isinstance(r, dict) else len(r) for r in batch)
        return collate(batch)

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            counted["tokens"] = 0
            if cuda:  # count from here, weights on the GPU, as mot-train's manifest does
                torch.cuda.reset_peak_memory_stats()
            self.start, self.start_cpu = time.monotonic(), time.process_time()

        def on_train_end(self, *a, **k):
            self.seconds = time.monotonic() - self.start
            self.cpu_seconds = time.process_time() - self.start_cpu

    timer = LoopTimer()
    trainer.data_collator = counting_collator
    trainer.add_callback(timer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"tokens": counted["tokens"], "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
                      "final_loss": losses[-1], "peak_cuda": torch.cuda.max_memory_allocated() if cuda else None}))


def mfu(tokens_per_second: float, model_dir: Path) -> tuple[float | None, int]:
    """Model FLOPs utilisation with the usual 6 x parameters x tokens (attention FLOPs left out)."""
    import torch
    from safetensors import safe_open

    params = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    if not torch.cuda.is_available():
        return None, params
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return (6 * params * tokens_per_second / peak if peak else None), params


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_path = build_inputs(args, work)
    contenders = [(MOT, "mot", run_mot_train)] + [(PEERS[p], p, run_peer(p)) for p in args.peers]
    results = {name: [] for name, _, _ in contenders}
    for i in range(args.repeats):
        # Each goes first in turn: the machine's first process pays one-off costs (on a GPU, loading the
        # CUDA kernels: 45.6 s vs 37.4 s for the same mot-train run, measured).
        k = i % len(contenders)
        for name, key, fn in contenders[k:] + contenders[:k]:
            out = work / f"out-{key}-{i}"
            shutil.rmtree(out, ignore_errors=True)  # mot-train would reuse a finished identical output
            r = fn(args, model_dir, data_path, out)
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
            r["tokens_per_cpu_second"] = r["tokens"] / r["cpu_seconds"]
            results[name].append(r)
            print(f"run {i + 1}/{args.repeats} {name:22s} {r['tokens_per_second']:8.0f} tokens/s wall "
                  f"{r['tokens_per_cpu_second']:8.0f} tokens/CPU-s ({r['tokens']} tokens in {r['seconds']:.2f}s, "
                  f"last logged loss {r['final_loss']:.4f}, peak RSS {_mib(r['peak_rss'])}"
                  + (f", peak CUDA {_mib(r['peak_cuda'])}" if args.device == "cuda" else "") + ")", flush=True)

    def median(name, key):
        values = [r[key] for r in results[name] if r[key] is not None]
        return statistics.median(values) if values else None

    print(f"\nmodel {args.size} on {args.device}, {args.threads} thread(s), micro-batch {args.micro_batch_size} x "
          f"accumulation {args.grad_accum}, {args.steps} steps, packing {'on' if args.packing else 'off'}")
    if "trl" in args.peers:
        import trl

        padding_free, liger = trl_modes(args)
        print(f"  TRL {trl.__version__}: padding_free={padding_free}, use_liger_kernel={liger}, SDPA attention, "
              "gradient checkpointing off")
    for name in results:
        print(f"  {name:22s} median {median(name, 'tokens_per_second'):8.0f} tokens/s wall, "
              f"{median(name, 'tokens_per_cpu_second'):8.0f} tokens/CPU-second, peak RSS {_mib(median(name, 'peak_rss'))}"
              + (f", peak CUDA {_mib(median(name, 'peak_cuda'))}" if args.device == "cuda" else ""))
    for peer in args.peers:
        ratios = [a["tokens_per_second"] / b["tokens_per_second"]
                  for a, b in zip(results[MOT], results[PEERS[peer]], strict=True)]
        print(f"  ratio mot-train / {PEERS[peer]}: median {statistics.median(ratios):.2f}x wall "
              f"(runs: {', '.join(f'{r:.2f}' for r in ratios)}), "
              f"{median(MOT, 'tokens_per_cpu_second') / median(PEERS[peer], 'tokens_per_cpu_second'):.2f}x "
              f"per CPU-second, peak RSS {_ratio(median(MOT, 'peak_rss'), median(PEERS[peer], 'peak_rss'))}"
              + (f", peak CUDA {_ratio(median(MOT, 'peak_cuda'), median(PEERS[peer], 'peak_cuda'))}"
                 if args.device == "cuda" else ""))
    utilisation, params = mfu(median(MOT, "tokens_per_second"), model_dir)
    print(f"  parameters {params / 1e6:.1f}M" + (f", MFU {utilisation:.1%} (6·N·tokens/s over bf16 peak)"
                                                 if utilisation is not None else ""))


if __name__ == "__main__":
    main()
