//! The host/port/path/method route table.
//!
//! Each (host, port) pair owns a `matchit` radix tree, so path lookup cost
//! does not grow with the number of routes. Host tables are found through
//! hash maps (exact names, and wildcard suffixes label by label), so the
//! whole lookup is independent of the table size.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;

use http::Method;

/// Reserved catch-all name used to implement prefix routes.
const REST: &str = "__rest";

/// Which `Host` a route applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Any host: the default routes.
    Any,
    /// Exactly this (lowercase) host name.
    Exact(String),
    /// `*.suffix`: any host strictly below `suffix`, at any depth (nginx
    /// semantics); `a.example.com` and `a.b.example.com`, not `example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Parses `*` / `""` (any), `*.example.com`, `example.com` or `[::1]`.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let invalid = |reason| RouteError::InvalidHost {
            pattern: s.to_owned(),
            reason,
        };
        if s.is_empty() || s == "*" {
            return Ok(Self::Any);
        }
        let lower = s.to_ascii_lowercase();
        if let Some(ip) = lower.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            // IPv6 literal; `split_host_port` yields it without brackets.
            let valid = ip.contains(':')
                && ip
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            return if valid {
                Ok(Self::Exact(ip.to_owned()))
            } else {
                Err(invalid("invalid IPv6 literal"))
            };
        }
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, lower.as_str()),
        };
        // `example.com.` is the same name, and `split_host_port` strips it too.
        let name = name.strip_suffix('.').unwrap_or(name);
        check_host_name(name).map_err(invalid)?;
        Ok(if wildcard {
            Self::Wildcard(name.to_owned())
        } else {
            Self::Exact(name.to_owned())
        })
    }
}

fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        let bad = label
            .bytes()
            .find(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        if let Some(b) = bad {
            return Err(match b {
                b'*' => "'*' is only allowed as a leading \"*.\" label",
                b':' => "ports are set separately (write IPv6 addresses as [::1])",
                b if b.is_ascii_whitespace() => "whitespace is not allowed",
                _ => "invalid character",
            });
        }
    }
    Ok(())
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(h) if h.contains(':') => write!(f, "[{h}]"),
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Which paths a route applies to. Both kinds may contain `{param}` segments.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathPattern {
    /// Exactly this template; may end in a `{*rest}` catch-all.
    Exact(String),
    /// This path and everything below it, on a segment boundary:
    /// `/api` matches `/api`, `/api/` and `/api/x`, never `/apix`.
    Prefix(String),
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(p) => f.write_str(p),
            Self::Prefix(p) => write!(f, "{}/**", p.trim_end_matches('/')),
        }
    }
}

/// One route's match criteria.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub host: HostPattern,
    /// `None` matches any listener port.
    pub port: Option<u16>,
    pub path: PathPattern,
    /// `None` matches any method; a list with `GET` also matches `HEAD`.
    pub methods: Option<Vec<Method>>,
}

/// Why a route could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("invalid host pattern `{pattern}`: {reason}")]
    InvalidHost {
        pattern: String,
        reason: &'static str,
    },
    #[error("invalid path pattern `{pattern}`: {reason}")]
    InvalidPath {
        pattern: String,
        reason: &'static str,
    },
    #[error("route `{path}` has an empty method list (omit it to allow any method)")]
    NoMethods { path: String },
    #[error("path pattern `{path}` conflicts with `{with}` on the same host: both would match the same requests")]
    Conflict { path: String, with: String },
    #[error(
        "duplicate route `{host} {path}`: an existing route already matches some of its methods"
    )]
    Duplicate { host: String, path: String },
}

/// The outcome of [`RouteTable::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'t, 'p, T> {
    Found(RouteMatch<'t, 'p, T>),
    /// Some route matched host and path, none the method (HTTP 405).
    MethodNotAllowed {
        allowed: Vec<Method>,
    },
    NotFound,
}

/// A matched route.
#[derive(Debug, PartialEq, Eq)]
pub struct RouteMatch<'t, 'p, T> {
    pub value: &'t T,
    /// `{param}` values, raw (still percent-encoded) slices of the path.
    pub params: Vec<(&'t str, &'p str)>,
    /// For prefix routes, the path after the prefix including its leading
    /// slash: `/api/x` → `/x`, `/api/` → `/`, `/api` → `""`.
    pub rest: Option<&'p str>,
}

/// How a candidate matched, which determines [`RouteMatch::rest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    /// An exact pattern.
    Exact,
    /// The prefix itself: `/api`.
    Bare,
    /// The prefix plus a slash: `/api/`.
    Slash,
    /// Below the prefix: `/api/{*__rest}`.
    CatchAll,
}

impl Tail {
    fn rest<'p>(self, path: &'p str, params: &matchit::Params<'_, 'p>) -> Option<&'p str> {
        match self {
            Tail::Exact => None,
            Tail::Bare => Some(""),
            Tail::Slash => Some("/"),
            // The catch-all is a suffix of `path`; widen it to its '/'.
            Tail::CatchAll => {
                let rest = params.get(REST)?;
                path.get(path.len().checked_sub(rest.len() + 1)?..)
            }
        }
    }
}

/// One route registered under a matchit entry.
#[derive(Debug)]
struct Candidate {
    route: usize,
    tail: Tail,
    methods: Option<Vec<Method>>,
    /// Length of the entry's literal start (before its first `{`): between the two
    /// trees, the match with the longer literal start is the more specific one.
    literal: usize,
}

impl Candidate {
    /// Lower is better; `None` if the method is not allowed at all.
    fn rank(&self, method: &Method) -> Option<u8> {
        match &self.methods {
            Some(ms) if ms.contains(method) => Some(0),
            Some(ms) if method == Method::HEAD && ms.contains(&Method::GET) => Some(1),
            Some(_) => None,
            None => Some(2),
        }
    }

    fn is_prefix(&self) -> bool {
        self.tail != Tail::Exact
    }
}

/// The routes of one (host, port).
///
/// Prefix catch-alls (`/users/{*__rest}`) live in a tree of their own:
/// matchit refuses a `{param}` and a catch-all at the same position, which
/// would forbid the common `/users/**` + `/users/{id}` pair. The prefix's own
/// path (`/users`, `/users/`) stays in the exact tree so it still beats a
/// template like `/{page}`; below it, exact patterns are tried first.
#[derive(Debug, Default)]
struct PathTable {
    exact: PathTree,
    prefix: PathTree,
    /// Routes of this table, for `entries()`.
    routes: Vec<usize>,
}

impl PathTable {
    fn trees(&self) -> [&PathTree; 2] {
        [&self.exact, &self.prefix]
    }

    fn tree_mut(&mut self, tail: Tail) -> &mut PathTree {
        match tail {
            Tail::CatchAll => &mut self.prefix,
            Tail::Exact | Tail::Bare | Tail::Slash => &mut self.exact,
        }
    }
}

#[derive(Debug, Default)]
struct PathTree {
    /// Maps a path to an index into `slots`.
    router: matchit::Router<usize>,
    /// Routes sharing one matchit entry (same path, disjoint methods, or an
    /// exact and a prefix route on the same path), best first.
    slots: Vec<Vec<Candidate>>,
    /// matchit entry -> slot; matchit cannot look up a route by its template.
    keys: HashMap<String, usize>,
}

impl PathTree {
    fn slot(&self, key: &str) -> &[Candidate] {
        self.keys
            .get(key)
            .and_then(|&i| self.slots.get(i))
            .map_or(&[], Vec::as_slice)
    }

    fn insert(&mut self, key: &str, candidate: Candidate) -> Result<(), matchit::InsertError> {
        if let Some(slot) = self.keys.get(key).and_then(|&i| self.slots.get_mut(i)) {
            slot.push(candidate);
            // Exact patterns beat prefixes; explicit methods beat "any".
            slot.sort_by_key(|c| (c.is_prefix(), c.methods.is_none()));
            return Ok(());
        }
        self.router.insert(key, self.slots.len())?;
        self.keys.insert(key.to_owned(), self.slots.len());
        self.slots.push(vec![candidate]);
        Ok(())
    }

    /// Undoes a partially inserted route (one of its matchit keys conflicted).
    fn remove(&mut self, route: usize, keys: &[(String, Tail)]) {
        for key in keys.iter().map(|(key, _)| key) {
            let Some(&i) = self.keys.get(key.as_str()) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            slot.retain(|c| c.route != route);
            if slot.is_empty() {
                self.router.remove(key.as_str());
                self.keys.remove(key.as_str());
            }
        }
    }
}

/// The entry of one tree that a path matches, whatever the method.
struct PathHit<'t, 'p> {
    /// Length of the entry's literal start.
    literal: usize,
    /// Its routes, best first; never empty.
    slot: &'t [Candidate],
    params: matchit::Params<'t, 'p>,
}

impl<'t, 'p> PathHit<'t, 'p> {
    fn at(tree: &'t PathTree, path: &'p str) -> Option<Self> {
        let m = tree.router.at(path).ok()?;
        // (A slot is only empty after a rolled-back insert.)
        let slot = tree.slots.get(*m.value).filter(|s| !s.is_empty())?;
        Some(Self {
            // All candidates of a slot share its matchit entry.
            literal: slot.iter().map(|c| c.literal).max().unwrap_or(0),
            slot,
            params: m.params,
        })
    }

    /// Adds the methods of a hit that refused the method: every candidate has an
    /// explicit method list, or it would have accepted.
    fn add_methods(&self, allowed: &mut Vec<Method>) {
        for m in self.slot.iter().flat_map(|c| c.methods.iter().flatten()) {
            add_method(allowed, m);
            if m == Method::GET {
                add_method(allowed, &Method::HEAD);
            }
        }
    }
}

/// The path tables of one host pattern, port-specific ones first.
#[derive(Debug, Default)]
struct ByPort(Vec<(Option<u16>, PathTable)>);

impl ByPort {
    fn for_port(&self, port: Option<u16>) -> impl Iterator<Item = &PathTable> {
        self.0
            .iter()
            .filter(move |(p, _)| p.is_none() || *p == port)
            .map(|(_, table)| table)
    }

    fn table_mut(&mut self, port: Option<u16>) -> &mut PathTable {
        let i = match self.0.iter().position(|(p, _)| *p == port) {
            Some(i) => i,
            None => {
                let i = if port.is_some() { 0 } else { self.0.len() };
                self.0.insert(i, (port, PathTable::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Tables in match order, for `entries()`.
    fn sorted(&self) -> Vec<&PathTable> {
        let mut tables: Vec<_> = self.0.iter().collect();
        tables.sort_by_key(|(p, _)| (p.is_none(), *p));
        tables.into_iter().map(|(_, t)| t).collect()
    }
}

#[derive(Debug)]
struct Route<T> {
    spec: RouteSpec,
    value: T,
}

/// An immutable route table; build one with [`RouteTableBuilder`].
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<Route<T>>,
    exact: HashMap<String, ByPort>,
    /// Keyed by suffix: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, ByPort>,
    any: ByPort,
}

impl<T> RouteTable<T> {
    /// Routes the request. `host` must be lowercase and without port (see
    /// [`split_host_port`]); `path` should be normalised.
    ///
    /// The most specific path match decides: tables in host order (exact host,
    /// wildcards, any host; port-specific first), and within a table the longer
    /// literal start, the exact tree on a tie. If none of its routes accepts the
    /// method, the answer is 405 — a less specific route (a public `/**` beside a
    /// `GET`-only `/admin`) never takes the request. Only a route with an equally
    /// long literal start, in the same or a less specific host table, may still
    /// accept it (host `a`: `GET /x` and any host: `POST /x`).
    pub fn lookup<'t, 'p>(
        &'t self,
        host: Option<&str>,
        port: Option<u16>,
        method: &Method,
        path: &'p str,
    ) -> Lookup<'t, 'p, T> {
        // Set by the most specific path match when it refuses the method: its
        // literal length, below which no later match may take the request.
        let mut floor: Option<usize> = None;
        // `Vec::new` does not allocate: only a refused method fills it.
        let mut allowed = Vec::new();
        for table in self.tables_for(host, port) {
            // Both trees of a table may match (`/{page}/{x}` and the prefix `/api`
            // for `/api/x`): the longer literal start first, the exact tree on a tie.
            let [exact, prefix] = table.trees().map(|tree| PathHit::at(tree, path));
            let hits = match (&exact, &prefix) {
                (Some(e), Some(p)) if p.literal > e.literal => [prefix, exact],
                _ => [exact, prefix],
            };
            for hit in hits.into_iter().flatten() {
                if floor.is_some_and(|floor| hit.literal < floor) {
                    continue;
                }
                if let Some(found) = self.accept(&hit, method, path) {
                    return Lookup::Found(found);
                }
                floor.get_or_insert(hit.literal);
                hit.add_methods(&mut allowed);
            }
        }
        match floor {
            Some(_) => Lookup::MethodNotAllowed { allowed },
            None => Lookup::NotFound,
        }
    }

    /// The path tables to try, most specific host first: exact host, then
    /// wildcards by longest suffix, then any host; port-specific first each.
    fn tables_for<'t, 'h>(
        &'t self,
        host: Option<&'h str>,
        port: Option<u16>,
    ) -> impl Iterator<Item = &'t PathTable> + use<'t, 'h, T> {
        let exact = host.and_then(|h| self.exact.get(h));
        let wildcards = host
            .into_iter()
            .flat_map(wildcard_suffixes)
            .filter_map(|suffix| self.wildcard.get(suffix));
        exact
            .into_iter()
            .chain(wildcards)
            .chain(Some(&self.any))
            .flat_map(move |by_port| by_port.for_port(port))
    }

    /// The best route of `hit` for `method`, if any accepts it.
    fn accept<'t, 'p>(
        &'t self,
        hit: &PathHit<'t, 'p>,
        method: &Method,
        path: &'p str,
    ) -> Option<RouteMatch<'t, 'p, T>> {
        let (_, c) = hit
            .slot
            .iter()
            .filter_map(|c| Some(((c.is_prefix(), c.rank(method)?), c)))
            .min_by_key(|(rank, _)| *rank)?;
        let route = self.routes.get(c.route)?;
        Some(RouteMatch {
            value: &route.value,
            params: hit.params.iter().filter(|(k, _)| *k != REST).collect(),
            rest: c.tail.rest(path, &hit.params),
        })
    }

    /// All routes in match order: host precedence as in `lookup`, then
    /// static paths, templates (more static segments first), prefixes
    /// (longest first).
    pub fn entries(&self) -> Vec<(&RouteSpec, &T)> {
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let mut wildcard: Vec<_> = self.wildcard.iter().collect();
        wildcard.sort_by(|a, b| (Reverse(a.0.len()), a.0).cmp(&(Reverse(b.0.len()), b.0)));
        let hosts = exact
            .into_iter()
            .chain(wildcard)
            .map(|(_, by_port)| by_port)
            .chain(Some(&self.any));

        let mut out = Vec::with_capacity(self.routes.len());
        for table in hosts.flat_map(ByPort::sorted) {
            let mut routes: Vec<&Route<T>> = table
                .routes
                .iter()
                .filter_map(|&i| self.routes.get(i))
                .collect();
            routes.sort_by_key(|r| specificity(&r.spec.path));
            out.extend(routes.into_iter().map(|r| (&r.spec, &r.value)));
        }
        out
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn add_method(methods: &mut Vec<Method>, m: &Method) {
    if !methods.contains(m) {
        methods.push(m.clone());
    }
}

/// Suffixes a wildcard could be registered under, longest first:
/// `a.b.example.com` → `b.example.com`, `example.com`, `com`. Never the
/// host itself, so `*.example.com` does not match `example.com`.
fn wildcard_suffixes(host: &str) -> impl Iterator<Item = &str> {
    host.match_indices('.')
        .filter(|&(i, _)| i > 0)
        .map(move |(i, _)| &host[i + 1..])
}

/// Sort key for `entries()`; lower sorts first.
fn specificity(path: &PathPattern) -> (u8, Reverse<usize>, Reverse<usize>) {
    match path {
        PathPattern::Exact(p) if !p.contains('{') => (0, Reverse(0), Reverse(0)),
        PathPattern::Exact(p) => {
            let fixed = p.split('/').filter(|s| !s.contains('{')).count();
            (1, Reverse(fixed), Reverse(0))
        }
        PathPattern::Prefix(p) => (2, Reverse(p.split('/').count()), Reverse(p.len())),
    }
}

/// Collects routes into a [`RouteTable`], rejecting ambiguous ones early.
#[derive(Debug)]
pub struct RouteTableBuilder<T> {
    table: RouteTable<T>,
}

impl<T> Default for RouteTableBuilder<T> {
    fn default() -> Self {
        Self {
            table: RouteTable {
                routes: Vec::new(),
                exact: HashMap::new(),
                wildcard: HashMap::new(),
                any: ByPort::default(),
            },
        }
    }
}

impl<T> RouteTableBuilder<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. On error the builder is left unchanged.
    pub fn add(&mut self, mut spec: RouteSpec, value: T) -> Result<(), RouteError> {
        // Re-parsing validates and lowercases hand-built patterns too.
        spec.host = HostPattern::parse(&spec.host.to_string())?;
        let keys = matchit_keys(&mut spec.path)?;
        if spec.methods.as_ref().is_some_and(Vec::is_empty) {
            return Err(RouteError::NoMethods {
                path: spec.path.to_string(),
            });
        }

        let by_port = match &spec.host {
            HostPattern::Any => &mut self.table.any,
            HostPattern::Exact(h) => self.table.exact.entry(h.clone()).or_default(),
            HostPattern::Wildcard(s) => self.table.wildcard.entry(s.clone()).or_default(),
        };
        let table = by_port.table_mut(spec.port);

        // Same kind of pattern on the same entry is the same pattern.
        let duplicate = keys.iter().any(|(key, tail)| {
            table.tree_mut(*tail).slot(key).iter().any(|c| {
                c.is_prefix() == (*tail != Tail::Exact) && overlaps(&c.methods, &spec.methods)
            })
        });
        if duplicate {
            let host = match spec.port {
                Some(port) => format!("{}:{port}", spec.host),
                None => spec.host.to_string(),
            };
            let path = spec.path.to_string();
            return Err(RouteError::Duplicate { host, path });
        }

        let id = self.table.routes.len();
        for (key, tail) in &keys {
            let candidate = Candidate {
                route: id,
                tail: *tail,
                methods: spec.methods.clone(),
                literal: key.find('{').unwrap_or(key.len()),
            };
            if let Err(err) = table.tree_mut(*tail).insert(key, candidate) {
                table.exact.remove(id, &keys);
                table.prefix.remove(id, &keys);
                return Err(insert_error(&spec.path, err));
            }
        }
        table.routes.push(id);
        self.table.routes.push(Route { spec, value });
        Ok(())
    }

    pub fn build(self) -> RouteTable<T> {
        self.table
    }
}

fn overlaps(a: &Option<Vec<Method>>, b: &Option<Vec<Method>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
        _ => false,
    }
}

fn insert_error(path: &PathPattern, err: matchit::InsertError) -> RouteError {
    match err {
        matchit::InsertError::Conflict { with } => {
            // Show our internal prefix entries the way the user wrote them.
            let with = match with.strip_suffix(&format!("/{{*{REST}}}")) {
                Some(prefix) => PathPattern::Prefix(prefix.to_owned()).to_string(),
                None => with,
            };
            RouteError::Conflict {
                path: path.to_string(),
                with,
            }
        }
        _ => RouteError::InvalidPath {
            pattern: path.to_string(),
            reason: "unsupported parameter syntax",
        },
    }
}

/// Validates `path` (normalising a prefix's trailing slash away) and returns
/// the matchit entries implementing it.
fn matchit_keys(path: &mut PathPattern) -> Result<Vec<(String, Tail)>, RouteError> {
    let (p, is_prefix) = match path {
        PathPattern::Exact(p) => (p, false),
        PathPattern::Prefix(p) => (p, true),
    };
    check_path(p, !is_prefix).map_err(|reason| RouteError::InvalidPath {
        pattern: p.clone(),
        reason,
    })?;
    if !is_prefix {
        return Ok(vec![(p.clone(), Tail::Exact)]);
    }
    // matchit catch-alls never match empty, so a prefix needs three entries.
    let base = p.trim_end_matches('/').to_owned();
    let mut keys = Vec::with_capacity(3);
    if !base.is_empty() {
        keys.push((base.clone(), Tail::Bare));
    }
    keys.push((format!("{base}/"), Tail::Slash));
    keys.push((format!("{base}/{{*{REST}}}"), Tail::CatchAll));
    *p = if base.is_empty() {
        "/".to_owned()
    } else {
        base
    };
    Ok(keys)
}

fn check_path(p: &str, catch_all_ok: bool) -> Result<(), &'static str> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err("must start with '/'");
    };
    let mut names: Vec<&str> = Vec::new();
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment.is_empty() {
            if last {
                continue;
            }
            return Err("empty segment ('//') never matches a normalised path");
        }
        if segment == "." || segment == ".." {
            return Err("dot segments never match a normalised path");
        }
        if !segment.contains(['{', '}']) {
            continue;
        }
        let inner = segment
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .ok_or("a parameter must be a whole segment, like /{id}")?;
        let (catch_all, name) = match inner.strip_prefix('*') {
            Some(name) => (true, name),
            None => (false, inner),
        };
        let mut chars = name.chars();
        let ident = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            return Err("parameter names must match [A-Za-z_][A-Za-z0-9_]*");
        }
        if name == REST {
            return Err("parameter name `__rest` is reserved");
        }
        if catch_all && !catch_all_ok {
            return Err("a prefix cannot contain a catch-all {*name}");
        }
        if catch_all && !last {
            return Err("a catch-all {*name} must be the last segment");
        }
        if names.contains(&name) {
            return Err("duplicate parameter name");
        }
        names.push(name);
    }
    Ok(())
}

/// Splits a `Host` header or URI authority into a lowercase host without
/// trailing dot and a port: `Example.COM.:8080` → (`example.com`, 8080),
/// `[::1]:8080` → (`::1`, 8080).
/// The host is borrowed when it is already lower-case without a trailing dot (the
/// usual case: no allocation per request).
pub fn split_host_port(authority: &str) -> (std::borrow::Cow<'_, str>, Option<u16>) {
    // Userinfo never selects a route.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':')),
            None => (authority, None),
        },
        None => match authority.rsplit_once(':') {
            // More than one ':' is a bare IPv6 address, not a port.
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            _ => (authority, None),
        },
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    };
    let port = port
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok());
    (host, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, path: PathPattern) -> RouteSpec {
        RouteSpec {
            host: HostPattern::parse(host).unwrap(),
            port: None,
            path,
            methods: None,
        }
    }

    fn exact(p: &str) -> PathPattern {
        PathPattern::Exact(p.to_owned())
    }

    fn prefix(p: &str) -> PathPattern {
        PathPattern::Prefix(p.to_owned())
    }

    fn build(routes: Vec<(RouteSpec, &'static str)>) -> RouteTable<&'static str> {
        let mut b = RouteTableBuilder::new();
        for (spec, value) in routes {
            b.add(spec, value).unwrap();
        }
        b.build()
    }

    /// (value, params, rest) of a matched request.
    type Hit<'t> = (&'static str, Vec<(&'t str, &'t str)>, Option<&'t str>);

    /// Looks up a GET to `host` + `path`.
    fn get<'t>(t: &'t RouteTable<&'static str>, host: &str, path: &'t str) -> Option<Hit<'t>> {
        match t.lookup(Some(host), None, &Method::GET, path) {
            Lookup::Found(m) => Some((*m.value, m.params, m.rest)),
            _ => None,
        }
    }

    fn value(t: &RouteTable<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        get(t, host, path).map(|(v, ..)| v)
    }

    #[test]
    fn exact_param_catch_all_precedence() {
        let t = build(vec![
            (spec("*", exact("/users/new")), "static"),
            (spec("*", exact("/users/{id}")), "param"),
            (spec("*", exact("/users/{id}/{*rest}")), "catch-all"),
        ]);
        assert_eq!(value(&t, "a", "/users/new"), Some("static"));
        let (v, params, rest) = get(&t, "a", "/users/42").unwrap();
        assert_eq!((v, params, rest), ("param", vec![("id", "42")], None));
        let (v, params, _) = get(&t, "a", "/users/42/x/y").unwrap();
        assert_eq!(
            (v, params),
            ("catch-all", vec![("id", "42"), ("rest", "x/y")])
        );
        assert_eq!(value(&t, "a", "/users"), None);
        assert_eq!(value(&t, "a", "/users/42/"), None);
    }

    #[test]
    fn prefix_boundary_and_rest() {
        let t = build(vec![
            (spec("*", prefix("/api")), "api"),
            (spec("*", prefix("/fn/{name}/")), "fn"),
        ]);
        let rest = |path| get(&t, "a", path).map(|(v, _, rest)| (v, rest));
        assert_eq!(rest("/api"), Some(("api", Some(""))));
        assert_eq!(rest("/api/"), Some(("api", Some("/"))));
        assert_eq!(rest("/api/x"), Some(("api", Some("/x"))));
        assert_eq!(rest("/api/x/y/"), Some(("api", Some("/x/y/"))));
        assert_eq!(rest("/apix"), None);
        assert_eq!(rest("/ap"), None);

        let (v, params, rest) = get(&t, "a", "/fn/hello/api/x").unwrap();
        assert_eq!(
            (v, params, rest),
            ("fn", vec![("name", "hello")], Some("/api/x"))
        );
        assert_eq!(get(&t, "a", "/fn/hello").unwrap().2, Some(""));
        assert_eq!(get(&t, "a", "/fn/hello/").unwrap().2, Some("/"));
        assert_eq!(value(&t, "a", "/fn"), None);
    }

    #[test]
    fn root_prefix_matches_everything() {
        let t = build(vec![
            (spec("*", prefix("/")), "root"),
            (spec("*", exact("/users/{id}")), "user"),
        ]);
        assert_eq!(get(&t, "a", "/").unwrap().2, Some("/"));
        assert_eq!(get(&t, "a", "/x/y").unwrap().2, Some("/x/y"));
        assert_eq!(value(&t, "a", "/users/1"), Some("user"));
        // matchit backtracks from the template to the catch-all.
        assert_eq!(value(&t, "a", "/users/1/more"), Some("root"));
    }

    #[test]
    fn exact_beats_prefix_on_same_path() {
        let t = build(vec![
            (spec("*", prefix("/api")), "prefix"),
            (spec("*", exact("/api")), "exact"),
        ]);
        assert_eq!(value(&t, "a", "/api"), Some("exact"));
        assert_eq!(value(&t, "a", "/api/"), Some("prefix"));
    }

    #[test]
    fn wildcard_hosts() {
        let t = build(vec![
            (spec("*.example.com", exact("/")), "wild"),
            (spec("*.b.example.com", exact("/")), "deeper"),
            (spec("exact.example.com", exact("/")), "exact"),
        ]);
        assert_eq!(value(&t, "a.example.com", "/"), Some("wild"));
        assert_eq!(value(&t, "a.c.example.com", "/"), Some("wild"));
        assert_eq!(value(&t, "a.b.example.com", "/"), Some("deeper"));
        assert_eq!(value(&t, "exact.example.com", "/"), Some("exact"));
        assert_eq!(value(&t, "example.com", "/"), None);
        assert_eq!(value(&t, "b.example.com", "/"), Some("wild"));
        assert_eq!(value(&t, "example.org", "/"), None);
    }

    #[test]
    fn host_precedence_falls_through_on_path_miss() {
        let t = build(vec![
            (spec("a.com", exact("/y")), "a.com /y"),
            (spec("*.com", exact("/z")), "*.com /z"),
            (spec("*", exact("/x")), "any /x"),
            (spec("*", exact("/y")), "any /y"),
        ]);
        assert_eq!(value(&t, "a.com", "/y"), Some("a.com /y"));
        assert_eq!(value(&t, "a.com", "/x"), Some("any /x"));
        assert_eq!(value(&t, "a.com", "/z"), Some("*.com /z"));
        assert_eq!(value(&t, "b.com", "/y"), Some("any /y"));
        assert_eq!(t.lookup(None, None, &Method::GET, "/x"), {
            let v = &"any /x";
            Lookup::Found(RouteMatch {
                value: v,
                params: vec![],
                rest: None,
            })
        });
        assert!(matches!(
            t.lookup(Some("a.com"), None, &Method::GET, "/q"),
            Lookup::NotFound
        ));
    }

    #[test]
    fn port_specific_tables() {
        let mut b = RouteTableBuilder::new();
        let on = |host: &str, port| RouteSpec {
            port,
            ..spec(host, exact("/"))
        };
        b.add(on("a.com", Some(8443)), "a:8443").unwrap();
        b.add(on("a.com", None), "a").unwrap();
        b.add(on("*", Some(9000)), "any:9000").unwrap();
        b.add(on("*", None), "any").unwrap();
        let t = b.build();
        let at = |host, port| match t.lookup(Some(host), port, &Method::GET, "/") {
            Lookup::Found(m) => Some(*m.value),
            _ => None,
        };
        assert_eq!(at("a.com", Some(8443)), Some("a:8443"));
        assert_eq!(at("a.com", Some(80)), Some("a"));
        assert_eq!(at("a.com", None), Some("a"));
        assert_eq!(at("b.com", Some(9000)), Some("any:9000"));
        assert_eq!(at("b.com", Some(80)), Some("any"));
    }

    #[test]
    fn method_dispatch() {
        let with = |methods: &[Method]| RouteSpec {
            methods: Some(methods.to_vec()),
            ..spec("*", exact("/items"))
        };
        let t = build(vec![
            (with(&[Method::GET]), "get"),
            (with(&[Method::POST, Method::PUT]), "write"),
        ]);
        let call = |method: Method| t.lookup(None, None, &method, "/items");
        assert!(matches!(call(Method::GET), Lookup::Found(m) if *m.value == "get"));
        assert!(matches!(call(Method::HEAD), Lookup::Found(m) if *m.value == "get"));
        assert!(matches!(call(Method::PUT), Lookup::Found(m) if *m.value == "write"));
        match call(Method::DELETE) {
            Lookup::MethodNotAllowed { allowed } => {
                assert_eq!(
                    allowed,
                    [Method::GET, Method::HEAD, Method::POST, Method::PUT]
                );
            }
            other => panic!("expected 405, got {other:?}"),
        }
        assert!(matches!(
            t.lookup(None, None, &Method::GET, "/other"),
            Lookup::NotFound
        ));
    }

    #[test]
    fn explicit_methods_before_any_method() {
        let t = build(vec![
            (spec("*", exact("/x")), "any"),
            (
                RouteSpec {
                    methods: Some(vec![Method::GET]),
                    ..spec("*", exact("/x"))
                },
                "get",
            ),
        ]);
        assert!(
            matches!(t.lookup(None, None, &Method::HEAD, "/x"), Lookup::Found(m) if *m.value == "get")
        );
        assert!(
            matches!(t.lookup(None, None, &Method::POST, "/x"), Lookup::Found(m) if *m.value == "any")
        );
    }

    /// The same path on a less specific host is equally specific: it may take a
    /// method the host's own route refuses.
    #[test]
    fn method_mismatch_falls_through_to_default_host() {
        let t = build(vec![
            (
                RouteSpec {
                    methods: Some(vec![Method::POST]),
                    ..spec("a.com", exact("/x"))
                },
                "a.com post",
            ),
            (spec("*", exact("/x")), "any"),
        ]);
        assert_eq!(value(&t, "a.com", "/x"), Some("any"));
    }

    fn only(methods: &[Method], spec: RouteSpec) -> RouteSpec {
        RouteSpec {
            methods: Some(methods.to_vec()),
            ..spec
        }
    }

    /// The value found, or `Err(allowed)` for a 405, or `Err([])` for a 404.
    fn call(
        t: &RouteTable<&'static str>,
        method: Method,
        host: &str,
        path: &str,
    ) -> Result<&'static str, Vec<Method>> {
        match t.lookup(Some(host), None, &method, path) {
            Lookup::Found(m) => Ok(*m.value),
            Lookup::MethodNotAllowed { allowed } => {
                assert!(!allowed.is_empty());
                Err(allowed)
            }
            Lookup::NotFound => Err(vec![]),
        }
    }

    const GET_HEAD: [Method; 2] = [Method::GET, Method::HEAD];

    /// A method mismatch on the most specific path must not fall through to a
    /// less specific (say, public) route.
    #[test]
    fn method_mismatch_does_not_fall_through_to_a_shorter_path() {
        let t = build(vec![
            (only(&[Method::GET], spec("*", exact("/admin"))), "admin"),
            (spec("*", prefix("/")), "public"),
        ]);
        assert_eq!(
            call(&t, Method::DELETE, "a", "/admin"),
            Err(GET_HEAD.to_vec())
        );
        assert_eq!(call(&t, Method::GET, "a", "/admin"), Ok("admin"));
        assert_eq!(call(&t, Method::HEAD, "a", "/admin"), Ok("admin"));
        assert_eq!(call(&t, Method::DELETE, "a", "/admin/"), Ok("public"));
        assert_eq!(call(&t, Method::DELETE, "a", "/adminx"), Ok("public"));
    }

    #[test]
    fn method_restricted_prefix_beside_public_root() {
        let t = build(vec![
            (only(&[Method::GET], spec("*", prefix("/admin"))), "admin"),
            (spec("*", prefix("/")), "public"),
            (spec("*", exact("/{page}/{x}")), "template"),
        ]);
        for path in ["/admin", "/admin/", "/admin/x", "/admin/x/y"] {
            assert_eq!(
                call(&t, Method::DELETE, "a", path),
                Err(GET_HEAD.to_vec()),
                "{path}"
            );
            assert_eq!(call(&t, Method::GET, "a", path), Ok("admin"), "{path}");
        }
        assert_eq!(call(&t, Method::DELETE, "a", "/adminx"), Ok("public"));
        assert_eq!(call(&t, Method::DELETE, "a", "/docs/x"), Ok("template"));
    }

    #[test]
    fn method_mismatch_on_a_specific_host_is_405() {
        let t = build(vec![
            (
                only(&[Method::GET], spec("api.com", exact("/admin"))),
                "api admin",
            ),
            (only(&[Method::GET], spec("*.a.com", exact("/x"))), "wild x"),
            (spec("*", prefix("/")), "public"),
        ]);
        assert_eq!(
            call(&t, Method::DELETE, "api.com", "/admin"),
            Err(GET_HEAD.to_vec())
        );
        assert_eq!(
            call(&t, Method::DELETE, "b.a.com", "/x"),
            Err(GET_HEAD.to_vec())
        );
        assert_eq!(
            call(&t, Method::DELETE, "other.com", "/admin"),
            Ok("public")
        );
        assert_eq!(call(&t, Method::DELETE, "api.com", "/other"), Ok("public"));
    }

    /// An equally specific path may still take the method, on the same or a less
    /// specific host; the 405 lists what those accept too.
    #[test]
    fn equally_specific_path_may_accept_the_method() {
        let t = build(vec![
            (
                only(&[Method::GET], spec("api.com", exact("/x"))),
                "api get",
            ),
            (only(&[Method::POST], spec("*", exact("/x"))), "any post"),
            (only(&[Method::GET], spec("*", exact("/api/{id}"))), "item"),
            (only(&[Method::PUT], spec("*", prefix("/api"))), "api put"),
            (spec("*", prefix("/")), "public"),
        ]);
        assert_eq!(call(&t, Method::POST, "api.com", "/x"), Ok("any post"));
        assert_eq!(call(&t, Method::GET, "api.com", "/x"), Ok("api get"));
        assert_eq!(
            call(&t, Method::DELETE, "api.com", "/x"),
            Err(vec![Method::GET, Method::HEAD, Method::POST])
        );
        // `/api/{id}` and `/api/**` share the literal start `/api/`.
        assert_eq!(call(&t, Method::PUT, "a", "/api/1"), Ok("api put"));
        assert_eq!(call(&t, Method::GET, "a", "/api/1"), Ok("item"));
        assert_eq!(
            call(&t, Method::DELETE, "a", "/api/1"),
            Err(vec![Method::GET, Method::HEAD, Method::PUT])
        );
        assert_eq!(
            call(&t, Method::DELETE, "a", "/api/1/2"),
            Err(vec![Method::PUT])
        );
    }

    /// Host precedence still comes first: a less specific host's longer path only
    /// takes what the host's own routes refuse.
    #[test]
    fn less_specific_host_with_longer_path() {
        let t = build(vec![
            (
                only(&[Method::GET], spec("api.com", prefix("/"))),
                "api root",
            ),
            (spec("*", exact("/admin")), "any admin"),
        ]);
        assert_eq!(call(&t, Method::GET, "api.com", "/admin"), Ok("api root"));
        assert_eq!(
            call(&t, Method::DELETE, "api.com", "/admin"),
            Ok("any admin")
        );
        assert_eq!(
            call(&t, Method::DELETE, "api.com", "/x"),
            Err(GET_HEAD.to_vec())
        );
        assert_eq!(
            call(&t, Method::DELETE, "api.com", "/admin/x"),
            Err(GET_HEAD.to_vec())
        );
    }

    #[test]
    fn duplicates_and_conflicts() {
        let mut b = RouteTableBuilder::new();
        let get = |path| RouteSpec {
            methods: Some(vec![Method::GET]),
            ..spec("a.com", path)
        };
        b.add(get(exact("/a/{id}")), 1).unwrap();
        assert!(matches!(
            b.add(get(exact("/a/{id}")), 2),
            Err(RouteError::Duplicate { .. })
        ));
        let err = b.add(get(exact("/a/{name}")), 3).unwrap_err();
        assert!(
            matches!(&err, RouteError::Conflict { with, .. } if with == "/a/{id}"),
            "{err}"
        );
        // Another host, port or disjoint method set is fine.
        b.add(spec("b.com", exact("/a/{id}")), 4).unwrap();
        b.add(
            RouteSpec {
                port: Some(1),
                ..get(exact("/a/{id}"))
            },
            5,
        )
        .unwrap();
        b.add(
            RouteSpec {
                methods: Some(vec![Method::POST]),
                ..get(exact("/a/{id}"))
            },
            6,
        )
        .unwrap();
        b.add(
            RouteSpec {
                methods: None,
                ..get(exact("/a/{id}"))
            },
            7,
        )
        .unwrap();
        // Prefixes normalise their trailing slash before the duplicate check.
        b.add(get(prefix("/p")), 8).unwrap();
        assert!(matches!(
            b.add(get(prefix("/p/")), 9),
            Err(RouteError::Duplicate { .. })
        ));

        // A conflict on a later entry of a prefix leaves nothing behind.
        b.add(get(prefix("/q/{x}")), 10).unwrap();
        let err = b.add(get(prefix("/q")), 11).unwrap_err();
        assert!(
            matches!(&err, RouteError::Conflict { with, .. } if with == "/q/{x}/**"),
            "{err}"
        );
        let t = b.build();
        assert_eq!(t.len(), 7);
        let at = |path| match t.lookup(Some("a.com"), None, &Method::GET, path) {
            Lookup::Found(m) => Some(*m.value),
            _ => None,
        };
        assert_eq!((at("/q"), at("/q/"), at("/q/x")), (None, None, Some(10)));
    }

    #[test]
    fn prefix_and_templates_coexist() {
        let t = build(vec![
            (spec("*", prefix("/users")), "users/**"),
            (spec("*", exact("/users/{id}")), "user"),
            (spec("*", exact("/files/{*path}")), "files"),
            (spec("*", prefix("/files")), "files/**"),
            (spec("*", prefix("/")), "/**"),
            (spec("*", exact("/{page}")), "page"),
        ]);
        assert_eq!(value(&t, "a", "/users/1"), Some("user"));
        assert_eq!(value(&t, "a", "/users/1/x"), Some("users/**"));
        assert_eq!(value(&t, "a", "/users"), Some("users/**"));
        assert_eq!(value(&t, "a", "/files/a/b"), Some("files"));
        assert_eq!(value(&t, "a", "/files/"), Some("files/**"));
        assert_eq!(value(&t, "a", "/about"), Some("page"));
        assert_eq!(value(&t, "a", "/about/x"), Some("/**"));
    }

    /// A longer literal start wins across the two trees: a public template must never
    /// take a request that a more specific (say, authenticated) prefix owns.
    #[test]
    fn longer_literal_start_wins_between_template_and_prefix() {
        let t = build(vec![
            (spec("*", exact("/{page}/{x}")), "template"),
            (spec("*", prefix("/api")), "api/**"),
            (spec("*", exact("/api/v1/{id}")), "v1"),
            (spec("*", prefix("/api/v1/items")), "items/**"),
        ]);
        assert_eq!(value(&t, "a", "/api/x"), Some("api/**"));
        assert_eq!(value(&t, "a", "/docs/x"), Some("template"));
        assert_eq!(value(&t, "a", "/api/v1/7"), Some("v1"));
        assert_eq!(value(&t, "a", "/api/v1/items/3"), Some("items/**"));
    }

    #[test]
    fn pattern_validation() {
        let mut b = RouteTableBuilder::new();
        for bad in [
            "api",
            "/a{b}",
            "/{a",
            "/{1x}",
            "/{__rest}",
            "/{*rest}/x",
            "/a//b",
            "/a/../b",
            "/{x}/{x}",
        ] {
            let err = b.add(spec("*", exact(bad)), ()).unwrap_err();
            assert!(
                matches!(err, RouteError::InvalidPath { .. }),
                "{bad}: {err}"
            );
        }
        assert!(b.add(spec("*", prefix("/a/{*rest}")), ()).is_err());
        let no_methods = RouteSpec {
            methods: Some(vec![]),
            ..spec("*", exact("/"))
        };
        assert!(matches!(
            b.add(no_methods, ()),
            Err(RouteError::NoMethods { .. })
        ));
        assert_eq!(b.build().len(), 0);
    }

    #[test]
    fn host_pattern_parsing() {
        use HostPattern::*;
        assert_eq!(HostPattern::parse("*"), Ok(Any));
        assert_eq!(HostPattern::parse(""), Ok(Any));
        assert_eq!(
            HostPattern::parse("Example.COM."),
            Ok(Exact("example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.Example.com"),
            Ok(Wildcard("example.com".into()))
        );
        assert_eq!(HostPattern::parse("[::1]"), Ok(Exact("::1".into())));
        for bad in [
            "a.*.com", "*a.com", "a..com", "a.com:80", "a com", "*.", ".a.com", "[zz]",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Wildcard("example.com".into()).to_string(), "*.example.com");
        assert_eq!(prefix("/api").to_string(), "/api/**");
        assert_eq!(prefix("/").to_string(), "/**");
    }

    #[test]
    fn split_authority() {
        let s = |a| split_host_port(a);
        assert_eq!(s("Example.COM"), ("example.com".into(), None));
        assert_eq!(s("example.com.:8080"), ("example.com".into(), Some(8080)));
        assert_eq!(s("[::1]:8080"), ("::1".into(), Some(8080)));
        assert_eq!(s("[::1]"), ("::1".into(), None));
        assert_eq!(s("::1"), ("::1".into(), None));
        assert_eq!(s("a.com:+80"), ("a.com".into(), None));
        assert_eq!(s("a.com:99999"), ("a.com".into(), None));
        assert_eq!(s("user@a.com:1"), ("a.com".into(), Some(1)));
    }

    #[test]
    fn entries_in_match_order() {
        let t = build(vec![
            (spec("*", prefix("/")), "any /**"),
            (spec("*", prefix("/api/v1")), "any /api/v1/**"),
            (spec("*", exact("/users/{id}")), "any /users/{id}"),
            (spec("*", exact("/{a}/{b}")), "any /{a}/{b}"),
            (spec("*", exact("/health")), "any /health"),
            (spec("*.com", exact("/")), "*.com"),
            (spec("*.a.com", exact("/")), "*.a.com"),
            (
                RouteSpec {
                    port: Some(1),
                    ..spec("x.com", exact("/"))
                },
                "x.com:1",
            ),
            (spec("x.com", exact("/")), "x.com"),
        ]);
        let order: Vec<_> = t.entries().into_iter().map(|(_, v)| *v).collect();
        assert_eq!(
            order,
            [
                "x.com:1",
                "x.com",
                "*.a.com",
                "*.com",
                "any /health",
                "any /users/{id}",
                "any /{a}/{b}",
                "any /api/v1/**",
                "any /**"
            ]
        );
    }

    #[test]
    fn ten_thousand_routes() {
        let mut b = RouteTableBuilder::new();
        for i in 0..10_000 {
            b.add(spec("*", exact(&format!("/svc{i}/items/{{id}}"))), i)
                .unwrap();
            b.add(
                spec(&format!("h{i}.example.com"), prefix(&format!("/p{i}"))),
                i,
            )
            .unwrap();
        }
        let t = b.build();
        assert_eq!(t.len(), 20_000);
        match t.lookup(Some("x"), None, &Method::GET, "/svc9876/items/5") {
            Lookup::Found(m) => assert_eq!((*m.value, m.params), (9876, vec![("id", "5")])),
            other => panic!("{other:?}"),
        }
        match t.lookup(Some("h42.example.com"), None, &Method::GET, "/p42/x") {
            Lookup::Found(m) => assert_eq!((*m.value, m.rest), (42, Some("/x"))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.lookup(Some("h42.example.com"), None, &Method::GET, "/p43"),
            Lookup::NotFound
        ));
    }
}
