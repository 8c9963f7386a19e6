"""The trainer's progress record: its keys and values, the MOT_PROGRESS_FILE JSONL (and its reader,
which a half-written last line must not break), the one HTTP port serving /metrics and /progress
(bound to MOT_METRICS_ADDRESS), and a real tiny `mot-train sft` writing records to the last step."""

import json
from datetime import UTC, datetime

import pytest
import requests

from mot_trainer import cli, progress

NOW = datetime(2026, 11, 29, 18, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_records_every_log_interval_and_at_the_last_step(tmp_path):
    clock, path = FakeClock(), tmp_path / "progress.jsonl"
    meter = progress.Progress(5, log_every=2, clock=clock, wall_clock=lambda: NOW, path=str(path))
    start = {"step": 0, "totalSteps": 5, "tokens": 0, "tokensPerSecond": 0.0, "elapsedSeconds": 0.0,
             "time": "2026-11-29T18:00:00Z"}
    assert progress.latest() == start  # emitted on construction: the total is known before step 1
    for step in range(1, 6):
        clock.now += 4.0
        meter.update(step, loss=1.0 / step, learning_rate=1e-3 * step, tokens=100)
        if step == 2:
            assert progress.latest() == {
                "step": 2, "totalSteps": 5, "loss": 0.5, "learningRate": 0.002, "tokens": 200,
                "tokensPerSecond": 25.0, "etaSeconds": 12.0, "elapsedSeconds": 8.0, "time": "2026-11-29T18:00:00Z"}
    records, offset = progress.read_records(path)
    assert [r["step"] for r in records] == [0, 2, 4, 5]  # every 2nd step, and the last
    assert records[0] == start and "loss" not in records[0] and "etaSeconds" not in records[0]
    assert records[-1]["etaSeconds"] == 0.0 and records[-1]["tokens"] == 500
    assert records[-1]["loss"] == 0.2 and records[-1] == progress.latest()
    assert offset == path.stat().st_size


def test_no_file_without_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    progress.Progress(3).update(1, 0.5, 1e-3, 10)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(tmp_path / "p.jsonl"))
    progress.Progress(3).update(1, 0.5, 1e-3, 10)
    assert [r["step"] for r in progress.read_records(tmp_path / "p.jsonl")[0]] == [0, 1]


def test_reader_leaves_a_half_written_last_line_for_the_next_read(tmp_path):
    path = tmp_path / "p.jsonl"
    assert progress.read_records(path) == ([], 0)  # not written yet
    first = json.dumps({"step": 0, "totalSteps": 4}) + "\n"
    path.write_text(first + "not json\n" + '{"step": 1, "tot')
    records, offset = progress.read_records(path)
    assert records == [{"step": 0, "totalSteps": 4}]  # the torn line is skipped, the partial one waits
    assert offset == len(first) + len("not json\n")
    with open(path, "a") as f:
        f.write('alSteps": 4}\n')
    assert progress.read_records(path, offset) == ([{"step": 1, "totalSteps": 4}], path.stat().st_size)


@pytest.fixture
def server():
    started = []

    def start(*args, **kwargs):
        started.append(progress.serve(*args, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.shutdown()


def test_one_port_serves_metrics_and_progress(server):
    srv = server(0, "127.0.0.1")
    base = f"http://127.0.0.1:{srv.server_port}"
    assert requests.get(f"{base}/progress", timeout=10).json() == {}  # nothing before the first record
    meter = progress.Progress(4, clock=FakeClock(), wall_clock=lambda: NOW, path="")
    meter.update(1, 0.75, 1e-3, 64)
    reply = requests.get(f"{base}/progress", timeout=10)
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == progress.latest() and reply.json()["step"] == 1 and reply.json()["loss"] == 0.75
    metrics = requests.get(f"{base}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "mot_trainer_step 1.0" in metrics.text and "mot_trainer_steps_total_planned 4.0" in metrics.text

    srv.shutdown()
    with pytest.raises(requests.ConnectionError):  # stopped and the port freed
        requests.get(f"{base}/metrics", timeout=2)


def test_metrics_address_env_is_the_bound_address(server, monkeypatch):
    monkeypatch.setenv(progress.METRICS_ADDRESS_ENV, "127.0.0.2")
    srv = server(0)
    assert srv.server_address[0] == "127.0.0.2"
    assert "mot_trainer_step" in requests.get(f"http://127.0.0.2:{srv.server_port}/metrics", timeout=10).text
    with pytest.raises(requests.ConnectionError):  # not on the other loopback addresses
        requests.get(f"http://127.0.0.1:{srv.server_port}/metrics", timeout=2)


def test_tiny_sft_writes_records_up_to_the_last_step(tiny_model, tiny_data, tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(path))
    code = cli.main(["sft", "--init", str(tiny_model), "--data", str(tiny_data), "--out", str(tmp_path / "out"),
                     "--steps", "5", "--log-every", "2", "--threads", "1", "--micro-batch-size", "4",
                     "--grad-accum", "1"])
    assert code == 0
    records, _ = progress.read_records(path)
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert all(r["totalSteps"] == 5 for r in records)
    last = records[-1]
    assert last["step"] == last["totalSteps"] and last["loss"] > 0 and last["learningRate"] >= 0
    assert last["tokens"] > 0 and last["tokensPerSecond"] > 0 and last["etaSeconds"] == 0.0
    assert datetime.fromisoformat(last["time"].replace("Z", "+00:00")) <= datetime.now(UTC)
