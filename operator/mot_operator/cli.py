"""`mot`: the operator (`mot operator`), a MoTRun on this machine (`mot run`, `mot validate`, `mot estimate`), the demo."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "operator": ("mot_operator.operator_cmd", "run the Kubernetes controller for MoTRun resources"),
    "run": ("mot_operator.local.cli", "run a MoTRun manifest on this machine, without a cluster"),
    "validate": ("mot_operator.local.validate", "check a MoTRun manifest and its inputs (student, data, storage)"),
    "estimate": ("mot_operator.local.estimate_cmd", "per-GPU memory of a MoTRun's SFT branch, and whether it fits"),
    "demo": ("mot_operator.demo.cli", "the bundled demo: a complete MoT run on CPU with baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
