//! Metrics (Prometheus), logging setup and the per-request access record.
//!
//! Metric labels are route names, methods and statuses, never raw paths, so their
//! cardinality is bounded by the config.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub route: Arc<str>,
    pub limit: Arc<str>,
    /// `allowed`, `limited`, `store_error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: Arc<str>,
    /// `hit`, `miss`, `stale`, `bypass`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: Arc<str>,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineStepLabels {
    pub pipeline: Arc<str>,
    pub step: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// The metrics of requests no configured route handled; allocated once.
pub struct FixedLabels {
    pub unmatched: Arc<RouteMetrics>,
    pub builtin: Arc<RouteMetrics>,
}

impl Default for FixedLabels {
    fn default() -> Self {
        FixedLabels {
            unmatched: RouteMetrics::new(Arc::from("(none)")),
            builtin: RouteMetrics::new(Arc::from("(builtin)")),
        }
    }
}

/// Statuses whose request counters a route keeps at hand; any other status is
/// looked up by its labels.
const COUNTED_STATUSES: [u16; 25] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 415,
    422, 429, 500, 502, 503, 504,
];
const METHOD_SLOTS: usize = 10;

/// A route's metric handles. Each is resolved from its family on the route's first
/// request (a route that never serves one adds no series) and then used without a
/// label lookup. Families keep one series per label set, so handles of the same
/// route name in an older or newer snapshot are the same series.
pub struct RouteMetrics {
    pub name: Arc<str>,
    duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    /// [`METHOD_SLOTS`] × [`COUNTED_STATUSES`], allocated on first use.
    requests: OnceLock<Box<[OnceLock<Counter>]>>,
}

impl RouteMetrics {
    pub fn new(name: Arc<str>) -> Arc<Self> {
        Arc::new(RouteMetrics {
            name,
            duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            requests: OnceLock::new(),
        })
    }

    fn labels(&self) -> RouteLabels {
        RouteLabels {
            route: self.name.clone(),
        }
    }

    pub fn observe_duration(&self, m: &Metrics, seconds: f64) {
        self.duration
            .get_or_init(|| m.request_duration.get_or_create(&self.labels()).clone())
            .observe(seconds);
    }

    pub fn observe_upstream(&self, m: &Metrics, seconds: f64) {
        self.upstream_duration
            .get_or_init(|| m.upstream_duration.get_or_create(&self.labels()).clone())
            .observe(seconds);
    }

    pub fn count_request(&self, m: &Metrics, method: &Method, status: u16) {
        let slot = COUNTED_STATUSES
            .iter()
            .position(|s| *s == status)
            .map(|s| method_slot(method) * COUNTED_STATUSES.len() + s);
        let method = method_label(method);
        let labels = || RequestLabels {
            route: self.name.clone(),
            method,
            status,
        };
        let table = slot.map(|_| {
            self.requests.get_or_init(|| {
                (0..METHOD_SLOTS * COUNTED_STATUSES.len())
                    .map(|_| OnceLock::new())
                    .collect()
            })
        });
        match slot.zip(table).and_then(|(i, t)| t.get(i)) {
            Some(cell) => cell
                .get_or_init(|| m.requests.get_or_create(&labels()).clone())
                .inc(),
            None => m.requests.get_or_create(&labels()).inc(),
        };
    }
}

/// The index of [`method_label`]'s label, below [`METHOD_SLOTS`].
fn method_slot(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub upstream_duration: Family<RouteLabels, Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub open_connections: Family<ListenerLabels, Gauge>,
    pub connections: Family<ListenerLabels, Counter>,
    /// Connections closed at once because `server.max_connections` was reached.
    pub connections_rejected: Counter,
    /// Requests refused because they had already passed through this gateway.
    pub loops_detected: Counter,
    pub reloads: Family<ResultLabels, Counter>,
    pub config_generation: Gauge,
    /// Rate-limit decisions by route, limit and result.
    pub ratelimit: Family<LimitLabels, Counter>,
    /// Response cache lookups by route and result.
    pub cache: Family<CacheLabels, Counter>,
    /// Requests refused by the CSRF policy.
    pub csrf_rejected: Family<RouteLabels, Counter>,
    /// Requests refused by IP rules.
    pub ip_denied: Family<RouteLabels, Counter>,
    /// Retries of upstream attempts by route and reason.
    pub upstream_retries: Family<UpstreamErrorLabels, Counter>,
    /// Per upstream target, refreshed at each scrape from the target states.
    pub target_healthy: Family<TargetLabels, Gauge>,
    pub target_breaker_open: Family<TargetLabels, Gauge>,
    pub target_in_flight: Family<TargetLabels, Gauge>,
    /// Pipeline steps: from sending the request to the end of the response read
    /// (to its head for a sequential pipeline's last step), whatever the outcome.
    pub pipeline_step_duration: Family<PipelineStepLabels, Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub upstream: Arc<str>,
    pub target: Arc<str>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let open_connections = Family::<ListenerLabels, Gauge>::default();
        let connections = Family::<ListenerLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let config_generation = Gauge::default();
        let connections_rejected = Counter::default();
        let loops_detected = Counter::default();
        let ratelimit = Family::<LimitLabels, Counter>::default();
        let cache = Family::<CacheLabels, Counter>::default();
        let csrf_rejected = Family::<RouteLabels, Counter>::default();
        let ip_denied = Family::<RouteLabels, Counter>::default();
        let upstream_retries = Family::<UpstreamErrorLabels, Counter>::default();
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        let target_breaker_open = Family::<TargetLabels, Gauge>::default();
        let target_in_flight = Family::<TargetLabels, Gauge>::default();
        let pipeline_step_duration = Family::<PipelineStepLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "pipeline_step_duration_seconds",
            "Pipeline steps by pipeline and step: request sent to response read",
            pipeline_step_duration.clone(),
        );
        registry.register(
            "upstream_retries",
            "Upstream attempts retried, by route and reason (connect, reset, timeout, status)",
            upstream_retries.clone(),
        );
        registry.register(
            "upstream_target_healthy",
            "1 when an upstream target is healthy (active checks pass, not ejected), else 0",
            target_healthy.clone(),
        );
        registry.register(
            "upstream_target_breaker_open",
            "1 while an upstream target's circuit breaker is open",
            target_breaker_open.clone(),
        );
        registry.register(
            "upstream_target_in_flight",
            "Requests in flight on an upstream target",
            target_in_flight.clone(),
        );
        registry.register(
            "ratelimit_decisions",
            "Rate-limit decisions by route, limit and result (allowed, limited, store_error)",
            ratelimit.clone(),
        );
        registry.register(
            "cache_requests",
            "Response cache lookups by route and result (hit, miss, stale, bypass)",
            cache.clone(),
        );
        registry.register(
            "csrf_rejected",
            "Unsafe requests refused by the CSRF policy, by route",
            csrf_rejected.clone(),
        );
        registry.register(
            "ip_denied",
            "Requests refused by IP rules, by route",
            ip_denied.clone(),
        );
        registry.register(
            "connections_rejected",
            "Client connections closed at once because max_connections was reached",
            connections_rejected.clone(),
        );
        registry.register(
            "loops_detected",
            "Requests refused with 508 because they carried this gateway's Via",
            loops_detected.clone(),
        );
        registry.register(
            "requests",
            "Requests handled, by route, method and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body, by route",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time until the upstream's response head arrived, by route",
            upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by route and kind (connect, timeout, protocol)",
            upstream_errors.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections currently open, by listener",
            open_connections.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted, by listener",
            connections.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result (success, failure)",
            reloads.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the active config (1 at start)",
            config_generation.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            open_connections,
            connections,
            connections_rejected,
            loops_detected,
            reloads,
            config_generation,
            ratelimit,
            cache,
            csrf_rejected,
            ip_denied,
            upstream_retries,
            target_healthy,
            target_breaker_open,
            target_in_flight,
            pipeline_step_duration,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("failed to encode metrics");
        }
        let allocations = crate::alloc_count::allocations();
        if allocations > 0 {
            // Before the closing `# EOF` of the OpenMetrics text.
            let body = out.trim_end().trim_end_matches("# EOF").to_owned();
            out = format!(
                "{body}# HELP portcullis_heap_allocations Heap allocations since start (alloc-count builds only).\n# TYPE portcullis_heap_allocations counter\nportcullis_heap_allocations_total {allocations}\n# EOF\n"
            );
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// What one request did; logged and counted when its response body ends (or is
/// dropped), so streams report their real duration and size.
pub struct AccessRecord {
    pub shared: Arc<crate::Shared>,
    pub start: Instant,
    /// When the response ended, if the caller read the clock already.
    pub end: Option<Instant>,
    pub method: Method,
    pub path: String,
    pub route: Option<Arc<RouteMetrics>>,
    pub status: u16,
    pub upstream: Option<Arc<str>>,
    pub request_id: String,
    /// The authenticated principal (a name, never a credential).
    pub principal: Option<String>,
    pub client: IpAddr,
    pub log: bool,
    pub bytes: u64,
    pub completed: bool,
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let elapsed = match self.end {
            Some(end) => end.saturating_duration_since(self.start),
            None => self.start.elapsed(),
        };
        let route = self.route.as_ref().unwrap_or(&self.shared.labels.unmatched);
        let m = &self.shared.metrics;
        route.count_request(m, &self.method, self.status);
        route.observe_duration(m, elapsed.as_secs_f64());
        if self.log {
            tracing::info!(
                target: "access",
                method = %self.method,
                path = %self.path,
                route = %route.name,
                status = self.status,
                upstream = self.upstream.as_deref().unwrap_or(""),
                duration_ms = (elapsed.as_micros() as f64) / 1000.0,
                bytes = self.bytes,
                complete = self.completed,
                client = %self.client,
                principal = self.principal.as_deref().unwrap_or(""),
                request_id = %self.request_id,
            );
        }
    }
}

/// Counts reloads and the active generation.
pub struct Generation(AtomicU64);

impl Generation {
    pub fn new() -> Self {
        Generation(AtomicU64::new(0))
    }
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Default for Generation {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the global tracing subscriber. JSON lines by default.
pub fn init_logging(format: portcullis_config::LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = match format {
        portcullis_config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        portcullis_config::LogFormat::Pretty => builder.try_init(),
    };
    let _ = result;
}

/// `portcullis check` / `routes`: warnings (weak secrets, open mode, plain-http JWKS)
/// on stderr, one plain line each.
pub fn init_check_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_target(false)
        .try_init();
}
