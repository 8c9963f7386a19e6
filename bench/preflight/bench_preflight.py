"""Time `mot-train preflight`, the check `mot run` and the operator run before round 1.

    nice .venv/bin/python bench/preflight/bench_preflight.py --workdir /tmp/bench-preflight --repeats 3

Two inputs, built once in --workdir:
  demo   the data `mot demo` writes for a seed (its full configuration: 3 teachers x 200 3-digit
         additions, 100 held-out problems, maxSeqLength 256) with the demo's student before
         pre-training (the same tokenizer as the pre-trained one);
  long   N examples (default 200) of ~16k tokens each (--tokens, measured with the student's
         tokenizer), the tiny test student of mot_trainer/tiny.py; every teacher gets its own copy of
         the file. maxSeqLength 16384.
Each case (demo with its 3 teachers; long with 1 and 2 teachers) is timed --repeats times, median
reported, two ways, each in a fresh process so nothing is cached between repeats:
  cli        `python -m mot_trainer.cli preflight ...` as `mot run` starts it (--eval and a local
             --storage for demo, --out), wall time of the whole process;
  function   in a worker process: the imports, then `preflight()` itself (what the CLI spends after
             start-up), then its parts one by one on the same inputs: the student check (config and
             tokenizer load), reading and parsing each teacher's file, and encoding every record as
             sft does (data.encode_conversation), split into rendering the chat template and finding
             the response span (_assistant_spans), the tokenizer call, and the per-token label loop
             (the rest).
The parts are timed sequentially on one thread; preflight() checks teachers on
min(teachers, 4, CPUs) threads. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# --- inputs ------------------------------------------------------------------------------------


def build_demo(work: Path) -> dict:
    from mot_operator.demo import tasks
    from mot_operator.demo.cli import FULL
    from mot_operator.demo.student import build_initial

    student = build_initial(FULL.student, work / "demo-student")
    files = tasks.build_task(work / "demo-data", seed=0, teachers=FULL.teachers, per_teacher=FULL.per_teacher,
                             eval_size=FULL.eval_size, digits=FULL.digits)
    return {"student": str(student), "teachers": [[t.name, str(files[t.name])] for t in FULL.teachers],
            "eval": str(files["eval"]), "max_seq_length": 256}


def long_records(tokenizer, n: int, tokens: int, seed: int = 0) -> list[dict]:
    """n addition problems whose chain of thought checks the sum again and again until the example,
    rendered with the chat template, is `tokens` +-3% long."""
    from mot_trainer import data
    from mot_trainer.tiny import arithmetic_records

    rng = random.Random(seed)
    rows = []
    for base in arithmetic_records(n, seed=seed, style="steps"):
        steps = arithmetic_records(6, seed=rng.randrange(1 << 30), style="steps")
        chunk = " Check: " + " ".join(r["response"].replace("\\boxed", "") for r in steps)
        target = int(tokens * rng.uniform(0.97, 1.03))
        row = dict(base)

        def length(repeats: int, row=row, base=base, chunk=chunk) -> int:
            row["response"] = chunk * repeats + " " + base["response"]
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            return len(data.encode_conversation(messages, tokenizer))

        per_chunk = max(1, length(1) - length(0))
        repeats = max(0, round((target - length(0)) / per_chunk))
        length(repeats)
        rows.append(row)
    return rows


def build_long(work: Path, n: int, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from mot_trainer.tiny import arithmetic_records, build_tiny_model, corpus_texts

    student = work / "tiny-student"
    if not (student / "config.json").exists():
        corpus = arithmetic_records(300, seed=100, style="steps") + arithmetic_records(300, seed=101, style="short")
        build_tiny_model(student, corpus_texts(corpus), seed=0)
    path = work / f"long-{n}x{tokens}.jsonl"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(student)
        tokenizer.model_max_length = 1 << 62
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in long_records(tokenizer, n, tokens)))
        tmp.replace(path)
    return {"student": str(student), "file": str(path), "max_seq_length": 16384}


def cases(work: Path, n: int, tokens: int) -> dict[str, dict]:
    demo, long = build_demo(work), build_long(work, n, tokens)
    out = {"demo (3 teachers x 200, eval 100)": {**demo, "storage": str(work / "storage")}}
    for k in (1, 2):
        out[f"long {n} x ~{tokens // 1000}k tokens, {k} teacher{'s' if k > 1 else ''}"] = {
            "student": long["student"], "teachers": [[f"t{i}", long["file"]] for i in range(k)],
            "eval": None, "storage": None, "max_seq_length": long["max_seq_length"]}
    return out


# --- timing ------------------------------------------------------------------------------------


def cli_seconds(case: dict, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `mot-train preflight` process."""
    cmd = [sys.executable, "-m", "mot_trainer.cli", "preflight", "--student", case["student"],
           "--teachers", *(f"{name}={uri}" for name, uri in case["teachers"]),
           "--max-seq-length", str(case["max_seq_length"]), "--max-truncated-fraction", "1", "--out", str(out)]
    if case["eval"]:
        cmd += ["--eval", case["eval"]]
    if case["storage"]:
        cmd += ["--storage", case["storage"]]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MOT_TERMINATION_LOG=os.devnull)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit code {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def function_parts(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(case)], check=True, text=True,
                          stdout=subprocess.PIPE, env=dict(os.environ, TOKENIZERS_PARALLELISM="false",
                                                           OMP_NUM_THREADS="1"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(case: dict) -> None:
    started, cpu = time.monotonic(), time.process_time()
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - preflight imports them lazily: count them here

    from mot_trainer import data, preflight

    out = {"import_s": time.monotonic() - started}
    parts = {"student_s": 0.0, "teachers_s": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[key] = max(parts[key], time.monotonic() - t0)  # teachers overlap on threads: the longest
        return wrapper

    check_student = preflight.check_student
    preflight.check_student = timed(check_student, "student_s")
    preflight.check_teacher = timed(preflight.check_teacher, "teachers_s")
    teachers = [tuple(t) for t in case["teachers"]]
    t0 = time.monotonic()
    report = preflight.preflight(case["student"], teachers, max_seq_length=case["max_seq_length"],
                                 max_truncated_fraction=1.0, eval_data=case["eval"], storage_uri=case["storage"])
    out["preflight_s"] = time.monotonic() - t0
    out["cpu_s"] = time.process_time() - cpu
    out.update(parts, records=sum(t.records for t in report.teachers), p50=report.teachers[0].p50,
               max=max(t.max for t in report.teachers))

    # Where a teacher's time goes, one teacher on one thread (warm: imports and tokenizer loaded).
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = check_student(case["student"], Path(tmp))
    uri = teachers[0][1]
    t0 = time.monotonic()
    records = data.read_records(uri)
    read = time.monotonic() - t0
    render = tok = encode = 0.0
    for record in records:
        t0 = time.monotonic()
        text, _ = data._assistant_spans(record.messages, tokenizer)
        t1 = time.monotonic()
        tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        t2 = time.monotonic()
        data.encode_conversation(record.messages, tokenizer)
        t3 = time.monotonic()
        render, tok, encode = render + t1 - t0, tok + t2 - t1, encode + t3 - t2
    out.update(read_s=read, render_s=render, tokenizer_s=tok, labels_s=max(0.0, encode - render - tok),
               encode_s=encode)
    print(json.dumps(out))


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="inputs (kept for the next run); default a temp dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--tokens", type=int, default=16000, help="tokens per long example")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-preflight-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    all_cases = cases(work, args.examples, args.tokens)
    results = {}
    for name, case in all_cases.items():
        runs = []
        for i in range(args.repeats):
            wall, cpu = cli_seconds(case, work / "preflight.json")
            run = {"cli_s": wall, "cli_cpu_s": cpu, **function_parts(case)}
            runs.append(run)
            print(f"{name} run {i + 1}/{args.repeats}: process {run['cli_s']:.2f}s ({run['cli_cpu_s']:.2f} CPU-s); "
                  f"worker: imports {run['import_s']:.2f}s, preflight() {run['preflight_s']:.2f}s (student "
                  f"{run['student_s']:.2f}s, slowest teacher {run['teachers_s']:.2f}s); one teacher alone: read "
                  f"{run['read_s']:.2f}s, encode {run['encode_s']:.2f}s = template+span {run['render_s']:.2f}s + "
                  f"tokenizer {run['tokenizer_s']:.2f}s + labels {run['labels_s']:.2f}s; {run['records']} records, "
                  f"p50 {run['p50']} max {run['max']} tokens", flush=True)
        results[name] = runs
    keys = ("cli_s", "cli_cpu_s", "import_s", "preflight_s", "student_s", "teachers_s", "read_s", "encode_s",
            "render_s", "tokenizer_s", "labels_s")
    print(f"\nmedians (seconds) of {args.repeats} runs; load average {os.getloadavg()[0]:.1f}")
    print("| case | `mot-train preflight` process: wall (CPU) | imports | `preflight()` | student load | "
          "slowest teacher | one teacher: read / encode (template+span, tokenizer, labels) |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"| {name} | **{m['cli_s']:.2f}** ({m['cli_cpu_s']:.2f}) | {m['import_s']:.2f} | {m['preflight_s']:.2f} | "
              f"{m['student_s']:.2f} | {m['teachers_s']:.2f} | {m['read_s']:.2f} / {m['encode_s']:.2f} "
              f"({m['render_s']:.2f}, {m['tokenizer_s']:.2f}, {m['labels_s']:.2f}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
