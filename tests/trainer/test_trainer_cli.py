"""`mot-train` command line: argparse refusals exit 2 and put argparse's own message in the
termination log (what the MoTRun's status shows), usage still on stderr; --help exits 0."""

import pytest

from mot_trainer import cli


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "--init", "m", "--data", "d.jsonl"],
         "mot-train sft: error: the following arguments are required: --out"),
        (["sft", "--init", "m", "--data", "d.jsonl", "--out", "o", "--steps", "x"],
         "mot-train sft: error: argument --steps: invalid int value: 'x'"),
        (["merge", "--inputs", "a", "b", "--out", "o", "--no-such-flag"],
         "mot-train: error: unrecognized arguments: --no-such-flag"),
        (["merge", "--inputs", "a", "b", "--out", "o", "--method", "median"],
         "mot-train merge: error: argument --method: invalid choice: 'median'"),
        (["train"], "mot-train: error: argument {sft,merge,eval,preflight}: invalid choice: 'train'"),
    ],
)
def test_bad_arguments_put_argparse_message_in_termination_log(termination_log, capsys, argv, message):
    assert cli.main(argv) == 2
    written = termination_log.read_text()
    assert written.startswith(message), written
    assert "see usage above" not in written
    stderr = capsys.readouterr().err
    assert "usage: mot-train" in stderr and message in stderr  # the user still sees usage and the error


def test_help_exits_zero_without_a_termination_message(termination_log, capsys):
    assert cli.main(["merge", "--help"]) == 0
    assert "--allow-unmanifested-inputs" in capsys.readouterr().out
    assert not termination_log.exists()


def test_mot_train_sft_defaults_are_the_crds():
    """A MoTRun that leaves a training field unset and a `mot-train sft` given no flag for it train
    the same way: the builder's argv for an all-defaults spec parses to what the bare command line
    parses to (the CRD holds the spec's defaults; this keeps the trainer's CLI from drifting)."""
    import argparse

    from mot_operator.contract import sft_args
    from mot_operator.spec import parse_spec
    from mot_trainer import sft

    spec = parse_spec({"student": "s3://b/student", "teachers": [{"name": "a", "dataset": "s3://b/a.jsonl"}]})
    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)
    required = ["--init", "s3://b/student", "--data", "s3://b/a.jsonl", "--out", "s3://b/out"]
    argv = sft_args(spec, 1, "s3://b/a.jsonl", "s3://b/student", "s3://b/out", metrics_port=None)
    assert argv[0] == "sft"
    built, bare = vars(parser.parse_args(argv[1:])), vars(parser.parse_args(required))
    # --steps has no argparse default (it excludes --epochs); the trainer's DEFAULT_STEPS applies then.
    assert built.pop("steps") == sft.DEFAULT_STEPS and bare.pop("steps") is None
    assert built == bare
