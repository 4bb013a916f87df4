"""Every benchmark of `splitlora-bench` runs end to end at a tiny size (built-in model, synthetic data).
No timing is asserted: only that each writes its JSON, Markdown and plots with sane contents."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.data import load_examples, synthetic_e2e, write_examples
from splitlora_bench import assets
from splitlora_bench.cli import build_parser, run_benchmarks
from splitlora_bench.netns import PREFIX, namespaces, netns_unavailable
from splitlora_bench.options import BenchConfig


@pytest.fixture(scope="module")
def smoke(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BenchConfig:
    """Tiny sizes everywhere; the built-in model (6 x 128) and its synthetic data instead of GPT-2 and E2E."""
    data = tmp_path_factory.mktemp("bench-data")
    write_examples(data / "train.txt", synthetic_e2e(96, seed=1))
    write_examples(data / "eval.txt", synthetic_e2e(16, seed=2))
    cfg = BenchConfig(out=str(tmp_path_factory.mktemp("bench")), model=str(builtin_model_dir),
                      train_data=str(data / "train.txt"), eval_data=str(data / "eval.txt"), eval_examples=8,
                      split_layer=3, batch_size=2, max_seq_len=64, threads=1, overhead_steps=1, overhead_warmup=1,
                      wire_codecs=["int8"], wire_rounds=1, wire_local_steps=2, scaling_clients=[1, 2],
                      scaling_seconds=0.5, scaling_warmup_s=0.2, scaling_shapes=["2x16"], scaling_repeats=1,
                      clients=1, rounds=1, local_steps=2,
                      project_shapes=[], edge_rates_mbit=[50], edge_codecs=["int8"], edge_steps=2,
                      edge_clients=[1], edge_repeats=1)
    cfg.validate()
    return cfg


def _result(cfg: BenchConfig, name: str) -> dict:
    out = cfg.out_dir
    assert (out / f"{name}.md").read_text().startswith("## ")
    return json.loads((out / f"{name}.json").read_text())


def test_the_command_line_knows_every_benchmark():
    parser = build_parser()
    for name in ("overhead", "pipeline", "wire", "scaling", "time-to-target", "edge-link", "aggregation", "generate",
                 "privacy", "all"):
        assert parser.parse_args([name, "--out", "x"])._run


def test_overhead(smoke: BenchConfig):
    run_benchmarks(smoke, ["overhead"])
    (row,) = _result(smoke, "overhead")["table"]
    assert row["split_step_s"] > 0 and row["local_step_s"] > 0 and row["ratio"] > 0 and row["wire_MB_per_step"] > 0
    (result,) = _result(smoke, "overhead")["results"]
    assert result["forward_s"] > 0 and result["client_cpu_s"] > 0  # from the client's metrics.jsonl
    assert result["server_s"] > 0 and result["server_decode_s"] > 0 and result["server_cpu_s"] > 0  # the server's
    assert result["same_batches"] and result["paired_ratio"]["median"] > 0  # per-batch ratios pair the same batch


def test_pipeline(smoke: BenchConfig):
    run_benchmarks(dataclasses.replace(smoke, pipeline_micro_batches=[1, 2]), ["pipeline"])
    result = _result(smoke, "pipeline")
    assert [r["micro_batches"] for r in result["table"]] == [0, 1, 2]
    assert all(r["median_step_s"] > 0 for r in result["table"]) and len(result["split"]["2"]) == 1
    assert "load average" in (smoke.out_dir / "pipeline.md").read_text()


def test_wire(smoke: BenchConfig):
    run_benchmarks(smoke, ["wire"])
    (row,) = _result(smoke, "wire")["table"]  # one codec keeps it quick; the ratios need float32 too
    assert row["codec"] == "int8" and row["KB_up_per_step"] > row["KB_down_per_step"] > 0
    assert row["final_val_loss"] > 0 and row["encode+decode_ms"] > 0
    assert (smoke.out_dir / "wire.png").is_file()


def test_scaling(smoke: BenchConfig):
    run_benchmarks(smoke, ["scaling"])
    rows = _result(smoke, "scaling")["table"]
    assert {(r["clients"], r["batching"]) for r in rows} == {(1, "off"), (1, "on"), (2, "off"), (2, "on")}
    assert all(r["steps_per_s"] > 0 for r in rows)


def test_time_to_target(smoke: BenchConfig):
    run_benchmarks(smoke, ["time-to-target"])
    curves = _result(smoke, "time-to-target")["measured"]["curves"]
    assert [c["method"] for c in curves] == ["CenLoRA", "FedLoRA", "SplitLoRA"]
    assert all(len(c["val_loss"]) == 2 and c["samples"][-1] == 4 for c in curves)
    assert {p.name for p in smoke.out_dir.glob("ttt-*.png")} == {
        "ttt-loss-vs-samples.png", "ttt-loss-vs-measured-time.png", "ttt-modeled-tiny-gpu-client-100mbit.png",
        "ttt-modeled-tiny-gpu-client-1gbit.png"}


def test_privacy(smoke: BenchConfig, tmp_path: Path):
    write_examples(tmp_path / "public.txt", synthetic_e2e(64, seed=9))
    cfg = dataclasses.replace(smoke, out=str(tmp_path / "out"), pretrain_data=str(tmp_path / "public.txt"),
                              privacy_split_layers=[2], privacy_codecs=["float32"], privacy_noise=[1.0],
                              privacy_nopeek=[1.0], privacy_combined=["2+0.5"], privacy_steps=2, privacy_sequences=4,
                              privacy_public_lines=32, privacy_decoder_steps=20, privacy_opt_steps=5)
    run_benchmarks(cfg, ["privacy"])
    result = _result(cfg, "privacy")
    rows = result["table"]
    assert [(r["mode"], r["defense"].split()[0]) for r in rows] == [
        ("standard", "off"), ("standard", "noise"), ("standard", "nopeek"), ("standard", "nopeek+noise"),
        ("u-shape", "off"), ("u-shape", "noise")]
    assert rows[3]["defense"].startswith("nopeek+noise w=2 sigma=0.5 (C=")
    assert [r["labels_tok%"] for r in rows] == [100.0, 100.0, 100.0, 100.0, 0.0, 0.0]  # u-shape sends no labels
    off, base = rows[0]["val_loss"], result["base_val_loss"]
    assert rows[0]["gain_kept%"] == pytest.approx(100) and rows[1]["gain_kept%"] == pytest.approx(
        100 * (base - rows[1]["val_loss"]) / (base - off))
    assert all(0 <= r[m] <= 100 for r in rows for m in ("learn_tok%", "opt_tok%")) and all(r["val_loss"] > 0
                                                                                         for r in rows)
    assert (cfg.out_dir / "privacy.png").is_file()


@pytest.mark.skipif(bool(netns_unavailable()), reason=netns_unavailable() or "")
def test_edge_link(smoke: BenchConfig):
    run_benchmarks(smoke, ["edge-link"])
    rows = _result(smoke, "edge-link")["table"]
    assert [r["link_mbit"] for r in rows] == [50] and rows[0]["step_s_median"] > 0
    assert list(namespaces()) == []  # every namespace it made is gone


@pytest.mark.skipif(bool(netns_unavailable()), reason=netns_unavailable() or "")
def test_edge_link_removes_its_namespaces_when_terminated(smoke: BenchConfig, tmp_path: Path):
    flags = ["--model", smoke.model, "--train-data", smoke.train_data, "--eval-data", smoke.eval_data,
             "--eval-examples", "8", "--split-layer", "3", "--batch-size", "2", "--max-seq-len", "64", "--threads", "1",
             "--edge-rates-mbit", "50", "--edge-codecs", "int8", "--edge-clients", "1", "--edge-repeats", "1",
             "--edge-steps", "100000", "--out", str(tmp_path)]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("splitlora-bench")), "edge-link", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = f"{PREFIX}{proc.pid % 100000}"
    try:
        deadline = time.monotonic() + 120
        while not _namespaces_tagged(tag) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _namespaces_tagged(tag), "the benchmark never created its namespaces"
        proc.terminate()
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert _namespaces_tagged(tag) == []


def _namespaces_tagged(tag: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [ns for ns in listed if ns.startswith(tag)]


def test_edge_link_says_why_it_skipped(smoke: BenchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from splitlora_bench import bench_edge_link

    monkeypatch.setattr(bench_edge_link, "netns_unavailable", lambda: "network namespaces need root")
    bench_edge_link.run(dataclasses.replace(smoke, out=str(tmp_path)))
    result = json.loads((tmp_path / "edge-link.json").read_text())
    assert result["skipped"] == "network namespaces need root" and result["table"] == []
    assert "skipped: network namespaces need root" in (tmp_path / "edge-link.md").read_text()


def test_no_plots_without_matplotlib_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import builtins

    from splitlora_bench import report
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    assert report.plot(tmp_path / "x.png", {"a": ([1], [1])}, "x", "y", "t") is None


def test_the_benchmarks_install_as_splitlora_bench_not_as_a_top_level_benchmarks():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "splitlora_bench*" in packages and not any(p.startswith("benchmarks") for p in packages)
    assert project["project"]["scripts"]["splitlora-bench"] == "splitlora_bench.cli:main"


def test_nothing_but_the_benchmarks_import_them():
    root = Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for pkg in ("common", "splitlora_server", "splitlora_client")
                 for p in (root / pkg).rglob("*.py")
                 if "import splitlora_bench" in p.read_text() or "from splitlora_bench" in p.read_text()]
    assert offenders == []


def test_the_generated_base_is_pretrained_on_lines_the_validation_never_sees(builtin_model_dir: Path,
                                                                               tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    pool = synthetic_e2e(40, seed=3)
    write_examples(data / "lines.txt", pool)
    cfg = BenchConfig(out=str(tmp_path / "out"), tokenizer=str(builtin_model_dir), train_data=str(data / "lines.txt"),
                      eval_data="", pretrain_data=str(data / "lines.txt"), eval_examples=8, n_layer=2, n_embd=32, n_head=2, max_seq_len=32, pretrain_steps=12,
                      pretrain_batch=4, pretrain_learning_rate=3e-3)
    model = assets.model_dir(cfg)
    info = json.loads((model / assets.MARKER).read_text())["pretraining"]
    held_out = {ex.context for ex in pool[:8]}
    assert info["lines"] == sum(ex.context not in held_out for ex in pool) < len(pool)
    assert info["last10_loss"] < info["first_loss"]
    assert assets.model_dir(cfg) == model and not model.with_name(model.name + ".partial").exists()
    assert assets.model_dir(cfg, (2, 32)).name.endswith("-s0")  # timing-only shapes are not pretrained


def test_held_out_examples_share_no_context_with_the_fine_tuning_data(tmp_path: Path):
    pool = synthetic_e2e(60, seed=4)
    write_examples(tmp_path / "train.txt", pool)
    cfg = BenchConfig(out=str(tmp_path / "out"), train_data=str(tmp_path / "train.txt"), eval_data="",
                      eval_examples=10)
    train, held_out = assets.examples(cfg)
    assert held_out == pool[:10]
    assert train == [ex for ex in pool if ex.context not in {h.context for h in held_out}]
    assert load_examples(assets.train_file(cfg)) == train


def test_aggregation(smoke: BenchConfig):
    cfg = dataclasses.replace(smoke, aggregation_clients=[3], rounds=2, local_steps=2, warmup_steps=0,
                              learning_rate=1e-2, dirichlet_alpha=0.5)
    run_benchmarks(cfg, ["aggregation"])
    result = _result(cfg, "aggregation")
    rows = {(r["partition"], r["strategy"]): r for r in result["table"]}
    assert set(rows) == {(p, s) for p in ("iid", "dirichlet") for s in ("fedavg", "ffa", "fedex")}
    for run in result["runs"]:
        errors = run["extra"]["aggregation_error"][1:]
        assert len(run["val_loss"]) == 3 and len(errors) == 2
        if run["method"] == "fedavg":
            assert errors[-1] > 1e-4  # separate averaging of A and B is off once the clients diverge
        else:
            assert max(errors) < 1e-5
    assert sum(result["runs"][3]["shard_sizes"]) == sum(result["runs"][0]["shard_sizes"])


def test_generate(smoke: BenchConfig):
    cfg = dataclasses.replace(smoke, generate_tokens=3, generate_prompts=2, generate_sessions=[1, 2])
    run_benchmarks(cfg, ["generate"])
    result = _result(cfg, "generate")
    (row,) = result["table"]
    # per-token times are differences of two timings (N tokens minus the prefill): their values are the
    # benchmark's to report, not a test's to assert (a loaded machine can make a 3-token difference negative)
    assert all(math.isfinite(row[k]) for k in ("decode_split_ms", "decode_local_ms", "ratio"))
    assert row["bytes_per_token"] > 4 * 128  # at least the (1, 128) activations of one new token went up
    throughput = result["results"][0]["throughput"]
    assert [(r["batching"], r["sessions"]) for r in throughput] == [("off", 1), ("off", 2), ("on", 1), ("on", 2)]
    assert all(r["tokens_per_s"] > 0 for r in throughput)
