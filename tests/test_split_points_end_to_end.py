"""Per-client split points end to end, as processes: a server allowing split layers 2..4 of the built-in model,
alice pinned at K=2 (sending each step as two micro-batches) and bob choosing `auto` from a memory budget (which
fits K=4). A run killed during the close
of round 1 (server) and after a submission (alice) ends bit-identical to an uninterrupted one; the exported
whole-model adapter loads with peft on the unsplit model and scores a batch as each client's trained pipeline. The
same in u-shape mode."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from common.lora import load_adapter_state
from common.loss import causal_lm_loss
from common.split.loading import load_config
from common.split.parts import LoraSettings, Segment, SplitPart
from common.split.ushape import load_client_adapter
from splitlora_client.split_choice import estimate_memory
from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all
from tests.support.split_reference import model_loss, padded_batch

SERVE = ("--split-layer", "3", "--split-range", "2:4", "--lora-dropout", "0")
EXACT = LoraSettings(dropout=0.0)


def _clients(tmp: Path, port: int, model_dir: Path, faults: dict[str, list[str]]) -> list[procs.Role]:
    seq = min(512, int(load_config(model_dir).n_positions))
    budget = estimate_memory(model_dir, 4, EXACT, "float32", 4, seq).total  # exactly what K=4 needs
    return [procs.client(tmp, "alice", port, "--split-layer", "2", "--micro-batches", "2", faults=faults.get("alice")),
            procs.client(tmp, "bob", port, "--split-layer", "auto", "--max-memory", str(budget),
                         faults=faults.get("bob"))]


def test_mixed_split_layers_resume_bit_identical_and_export_exactly(tmp_path: Path, builtin_model_dir: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    port = free_port()
    roles = _clients(clean, port, builtin_model_dir, {})
    run_all([procs.server(clean, port, *SERVE).start(), *(r.start() for r in roles)])
    assert "split layer 4 chosen for --max-memory" in roles[1].log_text()
    reference = results(clean)

    port = free_port()
    server = procs.server(killed, port, *SERVE, faults=["server:round-end=1"])
    run_all([server.start(), *(r.start() for r in _clients(killed, port, builtin_model_dir,
                                                             {"alice": ["client:submit=1"]}))])
    for what, tensors in reference.items():
        assert_identical(results(killed)[what], tensors, what)

    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(builtin_model_dir)),
                                         str(clean / "server" / "adapter")).eval()
    batch = padded_batch(exported.config.vocab_size, lengths=(12, 7), seed=5)
    server = SplitPart(builtin_model_dir, "server", 2, EXACT).eval()
    load_adapter_state(server.peft, reference["server adapter"])
    with torch.no_grad():
        whole = model_loss(exported, batch)
        with exported.disable_adapter():
            base = model_loss(exported, batch)
        for name, k in zip(CLIENTS, (2, 4)):
            client = SplitPart(builtin_model_dir, "client", k, EXACT).eval()
            load_adapter_state(client.peft, reference[f"{name}'s adapter"])
            mask, pos = batch["attention_mask"], batch["position_ids"]
            trained = causal_lm_loss(server(client(batch["input_ids"], mask, pos), mask, pos, start=k),
                                     batch["labels"])[0]
            assert abs(trained.item() - whole.item()) < 1e-5, (name, trained.item(), whole.item())
            own = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(builtin_model_dir)),
                                            str(clean / name / "adapter")).eval()
            assert abs(model_loss(own, batch).item() - whole.item()) < 1e-5  # each client's whole-model adapter
    assert abs(base.item() - whole.item()) > 1e-3  # the adapter really changes the model


def test_mixed_split_layers_in_u_shape_mode_export_exactly(tmp_path: Path, builtin_model_dir: Path) -> None:
    """U-shape (J=1 stays one server-wide value): alice at K=1 (in two micro-batches) and bob at K=3 train with a
    server holding blocks [1, 5); the exported adapter scores a batch as each client's three-part pipeline."""
    port = free_port()
    u_shape = ("--split-mode", "u-shape", "--top-blocks", "1")
    run_all([procs.server(tmp_path, port, "--split-layer", "2", "--split-range", "1:3", "--lora-dropout", "0",
                          *u_shape).start(),
             procs.client(tmp_path, "alice", port, "--split-layer", "1", "--micro-batches", "2").start(),
             procs.client(tmp_path, "bob", port, "--split-layer", "3").start()])
    final = results(tmp_path)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(builtin_model_dir)),
                                         str(tmp_path / "server" / "adapter")).eval()
    batch = padded_batch(exported.config.vocab_size, lengths=(12, 7), seed=5)
    mask, pos = batch["attention_mask"], batch["position_ids"]
    middle = SplitPart(builtin_model_dir, Segment(1, 5), None, EXACT).eval()
    load_adapter_state(middle.peft, final["server adapter"])
    top = SplitPart(builtin_model_dir, Segment(5, 6, head=True), None, EXACT).eval()
    with torch.no_grad():
        whole = model_loss(exported, batch)
        for name, k in zip(CLIENTS, (1, 3)):
            bottom = SplitPart(builtin_model_dir, "client", k, EXACT).eval()
            load_client_adapter(bottom.peft, top.peft, final[f"{name}'s adapter"])
            logits = top(middle(bottom(batch["input_ids"], mask, pos), mask, pos, start=k), mask, pos)
            trained = causal_lm_loss(logits, batch["labels"])[0]
            assert abs(trained.item() - whole.item()) < 1e-5, (name, trained.item(), whole.item())
