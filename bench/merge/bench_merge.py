"""Benchmark `mot-train merge` against mergekit `linear` and against raw I/O on the same files.

    .venv/bin/python bench/merge/bench_merge.py --mergekit /tmp/mk/bin/mergekit-yaml --workdir /tmp/mot-bench

Builds K synthetic Llama-shaped bf16 checkpoints (sharded safetensors, config, manifest), then runs,
each as a child process under /usr/bin/time (wall time, peak RSS, CPU time):
  raw       read every input byte with plain 64 MiB reads and write one output of one input's size
  rawfloor  the same bytes with 1 MiB reads (they stay in cache) into a preallocated output: the
            fastest plain I/O found on the development VM, i.e. the floor for any merge
  mot       mot-train merge --inputs ... (uniform average, fp32 accumulation, bf16 output)
  mergekit  mergekit-yaml with merge_method linear, dtype float32, out_dtype bfloat16
  import    python -c "import torch": the fixed cost in every merge process (mot and mergekit alike)
For mot, merge_s is the merge's own wall time from its log (process start and `import torch` excluded).
and compares the mot and mergekit outputs tensor by tensor (bit-identical expected).
--repeat N runs the whole sequence N times and reports medians (wall times on a small VM vary by 2x
from run to run, mostly in how fast the kernel takes written pages).
By default the inputs are in the page cache (warm); --cold evicts them (posix_fadvise DONTNEED)
before each run; --drop-caches (root) drops the whole page cache before each run, so the process
also reads Python, torch's libraries and everything else it loads from disk, as on a fresh node. Not part of the test suite: it needs ~4 x size + 3 x size of disk and minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_checkpoint(folder: Path, cfg: dict, seed: int, shard_bytes: int) -> int:
    """Random bf16 weights in shards of about shard_bytes, with an index, config and manifest."""
    import torch
    from safetensors.torch import save_file

    from mot_trainer.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for n, names in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    write_manifest(folder, kind="sft", inputs={}, params={"seed": seed}, metrics={})
    return total


def raw_io(inputs: list[str], out: str, chunk: int = 64 << 20, preallocate: bool = False) -> None:
    """Plain I/O: read every input file, write the first input's weight bytes once."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, folder in enumerate(inputs):
        for path in sorted(Path(folder).glob("*.safetensors")):
            dest = open(out_dir / path.name, "wb") if k == 0 else None
            if dest and preallocate:
                os.posix_fallocate(dest.fileno(), 0, path.stat().st_size)
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    if dest:
                        dest.write(view[:n])
            if dest:
                dest.close()


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    os.sync()
    for folder in paths:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def drop_page_cache() -> None:
    """Drop every clean page (root): the program's own files are read from disk again too."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for folder in paths:
        for path in sorted(folder.rglob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def measure(cmd: list[str], env: dict, log: Path) -> dict:
    """Run a child under /usr/bin/time: wall seconds, its peak RSS, CPU seconds. (Not wait4 from this
    process: a forked child's max RSS starts at this process's own.)"""
    stats = log.with_suffix(".time")
    timed = ["/usr/bin/time", "-o", str(stats), "-f", "%e %M %U %S", *cmd]
    with open(log, "w") as out:
        code = subprocess.call(timed, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{cmd[0]} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    wall, rss_kb, user, system = stats.read_text().split()[-4:]
    return {"wall_s": float(wall), "peak_rss_gb": round(int(rss_kb) * 1024 / 1e9, 3),
            "cpu_s": round(float(user) + float(system), 1)}


def merge_seconds(log: Path) -> float:
    """The wall time `mot-train merge` logs for the merge itself ("... into OUT in 3.2s")."""
    found = re.findall(r"merged \d+ inputs, .* in ([0-9.]+)s", log.read_text())
    if not found:
        raise SystemExit(f"no merge time in {log}")
    return float(found[-1])


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor byte comparison of two merged folders."""
    import torch

    from mot_trainer.merge.reader import Checkpoint, ReadBuffer

    left, right = Checkpoint(a), Checkpoint(b)
    same = differ = 0
    buf_a, buf_b = ReadBuffer(), ReadBuffer()
    for name in set(left.tensors) & set(right.tensors):
        x = left.read_into(left.tensors[name], buf_a)
        y = right.read_into(right.tensors[name], buf_b)
        if x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            same += 1
        else:
            differ += 1
    only_one = len(set(left.tensors) ^ set(right.tensors))
    return {"bit_identical_tensors": same, "differing_tensors": differ, "tensors_in_only_one": only_one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path of mergekit-yaml (in its own venv)")
    parser.add_argument("--workdir", default="/tmp/mot-bench-merge")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=15, help="15 layers of TinyLlama width: 1.58 GB bf16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--input-shard", type=int, default=500_000_000)
    parser.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the whole page cache before each run (root; inputs and libraries cold)")
    parser.add_argument("--runs", default="raw,mot,mergekit")
    parser.add_argument("--repeat", type=int, default=1, help="run the sequence N times; report medians")
    parser.add_argument("--keep", action="store_true", help="keep the inputs for another run")
    parser.add_argument("--raw-io", nargs="+", help=argparse.SUPPRESS)  # child mode: inputs..., out last
    parser.add_argument("--raw-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_io:
        if args.raw_floor:
            raw_io(args.raw_io[:-1], args.raw_io[-1], chunk=1 << 20, preallocate=True)
        else:
            raw_io(args.raw_io[:-1], args.raw_io[-1])
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
    inputs = [work / f"input-{k}" for k in range(args.k)]
    sizes = []
    for k, folder in enumerate(inputs):
        if (folder / "mot-manifest.json").exists():
            sizes.append(sum(p.stat().st_size for p in folder.glob("*.safetensors")))
            continue
        t = time.perf_counter()
        sizes.append(make_checkpoint(folder, cfg, seed=k, shard_bytes=args.input_shard))
        print(f"built {folder} ({sizes[-1] / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s", flush=True)
    env = dict(os.environ)
    cache = "dropped" if args.drop_caches else "cold" if args.cold else "warm"
    results = {"k": args.k, "input_gb": round(sizes[0] / 1e9, 3), "cache": cache,
               "cpus": os.cpu_count()}
    mk_config = work / "mergekit.yml"
    mk_config.write_text(
        "merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
        + "".join(f"  - model: {p}\n    parameters:\n      weight: 1.0\n" for p in inputs)
    )
    commands = {
        "raw": [sys.executable, __file__, "--mergekit", "-", "--raw-io", *map(str, inputs), str(work / "out-raw")],
        "rawfloor": [sys.executable, __file__, "--mergekit", "-", "--raw-floor", "--raw-io", *map(str, inputs),
                     str(work / "out-rawfloor")],
        "mot": [sys.executable, "-m", "mot_trainer.cli", "merge", "--inputs", *map(str, inputs), "--out", str(work / "out-mot")],
        "mergekit": [args.mergekit, str(mk_config), str(work / "out-mergekit"), "--no-copy-tokenizer"],
        "import": [sys.executable, "-c", "import torch"],
    }
    names = args.runs.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            os.sync()
            if args.drop_caches:
                drop_page_cache()
            elif args.cold:
                evict(inputs)
            else:
                warm(inputs)
            runs[name].append(measure(commands[name], env, work / f"{name}.log"))
            if name == "mot":
                runs[name][-1]["merge_s"] = merge_seconds(work / f"{name}.log")
            os.sync()
            print(name, runs[name][-1], "load average", os.getloadavg(), flush=True)
    if (work / "out-mot").exists() and (work / "out-mergekit").exists():
        results["mot_vs_mergekit"] = compare_outputs(work / "out-mot", work / "out-mergekit")
    results["runs"] = runs
    median = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    results["median"] = median
    for name, other in [("mot", "mergekit"), ("mot", "raw"), ("mot", "rawfloor")]:
        if name in median and other in median:
            results[f"ratio_wall_{name}_over_{other}"] = round(median[name]["wall_s"] / median[other]["wall_s"], 3)
    for other in ("raw", "rawfloor"):
        if "mot" in median and other in median:
            results[f"ratio_merge_s_mot_over_{other}"] = round(median["mot"]["merge_s"] / median[other]["wall_s"], 3)
    if "mot" in median and "mergekit" in median:
        results["ratio_rss_mot_over_mergekit"] = round(median["mot"]["peak_rss_gb"] / median["mergekit"]["peak_rss_gb"], 3)
    print(json.dumps(results, indent=2))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    for name in set(args.runs.split(",")):
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    if not args.keep:
        for folder in inputs:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
