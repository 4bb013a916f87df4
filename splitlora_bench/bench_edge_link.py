"""Edge link: the SplitLoRA run with each client in its own network namespace behind a rate-limited link
(`tc tbf`, both directions), measured for real. tbf limits the rate only: no latency is added (netem is not
available here)."""
from __future__ import annotations

import signal
import statistics
import sys
import threading
from pathlib import Path

from splitlora_bench import assets, procs, report, split_run
from splitlora_bench.netns import Links, netns_unavailable
from splitlora_bench.options import BenchConfig

PORT = 50051  # inside the server's own namespace, so always free


def run_linked(cfg: BenchConfig, model: Path, clients: int, rate: int, codec: str, work: Path) -> dict:
    """One round of --edge-steps steps for `clients` clients behind links of `rate` Mbit/s (0: no limit)."""
    procs.fresh(work)
    with Links(clients, rate or None) as links:
        flags = split_run.server_flags(cfg, model, clients, 1, cfg.edge_steps, codec, work / "server")
        server, port = procs.start_server([*flags, "--host", "0.0.0.0"], work / "server.log", cfg.threads,
                                          prefix=links.prefix(links.server_ns), port=PORT)
        logs = [work / f"client-{i}.log" for i in range(clients)]
        started = [procs.start_client(split_run.client_flags(cfg, model, f"{links.server_address(i)}:{port}", i,
                                                             clients, codec, work / f"client-{i}"),
                                      logs[i], cfg.threads, prefix=links.prefix(ns))
                   for i, ns in enumerate(links.client_ns)]
        try:
            procs.wait_all(started, timeout=24 * 3600, logs=logs)
            server.wait(timeout=120)
        finally:
            procs.stop([server, *started])
    return split_run.summarize([work / f"client-{i}" / "metrics.jsonl" for i in range(clients)])


def run(cfg: BenchConfig) -> Path:
    """Every codec at every rate; write edge-link.{json,md,png}."""
    reason = netns_unavailable()
    if reason:
        return report.write(cfg.out_dir, "edge-link", "Edge link (skipped)", {"skipped": reason}, [],
                            [f"skipped: {reason}"])
    model = assets.model_dir(cfg)
    if threading.current_thread() is threading.main_thread():  # a SIGTERM still removes the namespaces
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    for clients in cfg.edge_clients:
        configs = [(codec, rate) for codec in cfg.edge_codecs for rate in cfg.edge_rates_mbit]
        for rep in range(cfg.edge_repeats):  # every configuration once per repeat, in a rotated order
            for codec, rate in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                name = f"edge-{clients}-{codec}-{rate or 'unlimited'}-{rep}"
                r = run_linked(cfg, model, clients, rate, codec, cfg.out_dir / "work" / name)
                runs.append({"clients": clients, "link_mbit": rate or "unlimited", "codec": codec, "repeat": rep,
                             **{k: v for k, v in r.items() if k != "losses"}})
    results, rows = [], []
    for clients in cfg.edge_clients:
        for codec in cfg.edge_codecs:
            for rate in [r or "unlimited" for r in cfg.edge_rates_mbit]:
                same = [r for r in runs if (r["clients"], r["codec"], r["link_mbit"]) == (clients, codec, rate)]
                per_step = same[0]["bytes_up_per_step"] + same[0]["bytes_down_per_step"]
                results.append({"clients": clients, "link_mbit": rate, "codec": codec,
                                "step_s_median": statistics.median(r["step_s_median"] for r in same)})
                rows.append({**results[-1], "step_s_each_repeat": " / ".join(f"{r['step_s_median']:.2f}" for r in same),
                             "KB_per_step": per_step / 1e3,
                             "transfer_s_per_step_at_rate": per_step * 8 / (rate * 1e6) if rate != "unlimited"
                             else 0.0})
    series = {}
    for n in cfg.edge_clients:
        for c in cfg.edge_codecs:
            line = [r for r in results if (r["clients"], r["codec"]) == (n, c)]
            series[f"{n} client{'s' * (n > 1)}, {c}"] = ([str(r["link_mbit"]) for r in line],
                                                      [r["step_s_median"] for r in line])
    plots = [p for p in [report.plot(cfg.out_dir / "edge-link.png", series, "link (Mbit/s each way)",
                                     "median client step (s)", "Client step time behind a rate-limited link",
                                     kind="bar")] if p]
    notes = [f"{' and '.join(map(str, cfg.edge_clients))} clients, each in its own network namespace with a veth pair "
             "to the server's namespace; "
             "`tc qdisc tbf` on both ends (rate only, no added latency: netem is not available)",
             f"one round of {cfg.edge_steps} steps per client, batch {cfg.batch_size}; step_s_median is the client's "
             "step (forward, transfer, server, transfer, backward) as its metrics record it, median over clients and "
             f"steps, then over {cfg.edge_repeats} repeats (each repeat runs every configuration, in a rotated order)",
             "transfer_s_per_step_at_rate: the bytes of one step at the link rate, the least the link adds"]
    return report.write(cfg.out_dir, "edge-link", "Edge link: real rate-limited links (netns + tbf)",
                        {"runs": runs}, rows, notes, plots)
