"""The demo's students: tiny Qwen2-shaped models built from a config (no download), pre-trained with
`mot-train sft` on short additions, and shipped in the repository (students/<name>/).

Pre-training at this scale is chaotic: the same config gave a student scoring 2 % on one CPU and
94 % on another (torch picks different kernels per CPU, and small differences grow). So the demo and
the study do not pre-train; they use the shipped students, identical on every machine.
`mot demo --build-students` rebuilds them (pre-training each config below) and measures each on a
fixed probe set (students/students.json); on another CPU it may build different students.

`pretrain` caches by a key covering everything that shapes the student (sizes, data, steps), so
changing any of them builds a new one instead of silently reusing a stale model. Each step
publishes its folder only when complete (a temp folder renamed into place, or the trainer's
manifest written last).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mot_operator.demo import tasks
from mot_trainer import storage

GENERATOR_VERSION = 3  # bump when tasks.py changes what it writes


@dataclass(frozen=True)
class StudentConfig:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 512
    pretrain_examples: int = 4000
    pretrain_digits: tuple[int, ...] = (1, 2, 3)
    steps: int = 600
    learning_rate: float = 3e-3
    batch_size: int = 16  # one micro-batch per step: the same update as accumulating 16, 1.6x faster on CPU
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


STUDENTS_DIR = Path(__file__).with_name("students")
# Strength on the demo's target (3-digit additions), as measured on the probe set when built.
STUDENTS = {
    # One recipe, stopped earlier or later (lr 1e-3 cosine over the steps); 3-digit skill appears
    # abruptly between 450 and 600 steps (probe: 300 -> 0 %, 450 -> 0.5 %, 525 -> 20.5 %, 600 -> 89 %).
    "weak": StudentConfig(steps=300, learning_rate=1e-3),
    "partial": StudentConfig(steps=525, learning_rate=1e-3),
    "strong": StudentConfig(steps=600, learning_rate=1e-3),
    # --quick's pipeline check: a barely trained small student.
    "quick": StudentConfig(hidden_size=64, layers=2, pretrain_examples=600, steps=40),
}
PROBE_SEED, PROBE_SIZE = 123, 200  # the probe set: 200 held-out 3-digit problems, fixed


def shipped_student(name: str) -> Path:
    """The shipped student `name` (a Hugging Face folder with its mot-manifest)."""
    folder = STUDENTS_DIR / name
    if storage.read_checkpoint_manifest(str(folder)) is None:
        raise FileNotFoundError(f"the demo student {name!r} is missing or incomplete at {folder}; "
                                "rebuild it with `mot demo --build-students`")
    return folder


def build_students(names: list[str], out_dir: Path, cache: Path, threads: int, log=print) -> dict:
    """Pre-train each named student, publish it into out_dir/<name>, measure it on the probe set
    and record how it was built in out_dir/students.json; returns that record."""
    record_path = out_dir / "students.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    probe = tasks.build_task(cache / "probe", seed=PROBE_SEED, teachers=(), eval_size=PROBE_SIZE, digits=3)["eval"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    for name in names:
        built = pretrain(STUDENTS[name], cache, threads=threads, log=log)
        tmp, target = out_dir / f".{name}.tmp", out_dir / name
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(built, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        scored = cache / f"probe-{name}-{STUDENTS[name].key()}.json"
        subprocess.run([sys.executable, "-m", "mot_trainer.cli", "--log-level", "WARNING", "eval", "--model",
                        str(target), "--data", str(probe), "--out", str(scored), "--max-new-tokens", "128",
                        "--threads", str(threads)], check=True, env=env)
        found = json.loads(scored.read_text())
        record[name] = {"config": asdict(STUDENTS[name]),
                        "probe": {"problems": PROBE_SIZE, "accuracy": found["accuracy"],
                                  "heldout_loss": found.get("heldout_loss")},
                        "built_with": _build_platform()}
        log(f"student {name}: {found['accuracy']:.1%} exact match on the probe set "
            f"({PROBE_SIZE} 3-digit additions), held-out loss {found.get('heldout_loss', float('nan')):.4f}")
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _build_platform() -> dict:
    """torch's version and the CPU kernels it chose (in a subprocess: `mot` never imports torch)."""
    code = "import torch; print(torch.__version__); print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"torch": out[0], "cpu_capability": out[1]}


def tokenizer_texts(cfg: StudentConfig) -> list[str]:
    """Texts covering everything the student will read: pre-training, and the target task in every
    CoT style the study's teachers write."""
    import random

    rows = tasks.pretraining_rows(cfg.seed, 1500, cfg.pretrain_digits)
    rng = random.Random(cfg.seed + 1)
    for style in tasks.STYLES:
        for _ in range(300):
            a, b = tasks.random_problem(rng, rng.choice((3, 4)))
            rows.append({"prompt": tasks.prompt_for(a, b), "response": tasks.response_for(*tasks.solve(a, b, style=style))})
    return [f"{r['prompt']}\n{r['response']}" for r in rows]


def build_initial(cfg: StudentConfig, out: Path) -> Path:
    """Random weights and a BPE tokenizer (runs in a subprocess: `mot` itself never imports torch)."""
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "texts.json").write_text(json.dumps(tokenizer_texts(cfg)))
    (tmp / "config.json.args").write_text(json.dumps(asdict(cfg)))
    subprocess.run([sys.executable, "-m", "mot_operator.demo.student", "init", str(tmp)], check=True)
    (tmp / "texts.json").unlink()
    (tmp / "config.json.args").unlink()
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def pretrain(cfg: StudentConfig, cache: Path, threads: int, log=print) -> Path:
    """The cached pre-trained student folder (a Hugging Face folder with a mot-manifest)."""
    student = cache / f"student-{cfg.key()}"
    if storage.read_checkpoint_manifest(str(student)) is not None:
        log(f"student: cached at {student}")
        return student
    init = build_initial(cfg, cache / f"init-{cfg.key()}")
    data = tasks.write_jsonl(cache / f"pretrain-{cfg.key()}.jsonl",
                             tasks.pretraining_rows(cfg.seed, cfg.pretrain_examples, cfg.pretrain_digits))
    log(f"student: pre-training a {cfg.layers}-layer, {cfg.hidden_size}-wide model on {cfg.pretrain_examples} "
        f"short additions for {cfg.steps} steps (once; cached in {cache})")
    cmd = [sys.executable, "-m", "mot_trainer.cli", "sft", "--init", str(init), "--data", str(data),
           "--out", str(student), "--steps", str(cfg.steps), "--learning-rate", str(cfg.learning_rate),
           "--lr-schedule", "cosine", "--warmup-ratio", "0.05", "--grad-accum", "1",
           "--micro-batch-size", str(cfg.batch_size), "--max-seq-length", "256", "--seed", str(cfg.seed),
           "--threads", str(threads), "--log-every", "50"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env)
    return student


def _init_main(folder: Path) -> None:
    from mot_trainer.tiny import build_tiny_model

    cfg = json.loads((folder / "config.json.args").read_text())
    texts = json.loads((folder / "texts.json").read_text())
    build_tiny_model(folder, texts, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                     layers=cfg["layers"], heads=cfg["heads"], seed=cfg["seed"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: build the demo's initial student")
    parser.add_argument("command", choices=["init"])
    parser.add_argument("folder", type=Path)
    _init_main(parser.parse_args().folder)
