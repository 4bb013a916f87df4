"""Helpers for the hostile-client tests (issue 14): a split server over mutual TLS with certificates from the certs
helper, a legitimate client whose step times are measured, raw calls an attacker makes, and the server's RSS.

The attacks come from authenticated clients (alice: enrolled; carol: holds a certificate but never joins); bob is the
legitimate client. The legitimate client's rate is compared as a ratio of medians of per-step times, alone and under
attack, measured in alternating blocks so that the machine's own load affects both alike.
"""
from __future__ import annotations

import queue
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import grpc
import torch

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.tls import ClientTlsOptions, open_channel
from splitlora_client.session import SplitSession
from tests.support.servers import ClientSide, Harness, metadata, running_server, server_fingerprint

TRAIN = "/splitlora.v1.SplitTraining/Train"
SUBMIT = "/splitlora.v1.Aggregator/Submit"
def mtls(certs: Path, who: str) -> ClientTlsOptions:
    """Client TLS options with `who`'s certificate from `certs`."""
    return ClientTlsOptions(tls_ca=str(certs / "ca.pem"), tls_cert=str(certs / f"{who}.pem"),
                            tls_key=str(certs / f"{who}.key"))


def server_tls(certs: Path) -> dict[str, object]:
    """The server's mutual-TLS settings (as serve_config overrides)."""
    return {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
            "tls_ca": str(certs / "ca.pem"), "require_client_cert": True}


@contextmanager
def mtls_server(model_dir: Path, output: Path, certs: Path, **overrides: object) -> Iterator[Harness]:
    """A split server with its aggregator over mutual TLS; the harness channel is the admin's."""
    with running_server(model_dir, output, client_tls=mtls(certs, "admin"), **server_tls(certs),
                        **overrides) as harness:
        yield harness


def channel_of(harness: Harness, certs: Path, who: str) -> grpc.Channel:
    return open_channel(f"localhost:{harness.running.port}", mtls(certs, who),
                        options=[("grpc.max_receive_message_length", 64 << 20)])


def rss_bytes() -> int:
    """Resident memory of this process (the server runs in it)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class Legit:
    """A legitimate client (bob) training round 0 step by step; `steps(n)` returns each step's duration."""

    def __init__(self, harness: Harness, certs: Path, model_dir: Path, who: str = "bob") -> None:
        self.channel = channel_of(harness, certs, who)
        self.session = SplitSession(self.channel, who)
        self.reply = self.session.join(server_fingerprint(harness), [tpb.CODEC_RAW], timeout=30)
        self.client = ClientSide(model_dir)
        self.batch = self.client.batch(4, seed=7)
        self.hidden = self.client.hidden(self.batch)
        self.next_step = 0

    def steps(self, n: int) -> list[float]:
        """`n` steps through the server (the same batch each time: the server's work is what is measured)."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            result = self.session.step(self.next_step, 0, self.hidden, self.batch["attention_mask"],
                                       self.batch["labels"], self.batch["position_ids"])
            times.append(time.perf_counter() - start)
            assert torch.isfinite(result.grad).all()
            self.next_step += 1
        return times

    def close(self) -> None:
        self.session.close()
        self.channel.close()


def steps_under_attack(legit: Legit, attack_on: Callable[[], None], attack_off: Callable[[], None],
                       blocks: int = 3, per_block: int = 8) -> int:
    """Blocks of the legitimate client's steps alternately alone and under attack; the steps done under attack.

    Every step must come back with a finite gradient (`Legit.steps` checks it). How much slower the steps are under
    attack is a timing and is measured by `scripts/hostile_load.py` (SECURITY.md), never asserted in a test.
    """
    legit.steps(3)  # warm up
    attacked = 0
    for _ in range(blocks):
        legit.steps(per_block)
        attack_on()
        attacked += len(legit.steps(per_block))
        attack_off()
    return attacked


class HeldStreams:
    """Client-streaming calls that an attacker opens and keeps open, sending what it is given (or nothing)."""

    def __init__(self, channel: grpc.Channel, method: str, md: list[tuple[str, str]] | None = None) -> None:
        self.call_of = channel.stream_stream(method) if method == TRAIN else channel.stream_unary(method)
        self.md, self.queues, self.calls = md, [], []
        self.codes: "queue.Queue[grpc.StatusCode]" = queue.Queue()

    def open(self, count: int, first: bytes | None = None) -> None:
        """Open `count` streams; each sends `first` (raw bytes) if given, then nothing until released."""
        for _ in range(count):
            requests: queue.Queue = queue.Queue()
            if first is not None:
                requests.put(first)
            call = self.call_of.future(iter(requests.get, None), metadata=self.md) \
                if hasattr(self.call_of, "future") else self.call_of(iter(requests.get, None), metadata=self.md)
            call.add_done_callback(lambda done: self.codes.put(done.code()))
            self.queues.append(requests)
            self.calls.append(call)

    def ended(self, timeout: float = 30.0) -> list[grpc.StatusCode]:
        """The status of every stream, waiting until each has ended."""
        return [self.codes.get(timeout=timeout) for _ in self.calls]

    def release(self) -> None:
        for requests in self.queues:
            requests.put(None)
        for call in self.calls:
            call.cancel()


def joined_metadata(channel: grpc.Channel, harness: Harness, who: str) -> list[tuple[str, str]]:
    """Join as `who` over its own channel; the Train metadata of its session."""
    reply = sgrpc.SplitTrainingStub(channel).Join(
        spb.JoinRequest(client_id=who, fingerprint=server_fingerprint(harness)), timeout=30)
    return metadata(who, reply.session)


def flood_partial_frames(address: str, certs: Path, who: str, session: str, count: int, pieces: int,
                         piece: int, seconds: float) -> int:
    """Open Train streams that send `pieces` of a frame announced as `count` pieces and end, for `seconds`;
    return how many streams were sent."""
    channel = open_channel(address, mtls(certs, who))
    stub, md, sent = sgrpc.SplitTrainingStub(channel), metadata(who, session), 0
    frames = [spb.ClientFrame(part=tpb.FramePart(message_id=1, index=i, count=count, data=b"\0" * piece))
              for i in range(pieces)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            list(stub.Train(iter(frames), metadata=md, timeout=30))
        except grpc.RpcError:
            pass
        sent += 1
    channel.close()
    return sent


if __name__ == "__main__":  # python -m tests.support.attacks ADDRESS CERTS WHO SESSION COUNT PIECES SIZE SECONDS
    import sys

    args = sys.argv[1:]
    print(flood_partial_frames(args[0], Path(args[1]), args[2], args[3], *map(int, args[4:7]), float(args[7])))
