"""Every data owner gets the model: when training ends the client receives the final server adapter and writes
the whole-model PEFT adapter (its global client adapter + the server adapter) to `--output/adapter/`."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grpc

from common.lora import AdapterError, AdapterState, export_adapter, from_bytes
from common.provenance import Provenance
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import SplitPart
from splitlora_client.session import SplitSession

log = logging.getLogger("splitlora.client")


def receive_whole_adapter(session: SplitSession, plan: spb.Plan, part: SplitPart, client_state: AdapterState,
                          out_dir: Path, made: Provenance, timeout: float) -> Path | None:
    """Fetch the server adapter and write the whole-model adapter; None when the server keeps its adapter
    private or cannot send it (said in the log: the client adapter is written either way)."""
    if not plan.send_final_adapter:
        log.info("the server keeps its adapter private: this client holds only its client adapter")
        return None
    request = spb.ServerAdapterRequest(client_id=session.client_id, max_message_bytes=session.max_message_bytes)
    try:
        pieces = session.stub.FetchServerAdapter(request, timeout=timeout)
        server_state = from_bytes(b"".join(p.safetensors_chunk for p in pieces))
        # per-client split points: the server also holds the blocks this client trained (the same values)
        server_state = {k: v for k, v in server_state.items() if k not in client_state}
        path = export_adapter(out_dir, part.lora.peft_config(part.family), client_state, server_state,
                              base_model=str(part.model_dir),
                              metadata=dataclasses.replace(made, side="model").to_metadata())
    except (grpc.RpcError, AdapterError) as err:
        why = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
        log.warning("could not receive the server adapter (%s); the client adapter is written, and the operator "
                    "can export the whole-model adapter with `splitlora-server export`", why)
        return None
    log.info("whole-model adapter written to %s (load it with PeftModel.from_pretrained)", path)
    return path
