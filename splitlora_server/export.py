"""`splitlora-server export`: the whole-model adapter from a client global adapter and a server adapter.

What the adapters were trained with (model, split layer, LoRA options) comes from their headers (see
common.provenance): no flags need repeating, and inconsistent pieces are refused with the reason: options given
that differ from the adapters', pieces of different split layers or models, a model that is not theirs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.fingerprint import compute_fingerprint
from common.lora import AdapterError, export_adapter, read_adapter_file
from common.plan import apply_plan, fill_defaults
from common.provenance import Provenance, model_of, read_provenance
from common.split import family_for
from common.split.lora_settings import whole_model_lora_config
from common.split.parts import load_config
from splitlora_server.layout import check_whole_model_layout
from splitlora_server.options import ExportConfig

SOURCE = "the adapters"


def newest_global_adapter(aggregator_dir: str | Path) -> Path:
    """The global adapter of the last closed round under an aggregator's output directory."""
    found = sorted((Path(aggregator_dir) / "global").glob("round-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no global adapters under {Path(aggregator_dir) / 'global'}")
    return found[-1]


def _agreed(client: Provenance | None, server: Provenance | None, paths: tuple[Path, Path]) -> Provenance | None:
    """The provenance both files share (either one's when only one has it); AdapterError when they differ."""
    if client is not None and server is not None:
        if client.split_layer != server.split_layer:
            raise AdapterError(f"the adapters are of different split layers: {paths[0]} was trained with split layer "
                               f"{client.split_layer}, {paths[1]} with {server.split_layer}")
        diff = client.model_differences(server)
        if diff:
            raise AdapterError(f"the adapters are of different models ({'; '.join(diff)}): {paths[0]} and "
                               f"{paths[1]} were not trained together")
    return server or client


def export(cfg: ExportConfig) -> Path:
    """Check the two adapters against each other, the options given and the model; write a PEFT adapter
    directory loadable on the unsplit base model."""
    client_path = Path(cfg.client_adapter) if cfg.client_adapter else newest_global_adapter(cfg.aggregator_dir)
    server_path = Path(cfg.server_adapter)
    for path in (client_path, server_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
    made = _agreed(read_provenance(client_path), read_provenance(server_path), (client_path, server_path))
    if made is not None:
        apply_plan(cfg, made.model_options_json, source=SOURCE, pinner="the command line")
        if not cfg.model and made.base_model:
            if not Path(made.base_model).is_dir():
                raise FileNotFoundError(f"the adapters were trained on {made.base_model}, which is not on this "
                                        "machine: give its copy here with --model DIR")
            cfg.model = made.base_model
    else:  # files written before adapters carried their provenance: the flags (or defaults) say it all
        fill_defaults(cfg)
    model_dir = cfg.model_dir()
    lora = cfg.lora_settings()
    if made is not None:
        diff = made.model_differences(Provenance("", 0, "", model_of(compute_fingerprint(model_dir, cfg.split_layer,
                                                                                          lora))))
        if diff:
            raise AdapterError(f"--model {model_dir} is not the model the adapters were trained on ({'; '.join(diff)})")
    model_config = load_config(model_dir)
    config = whole_model_lora_config(lora, family_for(model_config.model_type), model_config)
    # both inputs are checked against their SHA-256 files; the exported weights get one too
    client_state, server_state = read_adapter_file(client_path), read_adapter_file(server_path)
    check_whole_model_layout(model_dir, config, cfg.split_layer, client_state, server_state)
    return export_adapter(cfg.output, config, client_state, server_state, base_model=str(model_dir),
                          metadata=dataclasses.replace(made, side="model").to_metadata() if made else None)
