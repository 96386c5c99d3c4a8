"""`--config run.yaml` for any of our argparse command lines (the encoder's and the trainer's).

The file is a YAML (or JSON) mapping whose keys are the flag names without dashes:

    model_path: ../models/tiny
    data_path: [data/a, data/b]
    learning_rate: 3.0e-4
    shuffle_data: false

Rules:
  - flags given on the command line override the file (a list flag is replaced, not extended);
  - an unknown key is refused, naming the key, the file and the closest flag;
  - values go through argparse like typed flags, so types, choices and required flags are checked
    exactly as on the command line (a wrong value names the flag).
It lives in shardfmt because both CLIs import shardfmt and nothing heavier; it knows no bytes.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Sequence

from shardfmt.errors import ConfigFileError

CONFIG_FLAG = "--config"


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(CONFIG_FLAG, default=None, metavar="RUN.yaml",
                        help="YAML file of flag values (keys are flag names without '--', e.g. "
                        "`learning_rate: 3.0e-4`, `data_path: [a, b]`); flags on the command line "
                        "override it")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """`name -> action` for every long option (name without the leading dashes)."""
    found = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        for opt in action.option_strings:
            if opt.startswith("--") and action.help != argparse.SUPPRESS:
                found[opt[2:]] = action
    return found


def load_config_file(path: str | Path) -> dict[str, Any]:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"--config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigFileError(f"--config {p}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {p}: expected a mapping of flag names to values, got a "
                              f"{type(data).__name__}")
    return data


def _tokens_for(name: str, value: Any, action: argparse.Action, path: Path) -> list[str]:
    """The command-line tokens that set `name` to `value`."""
    flag = f"--{name}"
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: {name}: expected true or false, got {value!r}")
        return [flag if value else f"--no-{name}"]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: {name}: expected true or false, got {value!r}")
        wanted = isinstance(action, argparse._StoreTrueAction)  # noqa: SLF001
        return [flag] if value == wanted else []
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        values = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not values:
            raise ConfigFileError(f"--config {path}: {name}: needs at least one value")
        return [flag, *(str(v) for v in values)]
    if isinstance(value, (list, dict)):
        raise ConfigFileError(f"--config {path}: {name}: expected one value, got {value!r}")
    return [flag, str(value).lower() if isinstance(value, bool) else str(value)]


def _given_on_command_line(argv: Sequence[str], options: dict[str, argparse.Action]) -> set[str]:
    """Flag names present in argv (`--x v`, `--x=v`, `--no-x`)."""
    given = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        name = tok[2:].split("=", 1)[0]
        if name.startswith("no-") and name[3:] in options:
            name = name[3:]
        if name in options:
            given.add(name)
    return given


def _exclusive_partners(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Flag name -> the names it is mutually exclusive with."""
    partners: dict[str, set[str]] = {}
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001
        names = {o[2:] for a in group._group_actions for o in a.option_strings  # noqa: SLF001
                 if o.startswith("--")}
        for n in names:
            partners.setdefault(n, set()).update(names - {n})
    return partners


def config_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], str | None]:
    """`argv` with the --config file's values put before it (so the command line wins), and the
    file's path (None without --config). Raises ConfigFileError naming the file and key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    known, rest = pre.parse_known_args(list(argv))
    if known.config is None:
        return list(argv), None
    path = Path(known.config)
    data = load_config_file(path)
    options = _options(parser)
    options.pop(CONFIG_FLAG[2:], None)
    unknown = [k for k in data if k not in options]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k).replace("-", "_"), list(options), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigFileError(f"--config {path}: unknown key(s) {', '.join(hints)}: keys are flag "
                              f"names without '--' (see --help)")
    given = _given_on_command_line(rest, options)
    partners = _exclusive_partners(parser)
    tokens: list[str] = []
    for name, value in data.items():
        if name in given or partners.get(name, set()) & given:
            continue  # the command line overrides the file (also across exclusive flags)
        tokens += _tokens_for(name, value, options[name], path)
    return tokens + rest, str(path)


def parse_with_config(parser: argparse.ArgumentParser,
                      argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args` with `--config FILE` support (add_config_flag(parser) first). A bad
    file exits with status 2 and one line naming the file and key, like any argparse error."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        merged, path = config_argv(parser, argv)
    except ConfigFileError as e:
        parser.error(str(e))
    ns = parser.parse_args(merged)
    ns.config = path
    return ns


def format_resolved(values: dict[str, Any], *, title: str) -> str:
    """The resolved flag values as YAML (loadable again with --config), under a title line."""
    import yaml
    body = yaml.safe_dump({k: v for k, v in values.items() if k != "config"}, sort_keys=False,
                          default_flow_style=None, width=100)
    return f"{title}\n" + "".join(f"  {line}\n" for line in body.splitlines())
