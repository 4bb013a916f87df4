"""Mixtral's router auxiliary loss on the split: client and server each sum their layers' router statistics,
the server adds the loss over all layers and returns its gradient for the client's share. Loss, aux term and
every LoRA and router gradient equal the unsplit model's (transformers' own loss with output_router_logits)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM

from common.builtin import build_builtin_tokenizer, round_up
from common.fingerprint import compute_fingerprint
from common.lora import adapter_state, load_adapter_state
from common.loss import causal_lm_loss
from common.router_wire import encode_stats
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.lora_settings import LoraSettings
from common.split.parts import SplitPart
from common.split.router import RouterRecorder, RouterStats, backward_through_cut, router_aux
from common.wire import WireError, encode_tensor
from splitlora_client.options import TrainConfig
from splitlora_client.session import SplitSession
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.engine import compute
from splitlora_server.engine.jobs import Step
from splitlora_server.frames import FrameLimits, decode_step
from splitlora_server.options import ServeConfig
from tests.support.families import NUM_LAYERS, VOCAB, checkpoint_dir, copy_adapter, reference, tiny_config
from tests.support.servers import running_server
from tests.support.split_reference import EXACT, build_parts, lora_params, padded_batch

BATCH = padded_batch(VOCAB, lengths=(11, 6, 9))
TARGETS = dataclasses.replace(EXACT, targets=("q_proj", "v_proj", "o_proj"))


def split_moe_step(client, server, batch, router_gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One split step as the wire runs it: the client's router statistics go with the activations, the server
    returns the gradient at the cut and for the client's routing probabilities (dropped when not
    `router_gradient`). Returns (loss, aux term)."""
    mask, pos = batch["attention_mask"], batch["position_ids"]
    with RouterRecorder(client, mask) as rec:
        hidden = client(batch["input_ids"], mask, pos)
    mine = rec.stats()
    cut = hidden.detach().requires_grad_(True)
    with RouterRecorder(server, mask) as rec:
        ce, _ = causal_lm_loss(server(cut, mask, pos), batch["labels"])
    aux, probs = rec.aux_term(mine.detached())
    (ce + aux).backward()
    backward_through_cut(hidden, cut.grad, mine if router_gradient else None, probs.grad)
    return (ce + aux).detach(), aux.detach()


def unsplit(model_dir: Path):
    ref = reference(model_dir, TARGETS)
    out = ref(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"],
              position_ids=BATCH["position_ids"], labels=BATCH["labels"], output_router_logits=True)
    out.loss.backward()
    return ref, out


def test_router_aux_loss_split_equals_unsplit() -> None:
    model_dir = checkpoint_dir("mixtral")
    ref, out = unsplit(model_dir)
    coef = ref.base_model.model.config.router_aux_loss_coef
    assert float(out.aux_loss) > 0.5 and coef == 0.5  # a term large enough to matter
    ref_grads = {n: p.grad for n, p in lora_params(ref).items()}
    for split_layer in range(1, NUM_LAYERS):
        client, server = build_parts(model_dir, split_layer, TARGETS)
        copy_adapter(ref, client, server)
        loss, aux = split_moe_step(client, server, BATCH)
        torch.testing.assert_close(aux, coef * out.aux_loss.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(loss, out.loss.detach(), atol=1e-5, rtol=0)
        grads = {n: p.grad for part in (client, server) for n, p in lora_params(part.peft).items()}
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=f"{split_layer}: {name}")


def test_router_aux_loss_with_gradient_checkpointing() -> None:
    """Router logits recorded inside recomputed blocks still carry their gradient (the recomputation in backward
    does not count twice)."""
    model_dir = checkpoint_dir("mixtral")
    ref, out = unsplit(model_dir)
    client, server = (SplitPart(model_dir, side, 2, TARGETS, gradient_checkpointing=True).train()
                      for side in ("client", "server"))
    copy_adapter(ref, client, server)
    loss, _ = split_moe_step(client, server, BATCH)
    torch.testing.assert_close(loss, out.loss.detach(), atol=1e-5, rtol=0)
    ref_params = dict(ref.named_parameters())
    for name, param in [*lora_params(client.peft).items(), *lora_params(server.peft).items()]:
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_router_gradient_reaches_the_client_layers() -> None:
    """Negative control: without the gradient for the client's routing probabilities, the client's LoRA
    gradients differ from the unsplit ones (so the test above checks the returned router gradient)."""
    model_dir = checkpoint_dir("mixtral")
    ref, _ = unsplit(model_dir)
    client, server = build_parts(model_dir, 2, TARGETS)
    copy_adapter(ref, client, server)
    split_moe_step(client, server, BATCH, router_gradient=False)
    name = next(n for n in lora_params(client.peft) if "layers.0.self_attn.q_proj.lora_A" in n)
    assert (lora_params(client.peft)[name].grad - lora_params(ref)[name].grad).abs().max() > 1e-6


def test_no_aux_loss_when_the_config_turns_it_off(tmp_path: Path) -> None:
    model_dir = shutil.copytree(checkpoint_dir("mixtral"), tmp_path / "mixtral")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "output_router_logits": False}))
    client, server = build_parts(model_dir, 2, TARGETS)
    assert router_aux(server.family, server.config) is None
    with RouterRecorder(client, BATCH["attention_mask"]) as rec:
        client(BATCH["input_ids"], BATCH["attention_mask"], BATCH["position_ids"])
    assert rec.stats() is None


def test_server_refuses_a_step_without_the_client_statistics() -> None:
    _, server = build_parts(checkpoint_dir("mixtral"), 2, TARGETS)
    with pytest.raises(ValueError, match="router statistics of the client's layers are missing"):
        RouterRecorder(server, BATCH["attention_mask"]).aux_term(None)


# -- through the real wire: proto frames, the service, the engine and the client's session ------------------
def _random_b(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v for k, v in sorted(state.items())}


def test_router_aux_loss_over_the_wire(tmp_path: Path) -> None:
    """A real server and the client's real session: the step carries the client's router statistics, the answer
    the router gradient and aux term; loss, aux term and the client's LoRA gradients equal the unsplit model's."""
    model_dir, split_layer = checkpoint_dir("mixtral"), 2
    lora = LoraSettings(dropout=0.0, targets=TARGETS.targets)
    batch = padded_batch(VOCAB, lengths=(11, 6, 9), seed=3)
    with running_server(model_dir, tmp_path / "server", split_layer=split_layer, lora_r=lora.r,
                        lora_dropout=0.0, lora_targets=list(lora.targets), label_smoothing=0.0,
                        batch_size=4, max_seq_len=16) as harness:
        engine, part = harness.running.engine, harness.running.part
        server_state = _random_b(engine.server_adapter(), seed=1)
        engine.call(lambda: load_adapter_state(part.peft, server_state)).result()
        client = SplitPart(model_dir, "client", split_layer, lora).eval()
        load_adapter_state(client.peft, _random_b(adapter_state(client.peft), seed=2))
        session = SplitSession(harness.channel, "moe-client")
        session.join(compute_fingerprint(model_dir, split_layer, lora), [tpb.CODEC_RAW])
        mask = batch["attention_mask"]
        with RouterRecorder(client, mask) as routers:
            hidden = client(batch["input_ids"], mask, batch["position_ids"])
        stats = routers.stats()
        result = session.step(0, 0, hidden.detach(), mask, batch["labels"], batch["position_ids"], stats)
        backward_through_cut(hidden, result.grad, stats, result.router_grad)
        session.close()

    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora.peft_config(client.family))
    load_adapter_state(ref, {**adapter_state(client.peft), **server_state})
    out = ref(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
              labels=batch["labels"], output_router_logits=True)
    out.loss.backward()
    coef = client.config.router_aux_loss_coef
    assert result.aux_loss == pytest.approx(coef * float(out.aux_loss), abs=1e-6) and result.aux_loss > 0.1
    assert result.loss == pytest.approx(float(out.loss), abs=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, param in lora_params(client.peft).items():
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_step_without_router_statistics_is_refused(tmp_path: Path) -> None:
    model_dir, lora = checkpoint_dir("mixtral"), LoraSettings(dropout=0.0)
    batch = padded_batch(VOCAB, lengths=(5, 4), seed=3)
    with running_server(model_dir, tmp_path / "server", split_layer=2, lora_dropout=0.0, batch_size=4,
                        max_seq_len=16) as harness:
        session = SplitSession(harness.channel, "moe-client")
        session.join(compute_fingerprint(model_dir, 2, lora), [tpb.CODEC_RAW])
        client = SplitPart(model_dir, "client", 2, lora).eval()
        with torch.no_grad():
            hidden = client(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        with pytest.raises(grpc.RpcError) as err:
            session.step(0, 0, hidden, batch["attention_mask"], batch["labels"], batch["position_ids"])
        session.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "router statistics are missing" in err.value.details()


def test_client_trainer_trains_a_moe_model(tmp_path: Path) -> None:
    """The real client loop and server: steps carry router statistics (a step without them would be refused),
    training finishes and the exported whole-model adapter loads on the unsplit model."""
    model_dir = tmp_path / "mixtral"
    tokenizer = build_builtin_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = tiny_config("mixtral")
        cfg.vocab_size = round_up(len(tokenizer))
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    running = start_server(ServeConfig(model=str(model_dir), split_layer=2, port=0, clients=1, rounds=1,
                                       local_steps=2, batch_size=2, warmup_steps=1, output=str(tmp_path / "server"),
                                       insecure=True))
    try:
        train(TrainConfig(server=f"127.0.0.1:{running.port}", model=str(model_dir), split_layer=2, client_id="moe",
                          progress=False, output=str(tmp_path / "client"), builtin_examples=8, insecure=True))
        assert running.wait_finished()
        exported = running.export()
    finally:
        running.stop(grace=0)
    steps = [json.loads(line) for line in (tmp_path / "client" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["event"] == "step"] == [0, 1]
    AutoPeftModelForCausalLM.from_pretrained(str(exported))


def _frame(stats) -> spb.StepForward:
    batch = padded_batch(VOCAB, lengths=(5, 4))
    return spb.StepForward(step=0, hidden=encode_tensor(torch.zeros(2, 5, 32)),
                           attention_mask=encode_tensor(batch["attention_mask"]), labels=encode_tensor(batch["labels"]),
                           position_ids=encode_tensor(batch["position_ids"]),
                           router=None if stats is None else encode_stats(stats))


@pytest.mark.parametrize(("experts", "stats", "error"), [
    (0, RouterStats(torch.ones(4), torch.ones(4), torch.tensor(9.0)), "this model has no router auxiliary loss"),
    (4, RouterStats(torch.ones(3), torch.ones(3), torch.tensor(9.0)), r"expert_counts must be float32 of shape \[4\]"),
    (4, RouterStats(torch.ones(4), -torch.ones(4), torch.tensor(9.0)), "expert_probs must not be negative"),
    (4, RouterStats(torch.ones(4), torch.ones(4), torch.tensor(0.0)), "rows must be a positive count"),
])
def test_bad_router_statistics_are_refused(experts: int, stats: RouterStats, error: str) -> None:
    limits = FrameLimits(32, VOCAB, 4, 16, 64, num_experts=experts)
    with pytest.raises(WireError, match=error):
        decode_step(_frame(stats), limits)


def test_a_batch_of_steps_keeps_each_step_s_router_term() -> None:
    """Cross-client batching: two clients' steps stacked into one computation get the losses, cut gradients and
    router gradients each gets alone, and the server's LoRA gradient is the sum of theirs."""
    model_dir = checkpoint_dir("mixtral")
    client, server = build_parts(model_dir, 2, TARGETS)
    copy_adapter(reference(model_dir, TARGETS), client, server)
    steps = []
    for i, lengths in enumerate([(11, 6, 9), (5, 7)]):
        batch = padded_batch(VOCAB, lengths=lengths, seed=i)
        with torch.no_grad(), RouterRecorder(client, batch["attention_mask"]) as rec:
            hidden = client(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        steps.append(Step(f"c{i}", 0, hidden, batch["attention_mask"], batch["position_ids"], batch["labels"],
                          rec.stats()))
    alone, grads = [], {}
    for step in steps:
        pending = compute.forward(server, [step], 0.0)
        compute.backward(pending)
        alone += compute.outcomes(pending)
        for name, p in lora_params(server.peft).items():
            grads[name] = grads.get(name, 0) + p.grad
            p.grad = None
    pending = compute.forward(server, steps, 0.0)
    compute.backward(pending)
    for one, batched in zip(alone, compute.outcomes(pending)):
        assert batched.aux_loss == pytest.approx(one.aux_loss, abs=1e-6) and one.aux_loss > 0.1
        assert batched.loss == pytest.approx(one.loss, abs=1e-5)
        torch.testing.assert_close(batched.grad, one.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.router_grad, one.router_grad, atol=1e-6, rtol=1e-4)
    for name, p in lora_params(server.peft).items():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
