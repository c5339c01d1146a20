"""json_schema (engine_service/json_schema.py): a compiled schema's automaton accepts exactly the documents a
validator of the same subset accepts, its masks equal a walk of each token, and what it cannot follow is refused
by name."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine_service import json_grammar as jg
from engine_service.json_schema import (
    MAX_KEY_CHOICES,
    MAX_SCHEMA_BYTES,
    SchemaCache,
    SchemaError,
    compile_schema,
)
from engine_service.structured_output import JsonMasks
from tests.unit.test_structured_output import _brute_force, _vocabulary

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "annotations constrain nothing"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "email": {"type": ["string", "null"], "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"const": "00000"}},
                    "required": ["city"], "additionalProperties": False},
        "meta": {"type": "object"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}, {"type": "array", "items": {"type": "integer"}}]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
    }, "required": ["value"]}},
    "$ref": "#/$defs/node",
}
ENUMS = {"type": "object", "properties": {"n": {"enum": [1, 12, 1.5, -3, True, None, "1", [1, 2], {"a": 1}]},
                                          "e": {"type": "array", "items": {"enum": ["x", "xy"]}}},
         "required": ["n"]}
SCHEMAS = [PERSON, TREE, ENUMS, {"type": "object"}, {"type": "object", "properties": {}, "additionalProperties": False}]


def _resolve(schema, root):
    while isinstance(schema, dict) and "$ref" in schema:
        section, _, name = schema["$ref"][2:].partition("/")
        schema = root[section][name]
    return schema


def _text(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _conforms(schema, value, root) -> bool:
    """The subset's meaning, written out plainly: the reference."""
    schema = _resolve(schema, root)
    if schema is True or schema == {}:
        return True
    for word in ("const", "enum"):  # each must hold, and so must the rest of the schema
        if word in schema:
            allowed = [schema["const"]] if word == "const" else schema["enum"]
            if _text(value) not in {_text(v) for v in allowed}:
                return False
            return _conforms({k: v for k, v in schema.items() if k != word}, value, root)
    branches = schema.get("anyOf", schema.get("oneOf"))
    if branches is not None:
        return sum(_conforms(b, value, root) for b in branches) >= 1
    kinds = schema.get("type")
    if kinds is None:
        kinds = "object" if "properties" in schema else None
    if kinds is None:
        return True
    kinds = kinds if isinstance(kinds, list) else [kinds]
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool), "null": lambda v: v is None}
    if not any(checks[k](value) for k in kinds):
        return False
    if isinstance(value, dict) and "properties" in schema:
        props = list(schema["properties"])
        keys = list(value)
        if any(k not in props for k in keys) or keys != sorted(keys, key=props.index):
            return False  # only listed properties, in their order
        if any(r not in value for r in schema.get("required", [])):
            return False
        return all(_conforms(schema["properties"][k], v, root) for k, v in value.items())
    if isinstance(value, dict) and schema.get("additionalProperties") is False:
        return not value
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(_conforms(schema.get("items", True), v, root) for v in value)
    return True


def _generate(schema, root, rng: random.Random, depth: int = 0, mess: float = 0.0):
    """A random value the schema accepts; with mess > 0, objects and arrays break a rule at that rate (keys out of
    order, a required one left out, one not listed, too many or too few items)."""
    schema = _resolve(schema, root)
    if schema is True or schema == {}:
        return rng.choice([None, 1, "x", [1, "é"], {"k": [True]}])
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return _generate(rng.choice(schema["anyOf"]), root, rng, depth)
    kinds = schema.get("type", "object")
    kind = rng.choice(kinds) if isinstance(kinds, list) else kinds
    if kind == "object":
        props = schema.get("properties")
        if props is None:
            return {} if schema.get("additionalProperties") is False else {"free": rng.random(), "é": None}
        required = schema.get("required", [])
        out = {k: _generate(sub, root, rng, depth + 1, mess) for k, sub in props.items()
               if k in required or (depth < 3 and rng.random() < 0.5)}
        if rng.random() < mess:
            items = list(out.items())
            breach = rng.randrange(3)
            if breach == 0:
                rng.shuffle(items)
            elif breach == 1 and items:
                del items[rng.randrange(len(items))]
            else:
                items.insert(rng.randint(0, len(items)), ("unlisted", 1))
            out = dict(items)
        return out
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems", 3)
        if depth >= 3:
            high = low
        if rng.random() < mess:
            low, high = max(0, low - 1), high + 1
        return [_generate(schema.get("items", True), root, rng, depth + 1, mess)
                for _ in range(rng.randint(low, high))]
    return {"string": lambda: rng.choice(["", "a b", 'q"\\', "é世\n"]), "integer": lambda: rng.randint(-10**6, 10**6),
            "number": lambda: rng.choice([0, -1.5, 2.5e-8, 7]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def _accepts(node: jg.Node, data: bytes) -> bool:
    state = jg.walk(jg.initial(node), data)
    return state is not None and jg.is_done(state)


def _reference(schema, data: bytes) -> bool:
    if data != data.rstrip(b" \t\n\r"):
        return False
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and _conforms(schema, value, schema)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_documents_and_mutations_agree_with_a_validator(index):
    schema = SCHEMAS[index]
    node = compile_schema(json.dumps(schema))
    rng = random.Random(index)
    accepted = refused = 0
    broken = 0
    for i in range(300):
        value = _generate(schema, schema, rng, mess=0.0 if i % 2 else 0.3)
        compact = schema is ENUMS  # enum values are written as json.dumps writes them compactly
        doc = json.dumps(value, ensure_ascii=False, indent=None if compact else rng.choice([None, 1, 2]),
                         separators=(",", ":") if compact else rng.choice([None, (",", ":")])).encode()
        assert _accepts(node, doc) == _reference(schema, doc), doc
        if not _reference(schema, doc):
            broken += 1
            continue
        for _ in range(10):
            data = bytearray(doc)
            at = rng.randrange(len(data) + 1)
            if rng.random() < 0.5 and at < len(data):
                del data[at]
            else:
                data.insert(at, rng.choice(b'{}[]",:0-.e tnu1x'))
            data = bytes(data)
            if b"\\" in data or (schema is ENUMS and any(data.count(c) > doc.count(c) for c in (b"0", b" "))):
                continue  # an escape, "1.50" for 1.5 or "[1 ,2]" for [1,2]: the value the reference reads, not the text
            ours = _accepts(node, data)
            assert ours == _reference(schema, data), data
            accepted += ours
            refused += not ours
    assert refused > 150 and (accepted > 0 or index == 4) and (broken > 20 or index >= 3)


@pytest.mark.parametrize("data, ok", [
    (b'{"name":"x","age":1,"role":"user"}', True),
    (b'{"age":1,"name":"x","role":"user"}', False),  # properties come in their listed order
    (b'{"name":"x","role":"user"}', False),  # age is required
    (b'{"name":"x","age":1,"role":"user","extra":1}', False),
    (b'{"name":"x","age":1.0,"role":"user"}', False), (b'{"name":"x","age":1e2,"role":"user"}', False),
    (b'{"name":"x","age":-7,"height":1.5e-3,"email":null,"role":"guest"}', True),
    (b'{"name":"x","age":1,"email":"a@b","role":"root"}', False),
    (b'{"name":"x","age":1,"role":"user","tags":["a","b","c"]}', True),
    (b'{"name":"x","age":1,"role":"user","tags":["a","b","c","d"]}', False),
    (b'{"name":"x","age":1,"role":"user","tags":[]}', False),
    (b'{"name":"x","age":1,"role":"user","address":{"zip":"00000"}}', False),
    (b'{"name":"x","age":1,"role":"user","address":{"city":"c","zip":"00000"}}', True),
    (b'{"name":"x","age":1,"role":"user","address":{"city":"c","zip":"11111"}}', False),
    (b'{"name":"x","age":1,"role":"user","meta":{"any":[1,{"b":null}]},"score":[1,2]}', True),
    (b'{"name":"x","age":1,"role":"user","score":null}', True),
    (b'{"name":"x","age":1,"role":"user","score":"x"}', False),
    (b'{"name":"x","age":1,"role":"user","score":[1.5]}', False),
])
def test_person(data: bytes, ok: bool):
    assert _accepts(compile_schema(json.dumps(PERSON)), data) is ok
    assert _reference(PERSON, data) is ok


@pytest.mark.parametrize("data, ok", [
    (b'{"n":1}', True), (b'{"n":12}', True), (b'{"n":1.5}', True), (b'{"n":-3}', True), (b'{"n":true}', True),
    (b'{"n":null}', True), (b'{"n":"1"}', True), (b'{"n":[1,2]}', True), (b'{"n":{"a":1}}', True),
    (b'{"n":2}', False), (b'{"n":1.0}', False), (b'{"n":[1, 2]}', False),  # enum values are written as json.dumps writes
    (b'{"n":1 ,"e":["x","xy"]}', True), (b'{"n":1,"e":["xyz"]}', False), (b'{}', False),
])
def test_enum_literals(data: bytes, ok: bool):
    assert _accepts(compile_schema(json.dumps(ENUMS)), data) is ok


def test_an_enums_states_are_a_range_of_its_sorted_values_not_the_values_left():
    """A state partway into an enum held the tuple of the values still possible, rebuilt on every byte and hashed
    on every mask lookup: 50-90 us a hit and 65-350 ms a miss for a 2,000-value enum, against about 2 us and a few
    ms for other states. Its detail is now (the enum's sorted values, a range of them, the bytes read): the same
    bytes give an equal state, and an object's keys step the same way."""
    cities = [f"city {i}" for i in range(2000)]
    node = compile_schema(json.dumps({"type": "object", "properties": {"city": {"enum": cities}, "n": {"enum": [1, 12]}},
                                      "required": ["city"]}))
    first, again = (jg.walk(jg.initial(node), b'{"city":"city 1') for _ in range(2))
    assert first[0] == jg.LITS and first[1] == again[1] and first[1][0] is again[1][0]
    lits, lo, hi, depth = first[1]
    assert isinstance(lits, jg.Lits) and depth == len(b'"city 1') and hi - lo == 1111  # 1, 10-19, 100-199, 1000-1999
    key = jg.walk(jg.initial(node), b'{"ci')
    assert key[0] == jg.LITS and key[1][0].tag == "k" and key[1] == jg.walk(jg.initial(node), b'{"ci')[1]
    assert jg.walk(jg.initial(node), b'{"city":"city 1999"}') is not None
    assert jg.walk(jg.initial(node), b'{"city":"city 2000"}') is None
    # 1 is complete where 12 goes on: the byte after it is read after the value
    assert jg.walk(jg.initial(node), b'{"city":"city 5","n":1}')[0] == jg.DONE
    assert jg.walk(jg.initial(node), b'{"city":"city 5","n":12}')[0] == jg.DONE
    assert jg.walk(jg.initial(node), b'{"city":"city 5","n":13}') is None


def test_many_optional_properties_compile_to_what_their_keys_take():
    """The keys that may come next, a set per property index, were each a byte trie of an object per byte: a 62 KB
    schema of 361 optional properties with 165-byte names compiled in 22 s to 2.9 GB on the engine's thread (a
    request could stall and exhaust an engine). They are sorted tuples of the same bytes objects now."""
    import tracemalloc

    props = {f"{i:03d}" + "k" * 150: {"type": "integer"} for i in range(361)}
    schema = json.dumps({"type": "object", "properties": props}, separators=(",", ":"))
    assert len(schema) < 64 * 1024
    tracemalloc.start()
    try:
        node = compile_schema(schema)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # the choices are 65,341 references to 361 names
    last = list(props)[-1]
    assert jg.walk(jg.initial(node), ('{"' + last + '":7}').encode())[0] == jg.DONE
    assert jg.walk(jg.initial(node), ('{"' + last + '":7,"000' + "k" * 150 + '":1}').encode()) is None  # in order


def test_masks_of_schema_states_equal_a_walk_of_each_token():
    vocab = _vocabulary(7)
    masks = JsonMasks(vocab)
    rng = random.Random(8)
    for schema in SCHEMAS[:3]:
        node = compile_schema(json.dumps(schema))
        for _ in range(25):
            if schema is ENUMS:  # enum values are written compactly
                doc = json.dumps(_generate(schema, schema, rng), ensure_ascii=False, separators=(",", ":")).encode()
            else:
                doc = json.dumps(_generate(schema, schema, rng), ensure_ascii=False,
                                 indent=rng.choice([None, 2])).encode()
            for cut in sorted(rng.sample(range(len(doc)), min(8, len(doc)))):
                state = jg.walk(jg.initial(node), doc[:cut])
                expected = _brute_force(vocab, state)
                assert torch.equal(masks.allowed(state).dense(len(vocab)), expected), (doc[:cut], jg.describe(state))


@pytest.mark.parametrize("schema, words", [
    ({"type": "string"}, "top level"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}, "'pattern'"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}, "'minimum'"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"enum": ["x"]}]}}}, "start with '\"'"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}, "start with '-'"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties must be false"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "additionalProperties true"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required names ['b']"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "names no definition"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/s.json"}}}, "#/$defs/"),
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": 1, "minItems": 2}}}, "below minItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "items": {}}}}, "apply to type array"),
    ({"type": "object", "properties": {"a": {"type": "text"}}}, "type 'text' is not one of"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "non-empty list"),
    ({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"type": "null"}]}}}, "cannot be combined"),
    # Each of these was once accepted with a constraint silently dropped or loosened:
    ({"type": "object", "properties": {"a": {"enum": ["x"], "const": "y"}}}, "no value of enum/const"),  # const won
    ({"type": "object", "properties": {"a": {"enum": [True], "const": 1}}}, "no value of enum/const"),  # True == 1
    ({"$defs": {"s": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/s", "type": "integer"}}},
     "$ref cannot be combined"),  # the type beside the $ref was dropped
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "oneOf": [{"type": "integer"}]}}},
     "each other"),  # the oneOf was dropped
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": 4097}}}, "maxItems must be an integer in"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 4097}}}, "minItems must be an integer in"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": True}}}, "minItems must be an integer in"),
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": False}}}, "maxItems must be an integer in"),
    # A oneOf branch typed only by its keywords: JSON Schema lets null meet {"maxItems": 1} too, so the engine's
    # null met both branches and failed oneOf (written with finish "stop"); through a $ref, beside an enum too.
    ({"type": "object", "properties": {"a": {"oneOf": [{"maxItems": 1}, {"type": "null"}]}}},
     'at #/properties/a/oneOf/0: a oneOf branch with object or array keywords and no "type"'),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"properties": {"b": {}}}]}}},
     "oneOf/1: a oneOf branch with object or array keywords"),
    ({"$defs": {"A": {"anyOf": [{"minItems": 1}]}}, "type": "object",
      "properties": {"a": {"oneOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}, "oneOf/0: a oneOf branch"),
    ({"type": "object", "properties": {"a": {"enum": [None], "oneOf": [{"maxItems": 1}, {"type": "null"}]}}},
     "oneOf/0: a oneOf branch"),
    # A nested $id is a new base for the $refs inside it: they were resolved against the root, another definition.
    ({"$defs": {"T": {"type": "string"}}, "type": "object", "properties": {"x": {
        "$id": "https://example.com/sub", "$defs": {"T": {"type": "integer"}}, "$ref": "#/$defs/T"}}},
     "at #/properties/x: $id 'https://example.com/sub' below the top level makes a new base"),
    # A keyword whose value is null was read as absent: "minItems": null passed, then failed the request mid-document
    # (a TypeError); null type, properties and anyOf took any value, any keys, no branches.
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": None}}}, "at #/properties/a: 'minItems' is null"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": None, "maxItems": 2}}}, "'minItems' is null"),
    ({"type": "object", "properties": {"a": {"type": None}}}, "'type' is null"),
    ({"type": "object", "properties": None}, "at #: 'properties' is null"),
    ({"type": "object", "properties": {"a": {"anyOf": None, "type": "string"}}}, "'anyOf' is null"),
    # 0 and 1.0 equal False and True: 0 was read as true (any keys), 1.0 beside properties as false.
    ({"type": "object", "additionalProperties": 0}, "additionalProperties must be false"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": 1.0}, "additionalProperties must be false"),
    # 0 and -0.0 are one value (JSON Schema compares numbers by value), which met both branches and failed oneOf.
    ({"type": "object", "properties": {"v": {"oneOf": [{"const": 0}, {"const": -0.0}]}}}, "can both start with '0'"),
])
def test_refusals_name_the_keyword(schema, words):
    with pytest.raises(SchemaError) as err:
        compile_schema(json.dumps(schema))
    assert words in str(err.value)


@pytest.mark.parametrize("sub, good, bad", [
    ({"type": "string", "enum": ["a", 1]}, b'"a"', b"1"),
    ({"type": "integer", "enum": [1.5, 2]}, b"2", b"1.5"),
    ({"enum": ["a", "b"], "const": "b"}, b'"b"', b'"a"'),
    ({"type": "array", "minItems": 1, "enum": [[], [1]]}, b"[1]", b"[]"),
    ({"type": ["integer", "number"]}, b"1.5", b'"1"'),  # every integer is a number: one branch
])
def test_enum_and_const_meet_the_keywords_beside_them(sub, good, bad):
    schema = {"type": "object", "properties": {"x": sub}, "required": ["x"]}
    node = compile_schema(json.dumps(schema))
    for value, ok in ((good, True), (bad, False)):
        data = b'{"x":' + value + b"}"
        assert _accepts(node, data) is ok and _reference(schema, data) is ok, data


def test_a_float_of_an_integers_value_in_enum_or_const_is_written_as_that_integer():
    """1.0 is an integer to JSON Schema: "const": 1.0 beside "type": "integer" was refused (no value met the rest),
    and 2.0 was dropped from an enum. The engine writes such a value as the integer, the same value."""
    for sub, good, bad in (({"type": "integer", "const": 1.0}, [b"1"], [b"1.0", b"2"]),
                           ({"type": "integer", "enum": [2.0, 3]}, [b"2", b"3"], [b"2.0", b"4"]),
                           ({"enum": [[1.0, {"k": -0.0}], 2.5]}, [b'[1,{"k":0}]', b"2.5"], [b'[1.0,{"k":-0.0}]'])):
        node = compile_schema(json.dumps({"type": "object", "properties": {"x": sub}, "required": ["x"]}))
        for value in good + bad:
            assert _accepts(node, b'{"x":' + value + b"}") is (value in good), (sub, value)


@pytest.mark.parametrize("first", ["A", "B"])
def test_a_definition_that_is_a_ref_alone_to_a_recursive_one_compiles_whichever_is_reached_first(first):
    """A = B, B = an array of A: an array lies on the cycle, so it is not a cycle of $refs alone. Reached through B
    first, it was refused as one; through A it compiled."""
    defs = {"A": {"$ref": "#/$defs/B"}, "B": {"type": "array", "items": {"$ref": "#/$defs/A"}}}
    schema = {"type": "object", "properties": {"x": {"$ref": f"#/$defs/{first}"}}, "required": ["x"], "$defs": defs}
    node = compile_schema(json.dumps(schema))
    for data, ok in ((b'{"x":[]}', True), (b'{"x":[[],[[]]]}', True), (b'{"x":[1]}', False), (b'{"x":[[{}]]}', False)):
        assert _accepts(node, data) is ok and _reference(schema, data) is ok, data
    # The alias as a union's branch, before it is filled: it takes its target's first bytes ("a branch refers to
    # itself before it is defined" where A or C was reached first).
    defs = {"C": {"type": "array", "items": {"$ref": "#/$defs/B"}},
            "B": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "string"}]}, "A": {"$ref": "#/$defs/C"}}
    for top in "ABC":
        schema = {"type": "object", "properties": {"x": {"$ref": f"#/$defs/{top}"}}, "required": ["x"], "$defs": defs}
        node = compile_schema(json.dumps(schema))
        for data, ok in ((b'{"x":[]}', True), (b'{"x":["s",["t",[]]]}', True), (b'{"x":[1]}', False)):
            assert _accepts(node, data) is ok, (top, data)
        assert _accepts(node, b'{"x":"s"}') is (top == "B")
    for defs in ({"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}},
                 {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/C"}, "C": {"$ref": "#/$defs/A"}}):
        looped = {"type": "object", "properties": {"x": {"$ref": f"#/$defs/{first}"}}, "$defs": defs}
        with pytest.raises(SchemaError, match="leads back to itself through"):
            compile_schema(json.dumps(looped))


@pytest.mark.parametrize("name, ref", [
    ("a/b", "#/$defs/a~1b"), ("a~b", "#/$defs/a~0b"), ("a b", "#/$defs/a%20b"), ("~1", "#/$defs/~01"),
    ("é", "#/definitions/%C3%A9"),
])
def test_a_ref_is_a_json_pointer_whose_escapes_are_decoded(name, ref):
    """A $ref is a URI fragment holding a JSON pointer: percent-escapes, then ~1 ("/") and ~0 ("~"), name the
    definition (RFC 6901; jsonschema resolves these). They were compared raw: "names no definition"."""
    section = ref.split("/")[1]
    schema = {section: {name: {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": ref}},
              "required": ["x"]}
    node = compile_schema(json.dumps(schema))
    assert _accepts(node, b'{"x":1}') and not _accepts(node, b'{"x":"s"}')


def test_a_ref_into_a_definition_is_refused_as_such_not_matched_against_a_name_with_a_slash():
    """"#/$defs/a/b" points at b inside definition a; it matched a definition named "a/b"."""
    schema = {"$defs": {"a/b": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a/b"}}}
    with pytest.raises(SchemaError, match=r"points inside a definition; point at a whole definition .*~1"):
        compile_schema(json.dumps(schema))


def test_one_definition_spelled_two_ways_is_one_definition():
    """Recursion through two spellings of one $ref ends at the same node."""
    schema = {"$defs": {"n/x": {"type": "object", "properties": {
        "a": {"anyOf": [{"$ref": "#/$defs/n~1%78"}, {"type": "null"}]}}}},
        "type": "object", "properties": {"r": {"$ref": "#/$defs/n~1x"}}, "required": ["r"]}
    node = compile_schema(json.dumps(schema))
    assert _accepts(node, b'{"r":{"a":{"a":null}}}') and not _accepts(node, b'{"r":{"a":1}}')


def test_an_enum_beside_keywords_that_refer_back_through_a_recursive_ref_is_refused():
    """The keywords beside a const were checked against the placeholder of a definition still being compiled, which
    takes any value: {"child": "oops"} passed where child must be an N object, and the engine wrote it, finishing
    with stop. Such a schema is now refused; the same const beside a finished definition is checked as before."""
    recursive = {"type": "object", "properties": {"root": {"$ref": "#/$defs/N"}}, "required": ["root"],
                 "$defs": {"N": {"type": "object", "properties": {
                     "v": {"type": "integer"},
                     "next": {"const": {"child": "oops"}, "properties": {"child": {"$ref": "#/$defs/N"}}}},
                     "required": ["v", "next"]}}}
    with pytest.raises(SchemaError, match="enum/const beside keywords that refer back through a recursive \\$ref"):
        compile_schema(json.dumps(recursive))
    plain = {"type": "object", "properties": {"next": {"const": {"child": "oops"},
                                                       "properties": {"child": {"$ref": "#/$defs/M"}}}},
             "$defs": {"M": {"type": "object"}}}
    with pytest.raises(SchemaError, match="no value of enum/const meets the rest of the schema"):
        compile_schema(json.dumps(plain))


def test_an_enum_values_containers_count_toward_the_depth_bound():
    """A const's own containers counted as none: a recursive object 63 deep could end in [[[[[1]]]]] and the
    document nested 69 containers, past the 64 the docs promise. The value is offered only where it fits."""
    schema = {"type": "object", "properties": {"c": {"$ref": "#/$defs/N"}},
              "$defs": {"N": {"type": "object", "properties": {"c": {"$ref": "#/$defs/N"},
                                                               "e": {"const": [[[[[1]]]]]}}}}}
    node = compile_schema(json.dumps(schema))

    def nested(levels: int) -> bytes:
        return b'{"c":' * levels + b'{"e":[[[[[1]]]]]}' + b"}" * levels

    assert jg.MAX_DEPTH == 64
    assert _accepts(node, nested(58))  # 59 objects and 5 arrays: 64 containers
    assert not _accepts(node, nested(59))  # 65
    assert not _accepts(node, nested(63))


def test_keywords_without_a_type_give_it():
    # {"minItems": 2} alone would let any non-array through in JSON Schema; here it is an array of two or more,
    # which every such schema accepts too.
    schema = {"type": "object", "properties": {"a": {"minItems": 2}, "b": {"additionalProperties": False}}}
    node = compile_schema(json.dumps(schema))
    for data, ok in ((b'{"a":[1,2]}', True), (b'{"a":[1]}', False), (b'{"a":"x"}', False), (b'{"b":{}}', True),
                     (b'{"b":{"c":1}}', False)):
        assert _accepts(node, data) is ok, data


def test_typed_oneof_branches_an_anyof_of_untyped_ones_and_top_level_and_fragment_ids_are_taken():
    schema = {"$id": "https://example.com/root", "type": "object", "properties": {
        "c": {"$id": "#/properties/c", "type": "integer"}, "d": {"$ref": "#/$defs/D"},
        "a": {"oneOf": [{"type": "array", "maxItems": 1}, {"type": "null"}]},
        "b": {"anyOf": [{"maxItems": 1}, {"type": "null"}]}}, "$defs": {"D": {"$id": "#d", "type": "null"}}}
    node = compile_schema(json.dumps(schema))
    for data, ok in ((b'{"a":[1],"b":null}', True), (b'{"a":null,"b":[]}', True), (b'{"a":[1,2]}', False)):
        assert _accepts(node, data) is ok, data


def test_loops_and_depths_are_refused():
    loop = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
            "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}}
    with pytest.raises(SchemaError, match="leads back to itself"):
        compile_schema(json.dumps(loop))
    deep: dict = {"type": "string"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nests schemas more than 64 deep"):
        compile_schema(json.dumps({"type": "object", "properties": {"a": deep}}))
    very_deep = "{" + '"items":{' * 5000 + "}" * 5000 + "}"  # past Python's recursion limit: still a SchemaError
    with pytest.raises(SchemaError):
        compile_schema('{"type":"object","properties":{"a":' + very_deep + "}}")
    for depth in range(500, 1100, 5):  # some parse, but writing the value back recursed out of the compiler
        deep_value = "[" * depth + "]" * depth
        try:
            compile_schema('{"type":"object","properties":{"a":{"enum":[' + deep_value + "]}}}")
        except SchemaError:
            pass  # anything else (a RecursionError) would take the engine loop down
    with pytest.raises(SchemaError, match="no value of enum/const meets"):
        compile_schema(json.dumps({"type": "object", "properties": {"a": {"type": "string", "enum": [1]}}}))
    with pytest.raises(SchemaError, match="a property name JSON cannot write"):
        compile_schema('{"type":"object","properties":{"\\ud800":{}}}')
    many = {"type": "object", "properties": {f"{i}": {} for i in range(4000)}}  # all optional: P^2/2 key choices
    with pytest.raises(SchemaError, match="too many optional properties in a row"):
        compile_schema(json.dumps(many))


def test_bad_text_and_sizes_are_refused():
    with pytest.raises(SchemaError, match="not valid JSON"):
        compile_schema("{")
    with pytest.raises(SchemaError, match="must be a JSON object"):
        compile_schema("[]")
    with pytest.raises(SchemaError, match="bytes, over the 65536"):
        compile_schema(json.dumps({"type": "object", "description": "x" * 70_000}))
    pad = MAX_SCHEMA_BYTES - len(json.dumps({"type": "object", "description": ""}).encode())
    compile_schema(json.dumps({"type": "object", "description": "x" * pad}))  # exactly the bound is taken
    with pytest.raises(SchemaError, match=f"{MAX_SCHEMA_BYTES + 1} bytes, over the {MAX_SCHEMA_BYTES}"):
        compile_schema(json.dumps({"type": "object", "description": "x" * (pad + 1)}))
    wide = {"type": "object", "properties": {f"p{i}": {"type": ["string", "null", "boolean", "array", "object"]}
                                             for i in range(800)}}  # 6 nodes each, in 60 bytes
    with pytest.raises(SchemaError, match="more than 4096 nodes"):
        compile_schema(json.dumps(wide))


def test_a_long_array_reuses_its_masks():
    # The item count of an array without maxItems does not change what may come next: its states share keys.
    vocab = _vocabulary(9)
    masks = JsonMasks(vocab)
    node = compile_schema(json.dumps({"type": "object", "properties": {"t": {"type": "array", "items": {
        "type": "string"}, "minItems": 2, "maxItems": 60}}}))
    state = jg.walk(jg.initial(node), b'{"t":[')
    misses = []
    for i in range(50):
        for b in (b'"ab"' if i == 0 else b',"ab"'):
            masks.allowed(state)
            state = jg.step(state, b)
        misses.append(masks.misses)
    assert misses[-1] == misses[5]  # after the first items, no new mask
    for tail, ok in ((b"]}", True), (b',"x"' * 10 + b"]}", True), (b',"x"' * 11 + b"]}", False)):
        assert (jg.walk(state, tail) is not None and jg.is_done(jg.walk(state, tail))) is ok  # maxItems 60 holds


def test_the_cache_shares_nodes_by_text():
    cache = SchemaCache(size=2)
    a, b = json.dumps(PERSON), json.dumps(TREE)
    assert cache.get(a) is cache.get(a)
    first = cache.get(a)
    cache.get(b)
    cache.get(json.dumps(ENUMS))  # evicts the least recently used: PERSON
    assert cache.get(a) is not first


def test_items_bounds_take_max_items_bound_itself():
    """minItems and maxItems may be MAX_ITEMS_BOUND (4096) and no more: the bound is inclusive (the refusals above
    hold 4097); a check of `<= bound + 1` let 4097 through."""
    from engine_service.json_schema import MAX_ITEMS_BOUND

    assert MAX_ITEMS_BOUND == 4096
    node = compile_schema(json.dumps({"type": "object", "properties": {"a": {
        "type": "array", "items": {"type": "integer"}, "minItems": MAX_ITEMS_BOUND, "maxItems": MAX_ITEMS_BOUND}}}))
    items = b",".join([b"1"] * MAX_ITEMS_BOUND)
    assert _accepts(node, b'{"a":[' + items + b"]}")
    assert not _accepts(node, b'{"a":[' + items + b",1]}")
    assert not _accepts(node, b'{"a":[' + items[2:] + b"]}")


def test_a_cache_hit_keeps_a_schema_from_eviction():
    """The cache is an LRU, not a FIFO: a schema read again is the most recently used, and the next one added
    evicts the schema used least recently (without the move on a hit, the first one added went, hit or not)."""
    cache = SchemaCache(size=2)
    a, b, c = (json.dumps({"type": "object", "properties": {"a": {"const": i}}}) for i in range(3))
    first_a, first_b = cache.get(a), cache.get(b)
    assert cache.get(a) is first_a  # a hit: b is now the least recently used
    cache.get(c)
    assert cache.get(a) is first_a
    assert cache.get(b) is not first_b  # b was evicted and compiled again


def test_a_schemas_objects_and_arrays_nest_to_max_depth():
    """A schema's objects and arrays (here nested through a recursive $ref) open at most MAX_DEPTH containers, the
    top object included, as free ones do: a check of `>` for `>=` let the 65th open."""
    depth = jg.MAX_DEPTH
    objects = compile_schema(json.dumps({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}},
                                         "type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}))
    assert jg.walk(jg.initial(objects), b'{"c":' * (depth - 1) + b"{") is not None
    assert jg.walk(jg.initial(objects), b'{"c":' * depth + b"{") is None
    assert _accepts(objects, b'{"c":' * (depth - 1) + b"{}" + b"}" * (depth - 1))
    arrays = compile_schema(json.dumps({"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}},
                                        "type": "object", "properties": {"c": {"$ref": "#/$defs/a"}}}))
    assert jg.walk(jg.initial(arrays), b'{"c":' + b"[" * (depth - 1)) is not None
    assert jg.walk(jg.initial(arrays), b'{"c":' + b"[" * depth) is None
    assert _accepts(arrays, b'{"c":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}")


def test_a_smallest_document_of_exactly_max_depth_containers_is_taken_and_one_more_is_refused():
    """Refused is a schema whose smallest document nests MORE than MAX_DEPTH containers (docs/ENGINE.md): one of
    exactly MAX_DEPTH compiles and its document is accepted. A check of `>=` refused both schemas at the bound."""
    depth = jg.MAX_DEPTH
    chain: dict = {"type": "object", "additionalProperties": False}  # depth objects, each requiring the next
    for _ in range(depth - 1):
        chain = {"type": "object", "properties": {"a": chain}, "required": ["a"]}
    assert _accepts(compile_schema(json.dumps(chain)), b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1))

    def nested_const(arrays: int) -> dict:  # the top object's required "a": `arrays` arrays nested
        value: list = []
        for _ in range(arrays - 1):
            value = [value]
        return {"type": "object", "properties": {"a": {"const": value}}, "required": ["a"]}

    schema = nested_const(depth - 1)
    document = json.dumps({"a": schema["properties"]["a"]["const"]}, separators=(",", ":")).encode()
    assert document.count(b"[") + document.count(b"{") == depth
    assert _accepts(compile_schema(json.dumps(schema)), document)
    with pytest.raises(SchemaError, match=f"nests more than {depth} containers"):
        compile_schema(json.dumps(nested_const(depth)))


def test_brackets_after_an_escaped_quote_in_a_const_string_open_no_container():
    """A const string's escaped quote does not end it: the brackets after it are text. Read as the string's end,
    '"' + 64 brackets counted as 64 containers and the schema was refused for its depth."""
    text = '"' + "[" * jg.MAX_DEPTH
    node = compile_schema(json.dumps({"type": "object", "properties": {"a": {"const": text}}, "required": ["a"]}))
    document = json.dumps({"a": text}, separators=(",", ":")).encode()
    assert json.loads(document) == {"a": text}
    assert _accepts(node, document)


def test_exactly_max_key_choices_compile_and_one_more_is_refused():
    """MAX_KEY_CHOICES is the most key choices a schema may have. Counted by definition here: at each property
    index, the keys that may come next run from it up to and including the first required one."""
    def schema(optional: int, required: int) -> dict:
        properties = {f"o{i}": {} for i in range(optional)} | {f"r{i}": {} for i in range(required)}
        return {"type": "object", "properties": properties, "required": [f"r{i}" for i in range(required)]}

    def key_choices(s: dict) -> int:
        names, total = list(s["properties"]), 0
        for i in range(len(names)):
            for name in names[i:]:
                total += 1
                if name in s["required"]:
                    break
        return total

    optional = 360
    required = 1 + MAX_KEY_CHOICES - key_choices(schema(optional, 1))  # each required one after the first adds one
    at_bound = schema(optional, required)
    assert key_choices(at_bound) == MAX_KEY_CHOICES
    document = json.dumps({f"r{i}": 1 for i in range(required)}, separators=(",", ":")).encode()
    assert _accepts(compile_schema(json.dumps(at_bound)), document)
    over = schema(optional, required + 1)
    assert key_choices(over) == MAX_KEY_CHOICES + 1
    with pytest.raises(SchemaError, match=f"{MAX_KEY_CHOICES} key choices"):
        compile_schema(json.dumps(over))


def test_a_float_const_is_written_as_an_integer_only_below_2_to_the_53():
    """json_schema.py's bound for writing 1.0 as 1 is "below 2**53": 2.0**53 keeps its ".0" as json.dumps writes
    it, 2.0**53 - 1 is written as the integer."""
    for value, written, not_written in ((float(2**53), json.dumps(float(2**53)), json.dumps(2**53)),
                                        (float(2**53 - 1), json.dumps(2**53 - 1), json.dumps(float(2**53 - 1)))):
        assert written != not_written
        node = compile_schema(json.dumps({"type": "object", "properties": {"a": {"const": value}}, "required": ["a"]}))
        assert _accepts(node, b'{"a":' + written.encode() + b"}"), value
        assert not _accepts(node, b'{"a":' + not_written.encode() + b"}"), value


def test_masks_around_min_items_equal_a_walk_whichever_count_comes_first():
    """A schema array's item count is left out of a mask's cache key only where it cannot matter: at minItems or
    more (and far enough below maxItems). Counted from minItems - 1, the state one item short of minItems (where "]"
    may not come) shared its key with the states past it, so whichever was seen first gave the other its mask."""
    vocab: list[bytes | None] = [b"]", b"]}", b",", b"1", b",1", b",1]", b",1,1", b",1,1]", b",1,1,1", b",1,1,1]",
                                 b"1,1", b"1,1,1", b"[", b"{", b"}", b'"t"', b":"]
    # maxItems 20 is far above 6 items plus the vocabulary's most commas (3): only minItems bounds these states.
    node = compile_schema(json.dumps({"type": "object", "properties": {"t": {
        "type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 20}}}))
    states = []
    for n in range(1, 7):
        items = b'{"t":[' + b",".join([b"1"] * n)
        states += [jg.walk(jg.initial(node), items), jg.walk(jg.initial(node), items + b" ")]  # in the number, after
    assert all(state is not None for state in states)
    for order in (states, states[::-1]):
        masks = JsonMasks(vocab)
        for state in order:
            assert torch.equal(masks.allowed(state).dense(len(vocab)), _brute_force(vocab, state)), jg.describe(state)
