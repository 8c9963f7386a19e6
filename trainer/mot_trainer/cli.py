"""`mot-train`: the only command a MoT Job runs. Dispatches to sft, merge, eval and preflight.

Exit codes are the contract with the operator (mot_operator.contract): 0 only after the output is
complete, 2 for invalid input (the operator never retries it), anything else is retryable.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mot_operator.contract import EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_OK
from mot_trainer.errors import InvalidInput

COMMANDS = {
    "sft": ("mot_trainer.sft", "fine-tune a model on one teacher's chain-of-thought data"),
    "merge": ("mot_trainer.merge.cli", "merge checkpoints in weight space, streaming tensor by tensor"),
    "eval": ("mot_trainer.eval", "exact-match accuracy and held-out loss on problems with answers"),
    "preflight": ("mot_trainer.preflight", "check a run's student, teacher data, eval set and storage before training"),
}

EXIT_INVALID = EXIT_INVALID_INPUT  # the name callers of main() compare with
_DEFAULT_TERMINATION_LOG = "/dev/termination-log"
log = logging.getLogger("mot_trainer")


def termination_log_path() -> str | None:
    path = os.environ.get("MOT_TERMINATION_LOG")
    if path:
        return path
    return _DEFAULT_TERMINATION_LOG if os.path.exists(_DEFAULT_TERMINATION_LOG) else None


def write_termination_message(message: str) -> None:
    """One line for `kubectl describe` / the operator; never let this mask the real outcome."""
    path = termination_log_path()
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(" ".join(message.split())[:4000])
    except OSError as exc:
        log.warning("cannot write termination message to %s: %s", path, exc)


class UsageError(SystemExit):
    """argparse's refusal of the command line (exit code 2), carrying argparse's own message."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_INVALID_INPUT)
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors keep their message for the termination log: usage and message
    still go to stderr, then UsageError (a SystemExit with code 2). Subparsers inherit the class."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        sys.stderr.write(text + "\n")
        raise UsageError(text)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `only`, one whose other subcommands are not imported (a merge Job
    need not import the SFT stack)."""
    parser = ArgumentParser(prog="mot-train", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MOT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=next((arg for arg in argv if arg in COMMANDS), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: bad options are invalid input; --help exits 0
        if exc.code not in (0, None):
            write_termination_message(getattr(exc, "message", None) or "invalid arguments")
            return EXIT_INVALID_INPUT
        return EXIT_OK
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        summary = importlib.import_module(args._module).run(args)
    except InvalidInput as exc:
        log.error("invalid input: %s", exc)
        write_termination_message(f"invalid input: {exc}")
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        write_termination_message("interrupted")
        return 130
    except Exception as exc:
        log.exception("failed")
        write_termination_message(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if isinstance(summary, dict):
        import json

        write_termination_message(json.dumps(summary, sort_keys=True, separators=(",", ":")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_distributed(EXIT_OK)
    return EXIT_OK


def leave_distributed(code: int) -> None:
    """End a torchrun worker whose work is complete (output uploaded, message written): wait for the
    other ranks, take the process group down, and exit without the interpreter's teardown. Under load,
    destroying the gloo/FSDP objects in whatever order finalization picks has aborted a rank (SIGABRT,
    "terminate called without an active exception") after the work was done, which torchrun reports
    as a failed branch. Only after success: a failed rank returns normally and torchrun stops the rest."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
