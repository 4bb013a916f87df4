"""The run's plan: the split and LoRA options the server decides and hands every client before it joins.

Every field of `ModelOptions` except the local ones (which checkpoint directory, which dtype) travels as one JSON
object keyed by option name, so an option added to `ModelOptions` travels without a proto change. A client's
copies of these options default to None ("take the server's"); a value the client gives is a pin, and a pin
that differs from the server's plan is refused, naming the option.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from common.config.engine import ConfigError
from common.config.sections import ModelOptions

LOCAL_OPTIONS = ("model", "dtype")  # chosen by each side for itself
FROM_SERVER = "the server's"


def planned_fields() -> list[dataclasses.Field]:
    """The `ModelOptions` fields the server decides for everyone."""
    return [f for f in dataclasses.fields(ModelOptions) if f.name not in LOCAL_OPTIONS]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def options_json(options: ModelOptions) -> str:
    """The planned options of `options` as the JSON object of the plan."""
    return json.dumps({f.name: _jsonable(getattr(options, f.name)) for f in planned_fields()}, sort_keys=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_plan(options: ModelOptions, text: str, source: str = "the server's plan",
               pinner: str = "this client's options") -> list[str]:
    """Take the server's planned options into `options` (whose planned fields are None where not pinned).

    Returns the names of the options that came from the server. ConfigError naming every pin that differs,
    or an option this version does not know (a newer server). `source`/`pinner` name the two in messages."""
    try:
        plan = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from None
    known = {f.name: f for f in planned_fields()}
    unknown = sorted(set(plan) - set(known))
    if unknown:
        raise ConfigError(f"{source} has options this version does not know: {', '.join(unknown)}; "
                          "install the server's version of splitlora here")
    conflicts, taken = [], []
    for name, field in known.items():
        pinned = getattr(options, name)
        value = plan.get(name, _default(field))
        if pinned is None:
            setattr(options, name, list(value) if isinstance(value, list) else value)
            taken.append(name)
        elif _jsonable(pinned) != value:
            conflicts.append(f"{_flag(name)} is {_show(value)} in {source}, {_show(pinned)} in {pinner}")
    if conflicts:
        raise ConfigError(f"options given here differ from {source} (leave them out to take its values): "
                          + "; ".join(conflicts))
    return taken


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return _jsonable(field.default_factory())
    return field.default


def _show(value: Any) -> str:
    return ",".join(map(str, value)) or "(the family's default)" if isinstance(value, (list, tuple)) else str(value)


def pinnable(cls: type, source: str = FROM_SERVER) -> type:
    """A copy of the dataclass `cls` (a `ModelOptions`) whose planned fields default to None: `source`'s value."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in planned_fields():
        metadata = {**field.metadata, "default_text": source,
                    "help": field.metadata.get("help", "") + f" Given: pins {source} value (a different one is "
                                                             "refused)."}
        fields.append((field.name, typing.Optional[hints[field.name]],
                       dataclasses.field(default=None, metadata=metadata)))
    pinned = dataclasses.make_dataclass(f"Pinnable{cls.__name__}", fields, bases=(cls,))
    pinned.HELP_GROUPS = {f.name: f"split and LoRA ({source} unless given)" for f in planned_fields()}
    return pinned


def _defaults_of_unset(options: Any) -> dict[str, Any]:
    return {f.name: _default(f) for f in planned_fields() if getattr(options, f.name) is None}


def unpinned_copy(options: Any) -> ModelOptions:
    """`options` with every None (not yet planned) option at its `ModelOptions` default, e.g. to validate it."""
    return dataclasses.replace(options, **_defaults_of_unset(options))


def fill_defaults(options: Any) -> None:
    """Set every option not given (None) to its `ModelOptions` default, in place (nothing was planned)."""
    for name, value in _defaults_of_unset(options).items():
        setattr(options, name, value)
