"""`mot-train preflight`: check a run's inputs before any GPU work.

The student must load as a causal-LM folder (config.json, a tokenizer with a chat template, every
shard its safetensors index names), without loading weights; for an s3:// student only the small
files are fetched. Every teacher dataset must exist and parse by the same rules as `mot-train sft`
(data.py), with no empty response; each is tokenized with the student's tokenizer and chat template
exactly as sft encodes it, giving records, token length p50/p95/max and the fraction longer than
--max-seq-length (cut there in training, which may lose the final answer of a long chain of thought).
A fraction above --max-truncated-fraction is invalid input. The eval set, when given, must parse and
have an answer in every record (eval.py's rules); the storage URI, when given, must be writable with
the credentials given (a probe object is put and deleted). With --gpu-memory (what the executor knows
of the GPUs a branch can run on: the nodes' nvidia.com/gpu.memory label, or nvidia-smi for `mot run`)
one SFT branch, as --gpus, --nodes, --micro-batch-size, --max-seq-length, --precision and
--gradient-checkpointing describe it, must fit one GPU by `mot estimate`'s figure (mot_operator.estimate,
from the student's config.json): checked right after the student, and invalid input naming the spec
fields to change when it does not (a config the estimate cannot read is only logged).

Prints a per-teacher table; returns a one-line JSON summary, also written to --out when given (the
operator's record that the preflight passed). The first problem found is an InvalidInput (exit 2)
naming the file, line, field or teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mot_trainer import data, storage
from mot_trainer.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_MAX_TRUNCATED_FRACTION = 0.05
INDEX_NAME = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Not fetched for an s3:// student: the check needs config, tokenizer and index only.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
TRUNCATION_HINT = "raise spec.training.maxSeqLength or spec.preflight.maxTruncatedFraction"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="student model folder, local or s3:// (weights are not read)")
    p.add_argument("--teachers", required=True, nargs="+", metavar="NAME=URI",
                   help="each teacher's JSONL or Parquet dataset, local or s3://")
    p.add_argument("--eval", dest="eval_data", metavar="URI", help="held-out problems with an 'answer' each")
    p.add_argument("--max-seq-length", type=int, required=True, help="the length sft cuts examples at")
    p.add_argument("--max-truncated-fraction", type=float, default=DEFAULT_MAX_TRUNCATED_FRACTION,
                   help="largest fraction of a teacher's examples allowed over --max-seq-length (default 0.05)")
    p.add_argument("--storage", metavar="URI", help="checkpoint root that must be writable (a probe is put and deleted)")
    p.add_argument("--threads", type=int, help="teachers read and tokenized at once (default: min(teachers, 4))")
    p.add_argument("--out", metavar="URI", help="write the JSON summary here once every check passed")
    p.add_argument("--gpu-memory", type=int, metavar="BYTES",
                   help="memory of one GPU a branch can run on: refuse a branch that cannot fit it")
    p.add_argument("--gpus", type=int, default=1, help="with --gpu-memory: a branch's GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="with --gpu-memory: a branch's nodes (default 1)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="with --gpu-memory: as sft's (default 1)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="with --gpu-memory: as sft's (default auto)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="with --gpu-memory: as sft's")
    p.add_argument("--packing", action="store_true", help="with --gpu-memory: as sft's")


@dataclass(frozen=True)
class MemoryCheck:
    """--gpu-memory and the branch the estimate is for (mot_operator.estimate.estimate's arguments)."""

    gpu_memory: int
    gpus: int = 1
    nodes: int = 1
    micro_batch_size: int = 1
    precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False


@dataclass
class TeacherStats:
    name: str
    uri: str
    records: int
    p50: int
    p95: int
    max: int
    truncated: int  # examples longer than max_seq_length

    @property
    def fraction(self) -> float:
        return self.truncated / self.records if self.records else 0.0

    def summary(self) -> dict:
        return {"records": self.records, "p50": self.p50, "p95": self.p95, "max": self.max,
                "truncated": round(self.fraction, 4)}


@dataclass
class Report:
    max_seq_length: int
    teachers: list[TeacherStats]
    eval_records: int | None = None
    storage: str = "unchecked"
    memory: dict | None = None  # check_memory's record, when --gpu-memory was given and estimated
    seconds: float = 0.0

    def summary(self) -> dict:
        out = {"teachers": {t.name: t.summary() for t in self.teachers}, "max_seq_length": self.max_seq_length,
               "storage": self.storage, "seconds": round(self.seconds, 2)}
        if self.eval_records is not None:
            out["eval"] = {"records": self.eval_records}
        if self.memory is not None:
            out["memory"] = self.memory
        return out

    def table(self) -> str:
        return table(self.summary())


def table(summary: dict) -> str:
    """The per-teacher table of a summary (Report.summary(), or the JSON a preflight Job wrote)."""
    rows = [("teacher", "records", "p50", "p95", "max", "truncated")]
    rows += [(name, str(t["records"]), str(t["p50"]), str(t["p95"]), str(t["max"]), f"{100 * t['truncated']:.1f}%")
             for name, t in summary["teachers"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = [f"token lengths with the student's chat template; truncated = longer than maxSeqLength "
             f"{summary['max_seq_length']}"]
    if summary.get("eval") is not None:
        extra.append(f"eval set: {summary['eval']['records']} problems with answers")
    extra.append(f"storage: {summary.get('storage', 'unchecked')}")
    memory = summary.get("memory")
    if isinstance(memory, dict) and memory.get("needed") and memory.get("gpu_memory"):
        extra.append(f"GPU memory: {memory['needed'] / 1024 ** 3:.2f} GiB needed per GPU (`mot estimate`) <= "
                     f"{memory['gpu_memory'] / 1024 ** 3:.2f} GiB")
    return "\n".join(lines + extra)


class PreflightFailed(InvalidInput):
    """A check failed after the token statistics were computed: `report` holds them for the table."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (the smallest value with at least q% of values at or below it)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- student -----------------------------------------------------------------------------------


def _weight_file(rel: str) -> bool:
    return rel.endswith(_WEIGHT_SUFFIXES) and rel != INDEX_NAME


def _fetch_small_files(uri: str, workdir: Path) -> tuple[Path, set[str]]:
    """Config, tokenizer and index files of an s3:// model folder in `workdir`, and every key there."""
    keys = storage.list_keys(uri)
    if not keys:
        raise InvalidInput(f"--student {uri}: no objects under this prefix (no model folder)")
    for rel in keys:
        if not _weight_file(rel) and "/" not in rel:
            (workdir / rel).write_bytes(storage.read_bytes(storage.join(uri, rel)))
    return workdir, set(keys)


def _is_hub_id(uri: str) -> bool:
    """What sft treats as a hub id: neither s3:// nor a path (models.fetch_model's rule)."""
    path = Path(uri).expanduser()
    return not storage.is_s3(uri) and not path.is_dir() and not uri.startswith(("/", ".", "~")) and not path.exists()


def check_student(uri: str, workdir: Path):
    """The student's tokenizer, after checking the folder loads as a causal LM (weights not read)."""
    return _check_student(uri, workdir)[0]


def _check_student(uri: str, workdir: Path) -> tuple[object, dict]:
    """check_student's tokenizer, and the student's config.json as a dict."""
    from transformers import AutoConfig, AutoTokenizer

    if _is_hub_id(uri):
        return _check_hub_student(uri)
    if storage.is_s3(uri):
        folder, files = _fetch_small_files(uri, workdir)
    else:
        folder = Path(uri).expanduser()
        if not folder.is_dir():
            raise InvalidInput(f"--student {uri}: no such model folder")
        files = {p.name for p in folder.iterdir()}
    if "config.json" not in files:
        raise InvalidInput(f"--student {uri}: no config.json (not a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"--student {storage.join(uri, 'config.json')}: not a loadable model config ({exc})") from None
    _check_causal_lm(config, uri)
    _check_weights(uri, folder, files)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"--student {uri}: the tokenizer does not load ({exc})") from None
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raw = config.to_dict()
    return _measuring(tokenizer, uri), raw if isinstance(raw, dict) else config.to_dict()


def _measuring(tokenizer, uri: str):
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            f"--student {uri}: the tokenizer has no chat template (chat_template in tokenizer_config.json "
            f"or chat_template.jinja); sft renders every example with it"
        )
    # Lengths are measured, not fed to the model: no "longer than the maximum" warning per example.
    tokenizer.model_max_length = 1 << 62
    return tokenizer


def _check_hub_student(uri: str):
    """A hub id, as sft loads it: config and tokenizer fetched where a hub is reachable. A failure to
    fetch is not invalid input (the hub may be down); sft would meet the same on every branch."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(uri)
        tokenizer = AutoTokenizer.from_pretrained(uri)
    except OSError as exc:
        causes, cause = [], exc
        while cause is not None:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(c, RepositoryNotFoundError) for c in causes) or "not a valid model identifier" in str(exc):
            raise InvalidInput(f"--student {uri}: no such model folder, and no such model on the hub") from None
        raise
    _check_causal_lm(config, uri)
    return _measuring(tokenizer, uri), config.to_dict()


def _check_causal_lm(config, uri: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a.endswith("ForCausalLM") for a in architectures):
        return
    raise InvalidInput(
        f"--student {storage.join(uri, 'config.json')}: model_type {config.model_type!r} is not a causal LM "
        f"(architectures {architectures})"
    )


def _check_weights(uri: str, folder: Path, files: set[str]) -> None:
    index = storage.join(uri, INDEX_NAME)
    if INDEX_NAME in files:
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_bytes())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"--student {index}: not a valid safetensors index ({exc!r})") from None
        missing = [s for s in shards if s not in files]
        if missing:
            raise InvalidInput(f"--student {index}: names {missing[0]}, which is missing "
                               f"({len(missing)} of {len(shards)} shards missing)")
        return
    if not any(name in files for name in WEIGHT_FILES):
        raise InvalidInput(f"--student {uri}: no weights ({', '.join(WEIGHT_FILES)} or {INDEX_NAME})")


# --- memory --------------------------------------------------------------------------------------


def check_memory(config: dict, check: MemoryCheck, max_seq_length: int) -> dict | None:
    """Whether one branch fits `check.gpu_memory` by `mot estimate`'s figure: InvalidInput naming the
    spec fields to change when it does not; the summary's "memory" record when it does (None when
    the estimate cannot be made from this config: logged, nothing refused)."""
    from mot_operator import estimate

    try:
        est = estimate.estimate(config, gpus=check.gpus, nodes=check.nodes, micro_batch_size=check.micro_batch_size,
                                max_seq_length=max_seq_length, gradient_checkpointing=check.gradient_checkpointing,
                                precision=check.precision, packing=check.packing)
    except (estimate.ConfigError, ValueError, TypeError) as exc:
        log.warning("GPU memory not checked: no estimate for this student (%s)", exc)
        return None
    refused = estimate.refusal(est, check.gpu_memory)
    if refused:
        raise InvalidInput(refused)
    return {"needed": est.total + est.margin, "gpu_memory": check.gpu_memory}


# --- data ----------------------------------------------------------------------------------------


def check_teacher(name: str, uri: str, tokenizer, max_seq_length: int) -> TeacherStats:
    """Parse a teacher's dataset as sft does, refuse empty responses, and measure token lengths."""
    try:
        records = data.read_records(uri)
    except InvalidInput as exc:
        raise InvalidInput(f"teacher {name}: {exc}") from None
    lengths = []
    for record in records:
        empty = next((m for m in record.messages if m["role"] == "assistant" and not m["content"].strip()), None)
        if empty is not None:
            raise InvalidInput(f"teacher {name}: {record.where}: empty response (nothing to train on)")
        lengths.append(len(data.encode_conversation(record.messages, tokenizer)))
    lengths.sort()
    return TeacherStats(name=name, uri=uri, records=len(records), p50=percentile(lengths, 50),
                        p95=percentile(lengths, 95), max=lengths[-1],
                        truncated=sum(1 for n in lengths if n > max_seq_length))


def check_eval(uri: str) -> int:
    from mot_trainer.eval import load_problems  # eval.py imports torch only when it runs

    try:
        return len(load_problems(uri))
    except InvalidInput as exc:
        raise InvalidInput(f"eval set: {exc}") from None


def check_storage(uri: str) -> str:
    """Put and delete a small probe object under `uri` (a probe file for a local path)."""
    probe = storage.join(uri, f".mot-preflight-{uuid.uuid4().hex[:12]}")
    try:
        storage.write_bytes(probe, b"mot preflight probe\n")
        storage.delete(probe)
    except OSError as exc:  # a local path: permissions, read-only file system, a file in the way
        raise InvalidInput(f"storage {uri}: not writable ({exc})") from None
    return "writable"


# --- the whole check -----------------------------------------------------------------------------


def parse_teachers(values: list[str]) -> list[tuple[str, str]]:
    teachers, seen = [], set()
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise InvalidInput(f"--teachers {value!r}: expected NAME=URI")
        if name in seen:
            raise InvalidInput(f"--teachers: teacher {name!r} given twice")
        seen.add(name)
        teachers.append((name, uri))
    return teachers


def preflight(student: str, teachers: list[tuple[str, str]], *, max_seq_length: int,
              max_truncated_fraction: float = DEFAULT_MAX_TRUNCATED_FRACTION, eval_data: str | None = None,
              storage_uri: str | None = None, threads: int | None = None, memory: MemoryCheck | None = None) -> Report:
    """Run every check; InvalidInput for the first problem (PreflightFailed, with the report, when the
    token statistics were computed)."""
    if max_seq_length < 1:
        raise InvalidInput(f"--max-seq-length must be at least 1, got {max_seq_length}")
    if not 0 <= max_truncated_fraction <= 1:
        raise InvalidInput(f"--max-truncated-fraction must be in [0, 1], got {max_truncated_fraction}")
    if threads is not None and threads < 1:
        raise InvalidInput(f"--threads must be at least 1, got {threads}")
    if not teachers:
        raise InvalidInput("--teachers: at least one teacher is needed")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mot-preflight-"))
    try:
        tokenizer, config = _check_student(student, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Right after the student: a branch that cannot fit fails for certain, before any data is read.
    memory_record = check_memory(config, memory, max_seq_length) if memory is not None else None
    workers = threads or min(len(teachers), 4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_teacher, name, uri, tokenizer, max_seq_length) for name, uri in teachers]
        stats = [f.result() for f in futures]  # in teacher order: the first teacher's problem is reported
    report = Report(max_seq_length=max_seq_length, teachers=stats, memory=memory_record)
    if eval_data:
        report.eval_records = check_eval(eval_data)
    if storage_uri:
        report.storage = check_storage(storage_uri)
    report.seconds = time.monotonic() - started
    for t in stats:
        if t.fraction > max_truncated_fraction:
            raise PreflightFailed(
                f"teacher {t.name}: {100 * t.fraction:.3g}% of {t.records} examples are longer than maxSeqLength "
                f"{max_seq_length} (p95 {t.p95} tokens, max {t.max}; at most {100 * max_truncated_fraction:g}% "
                f"allowed); {TRUNCATION_HINT}",
                report,
            )
    log.info("preflight passed in %.1fs: %d teachers, %d records", report.seconds, len(stats),
             sum(t.records for t in stats))
    return report


def run(args) -> dict:
    memory = None
    if args.gpu_memory is not None:
        for flag, value in (("--gpu-memory", args.gpu_memory), ("--gpus", args.gpus), ("--nodes", args.nodes),
                            ("--micro-batch-size", args.micro_batch_size)):
            if value < 1:
                raise InvalidInput(f"{flag} must be at least 1, got {value}")
        memory = MemoryCheck(gpu_memory=args.gpu_memory, gpus=args.gpus, nodes=args.nodes,
                             micro_batch_size=args.micro_batch_size, precision=args.precision,
                             gradient_checkpointing=args.gradient_checkpointing, packing=args.packing)
    try:
        report = preflight(args.student, parse_teachers(args.teachers), max_seq_length=args.max_seq_length,
                           max_truncated_fraction=args.max_truncated_fraction, eval_data=args.eval_data,
                           storage_uri=args.storage, threads=args.threads, memory=memory)
    except PreflightFailed as exc:
        print(exc.report.table(), flush=True)
        raise
    print(report.table(), flush=True)
    summary = report.summary()
    if args.out:
        storage.write_json(args.out, summary)
    return summary
