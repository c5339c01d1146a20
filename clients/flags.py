"""Both services' settings: a dataclass's fields as command-line flags, each falling back to an environment
variable (PREFIX + the field's name in capitals), then to the field's default."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
# Kubernetes gives a pod variables for each Service of its namespace unless the pod sets enableServiceLinks: false:
# a Service named "engine" brings ENGINE_PORT=tcp://10.96.0.7:50051, ENGINE_SERVICE_HOST, ENGINE_PORT_50051_TCP_ADDR...
SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)
SERVICE_LINK_NAME = re.compile(r".*_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)")


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
                link = (f" ({env[var]!r} is the address Kubernetes gives a pod for a Service named "
                        f"{var.removesuffix('_PORT').lower().replace('_', '-')!r}: set enableServiceLinks: false in "
                        f"the pod spec, or rename that Service)" if SERVICE_LINK_VALUE.match(env[var]) else "")
                raise ValueError(f"{f.name}: environment variable {var}={env[var]!r} is invalid: {exc}{link}") from exc
    try:
        return cls(**values)
    except ValueError as exc:  # the settings' own rules name a field: say where its value came from
        raise ValueError(f"{exc}{_sources(str(exc), cls, env_prefix, args, env)}") from None


def _sources(message: str, cls: type, env_prefix: str, flags: Mapping[str, object], env: Mapping[str, str]) -> str:
    """" (set by --flag, PREFIX_VAR='value')" for the settings a refusal's message names, "" for none. A value refused
    by the settings' rules (not by its type, which argparse and parse_settings name the flag or variable for) was
    named by its field alone ("log_format must be 'text' or 'json', got ' json'"), which left a stray space in a
    ConfigMap a puzzle. A flag wins over its variable, as above; a default is no source."""
    sources = []
    for f in fields(cls):
        flag, var = "--" + f.name.replace("_", "-"), env_prefix + f.name.upper()
        # A one-word name (model, port, engines) names its setting only as the message's subject: in its prose,
        # "the service's port" or "the engines" may mean something else.
        if not (message.startswith(f.name + " ")
                or "_" in f.name and re.search(rf"(?<![\w-]){f.name}(?![\w-])", message)):
            continue
        if flags[f.name] is not None and flag not in message:
            sources.append(flag)
        elif flags[f.name] is None and var in env and var not in message:
            sources.append(f"{var}={env[var]!r}")
    return f" (set by {', '.join(sources)})" if sources else ""


def warn_unknown(cls: type, env_prefix: str, prog: str, env: Mapping[str, str] | None = None) -> None:
    """Warn of each variable with the settings' prefix (os.environ by default) that names no field of cls (a typo,
    such as ENGINE_MAX_NUM_SEQ for ENGINE_MAX_NUM_SEQS, left the default in force without a word), naming the
    closest setting. Kubernetes' Service variables (ENGINE_SERVICE_HOST, tcp:// addresses) and the tests' hooks
    (PREFIX_TEST_*, read by the services themselves) are not settings and are passed over. A service calls it once
    its logging is configured (from the settings parse_settings gives), so that the warning is in its format."""
    env = os.environ if env is None else env
    known = {env_prefix + f.name.upper() for f in fields(cls)}
    for var in sorted(v for v in env if v.startswith(env_prefix) and v not in known):
        if (SERVICE_LINK_NAME.fullmatch(var) or SERVICE_LINK_VALUE.match(env[var])
                or var.startswith(env_prefix + "TEST_")):
            continue
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else f"; {prog} --help lists its settings"
        log.warning("environment variable %s is not a setting of %s and is ignored%s", var, prog, hint)
