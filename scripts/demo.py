"""`make demo`: an aggregator, a split server and three clients on loopback, with the built-in tiny model and
data; shows progress and the validation loss of each round, ends with an exported whole-model adapter and a few
completions generated through the split before and after fine-tuning.

Every role runs as its own process through the console scripts, exactly as on separate machines, and every
connection is mutual TLS with certificates made by `splitlora-server certs` into <output>/certs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from splitlora_bench.procs import BIN
from common.data import synthetic_e2e, write_examples

CLIENTS = ("alice", "bob", "carol")
TRAINING = ["--rounds", "5", "--local-steps", "30", "--batch-size", "8", "--learning-rate", "3e-3",
            "--warmup-steps", "10", "--seed", "0"]
LORA = ["--lora-targets", "c_attn,c_proj,c_fc", "--lora-r", "8"]  # the server's: clients take them with its plan


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _make_certs(certs: Path, env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "splitlora-server"), "certs", "--output", str(certs), "--server-names",
                    "localhost,127.0.0.1", "--clients", ",".join(CLIENTS), "--log-level", "WARNING"],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def _server_tls(certs: Path) -> list[str]:
    return ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
            "--tls-ca", str(certs / "ca.pem"), "--require-client-cert"]


def _client_tls(certs: Path, name: str) -> list[str]:
    return ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{name}.pem"),
            "--tls-key", str(certs / f"{name}.key")]


def _steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == "step"]


def _validation(out: Path) -> dict[int, list[float]]:
    per_round: dict[int, list[float]] = {}
    for name in CLIENTS:
        path = out / name / "metrics.jsonl"
        for r in map(json.loads, path.read_text().splitlines() if path.exists() else []):
            if r.get("event") == "validation":
                per_round.setdefault(r["round"], []).append(r["loss"])
    return per_round


def _completions(server: str, out: Path, certs: Path, env: dict[str, str]) -> None:
    """A few held-out contexts completed through the split, with the base model and with the fine-tuned one."""
    prompts = out / "prompts.txt"
    prompts.write_text("".join(ex.context + "\n" for ex in synthetic_e2e(3, seed=12345)))
    runs = {"before fine-tuning": ["--adapter", "none", "--server-adapter", "none"],
            "after fine-tuning": ["--output", str(out / "alice")]}
    texts = {}
    for label, adapter in runs.items():
        done = subprocess.run([str(BIN / "splitlora-client"), "generate", "--server", server, "--client-id", "alice",
                               "--prompts", str(prompts), "--max-new-tokens", "24", "--batch-size", "3", *adapter,
                               *LORA, *_client_tls(certs, "alice")], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"generation failed: {done.stdout[-500:]} {done.stderr[-1500:]}", file=sys.stderr)
            return
        texts[label] = done.stdout.splitlines()
    for i, context in enumerate(prompts.read_text().splitlines()):
        print(f"\n  {context}")
        for label, lines in texts.items():
            print(f"    {label:>18}: {lines[i] if i < len(lines) else ''}")


def _watch(procs: dict[str, subprocess.Popen], out: Path, rounds: int, total: int) -> bool:
    """Show the federation's progress and each round's validation loss until every client and the aggregator are
    done (the server stays up to serve generation); False if a process failed."""
    training = {n: p for n, p in procs.items() if n != "server"}
    shown: set[int] = set()
    with tqdm(total=total, unit="step", desc="training", dynamic_ncols=True) as bar:
        while any(p.poll() is None for p in training.values()):
            for rnd, losses in sorted(_validation(out).items()):
                if rnd not in shown and len(losses) == len(CLIENTS):
                    shown.add(rnd)
                    bar.write(f"round {rnd} of 0-{rounds - 1}: validation loss {sum(losses) / len(losses):.3f}")
            records = [r for name in CLIENTS for r in _steps(out / name / "metrics.jsonl")]
            if records:
                latest = sorted(records, key=lambda r: r["time"])[-len(CLIENTS):]
                loss = sum(r["loss"] for r in latest) / len(latest)
                bar.set_postfix(round=f"{max(r['round'] for r in records)} of 0-{rounds - 1}", loss=f"{loss:.3f}")
                bar.update(len(records) - bar.n)
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                for p in procs.values():
                    p.kill()
                print(f"demo failed: {', '.join(failed)} exited with an error; see {out}/logs", file=sys.stderr)
                return False
            time.sleep(0.5)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="runs/demo", help="directory for logs, metrics and the adapter")
    parser.add_argument("--port", type=int, default=50051, help="split server port (aggregator: port + 1)")
    args = parser.parse_args()
    out = Path(args.output).resolve()
    for old in ("aggregator", "server", "adapter", *CLIENTS):  # every role resumes from its output: start afresh
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server, aggregator = f"127.0.0.1:{args.port}", f"127.0.0.1:{args.port + 1}"
    rounds, local_steps = int(TRAINING[1]), int(TRAINING[3])
    certs = out / "certs"
    _make_certs(certs, env)
    print(f"SplitLoRA demo: aggregator {aggregator}, server {server}, clients {', '.join(CLIENTS)}; mutual TLS with "
          f"certificates in {certs}; logs in {out}/logs")
    procs = {
        "aggregator": _spawn([str(BIN / "splitlora-server"), "aggregate", "--port", str(args.port + 1), "--clients",
                              str(len(CLIENTS)), "--rounds", str(rounds), "--output", str(out / "aggregator"),
                              *LORA, *_server_tls(certs)], out / "logs" / "aggregator.log", env),
        "server": _spawn([str(BIN / "splitlora-server"), "serve", "--port", str(args.port), "--clients",
                          str(len(CLIENTS)), "--aggregator", aggregator, "--output", str(out / "server"), *TRAINING,
                          *LORA, *_server_tls(certs), "--serve-after-training"], out / "logs" / "server.log", env),
    }
    held_out = out / "valid.txt"  # every client's own held-out lines (here: the same synthetic ones)
    write_examples(held_out, synthetic_e2e(48, seed=4242))
    for i, name in enumerate(CLIENTS):
        procs[name] = _spawn([str(BIN / "splitlora-client"), "train", "--server", server, "--client-id", name,
                              "--seed", str(i), "--output", str(out / name), "--no-progress", *LORA,
                              "--eval-data", str(held_out), *_client_tls(certs, name)],
                             out / "logs" / f"{name}.log", env)
    if not _watch(procs, out, rounds, rounds * local_steps * len(CLIENTS)):
        return 1
    server_proc = procs["server"]
    while server_proc.poll() is None and not (out / "server" / "server_adapter.safetensors").exists():
        time.sleep(0.5)  # the server exports its adapter after the last round, then keeps serving
    export = subprocess.run([str(BIN / "splitlora-server"), "export", "--aggregator-dir", str(out / "aggregator"),
                             "--server-adapter", str(out / "server" / "server_adapter.safetensors"),
                             "--output", str(out / "adapter"), "--log-level", "WARNING"], env=env,
                            stdout=subprocess.DEVNULL)
    if export.returncode:
        server_proc.terminate()
        return export.returncode
    per_round = {}
    for name in CLIENTS:
        for r in _steps(out / name / "metrics.jsonl"):
            per_round.setdefault(r["round"], []).append(r["loss"])
    print("mean training loss per round: " + ", ".join(f"round {r}: {sum(v) / len(v):.3f}"
                                                      for r, v in sorted(per_round.items())))
    print("validation loss per round: " + ", ".join(f"round {r}: {sum(v) / len(v):.3f}"
                                                    for r, v in sorted(_validation(out).items())))
    print(f"exported adapter: {out / 'adapter'} (load it with peft.PeftModel.from_pretrained on the base model)")
    print("completions generated through the split (alice's part and the server's part, greedy):")
    _completions(server, out, certs, env)
    server_proc.terminate()
    server_proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
