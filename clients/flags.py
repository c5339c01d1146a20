"""Both services' settings: a dataclass's fields as command-line flags, each falling back to an environment
variable (PREFIX + the field's name in capitals), then to the field's default."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields
from typing import TypeVar

T = TypeVar("T")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    # A blank value is refused as other blank settings are: read as false, a ConfigMap key left empty quietly
    # turned off what defaults to on (prefix caching, request logs).
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, on/off, yes/no or 1/0), got {text!r}")


def parse_settings(cls: type[T], env_prefix: str, prog: str, description: str, argv: list[str] | None = None,
                   env: dict[str, str] | None = None) -> T:
    """cls(**values) from `--field-name` flags, else `env_prefix + FIELD_NAME` variables (os.environ by
    default), else the defaults. Each value has its default's type; booleans take true/false, on/off, yes/no
    or 1/0. A bad environment value is a ValueError naming the variable."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog=prog, description=description)
    kinds = {}  # field name -> the parser of its values, from its default's type
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        kinds[f.name] = parse_bool if isinstance(default, bool) else type(default)
        var = env_prefix + f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kinds[f.name], default=None,
                            help=f"(env {var}, default {default!r})")
    args = vars(parser.parse_args(argv))
    values: dict[str, object] = {}
    for f in fields(cls):
        var = env_prefix + f.name.upper()
        if args[f.name] is not None:
            values[f.name] = args[f.name]
        elif var in env:
            try:
                values[f.name] = kinds[f.name](env[var])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{f.name}: environment variable {var}={env[var]!r} is invalid: {exc}") from exc
    return cls(**values)
