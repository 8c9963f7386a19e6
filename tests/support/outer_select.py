"""What a run with spec.merge.outer and spec.evaluation.selectBest must show, wherever it ran (`mot
run` or the cluster): the same checks on its merge arguments, velocity manifests and selection."""

OUTER = {"learningRate": 0.8, "momentum": 0.5, "nesterov": True}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def check_merge_args(merges: dict[int, list[str]], states: dict[int, str], student: str, status: dict) -> None:
    """Each round's merge: the outer flags, its start as --base, its own velocity out, round 2 reads round 1's."""
    assert sorted(merges) == [1, 2], merges
    for round_, args in merges.items():
        assert flag(args, "--outer-learning-rate") == "0.8" and flag(args, "--outer-momentum") == "0.5", args
        assert "--outer-nesterov" in args and flag(args, "--outer-state-out") == states[round_], args
    assert "--outer-state-in" not in merges[1], merges[1]
    assert flag(merges[2], "--outer-state-in") == states[1], merges[2]
    assert flag(merges[1], "--base") == student
    assert flag(merges[2], "--base") == status["rounds"][0]["mergedCheckpoint"]


def check_velocities(read_manifest, states: dict[int, str], status: dict) -> None:
    """The velocities are verified folders of their own; the merged model records the outer step."""
    for round_, state in states.items():
        velocity = read_manifest(state)
        assert velocity is not None, f"no manifest at {state}"
        assert velocity["kind"] == "outer-state" and velocity["params"] == OUTER, velocity
        assert velocity["inputs"]["state_in"] == (states[round_ - 1] if round_ > 1 else None), velocity["inputs"]
        assert any(f["path"].endswith(".safetensors") for f in velocity["files"]), velocity["files"]
    merged = read_manifest(status["rounds"][1]["mergedCheckpoint"])
    assert merged is not None and merged["kind"] == "merge" and merged["params"]["outer"] == OUTER, merged
    assert merged["inputs"]["outer_state_in"] == states[1] and merged["inputs"]["outer_state_out"] == states[2]


def check_selection(status: dict) -> tuple:
    """selectBest: the best of round 0 (the student) and every merged round, ties to the later round.
    Returns (round, checkpoint, score) of the best."""
    scores = [(0, status["student"]["model"], status["student"]["evalScore"])] + [
        (r["round"], r["mergedCheckpoint"], r["evalScore"]) for r in status["rounds"]]
    best = max(scores, key=lambda c: (c[2], c[0]))
    selected = status["selected"]
    print(f"\nscores {[(r, s) for r, _, s in scores]}; selected {selected}")
    assert (selected["round"], selected["checkpoint"], selected["evalScore"]) == best
    assert status["finalModel"] == selected["checkpoint"] and "selectBest" in selected["reason"]
    assert str(selected["checkpoint"]) in status["message"]
    return best
