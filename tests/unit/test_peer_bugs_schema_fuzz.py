"""JSON Schema constrained output against failure modes other servers shipped, by a conformance fuzz judged by the
jsonschema library: random schemas of the supported subset, random walks through their automaton, documents
jsonschema accepts written the ways the subset allows, and random sampling over the token masks of the demo
tokenizer (byte-level BPE) and a byte-fallback one, which must always reach a document. Recursive schemas are
walked down to MAX_DEPTH, where a key or an item whose value no longer fitted led to a place no byte could follow;
and the schemas at the documented limits compile and mask in bounded time."""

from __future__ import annotations

import json
import random
import time

import jsonschema
import pytest
import torch

from engine_service import json_grammar as jg
from engine_service.json_schema import (
    MAX_ITEMS_BOUND,
    MAX_KEY_CHOICES,
    MAX_NODES,
    SchemaError,
    compile_schema,
)
from engine_service.structured_output import JsonCursor, JsonMasks, token_bytes
from tests.unit.test_structured_output import _brute_force, _vocabulary

NAMES = ["a", "b", "id", "x y", "é", 'q"t', "back\\s", "n\nl", "1", "", "ab", "世"]
SCALARS = [0, 1, -1, 12, 1.5, -2.25e-3, True, False, None, "", "a", "ab", "é", 'q"', "tab\t", "世界", "\U0001F600"]
TEXTS = ["", "a", "é", 'q"t', "b\\s", "n\nl", "\U0001F600", "/", "\x01", "\u2028", "世界"]
WS = frozenset(b" \t\n\r")
# Bytes that bring a document closer to its end, in order of preference (a walk past its budget takes the first
# one allowed; inside a string its quote comes first, inside a number what ends it).
CLOSING = b'}]"0123456789nft:,'


def _value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 2 or r < 0.6:
        return rng.choice(SCALARS)
    if r < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(NAMES): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _schema(rng: random.Random, depth: int, defs: list[str]):
    """A schema of the subset: typed scalars, nullable types, enums (also beside a type), const, any value, $ref,
    objects (required, additionalProperties false or absent, free ones), arrays (items, minItems, maxItems) and
    anyOf/oneOf of branches that start differently."""
    r = rng.random() * (0.5 if depth >= 5 else 1)
    if r < 0.12:
        return {"type": rng.choice(["string", "number", "integer", "boolean", "null"])}
    if r < 0.18:
        return {"type": [rng.choice(["string", "integer", "number", "boolean", "object", "array"]), "null"]}
    if r < 0.24:
        return {"enum": [_value(rng) for _ in range(rng.randint(1, 5))]}
    if r < 0.27:
        return {"const": _value(rng)}
    if r < 0.3:
        return rng.choice([{}, True, {"description": "any"}])
    if r < 0.34 and defs and depth > 1:
        return {"$ref": "#/$defs/" + rng.choice(defs)}
    if r < 0.38:
        kind = rng.choice(["string", "integer", "boolean"])
        return {"type": kind, "enum": [_value(rng) for _ in range(5)] + [{"string": "s", "integer": 3, "boolean": True}[kind]]}
    if r < 0.6:
        return _object(rng, depth, defs)
    if r < 0.8:
        schema = {"type": "array", "items": _schema(rng, depth + 1, defs)}
        if rng.random() < 0.5:
            schema["minItems"] = rng.randint(0, 3)
        if rng.random() < 0.5:
            schema["maxItems"] = schema.get("minItems", 0) + rng.randint(0, 3)
        return schema
    pools = [[{"type": "string"}, {"enum": ["x", "y"]}], [{"type": "number"}, {"type": "integer"}, {"enum": [1, 2.5]}],
             [{"type": "boolean"}, {"const": True}], [{"type": "null"}], ["object"], ["array"]]
    branches = []
    for pool in rng.sample(pools, rng.randint(2, 4)):
        branch = rng.choice(pool)
        if branch == "object":
            branch = _object(rng, depth + 1, defs)
        elif branch == "array":
            branch = {"type": "array", "items": _schema(rng, depth + 1, defs)}
        branches.append(branch)
    return {rng.choice(["anyOf", "oneOf"]): branches}


def _object(rng: random.Random, depth: int, defs: list[str]) -> dict:
    if rng.random() < 0.15:
        return {"type": "object"}
    names = rng.sample(NAMES, rng.randint(0, 5))
    schema = {"type": "object", "properties": {name: _schema(rng, depth + 1, defs) for name in names}}
    required = [name for name in names if rng.random() < 0.5]
    if required or rng.random() < 0.5:
        schema["required"] = required
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def _root(rng: random.Random) -> dict:
    names = [f"d{i}" for i in range(rng.randint(0, 3))]
    defs = {name: _schema(rng, 1, names) for name in names}
    root = _object(rng, 0, names)
    if defs:
        root["$defs"] = {name: (s if s not in (True, {}) else {"type": "string"}) for name, s in defs.items()}
    return root


def _schemas(seed: int, count: int):
    """(schema, compiled node) pairs; schemas the engine refuses (enum values the type rules out, a $ref that must
    recurse forever) are skipped."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        schema = _root(rng)
        try:
            out.append((schema, compile_schema(json.dumps(schema))))
        except SchemaError:
            continue
    return out


def _allowed(state: jg.State) -> list[int]:
    """The bytes that may come next, whitespace between values left out (a byte inside a key or string kept)."""
    return [b for b in range(256) if jg.step(state, b) is not None and (b not in WS or state[0] not in jg.WS_MODES)]


def _closing(state: jg.State, allowed: list[int]) -> int:
    first = b'"' if state[0] in (jg.STR, jg.KEY_STR) else b"}]," if state[0] in (jg.NUM, jg.INT) else b""
    return next((b for b in first + CLOSING if b in allowed), None) or next(
        (b for b in allowed if b not in b"{["), allowed[0])


def _walk(node: jg.Node, rng: random.Random, budget: int, opening: float = 0.0) -> tuple[bytes, str | None]:
    """Random bytes the automaton allows (some whitespace; with `opening`, a preference for "{", "[" and ","), then
    past `budget` bytes the closing ones: the document, or where the walk found no byte but whitespace."""
    state, out = jg.initial(node), bytearray()
    while not jg.is_done(state):
        allowed = _allowed(state)
        if not allowed:
            return bytes(out), f"no byte may follow {bytes(out[-60:])!r} ({jg.describe(state)})"
        if len(out) >= budget:
            b = _closing(state, allowed)
        elif rng.random() < 0.04 and state[0] in jg.WS_MODES:
            b = rng.choice(b" \t\n\r")
        else:
            openers = [b for b in allowed if b in b"{[,"]
            b = rng.choice(openers if openers and rng.random() < opening else allowed)
        state = jg.step(state, b)
        out.append(b)
        assert len(out) < budget + 20_000, "the closing bytes did not close the document"
    return bytes(out), None


def _accepts(node: jg.Node, data: bytes) -> bool:
    state = jg.walk(jg.initial(node), data)
    return state is not None and jg.is_done(state)


def _mutants(doc: bytes, rng: random.Random, count: int):
    for _ in range(count):
        data = bytearray(doc)
        at = rng.randrange(len(data) + 1)
        op = rng.randrange(3)
        if op == 0 and at < len(data):
            del data[at]
        elif op == 1 or at == len(data):
            data[at:at] = bytes((rng.choice(b'{}[]",:0123456789-.eE tfnlu\\a\xc3'),))
        else:
            data[at] = rng.choice(b'{}[]",:0123456789-.eE tfnlu\\a')
        yield bytes(data)


def test_random_walks_of_random_schemas_are_documents_jsonschema_accepts():
    """A grammar that lets through what the schema forbids (an extra key, a missing required one, a value of the
    wrong type, an item count out of bounds, an enum value written another way), or a walk with nowhere to go:
    every walk ends in a document that parses and validates, and every mutation of one the automaton accepts
    parses and validates too."""
    rng = random.Random(7)
    accepted_mutants = 0
    for schema, node in _schemas(1, 70):
        validator = jsonschema.Draft202012Validator(schema)
        for budget in (20, 80, 300):
            doc, error = _walk(node, rng, budget)
            assert error is None, f"{error} in {json.dumps(schema)}"
            value = json.loads(doc)
            assert isinstance(value, dict) and validator.is_valid(value), (doc, schema)
            for mutant in _mutants(doc, rng, 8):
                if _accepts(node, mutant):
                    accepted_mutants += 1
                    value = json.loads(mutant)
                    assert isinstance(value, dict) and validator.is_valid(value), (mutant, schema)
    assert accepted_mutants > 100  # mutations inside strings and numbers, whitespace: the check had cases


def _ws(rng: random.Random) -> bytes:
    r = rng.random()
    return b"" if r < 0.6 else b" " * 32 if r < 0.05 else bytes(rng.choice(b" \t\n\r") for _ in range(rng.randint(1, 4)))


ESCAPES = {'"': b'\\"', "\\": b"\\\\", "\n": b"\\n", "\t": b"\\t", "\r": b"\\r", "\b": b"\\b", "\f": b"\\f", "/": b"\\/"}


def _string(text: str, rng: random.Random) -> bytes:
    """A JSON string written with escapes at random: short ones, \\u of either case (not for a surrogate, which
    the subset refuses: a character past the BMP is written as its UTF-8)."""
    out = bytearray(b'"')
    for c in text:
        if c in ESCAPES and (ord(c) < 0x20 or c in '"\\' or rng.random() < 0.5):
            out += ESCAPES[c]
        elif ord(c) < 0x20 or (ord(c) < 0x10000 and rng.random() < 0.2):
            out += (b"\\u%04x" if rng.random() < 0.5 else b"\\u%04X") % ord(c)
        else:
            out += c.encode()
    return bytes(out + b'"')


def _compact(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _any_text(rng: random.Random, depth: int, obj: bool = False) -> bytes:
    r = rng.random()
    if obj or (r < 0.2 and depth < 4):
        keys = rng.sample(TEXTS, rng.randint(0, 3))
        return b"{" + b",".join(_ws(rng) + _string(k, rng) + _ws(rng) + b":" + _ws(rng) + _any_text(rng, depth + 1)
                                + _ws(rng) for k in keys) + b"}"
    if r < 0.35 and depth < 4:
        return b"[" + b",".join(_ws(rng) + _any_text(rng, depth + 1) + _ws(rng) for _ in range(rng.randint(0, 3))) + b"]"
    return rng.choice([_string(rng.choice(TEXTS), rng), _number("number", rng), b"true", b"false", b"null"])


def _number(kind: str, rng: random.Random) -> bytes:
    if kind == "integer":  # the subset's integers have no fraction or exponent (1.0 and 1e2 are refused)
        return rng.choice([b"0", b"-0", b"7", b"-13", b"100000000000000000000", str(rng.randint(-999, 999)).encode()])
    return rng.choice([b"0", b"-0", b"1.5", b"-0.25e-3", b"1E+2", b"3e7", b"12", b"0.0", b"-1E-0", b"9.75E10"])


def _text(schema, root: dict, rng: random.Random, depth: int = 0) -> bytes:
    """A document of `schema` as the subset writes it (properties in their order, only listed keys beside
    properties, enum and const values compact), with whitespace, escapes and number forms at random."""
    while isinstance(schema, dict) and "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if schema is True or not set(schema) - {"description"}:
        return _any_text(rng, depth)
    if "const" in schema or "enum" in schema:
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        values = [v for v in ([schema["const"]] if "const" in schema else schema["enum"])
                  if jsonschema.Draft202012Validator(rest).is_valid(v)
                  and not (rest.get("type") == "integer" and isinstance(v, float))]
        return _compact(rng.choice(values))
    branches = schema.get("anyOf", schema.get("oneOf"))
    if branches:
        return _text(rng.choice(branches), root, rng, depth)
    kind = schema["type"]
    kind = rng.choice(kind) if isinstance(kind, list) else kind
    if kind == "object":
        if "properties" not in schema:
            return b"{" + _ws(rng) + b"}" if schema.get("additionalProperties") is False else _any_text(rng, depth, True)
        required = set(schema.get("required", []))
        parts = [_ws(rng) + _compact(name) + _ws(rng) + b":" + _ws(rng) + _text(sub, root, rng, depth + 1) + _ws(rng)
                 for name, sub in schema["properties"].items() if name in required or (depth < 4 and rng.random() < 0.5)]
        return b"{" + b",".join(parts) + b"}"
    if kind == "array":
        low = schema.get("minItems", 0)
        count = rng.randint(low, min(schema.get("maxItems", low + 3), low + (3 if depth < 4 else 0)))
        return b"[" + b",".join(_ws(rng) + _text(schema.get("items", True), root, rng, depth + 1) + _ws(rng)
                                for _ in range(count)) + b"]"
    if kind in ("number", "integer"):
        return _number(kind, rng)
    return {"string": lambda: _string(rng.choice(TEXTS), rng), "boolean": lambda: rng.choice([b"true", b"false"]),
            "null": lambda: b"null"}[kind]()


def test_documents_jsonschema_accepts_written_as_the_subset_allows_are_accepted():
    """A grammar that refuses valid output (an escaped key or character, a number form, whitespace in some place,
    an optional property left out, an enum value among longer ones): documents written independently of the
    automaton, which jsonschema accepts, are accepted byte by byte."""
    rng = random.Random(3)
    for schema, node in _schemas(2, 150):
        validator = jsonschema.Draft202012Validator(schema)
        for _ in range(4):
            doc = _ws(rng) + _text(schema, schema, rng)
            assert validator.is_valid(json.loads(doc)), (doc, schema)  # the generator's own check
            state = jg.initial(node)
            for i, b in enumerate(doc):
                state = jg.step(state, b)
                assert state is not None, f"refused at byte {i} of {doc!r} ({json.dumps(schema)})"
            assert jg.is_done(state), (doc, schema)


def _byte_fallback_vocab() -> list[bytes | None]:
    from tests.integration.tiny import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    return token_bytes(tokenizer, len(tokenizer))


def _sample(masks: JsonMasks, node: jg.Node, rng: random.Random, budget: int, check: float = 0.0,
            prefix: bytes = b"") -> bytes:
    """Uniform draws among the allowed tokens (after `prefix`, a byte token at a time), then past `budget` tokens
    single-byte ones that close; every mask must allow something other than whitespace (or a dead end is near),
    and with `check` some equal a walk."""
    vocab = masks.token_bytes
    singles = {data[0]: i for i, data in enumerate(vocab) if data is not None and len(data) == 1}
    cursor, out, steps = JsonCursor(masks, node), bytearray(prefix), 0
    for b in prefix:
        assert cursor.advance(singles[b])
    while not cursor.done:
        dense = cursor.allowed().dense(masks.vocab_size)
        ids = dense.nonzero().flatten().tolist()
        assert any(cursor.state[0] not in jg.WS_MODES or not set(vocab[i]) <= WS for i in ids), (
            f"only whitespace (or nothing) may follow {bytes(out[-60:])!r} ({jg.describe(cursor.state)})")
        if check and rng.random() < check:
            assert torch.equal(dense, _brute_force(vocab, cursor.state)), jg.describe(cursor.state)
        if steps < budget:
            token = rng.choice(ids)
        else:
            allowed = [b for b in range(256) if b in singles and dense[singles[b]]
                       and (b not in WS or cursor.state[0] not in jg.WS_MODES)]
            token = singles[_closing(cursor.state, allowed)]
        assert cursor.advance(token)
        out += vocab[token]
        steps += 1
        assert steps < budget + 5000
    return bytes(out)


@pytest.mark.parametrize("tokenizer", ["byte-level", "byte-fallback"])
def test_sampling_allowed_tokens_always_reaches_a_document(tokenizer, demo_tokenizer):
    """A sampler that meets a mask with no token allowed (a dead end) or only whitespace (a loop of newlines), over
    a real tokenizer's tokens (multi-byte pieces, byte-fallback <0xNN> tokens, special tokens): random draws reach
    a document that validates, for random schemas and recursive ones walked deep."""
    if tokenizer == "byte-level":
        vocab, check = token_bytes(demo_tokenizer, len(demo_tokenizer) + 5), 0.0
    else:
        vocab, check = _byte_fallback_vocab(), 0.05
    masks = JsonMasks(vocab)
    rng = random.Random(11)
    for schema, node in _schemas(3, 25) + [(s, compile_schema(json.dumps(s))) for s in _deep_schemas(4, 6)]:
        validator = jsonschema.Draft202012Validator(schema)
        for budget in (10, 60):
            doc = _sample(masks, node, rng, budget, check)
            assert validator.is_valid(json.loads(doc)), (doc, schema)
    deep = _tree(6)
    for depth in range(jg.MAX_DEPTH - 8, jg.MAX_DEPTH):  # from near the bound, draws still reach a document
        doc = _sample(masks, compile_schema(json.dumps(deep)), rng, 30, check, prefix=b'{"c":' * depth)
        assert jsonschema.Draft202012Validator(deep).is_valid(json.loads(doc)), doc


def _tree(chain: int, optional_array: bool = True) -> dict:
    """A recursive object: an optional child of its own kind and an optional value that opens `chain` containers."""
    value = {"type": "string"}
    for _ in range(chain):
        value = {"type": "object", "properties": {"z": value}, "required": ["z"]}
    props = {"c": {"$ref": "#/$defs/n"}, "v": value}
    if optional_array:
        props["k"] = {"type": "array", "items": {"type": "integer"}}
    return {"$defs": {"n": {"type": "object", "properties": props}}, "$ref": "#/$defs/n"}


def _deep_schemas(seed: int, count: int) -> list[dict]:
    """Recursive schemas whose self-references are optional (a property, array items, an anyOf with null) beside
    properties (some required) that open chains of required containers."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ref = {"$ref": "#/$defs/n"}
        selves = [ref, {"type": "array", "items": ref}, {"anyOf": [ref, {"type": "null"}]},
                  {"type": "array", "items": ref, "minItems": 1, "maxItems": 2},
                  {"type": "array", "items": {"type": "array", "items": ref}}]
        props = {f"r{i}": rng.choice(selves) for i in range(rng.randint(1, 3))}
        required = []
        for i in range(rng.randint(0, 2)):
            value = {"type": rng.choice(["string", "integer"])}
            for _ in range(rng.randint(0, 6)):
                value = ({"type": "object", "properties": {"z": value}, "required": ["z"]} if rng.random() < 0.5
                         else {"type": "array", "items": value, "minItems": 1})
            props[f"c{i}"] = value
            if rng.random() < 0.6:
                required.append(f"c{i}")
        order = list(props)
        rng.shuffle(order)
        out.append({"$defs": {"n": {"type": "object", "properties": {k: props[k] for k in order},
                                    "required": required}}, "$ref": "#/$defs/n"})
    return out


def test_recursive_schemas_walked_to_max_depth_always_close():
    """A recursive schema (a tree, a linked list) followed down to the nesting bound: a key, an item or an anyOf
    branch whose value needs more containers than are left was still offered, and after it no byte could come
    (the engine then failed the request). Walks that prefer opening containers always close, and validate."""
    rng = random.Random(5)
    deepest = 0
    for schema in _deep_schemas(1, 40):
        node = compile_schema(json.dumps(schema))
        validator = jsonschema.Draft202012Validator(schema)
        for budget in (400, 1500):
            doc, error = _walk(node, rng, budget, opening=0.8)
            assert error is None, f"{error} in {json.dumps(schema)}"
            assert validator.is_valid(json.loads(doc)), (doc, schema)
            state = jg.initial(node)
            for b in doc:
                state = jg.step(state, b)
                deepest = max(deepest, len(state[2]))  # containers open
    assert deepest == jg.MAX_DEPTH  # the walks did reach the bound


def test_a_key_an_item_or_a_branch_is_offered_only_where_its_value_fits():
    rest = jg.MAX_DEPTH - 1
    node = compile_schema(json.dumps(_tree(3)))
    at = jg.walk(jg.initial(node), b'{"c":' * (rest - 1) + b"{")  # 63 open: "v" needs 4 more, "k" 1 more
    assert jg.walk(at, b'"c":{}}') is not None and jg.walk(at, b'"k":[]}') is not None
    assert jg.walk(at, b'"v"') is None  # refused at its first distinguishing byte, not after its colon
    at = jg.walk(at, b'"c":{')  # 64 open: no key's value fits but the string-free ones, none here
    assert [chr(b) for b in range(256) if jg.step(at, b) is not None and b not in WS] == ["}"]
    union = compile_schema(json.dumps({"$defs": {"n": {"type": "object", "properties": {
        "c": {"$ref": "#/$defs/n"},
        "u": {"anyOf": [{"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                         "minItems": 1}, {"type": "null"}]},
        "a": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                                                      "minItems": 1}, "minItems": 1}}}}},
        "$ref": "#/$defs/n"}))
    at = jg.walk(jg.initial(union), b'{"c":' * (rest - 1) + b'{"u":')  # 63 open: [[1]] needs 2
    assert jg.walk(at, b"[") is None and jg.walk(at, b"null}") is not None
    at = jg.walk(jg.initial(union), b'{"c":' * (rest - 2) + b'{"a":[')  # 63 open: an item, [[1]], needs 2
    assert jg.walk(at, b"[") is None and jg.walk(at, b"]}") is not None


def test_a_schema_whose_smallest_document_nests_past_max_depth_is_refused():
    """Required properties that chain through $ref to more containers than MAX_DEPTH: every document of it would
    reach the bound with the chain unfinished. It compiled, and each request failed at the bound."""
    def chain(count: int, leaf: dict) -> dict:
        for _ in range(count):
            leaf = {"type": "object", "properties": {"z": leaf}, "required": ["z"]}
        return leaf

    defs = {"A": chain(40, {"type": "string"}), "B": chain(40, {"$ref": "#/$defs/A"})}
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/B"}},
              "required": ["b"], "$defs": defs}
    with pytest.raises(SchemaError, match=f"nests more than {jg.MAX_DEPTH} containers"):
        compile_schema(json.dumps(schema))
    defs["B"] = chain(20, {"$ref": "#/$defs/A"})  # 1 + 20 + 40 + the string: fits
    node = compile_schema(json.dumps(schema))
    assert _accepts(node, b'{"b":' + b'{"z":' * 60 + b'""' + b"}" * 61)


def test_a_part_too_deep_to_write_that_is_optional_is_left_out_not_refused():
    """Only a schema whose smallest document is too deep is refused: a too-deep part reached through an optional
    key or an anyOf branch is never offered, and the rest is served (a review found such schemas refused, with
    advice to make optional what already was)."""
    n = 70
    defs = {f"d{i}": {"type": "object", "required": ["c"], "properties": {"c": {"$ref": f"#/$defs/d{i + 1}"}}}
            for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    props = {"name": {"type": "string"}}
    # From the deep end, so that compiling each $def nests shallowly (a schema nests at most 64 schemas deep).
    props.update({f"p{i}": {"anyOf": [{"type": "null"}, {"$ref": f"#/$defs/d{i}"}]} for i in range(n, -1, -1)})
    props["deep"] = {"$ref": "#/$defs/d0"}
    node = compile_schema(json.dumps({"type": "object", "required": ["name"], "$defs": defs, "properties": props}))
    assert _accepts(node, b'{"name":"x","p70":null,"p69":null}')
    at = jg.walk(jg.initial(node), b'{"name":"x","p0":')
    assert jg.walk(at, b"{") is None and jg.walk(at, b"null") is not None  # the deep branch is never begun
    at = jg.walk(jg.initial(node), b'{"name":"x",')
    assert jg.walk(at, b'"deep"') is None  # nor the deep optional key offered


def test_masks_near_the_depth_bound_equal_a_walk_at_every_depth():
    """A mask cached at one depth and reused at another where a value no longer fits: the same state (an anyOf
    value, its top containers alike) allows "[" at depth 30 and not at 62."""
    vocab = _vocabulary(2)
    node = compile_schema(json.dumps({"$defs": {"n": {"type": "object", "properties": {
        "c": {"$ref": "#/$defs/n"},
        "u": {"anyOf": [{"type": "array", "items": _tree(5)["$defs"]["n"]["properties"]["v"], "minItems": 1},
                        {"type": "null"}]}}}}, "$ref": "#/$defs/n"}))
    for order in (range(1, jg.MAX_DEPTH), range(jg.MAX_DEPTH - 1, 0, -1)):
        masks = JsonMasks(vocab)
        for depth in order:
            for tail in (b'{"u":', b'{"u": '):
                state = jg.walk(jg.initial(node), b'{"c":' * (depth - 1) + tail)
                assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state)), depth


def test_item_counts_far_below_min_items_share_masks():
    """An array's count kept in every mask key below minItems: a document of minItems 4,096 items missed the
    cache twice an item (each miss a walk of the vocabulary on the engine loop). Counts from which no token reaches
    minItems allow the same tokens and share a mask; the masks still equal a walk whichever count comes first."""
    vocab = _vocabulary(4)
    node = compile_schema(json.dumps({"type": "object", "properties": {"a": {
        "type": "array", "items": {"type": "integer"}, "minItems": MAX_ITEMS_BOUND}}, "required": ["a"]}))
    masks = JsonMasks(vocab)
    state = jg.walk(jg.initial(node), b'{"a":[')
    for i in range(MAX_ITEMS_BOUND):
        for b in (b"1" if i == 0 else b",1"):
            masks.allowed(state)
            state = jg.step(state, b)
    assert jg.is_done(jg.walk(state, b"]}"))
    assert masks.misses < 100
    small = compile_schema(json.dumps({"type": "object", "properties": {"a": {
        "type": "array", "items": {"type": "integer"}, "minItems": 12, "maxItems": 30}}}))
    states = [jg.walk(jg.initial(small), b'{"a":[' + b",".join([b"1"] * n) + tail)
              for n in range(1, 16) for tail in (b"", b" ")]
    # Tokens of up to three items and the array's end: from 9 items one of them reaches minItems, from 8 none does.
    vocab = [b"]", b"]}", b",", b"1", b",1", b",1]", b",1,1", b",1,1]", b",1,1,1", b",1,1,1]", b"1,1", b"1,1,1", b"[",
             b"{", b"}", b'"a"', b":", b" "]
    for order in (states, states[::-1]):
        masks = JsonMasks(vocab)
        for state in order:
            assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state)), jg.describe(state)


def test_schemas_at_the_documented_limits_compile_and_mask_in_bounded_time():
    """Grammar compilation or masks that blow up with a schema's size (outlines' and llama.cpp's optional-property
    and item-count explosions): at 4,096 nodes, 64 levels, 65,536 key choices and minItems 4,096 a schema compiles
    and its documents' states mask in bounded time."""
    def compact(schema) -> str:
        return json.dumps(schema, separators=(",", ":"))

    optional = {f"p{i:03d}": {"type": "integer"} for i in range(361)}  # 361 * 362 / 2 key choices
    assert 361 * 362 // 2 <= MAX_KEY_CHOICES < 362 * 363 // 2
    unions = {f"p{i:03d}": {"type": ["null", "string", "array", "boolean"]} for i in range((MAX_NODES - 1) // 5)}
    chain: dict = {"type": "string"}
    for _ in range(jg.MAX_DEPTH - 1):
        chain = {"type": "object", "properties": {"z": chain}, "required": ["z"]}
    cases = [
        ({"type": "object", "properties": optional}, b"{" + b",".join(b'"p%03d":1' % i for i in range(0, 361, 5)) + b"}"),
        ({"type": "object", "properties": unions, "required": list(unions)},
         b"{" + b",".join(b'"p%03d":%s' % (i, (b"null", b'"x"', b"[1]", b"true")[i % 4]) for i in range(len(unions)))
         + b"}"),
        (chain, b'{"z":' * (jg.MAX_DEPTH - 2) + b'{"z":"x"' + b"}" * (jg.MAX_DEPTH - 1)),
        ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                "minItems": MAX_ITEMS_BOUND, "maxItems": MAX_ITEMS_BOUND}}},
         b'{"a":[' + b",".join([b"1"] * MAX_ITEMS_BOUND) + b"]}"),
    ]
    masks = JsonMasks(_vocabulary(6))
    for schema, doc in cases:
        start = time.perf_counter()
        node = compile_schema(compact(schema))
        compiled = time.perf_counter() - start
        state, misses, start = jg.initial(node), masks.misses, time.perf_counter()
        for i, b in enumerate(doc):
            if i % 7 == 0 or i > len(doc) - 64:
                masks.allowed(state)
            state = jg.step(state, b)
        assert state is not None and jg.is_done(state)
        took = time.perf_counter() - start
        assert compiled < 2 and took < 5 and masks.misses - misses < 1500, (compact(schema)[:80], compiled, took)
