"""The docs against the code: the commands README.md and docs/*.md show pass only flags their tool accepts, the
defaults docs/SERVICES.md gives are the services' own, and docs/ENGINE.md's arguments table is EngineConfig.
(tests/unit/test_tls.py checks that SERVICES.md names every flag; tests/unit/test_deploy.py the manifests.)"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

from engine_service.config import EngineConfig
from engine_service.server_config import ServerConfig
from tokenizer_service.config import TextServerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OURS = ("engine_service", "tokenizer_service", "clients", "scripts")
CONSOLE = {"llm-client": "clients.cli", "engine-service": "engine_service.server",
           "tokenizer-service": "tokenizer_service.server"}
# `python -m engine_service` runs the package's __main__, which hands over to the service's main() after holding
# SIGTERM: its flags are that module's.
PACKAGES = {"engine_service": "engine_service.server", "tokenizer_service": "tokenizer_service.server"}
PASS_ON = {"scripts/run_demo.sh": "scripts.demo"}  # a shell script that hands its arguments to this module
TOOL = re.compile(r"(?<![\w/-])(llm-client|engine-service|tokenizer-service)(?![\w-])|python3? -m ([\w.]+)"
                  r"|python3? (scripts/\w+\.py)|bash (scripts/[\w.]+\.sh)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def snippets(doc: Path):
    """(line, text) of each code block line (continuations joined) and each inline code span."""
    block, pending = False, ""
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            block, pending = not block, ""
        elif block:
            if line.endswith("\\"):
                pending += line[:-1] + " "
            else:
                yield n, pending + line
                pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield n, span


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, flags) for each command of ours the docs show; a shell script's module is its own path."""
    found = []
    for doc in DOCS:
        for n, text in snippets(doc):
            for segment in re.split(r"&&|\|\||[|;&]", text):
                match = TOOL.search(segment)
                if not match:
                    continue
                console, module, script, shell = match.groups()
                target = CONSOLE.get(console) or module or shell or script[:-3].replace("/", ".")
                target = PACKAGES.get(target, target)
                if target.split(".")[0] in OURS or target.startswith("scripts/"):
                    found.append((f"{doc.name}:{n}", target, FLAG.findall(segment[match.end():])))
    return found


class Parsed(BaseException):
    """Raised by the patched parse_args: carries the parser a tool built (BaseException: no handler keeps it)."""


def flags_of(module: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every option string of the parser that `module`'s main() builds (its subcommands' too), read without
    running the tool: parse_args is stopped before it parses."""
    def stop(parser, *args, **kwargs):
        raise Parsed(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        patch.setattr(sys, "argv", [module])
        patch.setattr(logging, "basicConfig", lambda **kwargs: None)  # gpu_check's main sets it up first
        with pytest.raises(Parsed) as info:
            importlib.import_module(module).main()
    parsers, flags = [info.value.args[0]], set()
    while parsers:
        parser = parsers.pop()
        flags |= set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return flags


def test_documented_commands_pass_only_flags_their_tool_takes(monkeypatch):
    found = commands()
    tools = {module for _, module, _ in found}
    assert {"clients.cli", "engine_service.server", "tokenizer_service.server", "engine_service.bench"} <= tools
    assert sum(len(flags) for _, _, flags in found) > 60
    known: dict[str, set[str]] = {}
    wrong = []
    for where, module, flags in found:
        if module.startswith("scripts/"):  # a shell script: it must exist; its own arguments are not flags
            assert (ROOT / module).is_file(), f"{where}: no {module}"
            module = PASS_ON.get(module)
            if module is None:
                continue
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module not in known:
            known[module] = flags_of(module, monkeypatch)
        wrong += [f"{where}: {module} has no {flag}" for flag in flags if flag not in known[module]]
    assert not wrong, "\n".join(wrong)


def stated_defaults(text: str) -> list[tuple[str, str]]:
    """(flag, value) where a flag is followed by its default in parentheses, first: `--grace-s` (30; ...)."""
    value = r"`([^`]*)`|(\d+(?:,\d{3})*(?:\.\d+)?(?: MiB)?)(?![\d.]| to)|(true|false)\b"
    return [(flag, next(v for v in values if v)) for flag, *values in re.findall(rf"`(--[a-z0-9-]+)`\s\((?:{value})", text)]


def as_default(text: str, default: object) -> object:
    """The documented text as a value of the default's type."""
    if isinstance(default, bool):
        return {"true": True, "false": False}.get(text, text)
    if isinstance(default, int | float):
        number, _, unit = text.replace(",", "").partition(" ")
        return float(number) * {"": 1, "MiB": 1 << 20}[unit]
    return text


def test_services_doc_states_each_flags_real_default():
    text = (ROOT / "docs" / "SERVICES.md").read_text()
    flags = text[text.index("Engine service (`engine-service`"):]
    engine, tokenizer = flags.split("Tokenizer service (`tokenizer-service`", 1)
    tokenizer = tokenizer[: tokenizer.index("\n\n")]
    checked = 0
    for cls, paragraph in ((ServerConfig, engine), (TextServerConfig, "`tokenizer-service`" + tokenizer)):
        defaults = {f"--{f.name.replace('_', '-')}": f.default for f in dataclasses.fields(cls)}
        named = set(re.findall(r"`(--[a-z0-9-]+)", paragraph))
        assert not named - set(defaults), f"{cls.__name__} has no {sorted(named - set(defaults))}"
        port = re.search(r"default port (\d+)", paragraph)
        assert port and int(port.group(1)) == defaults["--port"]
        for flag, stated in stated_defaults(paragraph):
            assert as_default(stated, defaults[flag]) == defaults[flag], f"{cls.__name__} {flag}: doc says {stated}"
            checked += 1
    assert checked >= 45


def engine_table() -> dict[str, str]:
    """docs/ENGINE.md's "Arguments" table: argument -> its default column."""
    text = (ROOT / "docs" / "ENGINE.md").read_text()
    section = text[text.index("## Arguments"):]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section, flags=re.M)
    assert len(rows) == len(set(dict(rows))), "an argument listed twice"
    return {name: default.strip() for name, default in rows}


def test_engine_doc_table_is_engine_config():
    table = engine_table()
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    assert set(table) == set(fields), f"missing {set(fields) - set(table)}, not arguments {set(table) - set(fields)}"
    for name, default in fields.items():
        stated = table[name]
        literal = re.fullmatch(r"`(\w+)`|(\d+(?:\.\d+)?)", stated)
        if literal is None:  # described in words ("sized", "the model's ..."): what None means
            assert default is None, f"{name}: the table describes a default of {default!r}"
        elif literal.group(1):
            assert literal.group(1) == (str(default) if isinstance(default, bool | None) else default), name
        else:
            assert not isinstance(default, bool) and float(literal.group(2)) == default, name


def test_engine_keywords_in_doc_examples_are_arguments():
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    used = set()
    for doc in (ROOT / "README.md", ROOT / "docs" / "ENGINE_API.md"):
        for call in re.findall(r"\bLLM(?:Engine)?\(([^)]*)\)", doc.read_text()):
            used |= set(re.findall(r"(\w+)=", call))
    assert {"device", "max_model_len", "overlap_scheduling"} <= used
    assert used <= names, f"not engine arguments: {used - names}"


def test_service_defaults_are_the_engines_defaults():
    """An engine service started with no engine flags runs the engine that docs/ENGINE.md's table describes."""
    kwargs = ServerConfig(model="/m").engine_kwargs()
    assert EngineConfig.from_kwargs("/m", **kwargs) == EngineConfig(model="/m")
