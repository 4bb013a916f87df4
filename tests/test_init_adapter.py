"""`serve --init-adapter DIR`: both sides start from an existing whole-model adapter, checked against the model
and the LoRA options; the server keeps its adapter private on request."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from common.config.sections import ModelOptions
from common.lora import AdapterError, adapter_state, export_adapter, from_bytes
from common.provenance import read_provenance
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split import family_for
from common.split.parts import LoraSettings, SplitPart, load_config
from tests.support.servers import RPC_TIMEOUT, join, running_server
from splitlora_client.plan import ClientPlan
from tests.test_export_provenance import _write_part


def _lora(r: int = 4) -> LoraSettings:
    return ModelOptions(lora_r=r, lora_targets=["c_attn", "c_fc"]).lora_settings()


def _whole(out: Path, model_dir: Path, split: int = 3, r: int = 4, stamp: bool = True) -> Path:
    """A whole-model adapter directory, as an earlier run's export writes it."""
    client = load_file(str(_write_part(out, model_dir, "client", split, r=r, stamp=stamp)))
    server_path = _write_part(out, model_dir, "server", split, r=r, stamp=stamp)
    made = read_provenance(server_path)
    family = family_for(load_config(model_dir).model_type)
    return export_adapter(out / f"whole-{split}-r{r}-{stamp}", _lora(r).peft_config(family), client,
                          load_file(str(server_path)), base_model=str(model_dir),
                          metadata=dataclasses.replace(made, side="model").to_metadata() if made else None)


def test_both_sides_start_from_the_adapter(builtin_model_dir: Path, tmp_path: Path) -> None:
    # trained at split layer 3, started at split layer 2: the whole-model adapter splits anywhere
    init = _whole(tmp_path, builtin_model_dir, split=3)
    weights = load_file(str(init / "adapter_model.safetensors"))
    with running_server(builtin_model_dir, tmp_path / "server", split_layer=2, init_adapter=str(init),
                        lora_targets=["c_attn", "c_fc"]) as h:
        server_state = h.running.engine.server_adapter()
        plan = h.stub.GetPlan(spb.PlanRequest(client_id="alice"), timeout=RPC_TIMEOUT)
    assert server_state and all(torch.equal(v, weights[k]) for k, v in server_state.items())
    client_state = from_bytes(plan.initial_client_adapter)
    assert client_state.keys() == weights.keys() - server_state.keys()
    client = SplitPart(builtin_model_dir, "client", 2, _lora(), lora_seed=9)
    ClientPlan(plan).load_initial_adapter(client)  # what the client does with its plan
    assert all(torch.equal(v, weights[k]) for k, v in adapter_state(client.peft).items())


@pytest.mark.parametrize("overrides, named", [
    ({"lora_r": 8}, "was trained with other LoRA options: --lora-r 4 in the adapter, 8 here"),
    ({"lora_targets": ["c_attn"]}, "--lora-targets ['c_attn', 'c_fc'] in the adapter, ['c_attn'] here"),
])
def test_an_adapter_of_other_options_is_refused(builtin_model_dir: Path, tmp_path: Path, overrides, named) -> None:
    init = _whole(tmp_path, builtin_model_dir)
    with pytest.raises(AdapterError) as refused:
        with running_server(builtin_model_dir, tmp_path / "server", init_adapter=str(init),
                            **{"lora_targets": ["c_attn", "c_fc"], **overrides}):
            pass
    assert named in str(refused.value)


def test_an_adapter_of_another_model_is_refused(builtin_model_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    init = _whole(tmp_path, tiny_gpt2_dir)
    with pytest.raises(AdapterError, match="was trained on another model than --model"):
        with running_server(builtin_model_dir, tmp_path / "server", init_adapter=str(init),
                            lora_targets=["c_attn", "c_fc"]):
            pass


def test_a_plain_peft_adapter_of_another_rank_is_refused_by_its_tensors(builtin_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    init = _whole(tmp_path, builtin_model_dir, r=8, stamp=False)  # no header: peft's own save, say
    with pytest.raises(AdapterError, match=r"server's blocks\) tensor .* has shape \(8, 128\), expected \(4, 128\)"):
        with running_server(builtin_model_dir, tmp_path / "server", init_adapter=str(init),
                            lora_targets=["c_attn", "c_fc"]):
            pass


def test_a_private_server_adapter_is_not_handed_out(builtin_model_dir: Path, tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, private_server_adapter=True) as h:
        alice = join(h, "alice")
        assert not h.stub.GetPlan(spb.PlanRequest(client_id="alice"), timeout=RPC_TIMEOUT).send_final_adapter
        with pytest.raises(grpc.RpcError) as refused:
            list(h.stub.FetchServerAdapter(spb.ServerAdapterRequest(client_id=alice.client_id), timeout=RPC_TIMEOUT))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "keeps its adapter private (--private-server-adapter)" in refused.value.details()
