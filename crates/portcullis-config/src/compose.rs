//! Composition: pipelines (FnKit's `/orchestrate/<name>`) and the steps they call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::interp::{ByteSize, Duration, Flag, Text};
use crate::ProxyConfig;

/// `pipeline:` on a route: run a pipeline and answer with its result.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// A pipeline declared under the top-level `pipelines:`.
    #[serde(default)]
    pub name: Option<Spanned<Text>>,
    /// The path param naming a pipeline kept in the store (FnKit's
    /// `fnkit:pipeline:<name>`): `pipeline` for `/orchestrate/{pipeline}`.
    #[serde(default)]
    pub from_store: Option<Spanned<Text>>,
    /// How stored pipelines reach their steps: a proxy whose upstream template
    /// uses `{step}` (`http://{step}:8080`), with its `allow_names`, `targets`,
    /// `timeouts` and `strip_prefix`.
    #[serde(default)]
    pub functions: Option<ProxyConfig>,
    /// Longest a stored definition is used before it is read again; changes made
    /// through the CLI or the admin API are seen at once.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: Duration,
    /// The whole run (504 beyond).
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// One step, until its response has been read (504 beyond).
    #[serde(default = "default_step_timeout")]
    pub step_timeout: Duration,
    /// Largest body handed from one step to the next, or read from a parallel
    /// step (413 beyond); also the largest client body a parallel run copies.
    #[serde(default = "default_max_handoff")]
    pub max_handoff: ByteSize,
    /// Parallel runs answer 200 with the steps that succeeded, failed ones as
    /// `null` (their errors under `$errors`, the header `X-Partial-Response`).
    #[serde(default)]
    pub partial: Flag,
}

fn default_cache_ttl() -> Duration {
    Duration::secs(5)
}
fn default_timeout() -> Duration {
    Duration::secs(60)
}
fn default_step_timeout() -> Duration {
    Duration::secs(30)
}
fn default_max_handoff() -> ByteSize {
    ByteSize::mib(1)
}

/// A pipeline declared in YAML (top-level `pipelines:`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDefConfig {
    /// `sequential` (each step's response is the next one's request) or
    /// `parallel` (every step gets the request; the answers are merged).
    pub mode: Spanned<Text>,
    pub steps: Vec<Spanned<StepConfig>>,
}

/// One step of a YAML pipeline: any upstream, with its own path, method, headers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Names the step in results, errors and metrics (`[A-Za-z0-9_.-]`).
    pub name: Spanned<Text>,
    /// A URL or the name of an entry in `upstreams`.
    pub upstream: Spanned<Text>,
    /// Path template (route params, `{rest}`); default: the route's remainder.
    #[serde(default)]
    pub path: Option<Spanned<Text>>,
    /// Default: the pipeline's rule (the client's method; POST for a hand-off body).
    #[serde(default)]
    pub method: Option<Spanned<Text>>,
    /// Headers set on this step's request.
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    /// This step's limit (default: the route's `step_timeout`).
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// `aggregate:` on a route: call several upstreams (in parallel, or after the parts
/// they depend on) and merge their JSON answers into one object.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    pub parts: Vec<Spanned<PartConfig>>,
    /// `nested`: each part's answer under its name; `flat`: the parts' top-level
    /// fields merged into one object (later parts win).
    #[serde(default)]
    pub merge: MergeMode,
    /// The whole request (504 beyond, or `null` for optional parts still running).
    #[serde(default = "default_aggregate_timeout")]
    pub timeout: Duration,
    /// Largest answer read from one part.
    #[serde(default = "default_max_handoff")]
    pub max_part_body: ByteSize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    #[default]
    Nested,
    Flat,
}

fn default_aggregate_timeout() -> Duration {
    Duration::secs(10)
}

/// One part of an aggregation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// The key of its answer (`[A-Za-z0-9_.-]`).
    pub name: Spanned<Text>,
    /// A URL or the name of an entry in `upstreams`.
    pub upstream: Spanned<Text>,
    /// Path (and query) template: route params, `{rest}`, and `{part.field}` for a
    /// top-level field of a part listed in `after`.
    #[serde(default)]
    pub path: Option<Spanned<Text>>,
    #[serde(default)]
    pub method: Option<Spanned<Text>>,
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    /// This part's limit (default: the aggregation's `timeout`).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// A failed required part fails the request; a failed optional one is `null`.
    #[serde(default = "yes")]
    pub required: Flag,
    /// Top-level fields kept from this part's answer (empty: all).
    #[serde(default)]
    pub fields: Vec<Text>,
    /// Parts that must answer first (declared earlier).
    #[serde(default)]
    pub after: Vec<Text>,
}

fn yes() -> Flag {
    Flag(true)
}
