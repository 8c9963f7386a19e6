"""The demo's synthetic reasoning task: multi-digit addition with a column-by-column chain of thought.

The student is pre-trained on short additions (1-3 digits, the `restate` style) and the teachers
teach 3-digit ones. A teacher has a CoT style and its own kind and rate of noise. The demo's
teachers share the student's style and differ in noise; the study (`mot demo --study`) also uses
clean teachers and teachers with three different styles (TEACHER_SETS), since merging branches
trained on different CoT formats mixes the formats (docs/demo.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Teacher:
    name: str
    carry_drop_rate: float  # a carry is forgotten; the wrong sum is then carried through consistently
    answer_typo_rate: float  # steps right, one digit of the final answer wrong
    description: str
    style: str = "restate"  # a key of STYLES


TEACHERS = (
    Teacher("careful", 0.0, 0.05, "almost clean: 5 % of final answers have one wrong digit"),
    Teacher("hasty", 0.15, 0.0, "forgets one carry in 15 % of problems that carry, then adds on consistently"),
    Teacher("sloppy", 0.0, 0.20, "correct steps, but 20 % of final answers have one wrong digit"),
)
# The study's teacher quality axis: clean or noisy, one CoT style or three.
TEACHER_SETS = {
    "clean": tuple(Teacher(f"clean-{i}", 0.0, 0.0, "clean, the student's style") for i in (1, 2, 3)),
    "noisy": TEACHERS,
    "styles": (TEACHERS[0],
               Teacher("hasty", 0.15, 0.0, TEACHERS[1].description + "; verbose style", style="verbose"),
               Teacher("sloppy", 0.0, 0.20, TEACHERS[2].description + "; compact style", style="compact")),
}


def prompt_for(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def solve(a: int, b: int, *, drop_carry_at: int | None = None, style: str = "restate") -> tuple[str, int]:
    """Column addition from the right. Returns (chain of thought, the answer the CoT arrives at).

    Each step restates what is left of both numbers, so the digits to add next are always the last
    ones written, and the partial result grows by one digit on the left: every step is a local copy
    plus one digit sum, which a 1M-parameter model can learn (indexing into the prompt it could not).
    The styles say the same steps in other words (STYLES).
    """
    xs, ys = str(a), str(b)
    steps, result, carry, column = [], "", 0, 0
    write_step, write_carry = STYLES[style]
    while xs or ys:
        x, y = int(xs[-1]) if xs else 0, int(ys[-1]) if ys else 0
        total = x + y + carry
        result = str(total % 10) + result
        new_carry = 0 if column == drop_carry_at else total // 10
        steps.append(write_step(xs or "0", ys or "0", x, y, carry, total, result, new_carry))
        xs, ys, carry, column = xs[:-1], ys[:-1], new_carry, column + 1
    if carry:
        result = str(carry) + result
        steps.append(write_carry(carry, result))
    return " ".join(steps), int(result)


# style: (one column's step, the final carry's step); the same content in other words.
STYLES = {
    "restate": (lambda xs, ys, x, y, c, t, r, nc: f"{xs}+{ys}: {x}+{y}+{c}={t}, result {r}, carry {nc}.",
                lambda c, r: f"carry {c}, result {r}."),
    "verbose": (lambda xs, ys, x, y, c, t, r, nc: f"Left are {xs} and {ys}. Adding {x} and {y} and carry {c} "
                                                  f"makes {t}, so far {r}, next carry {nc}.",
                lambda c, r: f"The last carry {c} goes in front, so far {r}."),
    "compact": (lambda xs, ys, x, y, c, t, r, nc: f"[{xs}|{ys}] {x}+{y}+{c}={t} -> {r} c{nc};",
                lambda c, r: f"[c{c}] -> {r};"),
}


def response_for(cot: str, answer: int) -> str:
    return f"{cot} Answer: {answer}"


def _typo(answer: int, rng: random.Random) -> int:
    s = list(str(answer))
    i = rng.randrange(len(s))
    s[i] = rng.choice([d for d in "0123456789" if d != s[i] and not (i == 0 and d == "0")])
    return int("".join(s))


def random_problem(rng: random.Random, digits: int) -> tuple[int, int]:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def clean_example(a: int, b: int) -> dict:
    cot, answer = solve(a, b)
    assert answer == a + b
    return {"prompt": prompt_for(a, b), "response": response_for(cot, answer), "answer": str(answer)}


def teacher_example(teacher: Teacher, a: int, b: int, rng: random.Random) -> dict:
    """One teacher's answer; `answer` is the reference (true) answer, the response may be wrong."""
    drop = None
    if rng.random() < teacher.carry_drop_rate:
        # Only a column that really carries makes a wrong answer.
        carrying = [i for i in range(len(str(max(a, b)))) if _column_carries(a, b, i)]
        drop = rng.choice(carrying) if carrying else None
    cot, answer = solve(a, b, drop_carry_at=drop, style=teacher.style)
    if rng.random() < teacher.answer_typo_rate:
        answer = _typo(answer, rng)
    return {"prompt": prompt_for(a, b), "response": response_for(cot, answer), "answer": str(a + b)}


def _column_carries(a: int, b: int, i: int) -> bool:
    _, carry = divmod(a % 10**i + b % 10**i, 10**i)
    return (a // 10**i % 10) + (b // 10**i % 10) + carry >= 10


def disjoint_problems(rng: random.Random, digits: int, n: int, taken: set) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        p = random_problem(rng, digits)
        if p not in taken:
            taken.add(p)
            out.append(p)
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def noise_rate(rows: list[dict]) -> float:
    """Share of rows whose final answer differs from the reference (a check on the generators)."""
    wrong = sum(1 for r in rows if r["response"].rsplit("Answer: ", 1)[1] != r["answer"])
    return wrong / max(1, len(rows))


def build_task(
    out_dir: Path,
    *,
    seed: int,
    teachers: tuple[Teacher, ...] = TEACHERS,
    per_teacher: int = 200,
    eval_size: int = 200,
    digits: int = 4,
) -> dict[str, Path]:
    """Teacher CoT files (each teacher answers its own problems), and a held-out eval set with
    reference answers and clean reference responses (for held-out loss). Problems never overlap."""
    rng = random.Random(seed)
    taken: set = set()
    files = {}
    eval_problems = disjoint_problems(random.Random(10_000 + seed), digits, eval_size, taken)
    files["eval"] = write_jsonl(out_dir / "eval.jsonl", (clean_example(a, b) for a, b in eval_problems))
    for teacher in teachers:
        problems = disjoint_problems(rng, digits, per_teacher, taken)
        rows = [teacher_example(teacher, a, b, rng) for a, b in problems]
        files[teacher.name] = write_jsonl(out_dir / f"teacher-{teacher.name}.jsonl", rows)
    return files


def pretraining_rows(seed: int, n: int = 4000, digits: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Clean short additions for the student's pre-training: it learns the format and the carries,
    but has never seen the demo's longer problems."""
    rng = random.Random(seed)
    return [clean_example(*random_problem(rng, rng.choice(digits))) for _ in range(n)]
