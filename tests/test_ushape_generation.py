"""Split generation and evaluation in u-shape mode over real gRPC on loopback: the client holds the embeddings and
blocks [0, K) and also blocks [L-J, L), the final norm and the head, each with its own key/value cache; the server
answers its blocks' hidden states. Greedy and beam search equal transformers' `generate` on the unsplit model
loaded with the exported whole-model adapter; evaluation's loss equals the unsplit loss and no label is sent."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from common.data import IGNORE_INDEX
from common.lora import adapter_state, export_adapter
from common.rpc.splitlora.v1 import generation_pb2 as gpb
from common.rpc.splitlora.v1 import generation_pb2_grpc as ggrpc
from common.split.parts import SplitPart
from common.split.ushape import u_shape_parts
from common.wire import encode_tensor
from splitlora_client.generation.model import SplitCausalLM
from splitlora_client.generation.scoring import validate
from splitlora_client.session import CLIENT_ID_KEY
from tests.support.families import FAMILIES, VOCAB, checkpoint_dir, copy_adapter, reference
from tests.support.generation import left_padded, open_session, sessions_freed
from tests.support.servers import running_server, server_fingerprint
from tests.support.split_reference import EXACT

PROMPTS = (7, 3, 5)
NO_ROUTER_AUX = [f for f in FAMILIES if f != "mixtral"]  # u-shape refuses the router's auxiliary loss (see below)


def _u_setup(family: str, tmp: Path, k: int, j: int):
    """A u-shape server whose middle part holds the reference's LoRA values, the client's bottom and top parts
    with the same values, and the unsplit model loaded from the exported whole-model adapter."""
    model_dir = checkpoint_dir(family)
    ref = reference(model_dir, EXACT)
    bottom_seg, _, top_seg = u_shape_parts(model_dir, k, j)
    bottom, top = (SplitPart(model_dir, seg, None, EXACT).eval() for seg in (bottom_seg, top_seg))
    copy_adapter(ref, *(p for p in (bottom, top) if p.peft is not None))
    server = running_server(model_dir, tmp / "server", lora_dropout=0.0, split_layer=k, split_mode="u-shape",
                            top_blocks=j)
    return model_dir, ref, bottom, top, server


def _exported(model_dir: Path, ref: PeftModel, parts: list[SplitPart], tmp: Path) -> PeftModel:
    states = [adapter_state(p.peft) for p in parts if p.peft is not None]
    out = export_adapter(tmp / "adapter", parts[0].lora.peft_config(parts[0].family), *states,
                         base_model=str(model_dir))
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()


def _generate(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("family", NO_ROUTER_AUX)
def test_u_shape_generation_equals_unsplit_generate_with_the_exported_adapter(family: str, tmp_path: Path) -> None:
    k, j = (1, 2) if family in ("gpt2", "gemma2") else (2, 1)  # gemma2: sliding and full layers on both sides
    ids, mask = left_padded(PROMPTS)
    model_dir, ref, bottom, top, server = _u_setup(family, tmp_path, k, j)
    with server as harness:
        harness.running.engine.call(lambda: copy_adapter(ref, harness.running.part)).result()
        unsplit = _exported(model_dir, ref, [bottom, harness.running.part, top], tmp_path)
        split = SplitCausalLM(bottom, lambda: open_session(harness, reply="hidden"), top=top)
        for kwargs in ({"do_sample": False, "max_new_tokens": 6},
                       {"do_sample": False, "num_beams": 3, "max_new_tokens": 4}):
            assert torch.equal(_generate(split, ids, mask, **kwargs), _generate(unsplit, ids, mask, **kwargs)), kwargs
        assert sessions_freed(harness) == (0, 0)


def test_u_shape_generation_with_no_top_blocks(tmp_path: Path) -> None:
    """J = 0: the client's top part is the final norm and the head only (no cache of its own)."""
    ids, mask = left_padded(PROMPTS)
    model_dir, ref, bottom, top, server = _u_setup("llama", tmp_path, 2, 0)
    with server as harness:
        harness.running.engine.call(lambda: copy_adapter(ref, harness.running.part)).result()
        split = SplitCausalLM(bottom, lambda: open_session(harness, reply="hidden"), top=top)
        kwargs = {"do_sample": False, "max_new_tokens": 6}
        assert torch.equal(_generate(split, ids, mask, **kwargs), _generate(ref, ids, mask, **kwargs))


def _examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in (9, 5, 12, 7, 3):
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        items.append((ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return items


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_u_shape_evaluation_equals_the_unsplit_loss_and_sends_no_label(family: str, tmp_path: Path) -> None:
    model_dir, ref, bottom, top, server = _u_setup(family, tmp_path, 1, 2)
    with server as harness:
        harness.running.engine.call(lambda: copy_adapter(ref, harness.running.part)).result()
        items = _examples()
        result = validate(bottom, harness.channel, "eval-0", items, batch_size=2, pad_id=0,
                          fingerprint=server_fingerprint(harness), top=top)
        ids = torch.zeros(len(items), 12, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        attention = torch.zeros_like(ids)
        for row, (x, y) in enumerate(items):
            ids[row, :len(x)], labels[row, :len(y)], attention[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=attention, labels=labels).loss
        assert result.tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
        assert abs(result.loss - float(expected)) < 1e-5
        # a score request carrying labels is refused: labels never reach a u-shape server
        hidden = bottom(ids[:2], attention[:2], torch.arange(12).expand(2, -1))
        request = gpb.ScoreRequest(hidden=encode_tensor(hidden.detach()), attention_mask=encode_tensor(attention[:2]),
                                   position_ids=encode_tensor(torch.arange(12).expand(2, -1).contiguous()),
                                   labels=encode_tensor(labels[:2]), round=-1,
                                   fingerprint=server_fingerprint(harness))
        with pytest.raises(grpc.RpcError) as err:
            ggrpc.SplitGenerationStub(harness.channel).Score(request, metadata=[(CLIENT_ID_KEY, "eval-0")])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels are refused" in err.value.details()
        # and a u-shape server answers only hidden states in generation
        with pytest.raises(grpc.RpcError) as err:
            open_session(harness, reply="logits")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_u_shape_server_refuses_a_router_auxiliary_loss(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="router auxiliary loss"):
        with running_server(checkpoint_dir("mixtral"), tmp_path / "server", split_layer=1, split_mode="u-shape",
                            top_blocks=1):
            pass
