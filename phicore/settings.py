"""Declared settings: each setting is one dataclass field that carries its default, help text,
valid range, choices and command-line spellings, declared once. From those declarations:

- `check(config)`: every field checked against its declaration (type, finite numbers, range,
  choices), with a one-line `SettingsError` naming the flag. A dataclass calls it from
  `__post_init__`, so an instance that exists is valid.
- `build_parser(cls)`: the argparse parser, one argument group per section, every default,
  range and choice in the help; flags given on the command line come back, the others not.
- `read_config_file(path)`: a TOML, JSON (or, with PyYAML, YAML) file of `field = value`
  pairs, keys spelled as fields, flags or aliases.
- `from_sources(cls, file_values, cli_values)`: defaults < file < command line.

Flags are the field names with dashes (`lora_r` -> `--lora-r`); every flag is also accepted in
snake_case (`--lora_r`), and a field may declare aliases (`--learning_rate`) and switches
(`--bf16` meaning `--precision bf16`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence


class SettingsError(ValueError):
    """A setting with a bad value, or a bad config file: one line that names the flag or file.
    `field`: the setting's field name, when one setting is to blame."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- ranges
@dataclasses.dataclass(frozen=True)
class Interval:
    """A range in interval notation: "[0, 1)", "[1, inf)", "(0, inf)". Numbers outside it and
    non-finite numbers (unless an end is an inclusive "inf") are refused."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if not match:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, 1)')")
        open_, low, high, close = match.groups()
        return cls(float(low), float(high), open_ == "[", close == "]", text.strip())

    def __contains__(self, value) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf and not self.high_closed:
            return f"{'at least' if self.low_closed else 'above'} {_number(self.low)}"
        return f"in {self.text}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# ----------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field declares. `kind` is its value type (int, float, str, bool), `optional` whether
    None is allowed (None: 'not set', explained in the help)."""

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    section: str
    range: Optional[Interval] = None
    choices: tuple = ()
    aliases: tuple = ()  # other flag spellings, e.g. "--learning_rate"
    switches: tuple = ()  # (flag, value) pairs: "--bf16" sets this field to "bf16"
    many: bool = False  # a comma-joined list: the flag takes several words, a file a list
    saved: bool = True  # written to the run's config (False: about one invocation only)
    resumable: str = "same"  # on resume: "same" (must not change), "free" (may change), "schedule" (see RunConfig)
    metavar: Optional[str] = None
    words: tuple = ()  # words a number setting also takes, e.g. "auto" for --batch-size

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, section: str, range: Optional[str] = None,
            choices: Sequence = (), aliases: Sequence[str] = (), switches: Optional[dict] = None,
            many: bool = False, saved: bool = True, resumable: str = "same", metavar: Optional[str] = None,
            words: Sequence[str] = ()):
    """A dataclass field declaring one setting (see `Setting`)."""
    spec = dict(help=help, section=section, range=Interval.parse(range) if range else None, choices=tuple(choices),
                aliases=tuple(aliases), switches=tuple((switches or {}).items()), many=many, saved=saved,
                resumable=resumable, metavar=metavar, words=tuple(words))
    return dataclasses.field(default=default, metadata={"setting": spec})


def settings_of(cls) -> list:
    """The `Setting`s of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is None:
            continue
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if type(None) in args:
            (kind,), optional = [a for a in args if a is not type(None)], True
        found.append(Setting(name=f.name, kind=kind, optional=optional, default=f.default, **spec))
    return found


# ----------------------------------------------------------------------------- checking
def check_value(spec: Setting, value: Any) -> Any:
    """The value as the field's type, or a SettingsError naming the flag."""
    def refuse(why: str):
        raise SettingsError(f"{spec.flag} {why}, got {value!r}", field=spec.name)

    if value is None:
        if spec.optional:
            return None
        refuse("needs a value")
    if isinstance(value, str) and value in spec.words:
        return value
    if spec.many and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if spec.kind is bool:
        if not isinstance(value, bool):
            refuse("must be true or false")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            refuse("must be a whole number" + "".join(f" or {word}" for word in spec.words))
        value = int(value)
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse("must be a number")
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not (spec.range and value in spec.range)):
            refuse("must be a finite number")
    elif spec.kind is str:
        if not isinstance(value, str):
            refuse("must be a string")
        if not value.strip():
            refuse("must not be empty")
    if spec.range is not None and value not in spec.range:
        refuse(f"must be {spec.range.describe()}")
    if spec.choices and value not in spec.choices:
        refuse(f"must be one of {', '.join(map(str, spec.choices))}")
    return value


def check(config) -> None:
    """Check (and normalise: 3 -> 3.0 for a float) every declared field of a dataclass instance.
    Call it from `__post_init__`."""
    for spec in settings_of(type(config)):
        object.__setattr__(config, spec.name, check_value(spec, getattr(config, spec.name)))


# ----------------------------------------------------------------------------- command line
def _help_text(spec: Setting) -> str:
    parts = [spec.help] if spec.help else []
    facts = []
    if spec.kind is not bool and spec.default is not None and spec.default is not dataclasses.MISSING:
        facts.append(f"default {spec.default}")
    elif spec.kind is bool:
        facts.append(f"default {'on' if spec.default else 'off'}")
    if spec.range is not None:
        facts.append(spec.range.describe())
    if spec.choices:
        facts.append("one of " + ", ".join(map(str, spec.choices)))
    if facts:
        parts.append(f"({'; '.join(facts)})")
    return " ".join(parts).replace("%", "%%")


def _cli_type(spec: Setting):
    """argparse's converter: a bad word fails as 'invalid int value' naming the flag."""
    if spec.words:
        def number_or_word(text: str):
            return text if text in spec.words else _cli_type(dataclasses.replace(spec, words=()))(text)

        number_or_word.__name__ = f"{spec.kind.__name__} or {'/'.join(spec.words)}"  # argparse names it on error
        return number_or_word
    if spec.kind is int:
        return int
    if spec.kind is float:
        return float
    return str


def _metavar(spec: Setting) -> str:
    if spec.metavar:
        return spec.metavar
    if spec.choices and len(spec.choices) <= 4:
        return "{" + ",".join(map(str, spec.choices)) + "}"
    return {int: "N", float: "X"}.get(spec.kind, spec.name.rpartition("_")[2].upper())


def build_parser(classes, *, prog: Optional[str] = None, description: str = "", epilog: str = "",
                 usage: Optional[str] = None, extra: Sequence = ()) -> argparse.ArgumentParser:
    """The argparse parser for a settings dataclass (or several, whose flags must not clash):
    one group per section, in declaration order.

    Defaults are left out of the namespace (argparse.SUPPRESS), so the namespace holds exactly
    the flags given, which then override a config file's values (`cli_values`). `extra`:
    (args, kwargs) of arguments that are not settings (--config), added first.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, usage=usage,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # one line naming the flag, not argparse's usage dump before it
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    for args, kwargs in extra:
        parser.add_argument(*args, **kwargs)
    groups = {}
    classes = classes if isinstance(classes, (list, tuple)) else [classes]
    for spec in [spec for cls in classes for spec in settings_of(cls)]:
        group = groups.get(spec.section)
        if group is None:
            group = groups[spec.section] = parser.add_argument_group(spec.section)
        names = [spec.flag, *spec.aliases]
        if spec.kind is bool:
            group.add_argument(*names, dest=spec.name, action=argparse.BooleanOptionalAction, help=_help_text(spec))
        else:
            group.add_argument(*names, dest=spec.name, type=_cli_type(spec), help=_help_text(spec),
                               nargs="+" if spec.many else None, metavar=_metavar(spec),
                               **({"action": "extend"} if spec.many else {}))  # a list flag may be repeated
        for flag, value in spec.switches:
            group.add_argument(flag, dest=spec.name, action="store_const", const=value,
                               help=f"same as {spec.flag} {value}")
    return parser


def normalize_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list:
    """Accept every flag in snake_case too: `--lora_r 4` -> `--lora-r 4` (and `--no-x_y`)."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        if arg == "--":
            out.extend(argv[len(out):])
            break
        if arg.startswith("--") and "_" in arg:
            name, eq, value = arg.partition("=")
            dashed = "--" + name[2:].replace("_", "-")
            if name not in known and dashed in known:
                arg = dashed + eq + value
        out.append(arg)
    return out


def cli_values(cls, namespace: argparse.Namespace) -> dict:
    """The settings given on the command line (a `many` setting's words joined by commas)."""
    values = {}
    for spec in settings_of(cls):
        if hasattr(namespace, spec.name):
            value = getattr(namespace, spec.name)
            values[spec.name] = ",".join(value) if spec.many and isinstance(value, list) else value
    return values


# ----------------------------------------------------------------------------- files
def _load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise SettingsError(f"{path}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: cannot read ({err})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise SettingsError(f"{path}: TOML needs Python 3.11+ or `pip install tomli`") from None
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SettingsError(f"{path}: YAML needs PyYAML (pip install pyyaml); or use TOML or JSON") from None
            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
    except SettingsError:
        raise
    except Exception as err:  # each parser's own error type; all mean "not valid <format>"
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SettingsError(f"{path}: not valid {suffix[1:].upper()} ({why})") from None
    raise SettingsError(f"{path}: unknown config file type {suffix or '(none)'}; use .toml, .json or .yaml")


def read_config_file(cls, path) -> dict:
    """Field values from a config file: a flat table of settings. Keys may be spelled as fields
    (`lora_r`), flags (`lora-r`) or aliases (`learning_rate`). A run record (training_config.json,
    whose settings are under "config") is read as the config it holds."""
    path = Path(path)
    data = _load_file(path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "base_model" in data:
        data = data["config"]  # a phicore run record
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a table of settings (key = value), found {type(data).__name__}")
    specs = settings_of(cls)
    spellings = {}
    for spec in specs:
        for name in (spec.name, spec.flag[2:], *[a.lstrip("-") for a in spec.aliases]):
            spellings[name.replace("-", "_")] = spec
    switches = {flag.lstrip("-").replace("-", "_"): (spec, value) for spec in specs for flag, value in spec.switches}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in spellings:
            spec = spellings[name]
            if spec.many and isinstance(value, list):
                value = ",".join(map(str, value))
            values[spec.name] = value
        elif name in switches:
            spec, switch_value = switches[name]
            if value is True:
                values[spec.name] = switch_value
        else:
            import difflib

            close = difflib.get_close_matches(name, [s.name for s in specs], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SettingsError(f"{path}: unknown setting {key!r}{hint}")
    return values


def from_sources(cls, file_values: Optional[dict] = None, cli_values: Optional[dict] = None, *, source: str = ""):
    """An instance of `cls` from its defaults, overridden by a file's values, overridden by the
    command line's. Validation (the dataclass's __post_init__) names the flag; a bad file value
    also names the file."""
    file_values, cli_values = file_values or {}, cli_values or {}
    try:
        return cls(**{**file_values, **cli_values})
    except SettingsError as err:
        if source and err.field in file_values and err.field not in cli_values:
            raise SettingsError(f"{source}: {err}", field=err.field) from None
        raise


def to_dict(config, *, saved_only: bool = True) -> dict:
    """The declared settings of an instance as a flat dict (JSON-ready), in declaration order."""
    return {spec.name: getattr(config, spec.name) for spec in settings_of(type(config)) if spec.saved or not saved_only}
