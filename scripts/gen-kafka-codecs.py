#!/usr/bin/env python3
"""Generates net/src/kafka/messages.rs from Kafka's published message schemas.

    scripts/gen-kafka-codecs.py [SCHEMA_DIR] [OUT_FILE]

SCHEMA_DIR defaults to ../shared/kafka-messages beside the repository; OUT_FILE to
net/src/kafka/messages.rs. The output is committed, so building never needs the schemas; a test
(net/tests/kafka_codegen.rs) regenerates it when the schemas are present and fails on a diff.

For each message the generator emits one module with a struct per (sub)structure, a `Default`
honouring the schema's defaults, and `decode`/`encode` methods that follow Kafka's version
rules: fields present per version, nullable versions, flexible versions (compact lengths and a
tagged-field section on every struct), tagged fields, and per-field flexibleVersions overrides.
The primitives they call live in net/src/kafka/wire.rs, which bounds every array count and
length by the bytes left in the frame before anything is allocated.
"""

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The APIs the broker implements, and so the messages it needs.
APIS = [
    "Produce", "Fetch", "ListOffsets", "Metadata", "OffsetCommit", "OffsetFetch", "FindCoordinator",
    "JoinGroup", "Heartbeat", "LeaveGroup", "SyncGroup", "DescribeGroups", "ListGroups",
    "ApiVersions", "CreateTopics", "DeleteTopics", "InitProducerId", "OffsetForLeaderEpoch",
    "DescribeConfigs", "CreatePartitions",
]
HEADERS = ["RequestHeader", "ResponseHeader"]

RUST_KEYWORDS = {"type", "match", "ref", "mod", "fn", "struct", "enum", "use", "loop", "move", "self"}
INT_TYPES = {"int8": "i8", "int16": "i16", "uint16": "u16", "int32": "i32", "uint32": "u32",
             "int64": "i64", "float64": "f64"}
MAX_VERSION = 0x7fff


def load(path):
    text = "\n".join(l for l in path.read_text().splitlines() if not l.strip().startswith("//"))
    return json.loads(text)


def versions(spec):
    """'0+', '3-7', '5' or 'none' -> (low, high) or None."""
    if spec is None or spec == "none":
        return None
    if spec.endswith("+"):
        return (int(spec[:-1]), MAX_VERSION)
    if "-" in spec:
        low, high = spec.split("-")
        return (int(low), int(high))
    return (int(spec), int(spec))


def intersect(a, b):
    if a is None or b is None:
        return None
    low, high = max(a[0], b[0]), min(a[1], b[1])
    return (low, high) if low <= high else None


# The valid versions of the message being generated: bounds equal to them need no check.
VALID = (0, MAX_VERSION)


def cond(rng, var="version"):
    """A Rust boolean expression for `var in rng`."""
    if rng is None:
        return "false"
    low, high = rng
    parts = []
    if low > VALID[0]:
        parts.append(f"{var} >= {low}")
    if high < VALID[1]:
        parts.append(f"{var} <= {high}")
    return " && ".join(parts) if parts else "true"


def snake(name):
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()
    return f"r#{s}" if s in RUST_KEYWORDS else s


class Field:
    def __init__(self, spec, valid):
        self.name = spec["name"]
        self.rust = snake(self.name)
        self.type = spec["type"]
        self.versions = intersect(versions(spec["versions"]), valid)
        self.nullable = intersect(versions(spec.get("nullableVersions")), valid)
        self.tagged = intersect(versions(spec.get("taggedVersions")), valid)
        self.tag = spec.get("tag")
        self.default = spec.get("default")
        if self.default is not None and not isinstance(self.default, str):
            self.default = str(self.default).lower()
        self.flexible_override = spec.get("flexibleVersions")
        self.fields = spec.get("fields")
        self.is_array = self.type.startswith("[]")
        self.elem = self.type[2:] if self.is_array else self.type

    def is_struct(self):
        return self.elem not in INT_TYPES and self.elem not in ("bool", "string", "bytes", "records", "uuid")


class Struct:
    def __init__(self, name, fields, valid):
        self.name = name
        self.fields = [Field(f, valid) for f in fields]


class Message:
    def __init__(self, spec):
        self.name = spec["name"]
        self.kind = spec["type"]
        self.api_key = spec.get("apiKey")
        self.valid = versions(spec["validVersions"])
        self.flexible = intersect(versions(spec["flexibleVersions"]), self.valid)
        self.structs = []
        common = {c["name"]: c for c in spec.get("commonStructs", [])}
        self.collect(self.name, spec["fields"], common)
        for c in common.values():
            if not any(s.name == c["name"] for s in self.structs):
                self.collect(c["name"], c["fields"], common)

    def collect(self, name, fields, common):
        struct = Struct(name, fields, self.valid)
        self.structs.append(struct)
        for field in struct.fields:
            if not field.is_struct():
                continue
            if any(s.name == field.elem for s in self.structs):
                continue
            if field.fields is not None:
                self.collect(field.elem, field.fields, common)
            elif field.elem in common:
                self.collect(field.elem, common[field.elem]["fields"], common)
            else:
                raise SystemExit(f"{self.name}: unknown type {field.type}")


def base_type(field):
    if field.is_struct():
        return field.elem
    return {"bool": "bool", "string": "String", "bytes": "Bytes", "records": "Records",
            "uuid": "Uuid"}.get(field.elem) or INT_TYPES[field.elem]


def rust_type(field):
    t = base_type(field)
    if field.is_array:
        t = f"Vec<{t}>"
    if field.nullable is not None or field.elem == "records":
        t = f"Option<{t}>"
    return t


def default_expr(field):
    d = field.default
    nullable = field.nullable is not None or field.elem == "records"
    if field.elem == "records":
        return "None"
    if d == "null":
        return "None"
    if field.is_array:
        inner = "Vec::new()"
    elif field.is_struct():
        inner = f"{field.elem}::default()"
    elif field.elem == "bool":
        inner = "true" if d == "true" else "false"
    elif field.elem == "string":
        inner = f"String::from({json.dumps(d)})" if d else "String::new()"
    elif field.elem == "bytes":
        inner = "Bytes::new()"
    elif field.elem == "uuid":
        inner = "Uuid::ZERO"
    elif field.elem == "float64":
        inner = f"{float(d or 0)!r}"
    else:
        inner = d.strip() if d and d.strip() else "0"
    return f"Some({inner})" if nullable else inner


def flex_expr(field):
    """Whether the field uses compact encodings in the current version."""
    if field.flexible_override == "none":
        return "false"
    return "flexible"


def decode_one(field, flex):
    """Expression decoding one non-array value of the field's element type."""
    e = field.elem
    if field.is_struct():
        return f"{e}::decode(r, version)?"
    if e in INT_TYPES:
        return f"r.{INT_TYPES[e]}()?"
    return {"bool": "r.bool()?", "uuid": "r.uuid()?", "string": f"r.string({flex})?",
            "bytes": f"r.bytes({flex})?"}[e]


def decode_expr(field):
    flex = flex_expr(field)
    nullable_now = cond(field.nullable)
    if field.elem == "records":
        return f"r.records({flex})?"
    if field.is_array:
        elem = decode_one(field, flex)
        read = f"r.array({flex}, |r| Ok({elem}))?"
        if field.nullable is None:
            return f"{read}.ok_or(DecodeError::UnexpectedNull(\"{field.name}\"))?"
        return f"if {nullable_now} {{ {read} }} else {{ Some({read}.ok_or(DecodeError::UnexpectedNull(\"{field.name}\"))?) }}"
    if field.elem in ("string", "bytes"):
        method = "nullable_string" if field.elem == "string" else "nullable_bytes"
        if field.nullable is None:
            return decode_one(field, flex)
        return f"if {nullable_now} {{ r.{method}({flex})? }} else {{ Some({decode_one(field, flex)}) }}"
    return decode_one(field, flex)


def encode_one(field, value, flex, is_ref):
    """Statement encoding one non-array value; `value` is a reference when `is_ref`, else a place."""
    e = field.elem
    if field.is_struct():
        return f"{value}.encode(w, version)?"
    if e in INT_TYPES or e == "bool":
        method = "bool" if e == "bool" else INT_TYPES[e]
        return f"w.{method}({'*' if is_ref else ''}{value})"
    ref = value if is_ref else f"&{value}"
    return {"uuid": f"w.uuid({ref})", "string": f"w.string({flex}, {ref})", "bytes": f"w.bytes({flex}, {ref})"}[e]


def encode_stmt(field, this="self"):
    flex = flex_expr(field)
    value = f"{this}.{field.rust}"
    nullable = field.nullable is not None
    if field.elem == "records":
        return f"w.records({flex}, {value}.as_ref());"
    null_check = (f"if {value}.is_none() && !({cond(field.nullable)}) "
                  f"{{ return Err(EncodeError::NotNullable(\"{field.name}\")); }} ")
    if field.is_array:
        body = encode_one(field, "e", flex, True)
        write = lambda v: f"w.array({flex}, {v}, |w, e| {{ {body}; Ok(()) }})?;"
        if not nullable:
            return write(f"Some(&{value})")
        return null_check + write(f"{value}.as_ref()")
    if field.elem in ("string", "bytes") and nullable:
        method = "nullable_string" if field.elem == "string" else "nullable_bytes"
        return null_check + f"w.{method}({flex}, {value}.as_deref());"
    return encode_one(field, value, flex, False) + ";"


def gen_struct(message, struct, out):
    global VALID
    top = struct.name == message.name
    out.append("#[derive(Debug, Clone, PartialEq)]")
    out.append(f"pub struct {struct.name} {{")
    for f in struct.fields:
        if f.versions is None:
            continue
        out.append(f"    /// {f.name}, versions {f.versions[0]}-{'' if f.versions[1] == MAX_VERSION else f.versions[1]}"
                   + (f" (tagged {f.tag})" if f.tagged else ""))
        out.append(f"    pub {f.rust}: {rust_type(f)},")
    out.append("}")
    out.append("")
    out.append(f"impl Default for {struct.name} {{")
    out.append("    fn default() -> Self {")
    out.append("        Self {")
    for f in struct.fields:
        if f.versions is not None:
            out.append(f"            {f.rust}: {default_expr(f)},")
    out.append("        }")
    out.append("    }")
    out.append("}")
    out.append("")
    live = [f for f in struct.fields if f.versions is not None]
    regular = live
    tagged = [f for f in live if f.tagged is not None]
    out.append(f"impl {struct.name} {{")
    VALID = (0, MAX_VERSION)
    if top:
        lo, hi = message.valid
        out.append(f"    pub const VERSIONS: (i16, i16) = ({lo}, {hi});")
        if message.api_key is not None:
            out.append(f"    pub const API_KEY: i16 = {message.api_key};")
        out.append("")
        out.append("    /// Whether `version` uses the flexible (compact, tagged) encoding.")
        out.append("    pub fn is_flexible(version: i16) -> bool {")
        out.append(f"        {cond(message.flexible)}")
        out.append("    }")
        out.append("")
    vis = "pub" if top else "pub(crate)"
    out.append(f"    {vis} fn decode(r: &mut Reader, version: i16) -> Result<Self, DecodeError> {{")
    if top:
        out.append(f"        if !({message.valid[0]}..={message.valid[1]}).contains(&version) {{")
        out.append(f"            return Err(DecodeError::UnsupportedVersion(\"{message.name}\", version));")
        out.append("        }")
    VALID = message.valid
    out.append(f"        let flexible = {cond(message.flexible)};")
    out.append("        let _ = flexible;")
    out.append("        #[allow(unused_mut)]")
    out.append("        let mut this = Self::default();")
    for f in regular:
        guard = cond(f.versions)
        if f.tagged is not None:
            guard = f"{guard} && !({cond(f.tagged)})"
        stmt = f"this.{f.rust} = {decode_expr(f)};"
        out.append(f"        if {guard} {{ {stmt} }}" if guard != "true" else f"        {stmt}")
    out.append("        if flexible {")
    if tagged:
        out.append("            r.tagged_fields(|tag, r| {")
        out.append("                match tag {")
        for f in tagged:
            out.append(f"                    {f.tag} if {cond(intersect(f.tagged, f.versions))} => this.{f.rust} = {decode_expr(f)},")
        out.append("                    _ => {}")
        out.append("                }")
        out.append("                Ok(())")
        out.append("            })?;")
    else:
        out.append("            r.tagged_fields(|_, _| Ok(()))?;")
    out.append("        }")
    out.append("        Ok(this)")
    out.append("    }")
    out.append("")
    VALID = (0, MAX_VERSION)
    out.append(f"    {vis} fn encode(&self, w: &mut Writer, version: i16) -> Result<(), EncodeError> {{")
    if top:
        out.append(f"        if !({message.valid[0]}..={message.valid[1]}).contains(&version) {{")
        out.append(f"            return Err(EncodeError::UnsupportedVersion(\"{message.name}\", version));")
        out.append("        }")
    VALID = message.valid
    out.append(f"        let flexible = {cond(message.flexible)};")
    out.append("        let _ = flexible;")
    for f in regular:
        guard = cond(f.versions)
        if f.tagged is not None:
            guard = f"{guard} && !({cond(f.tagged)})"
        stmt = encode_stmt(f)
        out.append(f"        if {guard} {{ {stmt} }}" if guard != "true" else f"        {stmt}")
    out.append("        if flexible {")
    if tagged:
        out.append("            let mut tagged: Vec<(u32, Writer)> = Vec::new();")
        for f in sorted(tagged, key=lambda f: f.tag):
            out.append(f"            if {cond(intersect(f.tagged, f.versions))} && self.{f.rust} != {default_expr(f)} {{")
            out.append("                let mut field = Writer::new();")
            out.append("                {")
            out.append("                    let w = &mut field;")
            out.append(f"                    {encode_stmt(f)}")
            out.append("                }")
            out.append(f"                tagged.push(({f.tag}, field));")
            out.append("            }")
        out.append("            w.tagged_fields(tagged);")
    else:
        out.append("            w.tagged_fields(Vec::new());")
    out.append("        }")
    out.append("        Ok(())")
    out.append("    }")
    out.append("}")
    out.append("")


def module_name(name):
    return snake(name)


def main():
    schema_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "kafka-messages"
    out_file = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "net" / "src" / "kafka" / "messages.rs"
    names = HEADERS + [f"{api}{kind}" for api in APIS for kind in ("Request", "Response")]
    messages = [Message(load(schema_dir / f"{name}.json")) for name in names]
    out = [
        "// @generated by scripts/gen-kafka-codecs.py from Kafka's message schemas. Do not edit.",
        "",
        "//! Kafka's request and response messages, one module each.",
        "",
    ]
    for m in messages:
        out.append(f"pub mod {module_name(m.name)} {{")
        out.append("    #![allow(clippy::all, unused_variables, unused_mut)]")
        out.append("    use crate::kafka::wire::*;")
        out.append("    #[allow(unused_imports)]")
        out.append("    use bytes::Bytes;")
        out.append("")
        body = []
        for s in m.structs:
            gen_struct(m, s, body)
        out.extend(("    " + l) if l else "" for l in body)
        out.append("}")
        out.append("")
    # Dispatch over the API keys, for the listener and the fuzz target.
    requests = [m for m in messages if m.kind == "request"]
    responses = {m.name[: -len("Response")]: m for m in messages if m.kind == "response"}
    apis = [(m.name[: -len("Request")], m, responses[m.name[: -len("Request")]]) for m in requests]
    out.append("/// The versions of each API key's schema: (key, name, lowest, highest, lowest flexible).")
    out.append("pub const SCHEMA_VERSIONS: &[(i16, &str, i16, i16, Option<i16>)] = &[")
    for api, m, _ in apis:
        flex = f"Some({m.flexible[0]})" if m.flexible else "None"
        out.append(f"    ({m.api_key}, \"{api}\", {m.valid[0]}, {m.valid[1]}, {flex}),")
    out.append("];")
    out.append("")
    for enum, pick in (("RequestBody", lambda request, response: request),
                       ("ResponseBody", lambda request, response: response)):
        kind = "request" if enum == "RequestBody" else "response"
        out.append(f"/// One {kind} body of any implemented API.")
        out.append("#[derive(Debug, Clone, PartialEq)]")
        out.append(f"pub enum {enum} {{")
        for api, request, response in apis:
            message = pick(request, response)
            out.append(f"    {api}({module_name(message.name)}::{message.name}),")
        out.append("}")
        out.append("")
        out.append(f"impl {enum} {{")
        out.append("    pub fn decode(api_key: i16, version: i16, r: &mut crate::kafka::wire::Reader) -> Result<Self, crate::kafka::wire::DecodeError> {")
        out.append("        Ok(match api_key {")
        for api, request, response in apis:
            message = pick(request, response)
            out.append(f"            {request.api_key} => Self::{api}({module_name(message.name)}::{message.name}::decode(r, version)?),")
        out.append("            _ => return Err(crate::kafka::wire::DecodeError::UnknownApiKey(api_key)),")
        out.append("        })")
        out.append("    }")
        out.append("")
        out.append("    pub fn encode(&self, w: &mut crate::kafka::wire::Writer, version: i16) -> Result<(), crate::kafka::wire::EncodeError> {")
        out.append("        match self {")
        for api, _, _ in apis:
            out.append(f"            Self::{api}(body) => body.encode(w, version),")
        out.append("        }")
        out.append("    }")
        out.append("")
        out.append("    pub fn api_key(&self) -> i16 {")
        out.append("        match self {")
        for api, request, _ in apis:
            out.append(f"            Self::{api}(_) => {request.api_key},")
        out.append("        }")
        out.append("    }")
        out.append("}")
        out.append("")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
