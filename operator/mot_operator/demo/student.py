"""The demo's student: a tiny Qwen2-shaped model built from a config (no download) and pre-trained
with `mot-train sft` on short additions, cached so that the second `mot demo` skips all of it.

The cache key covers everything that shapes the student (sizes, data, steps), so changing any of
them builds a new one instead of silently reusing a stale model. Each step publishes its folder
only when complete (a temp folder renamed into place, or the trainer's manifest written last).
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

GENERATOR_VERSION = 2  # bump when tasks.py changes what it writes


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


def tokenizer_texts(cfg: StudentConfig) -> list[str]:
    """Texts covering everything the student will read: pre-training and the demo's target task (3-digit by default)."""
    rows = tasks.pretraining_rows(cfg.seed, 1500, cfg.pretrain_digits)
    import random

    rng = random.Random(cfg.seed + 1)
    rows += [tasks.clean_example(*tasks.random_problem(rng, 4)) for _ in range(500)]
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
