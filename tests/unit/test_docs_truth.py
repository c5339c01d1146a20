"""The docs against the code, for the claims a machine can check that tests/unit/test_docs_match_flags.py
(flags and defaults) and tests/unit/test_metrics_edges.py (the metrics tables, the request line's fields)
leave open:
- every repository path and source file name README.md and docs/*.md give exists;
- every ENGINE_* / TOKENIZER_* variable they name is a setting of that service (or a hook the code reads);
- every RPC, message field and enum value they name is in protos/, and the RPC tables are the services' own;
- every metric they name anywhere, with its labels, is one a service exports;
- their Python snippets compile and their imports resolve; ENGINE_API.md's step API is LLMEngine's own, and
  the README's snippet runs on the demo model, with the keys both docs list for stats(), model_info and a
  result;
- the commands in their indented code blocks pass only flags their tool takes (the flags test reads fenced
  blocks and inline code only)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine_service.server_config import ServerConfig
from protos.llmserve.engine.v1 import engine_pb2
from protos.llmserve.text.v1 import text_pb2
from tests.unit.test_docs_match_flags import CONSOLE, FLAG, PACKAGES, TOOL, flags_of, snippets
from tokenizer_service.config import TextServerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
K8S = ROOT / "deploy" / "k8s"  # the docs name base/... and overlays/... relative to it
TOPS = ("engine_service", "tokenizer_service", "clients", "scripts", "protos", "tests", "deploy", "docs")


def doc_lines() -> list[tuple[str, str]]:
    """(where, line) of every line of the docs."""
    return [(f"{doc.name}:{n}", line) for doc in DOCS
            for n, line in enumerate(doc.read_text().splitlines(), 1)]


def code_spans() -> list[tuple[str, str]]:
    """(where, text) of every inline code span of the docs."""
    return [(where, span) for where, line in doc_lines() for span in re.findall(r"`([^`]+)`", line)]


# ---- paths -----------------------------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w/.:-])((?:engine_service|tokenizer_service|clients|scripts|tests|deploy|protos"
                  r"|docs|\.ci|base|overlays)/[\w./{},*<>-]*[\w*}>])")
SOURCE_NAME = re.compile(r"(?<![\w/.-])([\w-]+\.(?:py|sh|yaml|proto|toml|env|jinja|Dockerfile))\b")


def expand(path: str) -> list[str]:
    """A path with `{a,b}` alternatives, as the shell expands it."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[:match.start()], path[match.end():]
    return [p for alt in match.group(1).split(",") for p in expand(head + alt + tail)]


def exists(path: str) -> bool:
    """A file or folder (a glob: one at least), or `module/file.name`: a function or constant of file.py."""
    base = K8S if path.startswith(("base/", "overlays/")) else ROOT
    if "*" in path:
        return any(base.glob(path))
    if (base / path).exists():
        return True
    module, _, name = path.rpartition(".")
    source = base / f"{module}.py"
    defined = re.compile(rf"^(def|class) {name}\b|^{name} = ", re.M)
    return source.is_file() and defined.search(source.read_text()) is not None


def test_repo_paths_the_docs_name_exist():
    named, missing = 0, []
    for where, line in doc_lines():
        for path in PATH.findall(line):
            if "<" in path or (path.startswith("deploy/") and "/" not in path[7:] and "." not in path):
                continue  # a placeholder (overlays/<overlay>), or kubectl's deploy/NAME
            for one in expand(path):
                named += 1
                if not exists(one):
                    missing.append(f"{where}: {one}")
        for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", line):
            named += 1
            if not (ROOT / "docs" / image).exists() and not (ROOT / image).exists():
                missing.append(f"{where}: image {image}")
    assert named > 150, named
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(missing)


def test_source_file_names_the_docs_give_exist():
    """A bare name (`decoder.py`, `tokenizer-hpa.yaml`) must be some file's of the repository."""
    names = {p.name for top in TOPS for p in (ROOT / top).rglob("*") if "__pycache__" not in p.parts}
    names |= {p.name for p in ROOT.iterdir()}  # pyproject.toml
    given = [(where, name) for where, line in doc_lines() for name in SOURCE_NAME.findall(line)]
    assert len(given) > 20, len(given)
    missing = [f"{where}: {name}" for where, name in given if name not in names]
    assert not missing, "the docs name files the repository does not have:\n" + "\n".join(missing)


# ---- environment variables -------------------------------------------------------------------------------

# Names the docs give that are no setting on purpose: the rule's example, a typo shown as one, Kubernetes'
# own, and a doc's name.
NOT_SETTINGS = {"ENGINE_SOME_FLAG", "TOKENIZER_SOME_FLAG", "ENGINE_MAX_NUM_SEQ", "ENGINE_SERVICE_HOST",
                "ENGINE_API"}


def code_text() -> str:
    return "\n".join(p.read_text() for top in ("engine_service", "tokenizer_service", "clients")
                     for p in (ROOT / top).rglob("*.py"))


def test_environment_variables_the_docs_name_are_settings():
    """`ENGINE_MAX_NUM_SEQS` is `--max-num-seqs`; a renamed flag leaves the docs' variable set by no one."""
    fields = {"ENGINE": {f.name.upper() for f in dataclasses.fields(ServerConfig)},
              "TOKENIZER": {f.name.upper() for f in dataclasses.fields(TextServerConfig)}}
    code, named, wrong = code_text(), 0, []
    for where, line in doc_lines():
        for prefix, name in re.findall(r"(?<![\w*])(ENGINE|TOKENIZER)_([A-Z0-9_]*[A-Z0-9])\b", line):
            named += 1
            variable = f"{prefix}_{name}"
            if name not in fields[prefix] and variable not in NOT_SETTINGS and variable not in code:
                wrong.append(f"{where}: {variable}")
        for name in re.findall(r"`\*_([A-Z0-9_]+)`", line):  # `*_TLS_KEY`: both services'
            named += 1
            wrong += [f"{where}: {p}_{name}" for p in fields if name not in fields[p]]
    assert named > 40, named
    assert not wrong, "no such setting (docs/SERVICES.md, Flags):\n" + "\n".join(wrong)


def test_observability_doc_settings_table_gives_the_services_defaults():
    """OBSERVABILITY.md's table of settings: each row's flag and variables are both services', with their
    defaults (`9400 / 9401`: the engine's, then the tokenizer's)."""
    text = (ROOT / "docs" / "OBSERVABILITY.md").read_text()
    row = r"^\| [^|]+ \| `(--[a-z-]+)` / `(\w+)` \| `(--[a-z-]+)` / `(\w+)` \| ([^|]+) \|$"
    rows = re.findall(row, text, re.M)
    assert len(rows) >= 3, rows
    for flag, engine_variable, tokenizer_flag, tokenizer_variable, default in rows:
        name = flag[2:].replace("-", "_")
        variables = f"ENGINE_{name.upper()}", f"TOKENIZER_{name.upper()}"
        assert (tokenizer_flag, engine_variable, tokenizer_variable) == (flag, *variables), \
            f"OBSERVABILITY.md: {flag} / {tokenizer_flag} with {engine_variable}, {tokenizer_variable}; " \
            f"{flag}'s variables are {' and '.join(variables)}"
        stated = [d.strip().strip("`") for d in default.split(" / ")]
        real = [next(f.default for f in dataclasses.fields(cls) if f.name == name)
                for cls in (ServerConfig, TextServerConfig)]
        as_text = [str(v).lower() if isinstance(v, bool) else str(v) for v in real]
        assert (stated * 2 if len(stated) == 1 else stated) == as_text, \
            f"OBSERVABILITY.md: {flag} defaults to {default.strip()}; the services': {' / '.join(as_text)}"


# ---- the protocol ----------------------------------------------------------------------------------------

FILES = (engine_pb2.DESCRIPTOR, text_pb2.DESCRIPTOR)
MESSAGES: dict[str, set[str]] = {}
for _file in FILES:
    for _name, _message in _file.message_types_by_name.items():
        MESSAGES.setdefault(_name, set()).update(f.name for f in _message.fields)
ENUM_VALUES = {v.name for f in FILES for e in f.enum_types_by_name.values() for v in e.values}


def rpc_table(section: str) -> dict[str, list[str]]:
    """SERVICES.md's table under `## <section>`: RPC name -> the message names of its shape column."""
    text = (ROOT / "docs" / "SERVICES.md").read_text()
    table = text[text.index(f"## {section}"):].split("\n\n", 2)[1]
    rows = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            rows[name] = re.findall(r"`([A-Z]\w+)`", cells[1])
    return rows


@pytest.mark.parametrize("section, service", [("Engine API", "llmserve.engine.v1.Engine"),
                                              ("Text API", "llmserve.text.v1.TextGeneration")])
def test_services_doc_rpc_tables_are_the_services(section, service):
    assert f"## {section} (`{service}`)" in (ROOT / "docs" / "SERVICES.md").read_text()
    methods = {m.name: m for f in FILES for s in f.services_by_name.values() if s.full_name == service
               for m in s.methods}
    table = rpc_table(section)
    assert set(table) == set(methods), f"the table lists {sorted(table)}, {service} has {sorted(methods)}"
    for name, shape in table.items():
        real = {methods[name].input_type.name, methods[name].output_type.name}
        assert set(shape) <= real, f"{service}/{name}: the table says {shape}, the proto {sorted(real)}"


# Python classes the docs name beside the messages of the same name (the engine API's).
PYTHON_CLASSES = {"SamplingParams": "engine_service.sampling_params",
                  "TokenLogprobs": "engine_service.outputs", "StepOutput": "engine_service.outputs"}


def has_field(message: str, field: str) -> bool:
    if field in MESSAGES.get(message, ()):
        return True
    module = PYTHON_CLASSES.get(message)
    if module is None:
        return False
    cls = getattr(importlib.import_module(module), message)
    return hasattr(cls, field) or field in {f.name for f in dataclasses.fields(cls)}


def test_proto_fields_and_enum_values_the_docs_name_exist():
    """`NewRequest.trace_id`, `chat.enable_thinking`, `sampling_params.logprobs`, `FINISH_REASON_STOP`..."""
    named, wrong = 0, []
    for where, span in code_spans():
        for message, field in re.findall(r"(?<![\w.])([A-Z]\w+)\.([a-z_]\w*)\b", span):
            if message in MESSAGES:
                named += 1
                if not has_field(message, field):
                    wrong.append(f"{where}: {message}.{field}")
        for part, field in re.findall(r"(?<![\w.])(chat|sampling_params)\.([a-z_]\w*)\b", span):
            named += 1
            if not has_field({"chat": "Chat", "sampling_params": "SamplingParams"}[part], field):
                wrong.append(f"{where}: {part}.{field}")
        for value in re.findall(r"\b(?:RESPONSE_FORMAT|FINISH_REASON)_[A-Z_]+\b", span):
            named += 1
            if value not in ENUM_VALUES:
                wrong.append(f"{where}: {value}")
    assert named > 30, named
    assert not wrong, "not in protos/llmserve/*/v1/*.proto:\n" + "\n".join(wrong)


# ---- metrics ---------------------------------------------------------------------------------------------


def exported() -> dict[str, set[tuple[str, str]]]:
    """Every metric name the services export (histograms' and counters' families too): its (label, value)s."""
    from engine_service.metrics import EngineMetrics
    from tokenizer_service.metrics import TextMetrics

    engine = EngineMetrics("m", dict, lambda: 0)
    text = TextMetrics("m", log_requests=False)
    text.watch(lambda: 0, lambda: 0)
    names: dict[str, set[tuple[str, str]]] = {}
    for metrics in (engine, text):
        metrics.watch_certificate(lambda: 1.0)
        exposition = generate_latest(metrics.registry).decode()
        for name in re.findall(r"^# TYPE (\S+) ", exposition, re.M):
            names.setdefault(name, set())
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels.items())
    return names


def test_metric_names_anywhere_in_the_docs_are_exported():
    """Beyond OBSERVABILITY.md's tables: the alert in SECURITY.md, ENGINE.md's mask counter, the label values
    the prose quotes (`request_success_total{finished_reason="error"}`) name series a dashboard can read."""
    names = exported()
    mentioned, wrong = 0, []
    for where, span in code_spans():
        found = re.findall(r"llmserve:([a-z0-9_]+)(\{[^}]*\})?", span)
        found += re.findall(r"^([a-z0-9_]+_total)(\{[^}]*\})?$", span)
        for name, labels in found:
            mentioned += 1
            name = f"llmserve:{name}"
            if name not in names:
                wrong.append(f"{where}: {name} is not exported")
                continue
            for key, _, value in re.findall(r'(\w+)(="([^"]*)")?', labels.strip("{}")):
                keys = {k for k, _ in names[name]}
                if key not in keys or (value and (key, value) not in names[name]):
                    wrong.append(f"{where}: {name} has no series {key}={value or '...'}")
    assert mentioned > 30, mentioned
    assert not wrong, "\n".join(wrong)


# ---- Python snippets -------------------------------------------------------------------------------------


def python_blocks() -> list[tuple[str, str]]:
    """(where, code) of each ```python block of the docs."""
    blocks = []
    for doc in DOCS:
        for match in re.finditer(r"^```python\n(.*?)^```", doc.read_text(), re.M | re.S):
            line = doc.read_text()[:match.start()].count("\n") + 1
            blocks.append((f"{doc.name}:{line}", match.group(1)))
    return blocks


def resolve_imports(where: str, tree: ast.AST) -> list[str]:
    """Import each module the code imports and look up each name it takes from one."""
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    importlib.import_module(alias.name)
                except ImportError as exc:
                    wrong.append(f"{where}: import {alias.name}: {exc}")
        elif isinstance(node, ast.ImportFrom):
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                wrong.append(f"{where}: from {node.module}: {exc}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        wrong.append(f"{where}: {node.module} has no {alias.name}")
    return wrong


def test_python_snippets_compile_and_their_imports_resolve():
    """Every ```python block is Python (ENGINE_API.md's, a list of signatures, only in its import lines)."""
    blocks = python_blocks()
    docs = {where.split(":")[0] for where, _ in blocks}
    assert docs >= {"README.md", "ENGINE_API.md", "SERVICES.md", "SECURITY.md"}, docs
    commands = indented_commands() + [(f"{doc.name}:{n}", text) for doc in DOCS for n, text in snippets(doc)]
    one_liners = [(where, code) for where, command in commands
                  for code in re.findall(r'python3? -c "([^"]*)"', command)]
    assert len(one_liners) >= 2  # PERFORMANCE.md's tiny checkpoints for step_profile.py
    blocks += one_liners
    wrong = []
    for where, code in blocks:
        if where.startswith("ENGINE_API.md"):
            code = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            wrong.append(f"{where}: line {exc.lineno}: {exc.msg}")
            continue
        compile(tree, where, "exec")
        wrong += resolve_imports(where, tree)
    assert not wrong, "\n".join(wrong)


def engine_api() -> str:
    return next(code for where, code in python_blocks() if where.startswith("ENGINE_API.md"))


def test_engine_api_doc_signatures_are_the_engines():
    """Each `engine.method(params) -> type` line of ENGINE_API.md is LLMEngine's method: the same parameters,
    in order, with the defaults it gives, and the return annotation it gives."""
    from engine_service import LLMEngine

    entries = re.findall(r"^engine\.(\w+)\(([^)]*)\)\s*->\s*([^#\n]+?)\s*(?:#|$)", engine_api(), re.M)
    names = {name for name, _, _ in entries}
    assert {"add_request", "abort_request", "step", "has_unfinished_requests", "stats"} <= names, names
    wrong = []
    for name, params, returns in entries:
        method = getattr(LLMEngine, name, None)
        if method is None:
            wrong.append(f"LLMEngine has no {name}()")
            continue
        real = list(inspect.signature(method).parameters.values())[1:]
        documented = [p.strip() for p in params.split(",") if p.strip()]
        if [p.split(":")[0].split("=")[0].strip() for p in documented] != [p.name for p in real]:
            wrong.append(f"{name}({params}): LLMEngine.{name}{inspect.signature(method)}")
            continue
        for doc, param in zip(documented, real, strict=True):
            if "=" in doc and doc.split("=", 1)[1].strip() != repr(param.default):
                wrong.append(f"{name}: {doc}, the default is {param.default!r}")
        annotation = inspect.signature(method).return_annotation
        if annotation is not inspect.Signature.empty and returns != annotation:
            wrong.append(f"{name}() -> {returns}: LLMEngine.{name} returns {annotation}")
    assert not wrong, "docs/ENGINE_API.md against engine_service/engine.py:\n" + "\n".join(wrong)


def listed_keys(comment_of: str, text: str) -> set[str]:
    """The keys a snippet's comment lists after `comment_of` (its continuation lines too), without the
    parenthesized remarks."""
    lines = text[text.index(comment_of):].splitlines()
    comment = lines[0].split("#", 1)[1]
    for line in lines[1:]:
        if not line.lstrip().startswith("#"):
            break
        comment += " " + line.split("#", 1)[1]
    items = (item.strip() for item in re.sub(r"\([^)]*\)", "", comment).split(","))
    return {item for item in items if re.fullmatch(r"[a-z_]+", item)}  # not "prefix-cache counters"


def test_readme_and_engine_api_snippets_run_on_the_demo_model(demo_model_dir, monkeypatch, capsys):
    """README's snippet, as written, on the demo model (its pool made small: the doc's arguments would size a
    1 GiB CPU cache); the keys README.md and ENGINE_API.md give for stats(), model_info and a result."""
    import engine_service

    readme = next(code for where, code in python_blocks() if where.startswith("README.md"))
    seen = {}

    class DemoLLM(engine_service.LLM):
        def __init__(self, model, **kwargs):
            assert isinstance(model, str), model  # the doc's placeholder path
            super().__init__(demo_model_dir, **{"num_kvcache_blocks": 256, "max_num_seqs": 8, **kwargs})

        def __exit__(self, *exc):  # what the engine shows before the snippet closes it
            result = self.generate([[1, 2, 3]], engine_service.SamplingParams(max_tokens=1))[0]
            seen.update(stats=self.stats(), info=self.model_info, defaults=self.generation_defaults,
                        result=result)
            return super().__exit__(*exc)

    monkeypatch.setattr(engine_service, "LLM", DemoLLM)
    exec(compile(readme, "README.md", "exec"), {})
    assert seen and len(capsys.readouterr().out.splitlines()) >= 3
    stats, info, result = set(seen["stats"]), set(seen["info"]), set(seen["result"])
    readme_stats = listed_keys("print(llm.stats())", readme)
    assert readme_stats <= stats, f"README.md: stats() has no {readme_stats - stats}; it has {sorted(stats)}"

    api = (ROOT / "docs" / "ENGINE_API.md").read_text()
    result_sentence = api[api.index("each result has"):api.index("(lists of")]
    for listed, real, what in ((listed_keys("engine.stats() -> dict", api), stats, "stats()"),
                               (listed_keys("engine.model_info -> dict", api), info, "model_info"),
                               (set(re.findall(r"`(\w+)`", result_sentence)), result, "a generate() result")):
        assert listed == real, f"ENGINE_API.md lists {sorted(listed)} for {what}; its keys are {sorted(real)}"
    assert set(seen["defaults"]) <= {f.name for f in dataclasses.fields(engine_service.SamplingParams)}


# ---- commands in indented blocks -------------------------------------------------------------------------


def indented_commands() -> list[tuple[str, str]]:
    """(where, command) of each line of the docs' four-space-indented code blocks, continuations joined."""
    found = []
    for doc in DOCS:
        fenced, block, pending = False, False, ""
        previous = ""
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and line.startswith("    ") and (block or not previous.strip()):
                block = True
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                else:
                    found.append((f"{doc.name}:{n}", pending + line.strip()))
                    pending = ""
            elif line.strip():
                block = False
            previous = line
    return found


def test_indented_commands_pass_only_flags_their_tool_takes(monkeypatch):
    """PERFORMANCE.md's recipes (`python -m scripts.metrics_overhead --pairs 5`...) are indented blocks, which
    the flags test does not read."""
    known: dict[str, set[str]] = {}
    checked, wrong = 0, []
    for where, command in indented_commands():
        for segment in re.split(r"&&|\|\||[|;&]", command):
            match = TOOL.search(segment)
            if not match or match.group(4):  # none of ours, or a shell script (the flags test's)
                continue
            console, module, script, _ = match.groups()
            target = CONSOLE.get(console) or module or script[:-3].replace("/", ".")
            target = PACKAGES.get(target, target)
            if target not in known:
                known[target] = flags_of(target, monkeypatch)
            flags = FLAG.findall(segment[match.end():])
            checked += len(flags)
            wrong += [f"{where}: {target} has no {flag}" for flag in flags if flag not in known[target]]
    assert checked > 40, checked
    assert not wrong, "\n".join(wrong)
