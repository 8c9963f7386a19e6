"""Peak memory and time of one causal-LM loss forward+backward: transformers' way (whole logits,
then cross-entropy) vs mot_trainer.loss (lm_head + cross-entropy chunk by chunk). CPU, fp32.

    python bench/loss/bench_loss.py [--tokens 8192] [--vocab 151936] [--hidden 1024] [--chunk 1024]

Each measurement runs in a fresh process; peak memory is that process's max RSS minus its RSS
before the loss (inputs already allocated).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(mode: str, tokens: int, vocab: int, hidden: int, chunk: int, threads: int) -> dict:
    import torch

    from mot_trainer import loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.1).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "full":
        value = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum") / tokens
    else:
        value = loss.linear_cross_entropy(h, w, y, chunk=chunk, scale=1.0 / tokens)
    value.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "loss": value.item(), "seconds": seconds, "peak_extra_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2/3
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.vocab, args.hidden, args.chunk, args.threads)))
        return
    results = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, *sys.argv[1:]], capture_output=True,
                             text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"tokens {args.tokens} x vocab {args.vocab} (fp32 logits {logits_mib:.0f} MiB), hidden {args.hidden}, "
          f"chunk {args.chunk}, {args.threads} threads")
    for r in (full, chunked):
        print(f"  {r['mode']:8s} loss {r['loss']:.6f}  {r['seconds']:.2f} s  peak extra {r['peak_extra_mib']:.0f} MiB")
    print(f"  chunked/full: time {chunked['seconds'] / full['seconds']:.2f}x, "
          f"peak extra memory {chunked['peak_extra_mib'] / full['peak_extra_mib']:.2f}x")


if __name__ == "__main__":
    main()
