//! OpenAPI 3.0 and 3.1 documents compiled into request validators: every operation's
//! path, query, header and cookie parameters and its JSON body, each checked by a
//! JSON Schema validator (`jsonschema`) compiled once at load. `$ref`s inside the
//! document resolve; a document that does not load or compile is a `check` error.

use std::collections::HashMap;
use std::path::Path;

use http::Method;
use jsonschema::{Draft, Validator};
use serde_json::Value;

/// Characters a JSON pointer may hold that a URI fragment may not (`{id}`).
const FRAGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A compiled document.
pub struct OpenApi {
    router: matchit::Router<usize>,
    paths: Vec<PathItem>,
}

struct PathItem {
    ops: Vec<(Method, Operation)>,
}

pub struct Operation {
    pub params: Vec<Param>,
    pub body: Option<BodySpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Path,
    Query,
    Header,
    Cookie,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Path => "path",
            Location::Query => "query",
            Location::Header => "header",
            Location::Cookie => "cookie",
        }
    }
}

pub struct Param {
    pub name: String,
    pub location: Location,
    pub required: bool,
    /// How text values become JSON before validation.
    pub kind: Kind,
    /// Query arrays as `a=1&a=2` (`explode`, the default) or `a=1,2`.
    pub explode: bool,
    pub validator: Option<Validator>,
}

/// The JSON type a parameter's text is read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    Number,
    Boolean,
    Array(Box<Kind>),
}

pub struct BodySpec {
    pub required: bool,
    /// The JSON schema of `application/json` (or `*+json`) bodies.
    pub json: Option<Validator>,
    /// Media types the operation documents (lower-case, without parameters).
    pub media: Vec<String>,
}

/// What the request path found in the document.
pub enum Found<'a> {
    Operation(&'a Operation, Vec<(String, String)>),
    /// The path exists, not with this method.
    MethodMissing,
    PathMissing,
}

impl OpenApi {
    pub fn find(&self, method: &Method, path: &str) -> Found<'_> {
        let Ok(m) = self.router.at(path) else {
            return Found::PathMissing;
        };
        let item = &self.paths[*m.value];
        // HEAD is checked as GET when the document has no HEAD.
        let op = item.ops.iter().find(|(m, _)| m == method).or_else(|| {
            (method == Method::HEAD)
                .then(|| item.ops.iter().find(|(m, _)| m == Method::GET))
                .flatten()
        });
        match op {
            Some((_, op)) => {
                let params = m
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                Found::Operation(op, params)
            }
            None => Found::MethodMissing,
        }
    }
}

/// Reads and compiles the document at `path`.
pub fn load(path: &Path) -> Result<OpenApi, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let doc: Value = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{} is not YAML or JSON: {e}", path.display()))?;
    compile(doc)
}

pub fn compile(mut doc: Value) -> Result<OpenApi, String> {
    let version = doc
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let draft = if version.starts_with("3.0") {
        nullable_to_types(&mut doc);
        Draft::Draft4
    } else if version.starts_with("3.1") {
        Draft::Draft202012
    } else {
        return Err(format!(
            "`openapi: {version}`: only OpenAPI 3.0 and 3.1 documents are supported"
        ));
    };
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or("the document has no `paths`")?
        .clone();
    let mut router = matchit::Router::new();
    let mut items = Vec::new();
    let compiler = Compiler { doc: &doc, draft };
    for (template, item) in &paths {
        let item = compiler.deref(item)?;
        let pointer = format!("/paths/{}", escape(template));
        let shared = item
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut ops = Vec::new();
        for (name, method) in [
            ("get", Method::GET),
            ("put", Method::PUT),
            ("post", Method::POST),
            ("delete", Method::DELETE),
            ("options", Method::OPTIONS),
            ("head", Method::HEAD),
            ("patch", Method::PATCH),
            ("trace", Method::TRACE),
        ] {
            let Some(op) = item.get(name) else { continue };
            let at = format!("{pointer}/{name}");
            let compiled = compiler
                .operation(op, &shared, &at, &format!("{pointer}/parameters"))
                .map_err(|e| format!("{} {template}: {e}", name.to_uppercase()))?;
            ops.push((method, compiled));
        }
        router
            .insert(template.as_str(), items.len())
            .map_err(|e| format!("path {template:?}: {e}"))?;
        items.push(PathItem { ops });
    }
    Ok(OpenApi {
        router,
        paths: items,
    })
}

struct Compiler<'a> {
    doc: &'a Value,
    draft: Draft,
}

impl Compiler<'_> {
    /// Follows a `$ref` to an object in the document (parameters, request bodies).
    fn deref<'v>(&'v self, v: &'v Value) -> Result<&'v Value, String> {
        let mut v = v;
        for _ in 0..16 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let pointer = r.strip_prefix('#').ok_or_else(|| {
                        format!("{r:?}: only references inside the document are supported")
                    })?;
                    v = self
                        .doc
                        .pointer(pointer)
                        .ok_or_else(|| format!("{r:?} does not resolve"))?;
                }
                None => return Ok(v),
            }
        }
        Err("`$ref` chain too long".into())
    }

    /// The pointer a schema is found at (following a `$ref` object to its target).
    fn validator(&self, pointer: &str) -> Result<Validator, String> {
        let mut root = self.doc.clone();
        if let Value::Object(m) = &mut root {
            let fragment = percent_encoding::utf8_percent_encode(pointer, FRAGMENT);
            m.insert("$ref".into(), Value::String(format!("#{fragment}")));
        }
        // `pattern`s run on client input: the linear-time `regex` engine (no
        // look-around or back-references; a document that uses them is refused).
        jsonschema::options()
            .with_draft(self.draft)
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(&root)
            .map_err(|e| format!("schema at {pointer}: {e}"))
    }

    fn operation(
        &self,
        op: &Value,
        shared: &[Value],
        at: &str,
        shared_at: &str,
    ) -> Result<Operation, String> {
        // Operation parameters override path-level ones of the same name and place.
        let mut by_key: Vec<((String, String), String, Value)> = Vec::new();
        for (i, p) in shared.iter().enumerate() {
            let (key, resolved) = self.param_key(p)?;
            by_key.push((key, format!("{shared_at}/{i}"), resolved));
        }
        let own = op
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, p) in own.iter().enumerate() {
            let (key, resolved) = self.param_key(p)?;
            let pointer = format!("{at}/parameters/{i}");
            match by_key.iter_mut().find(|(k, _, _)| *k == key) {
                Some(slot) => *slot = (key, pointer, resolved),
                None => by_key.push((key, pointer, resolved)),
            }
        }
        let mut params = Vec::new();
        for ((name, place), pointer, p) in by_key {
            let location = match place.as_str() {
                "path" => Location::Path,
                "query" => Location::Query,
                "header" => Location::Header,
                "cookie" => Location::Cookie,
                other => return Err(format!("parameter {name:?}: unknown `in: {other}`")),
            };
            let schema = p.get("schema");
            // A `$ref`'d parameter's schema lives at its target.
            let schema_pointer = match self.ref_target(&self.doc_value(&pointer)) {
                Some(target) => format!("{target}/schema"),
                None => format!("{pointer}/schema"),
            };
            let validator = match schema {
                Some(_) => Some(self.validator(&schema_pointer)?),
                None => None,
            };
            params.push(Param {
                kind: schema.map_or(Kind::String, |s| self.kind(s)),
                explode: p.get("explode").and_then(Value::as_bool).unwrap_or(true),
                required: location == Location::Path
                    || p.get("required").and_then(Value::as_bool).unwrap_or(false),
                name,
                location,
                validator,
            });
        }
        let body = match op.get("requestBody") {
            None => None,
            Some(b) => {
                let target = self.ref_target(b);
                let base = target.unwrap_or_else(|| format!("{at}/requestBody"));
                let b = self.deref(b)?;
                let content = b.get("content").and_then(Value::as_object);
                let mut media = Vec::new();
                let mut json = None;
                for (mt, spec) in content.into_iter().flatten() {
                    let lower = mt.to_ascii_lowercase();
                    if is_json(&lower) && json.is_none() && spec.get("schema").is_some() {
                        json =
                            Some(self.validator(&format!("{base}/content/{}/schema", escape(mt)))?);
                    }
                    media.push(lower);
                }
                Some(BodySpec {
                    required: b.get("required").and_then(Value::as_bool).unwrap_or(false),
                    json,
                    media,
                })
            }
        };
        Ok(Operation { params, body })
    }

    fn doc_value(&self, pointer: &str) -> Value {
        self.doc.pointer(pointer).cloned().unwrap_or(Value::Null)
    }

    /// Where a `$ref` object points (its JSON pointer), if it is one.
    fn ref_target(&self, v: &Value) -> Option<String> {
        let mut target = None;
        let mut v = v.clone();
        for _ in 0..16 {
            let Some(r) = v.get("$ref").and_then(Value::as_str).map(str::to_owned) else {
                break;
            };
            let pointer = r.strip_prefix('#')?.to_owned();
            v = self.doc.pointer(&pointer)?.clone();
            target = Some(pointer);
        }
        target
    }

    fn param_key(&self, p: &Value) -> Result<((String, String), Value), String> {
        let p = self.deref(p)?;
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a parameter without `name`")?;
        let place = p
            .get("in")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("parameter {name:?} without `in`"))?;
        // Header names compare case-insensitively.
        let name = if place == "header" {
            name.to_ascii_lowercase()
        } else {
            name.to_owned()
        };
        Ok(((name, place.to_owned()), p.clone()))
    }

    /// The JSON type a parameter schema asks for (following `$ref`s).
    fn kind(&self, schema: &Value) -> Kind {
        let schema = self.deref(schema).unwrap_or(schema);
        let ty = match schema.get("type") {
            Some(Value::String(t)) => t.as_str(),
            // 3.1 `type: [integer, "null"]`: the first non-null one.
            Some(Value::Array(ts)) => ts
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("string"),
            _ => "string",
        };
        match ty {
            "integer" => Kind::Integer,
            "number" => Kind::Number,
            "boolean" => Kind::Boolean,
            "array" => Kind::Array(Box::new(
                schema.get("items").map_or(Kind::String, |i| self.kind(i)),
            )),
            _ => Kind::String,
        }
    }
}

pub fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// JSON-pointer escaping of one token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// OpenAPI 3.0's `nullable: true` as JSON Schema: `type: [T, "null"]`.
fn nullable_to_types(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = m.get("type").cloned() {
                    m.insert("type".into(), Value::Array(vec![t.into(), "null".into()]));
                }
                if let Some(Value::Array(e)) = m.get_mut("enum") {
                    if !e.contains(&Value::Null) {
                        e.push(Value::Null);
                    }
                }
            }
            for (_, child) in m.iter_mut() {
                nullable_to_types(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(nullable_to_types),
        _ => {}
    }
}

/// A parameter's text as the JSON value its schema checks; text that does not
/// read as its kind stays a string (the schema then reports the type).
pub fn typed(kind: &Kind, values: &[String], explode: bool) -> Value {
    match kind {
        Kind::Array(item) => {
            let items: Vec<&str> = if explode {
                values.iter().map(String::as_str).collect()
            } else {
                values.iter().flat_map(|v| v.split(',')).collect()
            };
            Value::Array(
                items
                    .into_iter()
                    .map(|v| typed(item, &[v.to_owned()], true))
                    .collect(),
            )
        }
        _ => {
            let v = values.first().map(String::as_str).unwrap_or("");
            match kind {
                Kind::Integer => v
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::String(v.to_owned())),
                Kind::Number => v
                    .parse::<f64>()
                    .ok()
                    .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                    .unwrap_or_else(|| Value::String(v.to_owned())),
                Kind::Boolean => match v {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::String(v.to_owned()),
                },
                _ => Value::String(v.to_owned()),
            }
        }
    }
}

/// Cookies of a request, by name.
pub fn cookies(headers: &http::HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for v in headers.get_all(http::header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for pair in s.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                out.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "openapi": "3.0.3",
            "paths": {
                "/v1/items/{id}": {
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                    "get": {"parameters": [{"$ref": "#/components/parameters/Limit"}]},
                    "post": {"requestBody": {"$ref": "#/components/requestBodies/Item"}}
                }
            },
            "components": {
                "parameters": {"Limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 10}}},
                "requestBodies": {"Item": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}}}},
                "schemas": {"Item": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "nullable": true}}}}
            }
        })
    }

    #[test]
    fn operations_compile_with_refs_and_nullable() {
        let api = compile(doc()).unwrap();
        let Found::Operation(op, params) = api.find(&Method::POST, "/v1/items/7") else {
            panic!("no operation");
        };
        assert_eq!(params, vec![("id".to_owned(), "7".to_owned())]);
        let body = op.body.as_ref().unwrap();
        assert!(body.required);
        let v = body.json.as_ref().unwrap();
        assert!(v.is_valid(&serde_json::json!({"name": null})));
        assert!(!v.is_valid(&serde_json::json!({"name": 3})));
        assert!(!v.is_valid(&serde_json::json!({})));
        let Found::Operation(get, _) = api.find(&Method::GET, "/v1/items/7") else {
            panic!("no GET");
        };
        let limit = get.params.iter().find(|p| p.name == "limit").unwrap();
        assert_eq!(limit.kind, Kind::Integer);
        assert!(!limit
            .validator
            .as_ref()
            .unwrap()
            .is_valid(&serde_json::json!(11)));
        assert!(matches!(
            api.find(&Method::DELETE, "/v1/items/7"),
            Found::MethodMissing
        ));
        assert!(matches!(api.find(&Method::GET, "/v2"), Found::PathMissing));
    }

    #[test]
    fn broken_documents_are_refused() {
        assert!(compile(serde_json::json!({"openapi": "2.0", "paths": {}})).is_err());
        assert!(compile(serde_json::json!({"openapi": "3.1.0"})).is_err());
        let bad_ref = serde_json::json!({"openapi": "3.1.0", "paths": {"/a": {"get": {"parameters": [{"$ref": "#/nope"}]}}}});
        assert!(compile(bad_ref).is_err());
        let bad_schema = serde_json::json!({"openapi": "3.1.0", "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": {"type": 5}}}}}}}});
        assert!(compile(bad_schema).is_err());
    }

    #[test]
    fn parameter_text_becomes_typed_json() {
        assert_eq!(
            typed(&Kind::Integer, &["5".into()], true),
            serde_json::json!(5)
        );
        assert_eq!(
            typed(&Kind::Integer, &["x".into()], true),
            serde_json::json!("x")
        );
        assert_eq!(
            typed(&Kind::Boolean, &["true".into()], true),
            serde_json::json!(true)
        );
        let arr = Kind::Array(Box::new(Kind::Integer));
        assert_eq!(
            typed(&arr, &["1".into(), "2".into()], true),
            serde_json::json!([1, 2])
        );
        assert_eq!(
            typed(&arr, &["1,2".into()], false),
            serde_json::json!([1, 2])
        );
    }
}
