"""Every hostile-client attack of issue 14 at once, for a fixed time, against a training run over mutual TLS.

    .venv/bin/python scripts/hostile_load.py --seconds 60 [--out results.json]

Starts `splitlora-server serve` (built-in model, certificates from the certs helper, default limits) and one
legitimate client (bob) that trains step after step in this process; measures bob's steps/s alone, then starts an
attacker process (mallory: enrolled; eve: a certificate, never joined) that runs, in parallel threads:
idle Train streams, idle Submit streams, partial frames that are never completed, undecodable messages, shapes
that overflow, uploads with another layout or float64 values, and 1 MiB client ids. Every second it samples the
server's RSS and threads; at the end it prints bob's rate alone and under attack, the samples, and the attacker's
calls by the status code they ended with.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.adapter_layout import adapter_layout  # noqa: E402
from common.builtin import ensure_builtin_model  # noqa: E402
from common.fingerprint import compute_fingerprint  # noqa: E402
from common.lora import to_bytes  # noqa: E402
from common.rpc.splitlora.v1 import aggregator_pb2 as apb  # noqa: E402
from common.rpc.splitlora.v1 import split_pb2 as spb  # noqa: E402
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc  # noqa: E402
from common.rpc.splitlora.v1 import tensor_pb2 as tpb  # noqa: E402
from common.split.parts import LoraSettings, SplitPart  # noqa: E402
from common.tls import ClientTlsOptions, open_channel  # noqa: E402
from splitlora_client.session import SplitSession  # noqa: E402
from splitlora_server.ops.certs import CertsConfig, make_certs  # noqa: E402

BIN = Path(sys.executable).parent
TRAIN, SUBMIT = "/splitlora.v1.SplitTraining/Train", "/splitlora.v1.Aggregator/Submit"


def tls(certs: Path, who: str) -> ClientTlsOptions:
    return ClientTlsOptions(tls_ca=str(certs / "ca.pem"), tls_cert=str(certs / f"{who}.pem"),
                            tls_key=str(certs / f"{who}.key"))


def proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


# -- the attacker process ------------------------------------------------------------------------------------------
class Attacker:
    """Runs every attack in threads until `deadline`; counts the status codes the calls end with."""

    def __init__(self, address: str, certs: Path, seconds: float) -> None:
        self.address, self.certs, self.deadline = address, certs, time.monotonic() + seconds
        self.codes: Counter = Counter()
        self.lock = threading.Lock()
        self.mallory, self.eve = open_channel(address, tls(certs, "mallory")), open_channel(address, tls(certs, "eve"))
        model = ensure_builtin_model()
        reply = sgrpc.SplitTrainingStub(self.mallory).Join(spb.JoinRequest(
            client_id="mallory", fingerprint=compute_fingerprint(model, 3, LoraSettings())), timeout=60)
        self.md = [("x-splitlora-client-id", "mallory"), ("x-splitlora-session", reply.session)]
        self.layout = adapter_layout(model, "client", 3, LoraSettings())

    def count(self, code: grpc.StatusCode) -> None:
        with self.lock:
            self.codes[code.name] += 1

    def call(self, fn) -> None:
        try:
            fn()
            self.count(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            self.count(err.code())

    def loop(self, fn) -> None:
        while time.monotonic() < self.deadline:
            self.call(fn)

    def idle_streams(self, channel: grpc.Channel, method: str, md) -> None:
        """Open 200 streams that send nothing, again each time they are cancelled."""
        call_of = channel.stream_stream(method) if method == TRAIN else channel.stream_unary(method)
        while time.monotonic() < self.deadline:
            held = []
            for _ in range(200):
                requests: queue.Queue = queue.Queue()
                call = call_of.future(iter(requests.get, None), metadata=md) if method == SUBMIT else \
                    call_of(iter(requests.get, None), metadata=md)
                call.add_done_callback(lambda done: self.count(done.code()))
                held.append((requests, call))
            time.sleep(3.0)
            for requests, call in held:
                requests.put(None)
                call.cancel()

    def partial_frames(self) -> None:
        """Frames announcing 2**32-1 pieces, and frames of 16 pieces that end after 15, in turn."""
        stub = sgrpc.SplitTrainingStub(self.mallory)
        piece = b"\0" * (16 << 10)
        huge = [spb.ClientFrame(part=tpb.FramePart(message_id=1, index=i, count=2**32 - 1, data=piece))
                for i in range(4)]
        partial = [spb.ClientFrame(part=tpb.FramePart(message_id=1, index=i, count=16, data=piece)) for i in range(15)]
        while time.monotonic() < self.deadline:
            for frames in (huge, partial):
                self.call(lambda: list(stub.Train(iter(frames), metadata=self.md, timeout=30)))

    def undecodable(self) -> None:
        train = self.mallory.stream_stream(TRAIN)
        self.loop(lambda: list(train(iter([b"\xff\xff\xff not a frame"]), metadata=self.md, timeout=30)))

    def huge_shape(self) -> None:
        hidden = tpb.Tensor(shape=[0, 2**62, 128], dtype=tpb.DTYPE_FLOAT32, data=b"")
        frame = spb.ClientFrame(forward=spb.StepForward(step=0, round=0, hidden=hidden))
        stub = sgrpc.SplitTrainingStub(self.mallory)
        self.loop(lambda: list(stub.Train(iter([frame]), metadata=self.md, timeout=30)))

    def bad_uploads(self) -> None:
        submit = self.mallory.stream_unary(SUBMIT)
        f64 = to_bytes({k: torch.full(s, 1e300, dtype=torch.float64) for k, s in self.layout.items()})
        bogus = to_bytes({"bogus": torch.zeros(3)})

        def upload(data: bytes):
            yield apb.AdapterUpload(client_id="mallory", round=0, num_samples=1, safetensors_chunk=data[:1 << 20])
            for offset in range(1 << 20, len(data), 1 << 20):
                yield apb.AdapterUpload(safetensors_chunk=data[offset:offset + (1 << 20)])

        while time.monotonic() < self.deadline:
            for data in (f64, bogus):
                self.call(lambda: submit(map(apb.AdapterUpload.SerializeToString, upload(data)), timeout=30))

    def long_ids(self) -> None:
        stub = sgrpc.SplitTrainingStub(self.eve)
        self.loop(lambda: stub.Join(spb.JoinRequest(client_id="e" * (1 << 20)), timeout=30))

    def run(self) -> dict:
        jobs = [lambda: self.idle_streams(self.mallory, TRAIN, self.md),
                lambda: self.idle_streams(self.eve, SUBMIT, None), self.partial_frames, self.undecodable,
                self.huge_shape, self.bad_uploads, self.long_ids]
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(self.deadline - time.monotonic(), 0) + 30)
        return dict(self.codes)


# -- the run -------------------------------------------------------------------------------------------------------
def legit_steps(session: SplitSession, part: SplitPart, seconds: float, start_step: int) -> tuple[list[float], int]:
    """bob's step durations for `seconds`."""
    from common.data import collate, encode, synthetic_e2e
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(part.model_dir), local_files_only=True)
    batch = collate([encode(tok, ex, 64) for ex in synthetic_e2e(4, seed=1)], tok.pad_token_id)
    with torch.no_grad():
        hidden = part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    times, step, end = [], start_step, time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        session.step(step, 0, hidden, batch["attention_mask"], batch["labels"], batch["position_ids"])
        times.append(time.perf_counter() - t)
        step += 1
    return times, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="How long the attacks run.")
    parser.add_argument("--out", default="", help="Write the results as JSON here too.")
    parser.add_argument("--attack", nargs=3, metavar=("ADDRESS", "CERTS", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        print(json.dumps(Attacker(args.attack[0], Path(args.attack[1]), float(args.attack[2])).run()))
        return
    work = Path(tempfile.mkdtemp(prefix="hostile-load-"))
    certs = work / "certs"
    make_certs(CertsConfig(output=str(certs), clients=["bob", "mallory", "eve"], days=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([str(BIN / "splitlora-server"), "serve", "--port", "0", "--clients", "2", "--rounds", "1",
                               "--local-steps", "100000", "--batch-size", "4", "--output", str(work / "server"),
                               "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                               "--tls-ca", str(certs / "ca.pem"), "--require-client-cert", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, stderr=(work / "server.log").open("w"), text=True, env=env)
    port = re.search(r":(\d+)", server.stdout.readline()).group(1)
    address = f"localhost:{port}"
    samples, stop = [], threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(1.0):
            rss, threads = proc_sample(server.pid)
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mib": round(rss, 1), "threads": threads})

    threading.Thread(target=sample, daemon=True).start()
    try:
        session = SplitSession(open_channel(address, tls(certs, "bob")), "bob")
        session.join(compute_fingerprint(ensure_builtin_model(), 3, LoraSettings()), [tpb.CODEC_RAW], timeout=60)
        part = SplitPart(ensure_builtin_model(), "client", 3, LoraSettings())
        alone, step = legit_steps(session, part, max(args.seconds / 3, 10.0), 0)
        # the attacker niced: on this shared machine it stands for a client on a machine of its own
        attacker = subprocess.Popen(["nice", "-n", "19", sys.executable, __file__, "--attack", address, str(certs),
                                     str(args.seconds)],
                                    stdout=subprocess.PIPE, text=True, env=env)
        attacked, step = legit_steps(session, part, args.seconds, step)
        codes = json.loads(attacker.communicate(timeout=args.seconds + 120)[0].strip().splitlines()[-1])
        session.close()
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
    result = {"seconds": args.seconds, "steps_per_s_alone": round(1 / statistics.median(alone), 2),
              "steps_per_s_attacked": round(1 / statistics.median(attacked), 2),
              "ratio": round(statistics.median(alone) / statistics.median(attacked), 3),
              "server_rss_mib_max": max(s["rss_mib"] for s in samples), "server_threads_max":
              max(s["threads"] for s in samples), "attacker_calls_by_code": codes, "samples": samples,
              "server_log_lines": len((work / "server.log").read_text().splitlines())}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print("t(s)  rss(MiB)  threads")
    for s in samples[::max(len(samples) // 20, 1)]:
        print(f"{s['t']:5.0f}  {s['rss_mib']:8.1f}  {s['threads']:7d}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
