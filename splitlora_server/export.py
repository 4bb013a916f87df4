"""`splitlora-server export`: the whole-model adapter from a client global adapter and a server adapter."""
from __future__ import annotations

from pathlib import Path

from common.lora import export_adapter, read_adapter_file
from common.split import family_for
from common.split.parts import load_config
from splitlora_server.options import ExportConfig


def newest_global_adapter(aggregator_dir: str | Path) -> Path:
    """The global adapter of the last closed round under an aggregator's output directory."""
    found = sorted((Path(aggregator_dir) / "global").glob("round-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no global adapters under {Path(aggregator_dir) / 'global'}")
    return found[-1]


def export(cfg: ExportConfig) -> Path:
    """Merge the two adapters and write a PEFT adapter directory loadable on the unsplit base model."""
    model_dir = cfg.model_dir()
    client_path = Path(cfg.client_adapter) if cfg.client_adapter else newest_global_adapter(cfg.aggregator_dir)
    for path in (client_path, Path(cfg.server_adapter)):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
    family = family_for(load_config(model_dir).model_type)
    # both inputs are checked against their SHA-256 files; the exported weights get one too
    return export_adapter(cfg.output, cfg.lora_settings().peft_config(family), read_adapter_file(client_path),
                          read_adapter_file(Path(cfg.server_adapter)), base_model=str(model_dir))
