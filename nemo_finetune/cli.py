"""Dataclass -> argparse: one dataclass is the single source of truth of a script's flags and their help;
`run_cli` maps the two user-facing errors to exit codes without a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import math
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from nemo_finetune.errors import USAGE_ERROR, ConfigError, PipelineError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Exit codes: 0 ok, 1 pipeline failure (or a full disk), 2 usage error. Messages go to stderr without a
    traceback."""
    try:
        code = main(argv)
    except ConfigError as e:
        print(f"error: invalid arguments:\n{e}", file=sys.stderr)
        code = USAGE_ERROR
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full ({e.strerror}{where}); free space there or choose another output directory, "
              "then run the same command again", file=sys.stderr)  # fmt: skip
        code = 1
    sys.exit(code)


# --------------------------------------------------------------------------------------------------------------------
# Dataclass -> argparse. The dataclass is the single source of truth: names, types, defaults and help.
# --------------------------------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """The argparse type of float fields: nan and inf are never a meaningful setting, and would pass every range
    check (comparisons with nan are false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_or_auto(text: str) -> int | None:
    """An integer flag whose value may be `auto` (None: resolved later from the machine)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


class _BoolAction(argparse.Action):
    """`--flag`, `--no-flag`, and `--flag true|false` (the form SageMaker uses for hyperparameters). A flag that is
    itself a negation (`--no_merge`) gets no `--no-` twin."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        name = option_strings[0][2:]
        options = [f"--{name}"] if name.startswith("no_") else [f"--{name}", f"--no-{name}"]
        super().__init__(options, dest, nargs="?", default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else parse_bool(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"{option_string}: {e}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[int] and int | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def declared_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """cls's fields, each with the dataclass that declares it, in declaration order: the fields of the bases in the
    order the class lists its bases, then its own (dataclasses.fields orders inherited fields by reverse MRO)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    fields: list[tuple[dataclasses.Field, type]] = []
    for base in cls.__bases__:
        if dataclasses.is_dataclass(base):
            fields += [(by_name[f.name], owner) for f, owner in declared_fields(base) if f.name in by_name]
    seen = {f.name for f, _ in fields}
    own = cls.__dict__.get("__annotations__", {})
    return fields + [(by_name[name], cls) for name in own if name in by_name and name not in seen]


def iter_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any, str | None]]:
    """(field, resolved type, parent field name or None), flattening nested dataclass fields."""
    hints = typing.get_type_hints(cls)
    for f, _ in declared_fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for sub, sub_tp, _ in iter_fields(tp):
                yield sub, sub_tp, f.name
        else:
            yield f, tp, None


def field_groups(cls: type) -> dict[str, str | None]:
    """Each flag's --help section: the GROUP of the dataclass that declares it (None: no section)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, str | None] = {}
    for f, owner in declared_fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            groups.update(field_groups(hints[f.name]))
        else:
            groups[f.name] = getattr(owner, "GROUP", None)
    return groups


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--learning_rat` is not taken as `--learning_rate`), and a mistake in the
    command line answered with one line that names the flag and its closest match, not the whole usage."""

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {self._explain(message)}; see --help\n")

    def _explain(self, message: str) -> str:
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return message
        flags = [arg.split("=", 1)[0] for arg in message[len(prefix) :].split() if arg.startswith("-")]
        if not flags:
            return f"unexpected value(s) {message[len(prefix) :]} (every value follows its flag)"
        known = [option for option in self._option_string_actions if option.startswith("--")]
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            parts.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return "; ".join(parts)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per (flattened) field: `--name`, typed from the annotation, help from `metadata["help"]`."""
    seen: set[str] = set()
    groups = field_groups(cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f, tp, _ in iter_fields(cls):
        assert f.name not in seen, f"duplicate field name {f.name} across nested dataclasses"
        seen.add(f.name)
        group = groups[f.name]
        if group is not None and group not in sections:
            sections[group] = parser.add_argument_group(group)
        target = sections[group] if group is not None else parser
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        base, optional = _unwrap_optional(tp)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        flag = flag_name(f)
        if base is bool:
            target.add_argument(f"--{flag}", action=_BoolAction, help=f"{help_text} (default: {default})", **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["metavar"] = flag.upper()  # with choices, argparse shows them: {sdpa,unfused}
        if "type" in f.metadata:
            kwargs["type"] = f.metadata["type"]
        elif base in (int, float, str):
            kwargs["type"] = finite_float if base is float else base
        else:
            raise TypeError(f"unsupported field type {tp} for {f.name}")
        shown = f.metadata.get("shown", "unset" if default is None and optional else default)
        if "(default:" not in help_text:  # a help text that says its own default keeps it
            help_text = f"{help_text} (default: {shown})"
        target.add_argument(f"--{flag}", help=help_text, **kwargs)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace | dict) -> Any:
    """Build `cls` from parsed values; nested dataclasses are filled from the same flat namespace."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = dataclass_from_namespace(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def parse_dataclass_args(cls: type, argv: list[str] | None, description: str) -> tuple[Any, set[str]]:
    """Parse argv into `cls`; also return the names of the flags given explicitly (they beat the environment)."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return dataclass_from_namespace(cls, ns), set(vars(ns))


# --------------------------------------------------------------------------------------------------------------------
# Settings files: `--config FILE` (YAML, keys = flag names) under the flags given, and the settings written back.
# --------------------------------------------------------------------------------------------------------------------
def with_config_file(cls: type, argv: list[str], flag: str = "config") -> list[str]:
    """argv with the settings of `--<flag> FILE` placed before the flags given on the command line, which therefore
    override them (argparse keeps the last value). Every problem with the file is a ConfigError naming it."""
    path = None
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            path = arg.split("=", 1)[1]
    if path is None:
        return argv
    import yaml

    try:
        settings = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ConfigError([f"--{flag} {path}: cannot read it as YAML ({reason})"]) from None
    if settings is None:
        return argv
    if not isinstance(settings, dict):
        raise ConfigError(
            [f"--{flag} {path}: expected a mapping of flag names to values, found {type(settings).__name__}"]
        )
    known = [name for name in flag_names(cls) if name != flag]
    problems, file_argv = [], []
    for key, value in settings.items():
        name = str(key).removeprefix("--")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            problems.append(f"--{flag} {path}: unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        elif isinstance(value, (list, dict)):
            problems.append(f"--{flag} {path}: {name} must be one value, as its flag takes, not {value!r}")
        elif value is not None:  # null: the flag's default
            file_argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    if problems:
        raise ConfigError(problems)
    return file_argv + argv


def settings_yaml(config: Any, leave_out: tuple[str, ...] = ()) -> str:
    """The settings of `config` as YAML that with_config_file reads back (unset values left out: their default)."""
    import yaml

    values = {}
    for f, _, parent in iter_fields(type(config)):
        value = getattr(getattr(config, parent) if parent else config, f.name)
        if flag_name(f) not in leave_out and value is not None:
            values[flag_name(f)] = value
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def flag_name(f: dataclasses.Field) -> str:
    """A field's flag: its name, or `metadata["flag"]` where the name is taken by a derived value of the class
    (Config.global_batch_size is the resolved batch; the flag asks for one)."""
    return f.metadata.get("flag", f.name)


def flag_names(cls: type) -> list[str]:
    return [flag_name(f) for f, _, _ in iter_fields(cls)]


def flags_of(cls: type) -> dict[str, str]:
    """{field name: flag name} of every (flattened) field."""
    return {f.name: flag_name(f) for f, _, _ in iter_fields(cls)}
