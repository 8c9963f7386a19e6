"""Kernel-time breakdown of one training micro-batch of the bench model on a GPU.

    PYTHONPATH=trainer python3 bench/sft/profile_step.py --workdir /tmp/bench-sft [--attn sdpa]

Builds (or reuses) bench_sft.py's model and data, then runs forward+backward of one micro-batch of
packed rows the way `mot-train sft` does (fp32 weights, bf16 autocast): mean time over 5 after 3
warm-ups, MFU by 6 x parameters x tokens/s, peak memory, and torch.profiler's CUDA kernel table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-sft")
    parser.add_argument("--size", choices=sorted(bench_sft.SIZES), default="0.5b")
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mot_trainer import data

    bench_args = bench_sft.parse_args(["--device", "cuda", "--size", args.size, "--records", str(args.records),
                                       "--max-seq-length", str(args.max_seq_length)])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_path = bench_sft.build_inputs(bench_args, work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = data.tokenize_records(data.read_records(data_path), tokenizer, args.max_seq_length)
    rows = data.pack(examples, args.max_seq_length)
    labelled = sum(sum(1 for label in r.labels if label != data.IGNORE) for r in rows)
    total = sum(len(r) for r in rows)
    print(f"{len(rows)} packed rows, {total} tokens, {labelled / total:.0%} carry loss")
    batch = {k: v.cuda() for k, v in data.collate(rows[:args.micro_batch_size], tokenizer.pad_token_id).items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=args.attn).cuda()
    params = sum(p.numel() for p in model.parameters())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    tokens = batch["input_ids"].numel()
    peak = next((v for k, v in bench_sft.PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    mfu = f"{6 * params * tokens / seconds / peak:.3f}" if peak else "unknown peak"
    print(f"{args.attn}: {seconds * 1000:.0f} ms per micro-batch forward+backward, {tokens / seconds:.0f} tokens/s, "
          f"MFU {mfu}, peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
