"""The trainer processes of a local run, standing in for a cluster's Pods.

Each `mot-train` runs in a process group of its own that dies with `mot run` (even a SIGKILLed one),
with its threads and GPU set in its environment and three files under `<workdir>/logs`: its log, its
termination message (MOT_TERMINATION_LOG, as a Pod's) and its progress records (MOT_PROGRESS_FILE).
Stopped with SIGTERM, then SIGKILL after a grace period. Also: how many run at once, with how many
threads each.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mot_operator.contract import timestamp
from mot_trainer.progress import PROGRESS_FILE_ENV, read_records

log = logging.getLogger("mot_operator.local")

KILL_GRACE_S = 10.0


def detect_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def detect_gpu_memory() -> int | None:
    """Bytes of the smallest GPU this machine's trainers may use (CUDA_VISIBLE_DEVICES's, by index or
    UUID, when set), from `nvidia-smi` (MiB); None when unknown: no nvidia-smi, no GPU, output not read."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = None if visible is None else [d.strip() for d in visible.split(",") if d.strip()]
    if wanted is not None:
        wanted = wanted[:wanted.index("-1")] if "-1" in wanted else wanted  # CUDA stops at -1
        if not wanted:
            return None
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    sizes = []
    for line in out.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[2].isdigit():
            continue
        index, uuid, mib = fields
        if wanted is None or any(w == index or (len(w) > 4 and uuid.startswith(w)) for w in wanted):
            sizes.append(int(mib) * 1024 ** 2)
    return min(sizes) if sizes else None


def split_threads(parallel: int | None, threads: int | None, gpus: int, cores: int) -> tuple[int, int]:
    """parallel × threads ≤ cores: two torch processes with default threads on 2 cores run ~10x slower."""
    parallel = parallel or (gpus or 1)
    threads = threads or max(1, cores // parallel)
    return parallel, threads


# ---------------------------------------------------------------------------------------------
# A job's files under the logs folder


def log_path(logs: Path, name: str) -> Path:
    return logs / f"{name}.log"


def termination_path(logs: Path, name: str) -> Path:
    return logs / f"{name}.termination"


def progress_path(logs: Path, name: str) -> Path:
    return logs / f"{name}.progress.jsonl"


def termination_message(logs: Path, name: str) -> str:
    """What the job's last process left in its termination file (MOT_TERMINATION_LOG), if any."""
    try:
        return termination_path(logs, name).read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class TrainerProcess:
    """A running `mot-train` of a job, in the slot (GPU) it was started in."""

    popen: subprocess.Popen
    log_path: Path
    term_path: Path
    progress_path: Path
    slot: int
    progress_offset: int = 0

    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.popen.poll()

    def new_records(self) -> list[dict]:
        """Its progress records written since the last call (a half-written last line waits)."""
        records, self.progress_offset = read_records(self.progress_path, self.progress_offset)
        return records

    def message(self) -> str:
        """Its termination message ("" when it left none)."""
        return self.term_path.read_text().strip() if self.term_path.exists() else ""

    def last_log_line(self) -> str:
        """The last non-empty log line (a traceback's error) when it left no termination message."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"see {self.log_path}"
        return f"{lines[-1].strip()[:300]} (log: {self.log_path})" if lines else f"see {self.log_path}"


def launch(trainer_cmd: list[str], args: list[str], logs: Path, name: str, slot: int, *, threads: int,
           gpus: int) -> TrainerProcess:
    """Start `trainer_cmd args` for the job `name`: its log appended to (one `=== ` line per start),
    a previous process's termination message and progress records removed (they are not this one's)."""
    log_file_path = log_path(logs, name)
    term_path, records_path = termination_path(logs, name), progress_path(logs, name)
    term_path.unlink(missing_ok=True)
    records_path.unlink(missing_ok=True)
    env = dict(os.environ, MOT_TERMINATION_LOG=str(term_path), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env[PROGRESS_FILE_ENV] = str(records_path)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    with open(log_file_path, "ab") as log_file:
        log_file.write(f"=== {timestamp(datetime.now(UTC))} mot-train {' '.join(args)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen([*trainer_cmd, *args], stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                 preexec_fn=_die_with_parent)
    return TrainerProcess(popen, log_file_path, term_path, records_path, slot)


def _die_with_parent() -> None:  # runs in the child: SIGKILL of `mot run` must not orphan trainers
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def terminate(procs: Iterable[TrainerProcess]) -> None:
    """SIGTERM to each process group, SIGKILL to those still there after the grace period; reaped."""
    popens = [p.popen for p in procs]
    for p in popens:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_GRACE_S
    for p in popens:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def kill_stale(pid: int | None, output_uri: str, name: str) -> None:
    """A trainer from a `mot run` that was SIGKILLed may still be writing: stop it first (when the
    process `pid` is still that trainer: its command line names the output)."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return
    if output_uri in cmdline.split("\0"):
        log.info("stopping stale process %s of %s", pid, name)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
