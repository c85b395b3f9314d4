//! The `openapi` policy: requests are checked against their operation in an OpenAPI
//! 3.0/3.1 document ([`crate::openapi`]) — path, query, header and cookie parameters
//! and the JSON body — before anything is sent upstream. A request that does not fit
//! gets 400 `VALIDATION_FAILED` with a bounded list of `{location, pointer, message}`.
//! A JSON body is read once (up to `max_body`) and the action sends those bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{header, Request};
use hyper::body::Incoming;
use portcullis_config::OpenApiConfig;
use serde_json::Value;

use super::{Flow, PolicySite};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::openapi::{cookies, is_json, typed, Found, Location, OpenApi};
use crate::snapshot::{relative_to, Errors};

/// Longest message of one problem.
const MAX_MESSAGE: usize = 300;

pub struct Validate {
    api: Arc<OpenApi>,
    strict: bool,
    base_path: String,
    max_body: usize,
    max_errors: usize,
}

/// Documents compiled once per content, shared by the routes and snapshots that use
/// them (bounded).
#[derive(Default)]
pub struct Documents(Mutex<HashMap<String, (u64, Arc<OpenApi>)>>);

impl Documents {
    fn get(&self, path: &str) -> Result<Arc<OpenApi>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let mut docs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((h, api)) = docs.get(path) {
            if *h == hash {
                return Ok(api.clone());
            }
        }
        let api = Arc::new(crate::openapi::load(std::path::Path::new(path))?);
        if docs.len() >= 64 {
            docs.clear();
        }
        docs.insert(path.to_owned(), (hash, api.clone()));
        Ok(api)
    }
}

pub(crate) fn compile(
    c: &OpenApiConfig,
    site: &PolicySite<'_>,
    documents: &Documents,
    errors: &mut Errors<'_>,
) -> Option<Validate> {
    let field = site.field("openapi");
    let Some(doc) = &c.document else {
        errors.push(
            site.at,
            format!("{field}.document"),
            "the OpenAPI document is required",
        );
        return None;
    };
    let path = relative_to(errors.file, &doc.value);
    let api = match documents.get(&path) {
        Ok(api) => api,
        Err(e) => {
            errors.push(doc.referenced, format!("{field}.document"), e);
            return None;
        }
    };
    let base_path = c.base_path.trim_end_matches('/').to_owned();
    if !base_path.is_empty() && !base_path.starts_with('/') {
        errors.push(site.at, format!("{field}.base_path"), "must start with `/`");
        return None;
    }
    Some(Validate {
        api,
        strict: c.strict.0,
        base_path,
        max_body: usize::try_from(c.max_body.0).unwrap_or(usize::MAX),
        max_errors: usize::try_from(c.max_errors.0).unwrap_or(10).max(1),
    })
}

impl Validate {
    pub(super) async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        let path = match ctx.path.strip_prefix(self.base_path.as_str()) {
            Some("") => "/",
            Some(p) if p.starts_with('/') => p,
            _ if self.base_path.is_empty() => ctx.path,
            _ => return self.missing(false),
        };
        let (op, path_params) = match self.api.find(&ctx.method, path) {
            Found::Operation(op, params) => (op, params),
            Found::MethodMissing => return self.missing(true),
            Found::PathMissing => return self.missing(false),
        };
        let mut problems = Problems::new(self.max_errors);
        let query: Vec<(String, String)> = ctx
            .query
            .as_deref()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let mut jar = None;
        for p in &op.params {
            let values: Vec<String> = match p.location {
                Location::Path => path_params
                    .iter()
                    .filter(|(k, _)| *k == p.name)
                    .map(|(_, v)| {
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                    .collect(),
                Location::Query => query
                    .iter()
                    .filter(|(k, _)| *k == p.name)
                    .map(|(_, v)| v.clone())
                    .collect(),
                Location::Header => req
                    .headers()
                    .get_all(p.name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect(),
                Location::Cookie => jar
                    .get_or_insert_with(|| cookies(req.headers()))
                    .get(&p.name)
                    .cloned()
                    .into_iter()
                    .collect(),
            };
            let pointer = format!("/{}", p.name.replace('~', "~0").replace('/', "~1"));
            // A scalar given twice: the upstream could read either value.
            if values.len() > 1 && !matches!(p.kind, crate::openapi::Kind::Array(_)) {
                problems.push(
                    p.location.as_str(),
                    pointer,
                    "is given more than once".into(),
                );
                continue;
            }
            if values.is_empty() {
                if p.required {
                    problems.push(p.location.as_str(), pointer, "is required".into());
                }
                continue;
            }
            if let Some(v) = &p.validator {
                let instance = typed(&p.kind, &values, p.explode);
                // The common case is valid: a yes/no first, the details only if not.
                if v.is_valid(&instance) {
                    continue;
                }
                for e in v.iter_errors(&instance).take(problems.room()) {
                    problems.push(
                        p.location.as_str(),
                        format!("{pointer}{}", e.instance_path()),
                        e.to_string(),
                    );
                }
            }
        }
        if let Some(spec) = &op.body {
            let media = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(|m| m.trim().to_ascii_lowercase());
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let empty = declared == Some(0)
                || (declared.is_none() && http_body::Body::is_end_stream(req.body()));
            match media {
                _ if empty => {
                    if spec.required {
                        problems.push("body", String::new(), "a request body is required".into());
                    }
                }
                Some(m) if is_json(&m) && spec.json.is_some() => {
                    // The route's own limit holds too (the bytes read replace the stream).
                    let limit = self
                        .max_body
                        .min(usize::try_from(ctx.route.max_body).unwrap_or(usize::MAX));
                    if declared.is_some_and(|n| n > limit as u64) {
                        return Err(too_large(limit));
                    }
                    let bytes = crate::body::read_small(req.body_mut(), limit).await?;
                    match serde_json::from_slice::<Value>(&bytes) {
                        Err(e) => {
                            problems.push("body", String::new(), format!("not valid JSON: {e}"))
                        }
                        Ok(instance) => {
                            if let Some(v) = spec.json.as_ref().filter(|v| !v.is_valid(&instance)) {
                                for e in v.iter_errors(&instance).take(problems.room()) {
                                    problems.push(
                                        "body",
                                        e.instance_path().to_string(),
                                        e.to_string(),
                                    );
                                }
                            }
                        }
                    }
                    // The bytes read are what the action sends.
                    ctx.body = Some(bytes);
                }
                m => {
                    let documented = spec
                        .media
                        .iter()
                        .any(|d| m.as_deref().is_some_and(|m| media_matches(d, m)));
                    if !documented && !spec.media.is_empty() {
                        problems.push(
                            "header",
                            "/content-type".into(),
                            format!("the media type must be one of {}", spec.media.join(", ")),
                        );
                    }
                }
            }
        }
        if problems.list.is_empty() {
            return Ok(Flow::Continue);
        }
        Err(GatewayError::new(
            ErrorCode::ValidationFailed,
            "the request does not match the API's description",
        )
        .with_problems(problems.list))
    }

    /// No operation for the request: 404 (405 when the path is known) when strict,
    /// else it goes on unvalidated.
    fn missing(&self, path_known: bool) -> Result<Flow, GatewayError> {
        if !self.strict {
            return Ok(Flow::Continue);
        }
        Err(if path_known {
            GatewayError::new(
                ErrorCode::MethodNotAllowed,
                "the API does not describe this method for this path",
            )
        } else {
            GatewayError::new(ErrorCode::NotFound, "the API does not describe this path")
        })
    }
}

/// `text/*` and `*/*` ranges of a document's media types.
fn media_matches(documented: &str, media: &str) -> bool {
    documented == media
        || documented == "*/*"
        || documented
            .strip_suffix("/*")
            .is_some_and(|prefix| media.split('/').next() == Some(prefix))
}

fn too_large(limit: usize) -> GatewayError {
    GatewayError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body larger than {limit} bytes"),
    )
}

/// The problems found, at most `max` (and a last line saying more were left out).
struct Problems {
    list: Vec<Value>,
    max: usize,
    dropped: usize,
}

impl Problems {
    fn new(max: usize) -> Self {
        Problems {
            list: Vec::new(),
            max,
            dropped: 0,
        }
    }

    /// How many more problems are worth building (one more marks "more").
    fn room(&self) -> usize {
        (self.max + 1).saturating_sub(self.list.len())
    }

    fn push(&mut self, location: &str, pointer: String, message: String) {
        if self.list.len() >= self.max {
            self.dropped += 1;
            if let Some(Value::Object(last)) = self.list.last_mut() {
                if self.dropped == 1 {
                    last.insert("more".into(), Value::Bool(true));
                }
            }
            return;
        }
        let message: String = message.chars().take(MAX_MESSAGE).collect();
        self.list.push(serde_json::json!({
            "location": location,
            "pointer": pointer,
            "message": message,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ranges() {
        assert!(media_matches("application/json", "application/json"));
        assert!(media_matches("text/*", "text/plain"));
        assert!(media_matches("*/*", "image/png"));
        assert!(!media_matches("text/*", "application/json"));
    }

    #[test]
    fn problems_are_bounded() {
        let mut p = Problems::new(2);
        for i in 0..5 {
            p.push("query", format!("/q{i}"), "bad".into());
        }
        assert_eq!(p.list.len(), 2);
        assert_eq!(p.list[1]["more"], true);
        let mut p = Problems::new(3);
        p.push("body", String::new(), "x".repeat(1000));
        assert_eq!(p.list[0]["message"].as_str().unwrap().len(), MAX_MESSAGE);
    }
}
