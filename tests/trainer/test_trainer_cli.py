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
