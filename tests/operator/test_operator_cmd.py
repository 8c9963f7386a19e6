"""`mot operator` configuration: flags, the env vars behind them, and JSON logs."""

from __future__ import annotations

import json
import logging

from mot_operator.cli import build_parser
from mot_operator.operator_cmd import JsonFormatter


def parse(argv, monkeypatch, env=None):
    for name in ("MOT_WATCH_NAMESPACES", "MOT_DEFAULT_IMAGE", "MOT_DEFAULT_STORAGE_URI", "MOT_METRICS_PORT",
                 "MOT_LOG_FORMAT", "MOT_LOG_LEVEL", "MOT_DEFAULT_CREDENTIALS_SECRET",
                 "MOT_DEFAULT_STORAGE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["operator", *argv])


def test_defaults(monkeypatch):
    args = parse([], monkeypatch)
    assert args.namespaces is None and args.env_namespaces == []
    assert args.metrics_port == 8080 and args.log_format == "text" and args.log_level == "info"
    assert args.default_storage_uri is None


def test_env_vars_configure_every_flag(monkeypatch):
    args = parse([], monkeypatch, {
        "MOT_WATCH_NAMESPACES": "team-a, team-b", "MOT_DEFAULT_IMAGE": "img:1", "MOT_DEFAULT_STORAGE_URI": "s3://b",
        "MOT_DEFAULT_STORAGE_ENDPOINT": "http://s3:8333", "MOT_DEFAULT_CREDENTIALS_SECRET": "keys",
        "MOT_METRICS_PORT": "9100", "MOT_LOG_LEVEL": "debug", "MOT_LOG_FORMAT": "json"})
    assert args.env_namespaces == ["team-a", "team-b"]
    assert (args.default_image, args.default_storage_uri, args.default_storage_endpoint,
            args.default_credentials_secret) == ("img:1", "s3://b", "http://s3:8333", "keys")
    assert (args.metrics_port, args.log_level, args.log_format) == (9100, "debug", "json")


def test_flags_win_over_env(monkeypatch):
    args = parse(["--namespace", "x", "--namespace", "y", "--metrics-port", "0", "--default-image", "flag:2"],
                 monkeypatch, {"MOT_DEFAULT_IMAGE": "env:1", "MOT_METRICS_PORT": "9100"})
    assert args.namespaces == ["x", "y"] and args.metrics_port == 0 and args.default_image == "flag:2"


def test_json_log_lines():
    record = logging.LogRecord("mot_operator", logging.WARNING, __file__, 1, "run %s failed", ("demo",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["message"] == "run demo failed" and line["logger"] == "mot_operator"
