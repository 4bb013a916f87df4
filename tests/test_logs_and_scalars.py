"""Structured logs (client and round on every record that concerns one) and the client's TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from common.logs import ContextLogger, JsonFormatter, TextFormatter, context
from splitlora_client.cli import main as client_main
from splitlora_client.scalars import tensorboard_available
from splitlora_client.trainer import MetricsLog


def _record(msg: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("splitlora.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_client_and_round() -> None:
    line = JsonFormatter().format(_record("round %d closed", 2, **context(client="alice", round=2)))
    entry = json.loads(line)
    assert entry["message"] == "round 2 closed" and entry["client"] == "alice" and entry["round"] == 2
    assert entry["level"] == "INFO" and entry["logger"] == "splitlora.test" and "time" in entry
    assert "client" not in json.loads(JsonFormatter().format(_record("no context")))


def test_text_lines_end_with_the_context() -> None:
    text = TextFormatter().format(_record("joined", **context(client="bob", round=None)))
    assert text.endswith("splitlora.test: joined [client=bob]")
    assert TextFormatter().format(_record("plain")).endswith("plain")
    with pytest.raises(ValueError, match="unknown log context"):
        context(clinet="typo")


def test_context_logger_merges_fixed_and_per_call_context(caplog: pytest.LogCaptureFixture) -> None:
    log = ContextLogger(logging.getLogger("splitlora.test"), {"client": "carol"})
    with caplog.at_level(logging.INFO, logger="splitlora.test"):
        log.info("step", extra={"round": 3})
    assert caplog.records[-1].client == "carol" and caplog.records[-1].round == 3


def test_log_format_flag_is_on_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        client_main(["train", "--help"])
    assert "--log-format {text,json}" in capsys.readouterr().out


def _tfrecords(path: Path) -> list[bytes]:
    """The payloads of a TFRecord file (length, crc, data, crc)."""
    data, out, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        out.append(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
    return out


@pytest.mark.skipif(not tensorboard_available(), reason="needs tensorboardX")
def test_metrics_log_writes_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboardX.proto.event_pb2 import Event

    metrics = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    for step, loss in enumerate((3.0, 2.5)):
        metrics.write(event="step", client="alice", round=0, step=step, loss=loss, lr=0.1, seconds=0.2,
                      bytes_sent=100, bytes_received=90, tokens=12)
    metrics.write(event="round", client="alice", round=0, clients=3, samples=24)
    metrics.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    (events,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = {}
    for payload in _tfrecords(events):
        event = Event.FromString(payload)
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert scalars["train/loss"] == [(0, 3.0), (1, 2.5)]
    assert scalars["round/clients"] == [(0, 3.0)] and "train/bytes_sent" in scalars
