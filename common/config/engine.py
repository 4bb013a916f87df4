"""Turn a flat dataclass config into a command line, merged with an optional YAML file.

Each role declares its own ``@dataclass`` with fields built by :func:`option`. Precedence when
resolving: dataclass defaults < YAML file values < flags the user actually gave. Argparse
defaults are ``argparse.SUPPRESS`` so that only explicitly given flags reach the namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "option", "flag_name", "add_arguments", "resolve", "to_dict", "format_config", "save_yaml"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}
_NOUN = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class ConfigError(ValueError):
    """An invalid configuration value, key or file."""


def option(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:
    """Build a dataclass field; ``extra`` goes to metadata (choices, flag, short, secret, metavar, positional)."""
    metadata = {"help": help, **extra}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class _Spec:
    """What a field's type annotation allows."""
    base: type
    optional: bool = False
    is_list: bool = False
    choices: tuple[Any, ...] | None = None


def _spec(field: dataclasses.Field, tp: Any) -> _Spec:
    """Analyse a field annotation into a :class:`_Spec`; raise TypeError if unsupported."""
    optional = is_list = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{field.name}: unsupported union type {tp!r}")
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        is_list, tp = True, (typing.get_args(tp) or (str,))[0]
    choices = field.metadata.get("choices")
    if typing.get_origin(tp) is Literal:
        choices = choices or typing.get_args(tp)
        tp = type(typing.get_args(tp)[0])
    if tp not in _NOUN or (is_list and tp is bool):
        raise TypeError(f"{field.name}: unsupported config type {tp!r}")
    return _Spec(tp, optional, is_list, tuple(choices) if choices is not None else None)


def _specs(cls: type) -> dict[str, tuple[dataclasses.Field, _Spec]]:
    """Map each init field name of a dataclass to (field, spec)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls, include_extras=False)
    return {f.name: (f, _spec(f, hints[f.name])) for f in dataclasses.fields(cls) if f.init}


def _scalar(value: Any, base: type) -> Any:
    """Convert one scalar to ``base``; raise ValueError with a readable message."""
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if base is int:
                return int(text)
            if base is float:
                return float(text)
        except ValueError:
            pass
        if base is bool and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif not isinstance(value, bool) and isinstance(value, (int, float)):
        if base is str:
            return str(value)
        if base is float:
            return float(value)
        if base is int and float(value).is_integer():
            return int(value)
        if base is bool and value in (0, 1):
            return bool(value)
    raise ValueError(f"expected {_NOUN[base]}, got {value!r}")


def _convert(value: Any, spec: _Spec, cli: bool = False) -> Any:
    """Convert a YAML or command-line value according to ``spec``; raise ValueError."""
    if cli and spec.optional and isinstance(value, str) and value.strip().lower() in _NONE:
        value = None
    if value is None:
        if spec.optional:
            return None
        raise ValueError(f"expected {'a list' if spec.is_list else _NOUN[spec.base]}, got None")
    if spec.is_list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        items = [_scalar(item, spec.base) for item in value]
    else:
        items = [_scalar(value, spec.base)]
    for item in items:
        if spec.choices is not None and item not in spec.choices:
            allowed = ", ".join(str(c) for c in spec.choices)
            raise ValueError(f"expected one of {allowed}, got {item!r}")
    return items if spec.is_list else items[0]


def _show(value: Any) -> str:
    """Render a value for help text and logs."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "[]"
    return "''" if value == "" else str(value)


def _default(field: dataclasses.Field) -> Any:
    """The field's default value, or MISSING."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def flag_name(field: dataclasses.Field) -> str:
    """The long flag for a field: ``metadata['flag']`` or ``--split-layer`` for ``split_layer``."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


ADVANCED = "advanced"
# the order sections appear in --help: what every run needs first, the rest after (others in order of appearance)
GROUP_ORDER = ("essentials", "schedule", "LoRA", "transport security", "federation", ADVANCED)


def help_group(cls: type, name: str) -> str:
    """The --help section of field `name` of `cls`: the first `HELP_GROUPS` mapping (class attribute, subclasses
    first) that names it, else the `HELP_GROUP` of the class that declares it, else advanced."""
    for klass in cls.__mro__:
        groups = vars(klass).get("HELP_GROUPS") or {}
        if name in groups:
            return groups[name]
    declaring = [k for k in cls.__mro__ if name in vars(k).get("__annotations__", {})]
    return vars(declaring[-1]).get("HELP_GROUP", ADVANCED) if declaring else ADVANCED


def _help_text(field: dataclasses.Field, spec: _Spec) -> str:
    """The field's help with its choices and default; no default shown when it is empty (nothing to say)."""
    default = _default(field)
    text = field.metadata.get("help", "")
    if spec.choices is not None and spec.is_list:
        text += f" (choices: {', '.join(str(c) for c in spec.choices)})"
    if default is dataclasses.MISSING:
        text += " (required)"
    elif "default_text" in field.metadata:
        text += f" (default: {field.metadata['default_text']})"
    elif not (spec.base is bool or default in ("", None, []) or (field.metadata.get("secret") and default)):
        text += f" (default: {_show(default)})"
    elif spec.base is bool and default:
        text += " (default: on)"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field, in --help sections (see `help_group`); unset flags stay absent from the
    namespace. A bool that defaults to off is one flag (`--insecure`); one that defaults to on has `--no-X`."""
    specs = _specs(cls)
    used = list(dict.fromkeys(help_group(cls, n) for n in specs))
    titles = [g for g in GROUP_ORDER if g in used and g != ADVANCED] + [g for g in used if g not in GROUP_ORDER]
    titles += [ADVANCED] if ADVANCED in used else []
    sections = {title: parser.add_argument_group(title) for title in titles}
    listed = [n for klass in cls.__mro__ for n in (vars(klass).get("HELP_GROUPS") or {})]  # named first, in order
    order = sorted(specs, key=lambda n: (listed.index(n) if n in listed else len(listed), list(specs).index(n)))
    for name in order:
        field, spec = specs[name]
        _add_field(sections[help_group(cls, name)], name, field, spec)


def _add_field(parser: Any, name: str, field: dataclasses.Field, spec: _Spec) -> None:
    flags = [f for f in (field.metadata.get("short"), flag_name(field)) if f]
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help_text(field, spec)}
    if field.metadata.get("positional"):  # a required positional argument named by its metavar
        flags = []
        kwargs.pop("default")
    if spec.base is bool and not spec.is_list:
        if _default(field):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_true"
            # `--no-X` of an off-by-default flag still works (scripts, YAML habits) without cluttering --help
            parser.add_argument("--no-" + flag_name(field)[2:], dest=name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:

        def convert(raw: str, spec: _Spec = spec) -> Any:
            try:
                return _convert(raw, spec, cli=True)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        kwargs["type"] = convert
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        elif spec.choices is not None and not spec.is_list:
            kwargs["metavar"] = "{" + ",".join(str(c) for c in spec.choices) + "}"
        elif spec.is_list:
            kwargs["metavar"] = "A,B,..."
    parser.add_argument(*flags, **kwargs)


def _load_yaml(path: str | os.PathLike[str], specs: dict[str, Any]) -> dict[str, Any]:
    """Read a YAML mapping and return its raw values keyed by field name."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {os.fspath(path)}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{os.fspath(path)}: invalid YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping of option: value, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in specs:
            valid = sorted(specs)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{os.fspath(path)}: unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")
        if name in values:
            raise ConfigError(f"{os.fspath(path)}: key '{key}' given more than once")
        values[name] = value
    return values


def resolve(cls: type, args: argparse.Namespace, config_path: str | os.PathLike[str] | None = None) -> Any:
    """Build ``cls`` from defaults < YAML at ``config_path`` < flags given in ``args``, then validate."""
    specs = _specs(cls)
    raw = _load_yaml(config_path, specs) if config_path is not None else {}
    raw.update({name: getattr(args, name) for name in specs if hasattr(args, name)})
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            kwargs[name] = _convert(value, specs[name][1])
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    missing = [n for n, (f, _) in specs.items() if n not in kwargs and _default(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required option(s): " + ", ".join(f"{n} ({flag_name(specs[n][0])})" for n in missing))
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    """Field name -> value (lists copied)."""
    return {f.name: (list(v) if isinstance(v := getattr(instance, f.name), list) else v) for f in dataclasses.fields(instance)}


def format_config(instance: Any, title: str | None = None) -> str:
    """A multi-line ``key: value`` dump for logging; secret fields that are set print as ``***``."""
    secret = {f.name for f in dataclasses.fields(instance) if f.metadata.get("secret")}
    values = to_dict(instance)
    width = max((len(k) for k in values), default=0)
    lines = [title or f"{type(instance).__name__}:"]
    for key, value in values.items():
        shown = "***" if key in secret and value not in (None, "") else _show(value)
        lines.append(f"  {key + ':':<{width + 1}} {shown}")
    return "\n".join(lines)


def save_yaml(instance: Any, path: str | os.PathLike[str], include_secrets: bool = False) -> None:
    """Write the config as YAML loadable by :func:`resolve`; secret fields are left out unless asked."""
    secret = {f.name for f in dataclasses.fields(instance) if f.metadata.get("secret")}
    data = {k: v for k, v in to_dict(instance).items() if include_secrets or k not in secret}
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False, default_flow_style=False)
