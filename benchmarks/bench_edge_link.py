"""Edge link: the SplitLoRA run with each client in its own network namespace behind a rate-limited link
(`tc tbf`, both directions), measured for real. tbf limits the rate only: no latency is added (netem is not
available here)."""
from __future__ import annotations

from pathlib import Path

from benchmarks import assets, procs, report, split_run
from benchmarks.config import BenchConfig
from benchmarks.netns import Links, netns_unavailable


PORT = 50051  # inside the server's own namespace, so always free


def run_linked(cfg: BenchConfig, model: Path, rate: int, codec: str, work: Path) -> dict:
    """One round of --edge-steps steps for --clients clients behind links of `rate` Mbit/s (0: no limit)."""
    with Links(cfg.clients, rate or None) as links:
        flags = split_run.server_flags(cfg, model, cfg.clients, 1, cfg.edge_steps, codec, work / "server")
        server, port = procs.start_server([*flags, "--host", "0.0.0.0"], work / "server.log", cfg.threads,
                                          prefix=links.prefix(links.server_ns), port=PORT)
        logs = [work / f"client-{i}.log" for i in range(cfg.clients)]
        clients = [procs.start_client(split_run.client_flags(cfg, model, f"{links.server_address(i)}:{port}", i,
                                                             cfg.clients, codec, work / f"client-{i}"),
                                      logs[i], cfg.threads, prefix=links.prefix(ns))
                   for i, ns in enumerate(links.client_ns)]
        try:
            procs.wait_all(clients, timeout=24 * 3600, logs=logs)
            server.wait(timeout=120)
        finally:
            procs.stop([server, *clients])
    return split_run.summarize([work / f"client-{i}" / "metrics.jsonl" for i in range(cfg.clients)])


def run(cfg: BenchConfig) -> Path:
    """Every codec at every rate; write edge-link.{json,md,png}."""
    reason = netns_unavailable()
    if reason:
        return report.write(cfg.out_dir, "edge-link", "Edge link (skipped)", {"skipped": reason}, [],
                            [f"skipped: {reason}"])
    model = assets.model_dir(cfg)
    results = []
    for codec in cfg.edge_codecs:
        for rate in cfg.edge_rates_mbit:
            name = f"edge-{codec}-{rate or 'unlimited'}"
            r = run_linked(cfg, model, rate, codec, cfg.out_dir / "work" / name)
            results.append({"link_mbit": rate or "unlimited", "codec": codec, **{k: v for k, v in r.items()
                                                                                  if k != "losses"}})
    rows = []
    for r in results:
        per_step = r["bytes_up_per_step"] + r["bytes_down_per_step"]
        rate = r["link_mbit"]
        rows.append({"link_mbit": rate, "codec": r["codec"], "step_s_median": r["step_s_median"],
                     "wall_s": r["wall_s"], "KB_per_step": per_step / 1e3,
                     "transfer_s_per_step_at_rate": per_step * 8 / (rate * 1e6) if rate != "unlimited" else 0.0})
    series = {c: ([str(r["link_mbit"]) for r in results if r["codec"] == c],
                  [r["step_s_median"] for r in results if r["codec"] == c]) for c in cfg.edge_codecs}
    plots = [p for p in [report.plot(cfg.out_dir / "edge-link.png", series, "link (Mbit/s each way)",
                                     "median client step (s)", "Client step time behind a rate-limited link",
                                     kind="bar")] if p]
    notes = [f"{cfg.clients} clients, each in its own network namespace with a veth pair to the server's namespace; "
             "`tc qdisc tbf` on both ends (rate only, no added latency: netem is not available)",
             f"one round of {cfg.edge_steps} steps per client, batch {cfg.batch_size}; step_s_median is the client's "
             "step (forward, transfer, server, transfer, backward) as its metrics record it",
             "transfer_s_per_step_at_rate: the bytes of one step at the link rate, the least the link adds"]
    return report.write(cfg.out_dir, "edge-link", "Edge link: real rate-limited links (netns + tbf)",
                        {"results": results}, rows, notes, plots)
