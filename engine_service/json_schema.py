"""A JSON Schema, compiled into the nodes json_grammar.py's automaton follows (response_format "json_schema").

The subset is the one OpenAI's structured outputs take, with its strict reading, and every keyword outside it is
refused by name (a schema the output would not honour is an error, not a hint):
- "type": "object", "array", "string", "number", "integer", "boolean", "null", or a list of them;
- objects: "properties" (written in the order listed; a property not in "required" may be left out), "required",
  "additionalProperties" false (or absent, read as false when "properties" is given: only listed keys are
  written); an object without "properties" takes any keys and values;
- arrays: "items", "minItems", "maxItems";
- "enum" and "const" (of any JSON values, written as json.dumps writes them compactly, a float of an integer's
  value as that integer: 1.0 as 1);
- "anyOf" / "oneOf" whose branches start differently (a string or null; an object or an array), so that the first
  byte of a value picks its branch (a oneOf branch must give its "type" where it has object or array keywords);
- "$ref" to "#/$defs/..." or "#/definitions/..." (recursive ones too), with "$defs" / "definitions" beside it;
- annotations, which constrain nothing: title, description, default, examples, $schema, $id (below the top
  level only a fragment, "#..."), $comment, deprecated, readOnly, writeOnly, and "format" (not enforced: a "date-time" string is any string).
The top level must be an object. Strings follow json_grammar.py's rules (valid UTF-8, no surrogate escapes). Each
node gets the fewest containers its smallest value opens (`need`), with which the automaton offers a value, key
or branch only where it fits under MAX_DEPTH; a schema with a node no finite value meets, or whose smallest value
nests deeper than that, is refused.
"""

from __future__ import annotations

import heapq
import json
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable

from engine_service import json_grammar as jg

MAX_SCHEMA_BYTES = 64 * 1024
MAX_NODES = 4096
MAX_SCHEMA_DEPTH = 64  # schemas nested in schemas (properties, items, anyOf, $ref): a document nests no deeper
MAX_ITEMS_BOUND = 4096  # minItems / maxItems above this are refused: each count is a state of its own
COMPILED_CACHE_SIZE = 64
MAX_KEY_CHOICES = 65536

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "format"))
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_KEYWORDS = {
    "object": frozenset(("properties", "required", "additionalProperties")),
    "array": frozenset(("items", "minItems", "maxItems")),
}
# The bytes a value of each type starts with.
_TYPE_STARTS = {"object": b"{", "array": b"[", "string": b'"', "number": b"-0123456789", "integer": b"-0123456789",
                "boolean": b"tf", "null": b"n"}
_COMMON = frozenset(("type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions"))


class SchemaError(ValueError):
    """A schema this engine cannot follow; the message names the place and the keyword."""


def _literal(value) -> bytes:
    """An enum/const value as the engine writes it, compact, with every float of an integer's value (1.0, -0.0; below
    2**53) written as that integer: JSON Schema compares numbers by value, so the value is the same, "type":
    "integer" takes it (the integer grammar has no fraction: 1.0 was refused beside it), and -0.0 and 0 are one
    value, not two oneOf branches that start differently (each value met both, and failed oneOf)."""
    return json.dumps(_integral(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _integral(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.defs: dict[tuple[str, str], jg.Node] = {}  # (section, definition name) -> its node
        self.pending: set[int] = set()  # ids of $ref placeholders whose definitions are being compiled
        # A pending placeholder whose definition is only a $ref to another pending one: id -> that one, and back
        self.alias_of: dict[int, jg.Node] = {}
        self.aliases: dict[int, list[jg.Node]] = {}
        self.count = 0
        self.key_choices = 0
        self.depth = 0

    def node(self, kind: str) -> jg.Node:
        self.count += 1
        if self.count > MAX_NODES:
            raise SchemaError(f"json_schema needs more than {MAX_NODES} nodes; simplify it")
        return jg.Node(kind)

    def compile(self, schema, where: str) -> jg.Node:
        self.depth += 1
        try:
            if self.depth > MAX_SCHEMA_DEPTH:
                raise SchemaError(f"json_schema nests schemas more than {MAX_SCHEMA_DEPTH} deep (at {where[:120]})")
            return self._compile(schema, where)
        finally:
            self.depth -= 1

    def _compile(self, schema, where: str) -> jg.Node:
        if schema is True or schema == {}:
            return jg.ANY
        if not isinstance(schema, dict):
            raise SchemaError(f"json_schema at {where} must be an object (or true), got {json.dumps(schema)[:60]}")
        allowed = _COMMON | ANNOTATIONS | _KEYWORDS["object"] | _KEYWORDS["array"]
        unknown = sorted(set(schema) - allowed)
        if unknown:
            raise SchemaError(f"json_schema at {where} uses {', '.join(map(repr, unknown))}, which this engine does "
                              f"not enforce; it takes type, properties, required, additionalProperties (false), items, "
                              f"minItems, maxItems, enum, const, anyOf, oneOf, $ref and annotations")
        nulls = sorted(k for k, v in schema.items() if v is None and k in allowed - ANNOTATIONS - {"const"})
        if nulls:  # read as absent, "minItems": null passed the door and failed the request mid-document
            raise SchemaError(f"json_schema at {where}: {', '.join(map(repr, nulls))} is null, which JSON Schema does "
                              "not allow there; leave the keyword out, or give it a value")
        ident = schema.get("$id", "#")
        if where != "#" and not (isinstance(ident, str) and ident.startswith("#")):
            # A new base URI: "#/$defs/..." inside it names its own definitions, which a reading that resolves every
            # $ref against the root got wrong (the engine wrote values of another definition). A fragment alone
            # ("#name", draft 7's anchors; "#/properties/a", as schema generators write) changes no base.
            raise SchemaError(f"json_schema at {where}: $id {ident!r} below the top level makes a new base for "
                              "the $refs inside it, which this engine does not follow; leave it out, or move the "
                              "definitions to the top-level $defs")
        if "$ref" in schema:
            if set(schema) - ANNOTATIONS - {"$ref", "$defs", "definitions"}:
                raise SchemaError(f"json_schema at {where}: $ref cannot be combined with other constraints")
            return self.ref(schema["$ref"], where)
        if "const" in schema or "enum" in schema:
            if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
                raise SchemaError(f"json_schema at {where}: enum must be a non-empty list")
            try:
                literals = [_literal(v) for v in schema["enum"]] if "enum" in schema else None
                if "const" in schema:  # both: the values both allow
                    const = _literal(schema["const"])
                    literals = [const] if literals is None or const in literals else []
            except (ValueError, RecursionError) as exc:  # NaN or infinity, a lone surrogate, nesting
                raise SchemaError(f"json_schema at {where}: enum holds a value JSON cannot write ({exc})") from None
            rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
            if set(rest) - ANNOTATIONS - {"$defs", "definitions"}:  # type, items, ...: the values must meet them too
                check = self.compile(rest, where)
                if self.pending and _reaches(check, self.pending):
                    # A definition still being compiled is a placeholder that takes any value: every value passed,
                    # and the engine wrote ones the schema forbids.
                    raise SchemaError(f"json_schema at {where}: enum/const beside keywords that refer back through "
                                      "a recursive $ref is not supported; list the allowed values without them")
                literals = [lit for lit in literals if _accepts_value(check, lit)]
            if not literals:
                raise SchemaError(f"json_schema at {where}: no value of enum/const meets the rest of the schema")
            node = self.node(jg.LITERALS_KIND)
            node.literals = tuple(dict.fromkeys(literals))
            return node.seal()
        branches = schema.get("anyOf", schema.get("oneOf"))
        if branches is not None:
            beside = sorted(set(schema) - ANNOTATIONS - {"anyOf", "oneOf", "$defs", "definitions"})
            if beside or ("anyOf" in schema and "oneOf" in schema):
                raise SchemaError(f"json_schema at {where}: anyOf/oneOf cannot be combined with {beside or 'each other'}"
                                  "; put those constraints inside each branch")
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"json_schema at {where}: anyOf/oneOf must be a non-empty list of schemas")
            if "oneOf" in schema:
                for i, branch in enumerate(branches):
                    if self.untyped(branch, set()):
                        raise SchemaError(
                            f"json_schema at {where}/oneOf/{i}: a oneOf branch with object or array keywords and no "
                            '"type" (JSON Schema lets a value of any other type meet it, so a value of another '
                            'branch would meet two and fail oneOf); give it "type", or use anyOf')
            return self.union([self.compile(b, f"{where}/anyOf/{i}") for i, b in enumerate(branches)], where)
        kinds = _implied_type(schema)
        if kinds is None:
            return jg.ANY
        listed = kinds if isinstance(kinds, list) else [kinds]
        if not listed or not all(isinstance(k, str) for k in listed):
            raise SchemaError(f"json_schema at {where}: type must be a type name or a non-empty list of them")
        for other, words in _KEYWORDS.items():
            if other not in listed and set(schema) & words:
                raise SchemaError(f"json_schema at {where}: {sorted(set(schema) & words)} apply to type {other}, which "
                                  f"type {kinds!r} is not")
        if "number" in listed and "integer" in listed:  # every integer is a number: one branch, not a clash
            listed = [k for k in listed if k != "integer"]
        if len(listed) == 1:
            return self.typed(listed[0], schema, where)
        return self.union([self.typed(k, schema, where) for k in dict.fromkeys(listed)], where)

    def typed(self, kind, schema: dict, where: str) -> jg.Node:
        if kind not in TYPES:
            raise SchemaError(f"json_schema at {where}: type {kind!r} is not one of {', '.join(TYPES)}")
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        if kind == "boolean":
            node = self.node(jg.LITERALS_KIND)
            node.literals = (b"true", b"false")
            node.seal()
        elif kind == "null":
            node = self.node(jg.LITERALS_KIND)
            node.literals = (b"null",)
            node.seal()
        else:
            node = self.node({"string": jg.STRING_KIND, "number": jg.NUMBER_KIND, "integer": jg.INTEGER_KIND}[kind])
        node.starts = frozenset(_TYPE_STARTS[kind])
        return node

    def object(self, schema: dict, where: str) -> jg.Node:
        props = schema.get("properties")
        extra = schema.get("additionalProperties", None)
        if extra is not None and not isinstance(extra, bool):  # not `in (True, False)`: 0 and 1.0 equal those
            raise SchemaError(f"json_schema at {where}: additionalProperties must be false (or true without "
                              "properties); schemas for extra properties are not supported, got "
                              f"{json.dumps(extra)[:60]}")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"json_schema at {where}: required must be a list of property names")
        node = self.node(jg.OBJECT_KIND)
        node.starts = frozenset(b"{")
        if props is None:
            if required:
                raise SchemaError(f"json_schema at {where}: required names properties, but there are none")
            if extra is False:
                return node.seal()  # only {}
            node.free = True
            return node.seal()
        if not isinstance(props, dict):
            raise SchemaError(f"json_schema at {where}: properties must be an object of schemas")
        if extra is True:
            raise SchemaError(f"json_schema at {where}: additionalProperties true beside properties is not supported "
                              "(only the listed properties are written); set it false")
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"json_schema at {where}: required names {missing}, which properties lacks")
        try:
            names = [_literal(name) for name in props]
        except ValueError as exc:  # a lone surrogate
            raise SchemaError(f"json_schema at {where}: a property name JSON cannot write ({exc})") from None
        node.props = tuple((lit, self.compile(sub, f"{where}/properties/{name}"), name in required)
                           for lit, (name, sub) in zip(names, props.items(), strict=True))
        run = 0  # key_choices holds, per index, the keys up to the next required one: O(P^2) when all optional
        for name in reversed(list(props)):
            run = 1 if name in required else run + 1
            self.key_choices += run
        if self.key_choices > MAX_KEY_CHOICES:  # for the whole schema: 64 of them are cached
            raise SchemaError(f"json_schema at {where}: too many optional properties in a row (more than "
                              f"{MAX_KEY_CHOICES} key choices in the schema); mark some required")
        return node.seal()

    def array(self, schema: dict, where: str) -> jg.Node:
        node = self.node(jg.ARRAY_KIND)
        node.starts = frozenset(b"[")
        node.items = self.compile(schema.get("items", True), f"{where}/items")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        for name, value in (("minItems", low), ("maxItems", high)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_ITEMS_BOUND):
                raise SchemaError(f"json_schema at {where}: {name} must be an integer in [0, {MAX_ITEMS_BOUND}]")
        if high is not None and high < low:
            raise SchemaError(f"json_schema at {where}: maxItems {high} is below minItems {low}")
        node.min_items, node.max_items = low, high
        return node

    def union(self, branches: list[jg.Node], where: str) -> jg.Node:
        node = self.node(jg.UNION_KIND)
        for branch in branches:
            starts = self.starts(branch, where)
            clash = starts & set(node.dispatch)
            if clash:
                raise SchemaError(f"json_schema at {where}: two anyOf/oneOf branches (or types) can both start with "
                                  f"{bytes((min(clash),)).decode('latin-1')!r}; branches must start differently (a "
                                  "string, a number, an object, an array, true/false, null)")
            for b in starts:
                node.dispatch[b] = branch
        node.starts = frozenset(node.dispatch)
        return node

    def starts(self, node: jg.Node, where: str) -> frozenset[int]:
        if not node.starts:
            raise SchemaError(f"json_schema at {where}: a branch refers to itself before it is defined")
        return node.starts

    def untyped(self, schema, seen: set[int]) -> bool:
        """Whether a value of any type may meet `schema` by JSON Schema's rules where this engine reads it as one
        type: object or array keywords without "type" (_implied_type), here or in a branch or definition it is."""
        if not isinstance(schema, dict) or id(schema) in seen or "enum" in schema or "const" in schema:
            return False  # enum/const values are exact
        seen.add(id(schema))
        if "type" not in schema and set(schema) & (_KEYWORDS["object"] | _KEYWORDS["array"]):
            return True
        key = _definition_key(schema)
        if key is not None:  # else ref() refuses it
            return self.untyped(self._definition(*key), seen)
        branches = schema.get("anyOf", schema.get("oneOf"))
        return isinstance(branches, list) and any(self.untyped(b, seen) for b in branches)

    def peek_starts(self, schema, seen: frozenset = frozenset()) -> frozenset[int]:
        """_peek_starts, following a schema that is a $ref alone to its definition (an alias of a recursive
        definition is a union's branch before it is filled: "a branch refers to itself before it is defined")."""
        key = _definition_key(schema)
        if key is None or key in seen:
            return _peek_starts(schema)
        return self.peek_starts(self._definition(*key), seen | {key})

    def _definition(self, section: str, name: str):
        """The root's definition `name` in `section` ("$defs" or "definitions"), None where it has none."""
        defs = self.root.get(section)
        return defs.get(name) if isinstance(defs, dict) else None

    def ref(self, ref, where: str) -> jg.Node:
        pointer = _pointer(ref)
        if pointer is None:
            raise SchemaError(f"json_schema at {where}: $ref must point into #/$defs/ or #/definitions/, got {ref!r}")
        section, names = pointer
        if len(names) != 1:
            raise SchemaError(f"json_schema at {where}: $ref {ref!r} points inside a definition; point at a whole "
                              "definition (#/$defs/NAME, a \"/\" in NAME written ~1 and a \"~\" written ~0)")
        key = (section, names[0])
        if key in self.defs:
            return self.defs[key]  # recursive: the node is being filled in, or done
        target = self._definition(*key)
        if target is None:
            raise SchemaError(f"json_schema at {where}: $ref {ref!r} names no definition")
        # A placeholder that the definition's node is copied into, so that references inside it resolve to it; what
        # a value of it starts with is read off the definition now, for a union that refers back to it.
        placeholder = self.node(jg.ANY_KIND)
        placeholder.starts = self.peek_starts(target)
        self.defs[key] = placeholder
        self.pending.add(id(placeholder))
        compiled = self.compile(target, ref[1:])
        end = compiled
        while id(end) in self.alias_of:
            end = self.alias_of[id(end)]
        if end is placeholder:
            raise SchemaError(f"json_schema at {where}: $ref {ref!r} leads back to itself through $refs alone")
        if id(end) in self.pending:
            # The definition is a $ref alone to one still being compiled (A = B, B an array of A): it is filled when
            # that one is. Refusing it as a cycle refused a valid schema when B was reached before A.
            self.alias_of[id(placeholder)] = end
            self.aliases.setdefault(id(end), []).append(placeholder)
            return placeholder
        self._fill(placeholder, compiled)
        return placeholder

    def _fill(self, placeholder: jg.Node, compiled: jg.Node) -> None:
        """Copy a definition's compiled node into its placeholder, and into the placeholders of its aliases."""
        self.pending.discard(id(placeholder))
        for slot in jg.Node.__slots__:
            setattr(placeholder, slot, getattr(compiled, slot))
        for alias in self.aliases.pop(id(placeholder), ()):
            self._fill(alias, placeholder)


def _children(node: jg.Node) -> list[tuple[str, jg.Node]]:
    """A node's sub-schemas, each with its step in a JSON pointer (properties/NAME, items, anyOf/I)."""
    if node.kind == jg.OBJECT_KIND:
        return [(f"properties/{json.loads(key)}", sub) for key, sub, _ in node.props]
    if node.kind == jg.ARRAY_KIND and node.items is not None:
        return [("items", node.items)]
    if node.kind == jg.UNION_KIND:
        return [(f"anyOf/{i}", b) for i, b in enumerate({id(b): b for b in node.dispatch.values()}.values())]
    return []


def _reaches(node: jg.Node, ids: set[int]) -> bool:
    """Whether a node whose id is in `ids` is reachable from `node` (itself included)."""
    seen: set[int] = set()
    todo = [node]
    while todo:
        at = todo.pop()
        if id(at) in ids:
            return True
        if id(at) in seen:
            continue
        seen.add(id(at))
        todo += [sub for _, sub in _children(at)]
    return False


def _nesting(literal: bytes) -> int:
    """The containers an enum/const value opens, one inside another (0 for a scalar)."""
    deepest = depth = 0
    in_string = escaped = False
    for b in literal:
        if in_string:
            escaped, in_string = (False, True) if escaped else (b == 0x5C, b != 0x22)
        elif b == 0x22:
            in_string = True
        elif b in (0x7B, 0x5B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x7D, 0x5D):
            depth -= 1
    return deepest


def _accepts_value(node: jg.Node, literal: bytes) -> bool:
    """Whether `literal` (a compact JSON text) is a value of `node`."""
    state = jg.walk((jg.VALUE, (0, node), ("a",)), literal + b"]")
    return state is not None and jg.is_done(state)


def _pointer(ref) -> tuple[str, list[str]] | None:
    """A $ref into "#/$defs/" or "#/definitions/" as (section, the names after it), else None. It is a URI fragment
    holding a JSON pointer (RFC 6901): percent-escapes decoded, then split at "/", then "~1" is "/" and "~0" is "~"
    within a name ("#/$defs/a~1b" names the definition "a/b")."""
    if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
        return None
    section, *names = urllib.parse.unquote(ref[2:]).split("/")
    return section, [name.replace("~1", "/").replace("~0", "~") for name in names]


def _definition_key(schema) -> tuple[str, str] | None:
    """(section, name) of the whole definition a schema's $ref names; None for a schema without one, or a $ref
    that ref() refuses (outside the definitions, or inside one)."""
    pointer = _pointer(schema.get("$ref")) if isinstance(schema, dict) else None
    return (pointer[0], pointer[1][0]) if pointer is not None and len(pointer[1]) == 1 else None


def _implied_type(schema: dict):
    """A schema's "type", or the one its object or array keywords give it (stricter than JSON Schema, which lets
    other types through); None for any value."""
    kind = schema.get("type")
    if kind is None:
        kind = "object" if set(schema) & _KEYWORDS["object"] else "array" if set(schema) & _KEYWORDS["array"] else None
    return kind


def _peek_starts(schema) -> frozenset[int]:
    """The first bytes of a schema's values when its one type says them (else none: compile() finds them)."""
    kind = _implied_type(schema) if isinstance(schema, dict) else None
    return frozenset(_TYPE_STARTS.get(kind, b"")) if isinstance(kind, str) else frozenset()


def compile_schema(text: str) -> jg.Node:
    """The top-level node of a schema given as JSON text; SchemaError (a ValueError) naming what it cannot follow."""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"json_schema is {len(text.encode())} bytes, over the {MAX_SCHEMA_BYTES} this engine takes")
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SchemaError("json_schema must be a JSON object (a schema)")
    try:
        root = _Compiler(schema).compile(schema, "#")
    except RecursionError:  # never out of add_request: the engine loop would fail every request
        raise SchemaError("json_schema nests too deeply") from None
    if root.kind != jg.OBJECT_KIND:
        raise SchemaError('json_schema must describe an object at the top level ("type": "object")')
    endless = _depths(root)
    if endless is not None:
        raise SchemaError(f"json_schema at {endless}: no finite value meets it (a required property or minItems leads "
                          "back to it through $ref without end, so the document could never close); make that "
                          "property optional, minItems 0, or add an anyOf branch that ends")
    if root.need > jg.MAX_DEPTH:  # a deeper optional part is simply never offered (json_grammar.py)
        raise SchemaError(f"json_schema: its smallest document nests more than {jg.MAX_DEPTH} containers (its "
                          f"required properties and minItems, through $ref), over the {jg.MAX_DEPTH} this engine "
                          "writes; make some of them optional")
    return root


def _depths(root: jg.Node) -> str | None:
    """Set each node's `need` (the fewest containers its smallest value opens) and `horizon`, and return the place
    of a node reachable from root that no finite JSON value meets (a required property, or minItems over items,
    that refers back to it through $ref), or None where there is none. A node whose smallest value nests deeper
    than MAX_DEPTH (its need) is never offered where it does not fit; only the root's must."""
    where: dict[int, str] = {}
    nodes: list[jg.Node] = []
    todo = [(root, "#")]
    while todo:
        node, path = todo.pop()
        if id(node) in where:
            continue
        where[id(node)] = path
        nodes.append(node)
        todo += [(sub, f"{path}/{step}") for step, sub in _children(node)]
    need = _needs(nodes)
    for node in nodes:
        if node is not jg.ANY:  # shared by every schema: its need (0) and horizon (1) stay
            node.need = need.get(id(node), jg.MAX_DEPTH + 1)
    horizon = max([1, *(n for n in need.values() if n <= jg.MAX_DEPTH)])
    for node in nodes:
        if node is not jg.ANY:
            node.horizon = horizon
            node.seal_needs()
    return next((where[id(node)] for node in nodes if id(node) not in need), None)


def _needs(nodes: list[jg.Node]) -> dict[int, int]:
    """The fewest containers a finite value of each node opens (its own included), by id; a node no finite value
    meets is left out. Knuth's generalization of Dijkstra's algorithm: an object is 1 + the most its required
    properties need, an array 1 + its items' need under minItems, a union its smallest branch's; each is final once
    all it depends on is, smallest first. Linear but for the heap, whatever the $ref cycles."""
    parts: dict[int, list[jg.Node]] = {}  # what a node's need is computed from (a union: any one branch)
    waiting: dict[int, int] = {}  # how many of those are not yet final (a union: 1)
    users: dict[int, list[jg.Node]] = {}
    heap: list[tuple[int, int, jg.Node]] = []
    for node in nodes:
        if node.kind == jg.OBJECT_KIND:
            deps = [] if node.free else [sub for _, sub, required in node.props if required]
        elif node.kind == jg.ARRAY_KIND:
            deps = [node.items] if node.min_items and node.items is not None else []
        elif node.kind == jg.UNION_KIND:
            deps = list({id(b): b for b in node.dispatch.values()}.values())
        else:
            deps = []
        parts[id(node)] = deps
        waiting[id(node)] = 1 if node.kind == jg.UNION_KIND and deps else len(deps)
        for dep in deps:
            users.setdefault(id(dep), []).append(node)
        if not deps:
            heapq.heappush(heap, (_own(node), id(node), node))
    final: dict[int, int] = {}
    while heap:
        value, key, node = heapq.heappop(heap)
        if key in final:
            continue
        final[key] = value
        for user in users.get(key, ()):
            if id(user) in final:
                continue
            if user.kind == jg.UNION_KIND:  # its first branch to be final is its smallest
                heapq.heappush(heap, (value, id(user), user))
                continue
            waiting[id(user)] -= 1
            if not waiting[id(user)]:
                heapq.heappush(heap, (1 + max(final[id(dep)] for dep in parts[id(user)]), id(user), user))
    return final


def _own(node: jg.Node) -> int:
    """The need of a node that depends on no other: a container's own level; for enum/const values, the deepest
    one's containers (the automaton offers them together); else none."""
    if node.kind == jg.LITERALS_KIND:
        return max(map(_nesting, node.literals))
    return 1 if node.kind in (jg.OBJECT_KIND, jg.ARRAY_KIND) else 0


class SchemaCache:
    """Compiled schemas by their text (an LRU): requests with the same schema share nodes, so their states share
    cached masks. on_add / on_evict: called with a root as it enters and leaves the cache (the engine holds its
    masks meanwhile: JsonMasks.hold)."""

    def __init__(self, size: int = COMPILED_CACHE_SIZE, on_add: Callable[[jg.Node], None] | None = None,
                 on_evict: Callable[[jg.Node], None] | None = None):
        self.size = size
        self._nodes: OrderedDict[str, jg.Node] = OrderedDict()
        self._on_add, self._on_evict = on_add, on_evict

    def get(self, text: str) -> jg.Node:
        node = self._nodes.get(text)
        if node is None:
            node = compile_schema(text)
            self._nodes[text] = node
            if self._on_add is not None:
                self._on_add(node)
            while len(self._nodes) > self.size:
                _, old = self._nodes.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict(old)
        else:
            self._nodes.move_to_end(text)
        return node
