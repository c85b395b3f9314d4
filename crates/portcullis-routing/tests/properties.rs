//! Property tests for path normalisation and the route table: whatever the
//! client sends, a normalised path is canonical, and a path under a protected
//! prefix never reaches a public route.

use std::borrow::Cow;

use http::Method;
use portcullis_routing::{
    normalize_path, EncodedSlash, HostPattern, Lookup, NormalizeOptions, PathParameters,
    PathPattern, RouteSpec, RouteTable, RouteTableBuilder,
};
use proptest::prelude::*;

/// Every combination of options.
fn all_options() -> Vec<NormalizeOptions> {
    let mut out = Vec::new();
    for encoded_slash in [EncodedSlash::Reject, EncodedSlash::Keep] {
        for path_parameters in [PathParameters::Reject, PathParameters::Keep] {
            out.push(NormalizeOptions {
                encoded_slash,
                path_parameters,
            });
        }
    }
    out
}

/// Paths made of the tokens that traversal and smuggling tricks are built from.
fn tricky_tokens() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => Just("/"),
        1 => Just("//"),
        3 => Just(".."),
        2 => Just("."),
        1 => Just("%2e"),
        1 => Just("%2E%2e"),
        1 => Just(".%2E"),
        3 => Just("admin"),
        1 => Just("adm%69n"),
        1 => Just("%2f"),
        1 => Just("%2F"),
        1 => Just("%5c"),
        1 => Just("\\"),
        2 => Just(";"),
        1 => Just("%3b"),
        1 => Just("%3B"),
        1 => Just("x"),
        1 => Just("public"),
        1 => Just("%"),
        1 => Just("%25"),
        1 => Just("%00"),
        1 => Just("é"),
    ];
    proptest::collection::vec(token, 0..16).prop_map(|t| t.concat())
}

/// Strings from a small alphabet rich in path syntax, plus arbitrary characters.
fn tricky_chars() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        8 => proptest::sample::select(
            "/.%2eEfF;\\admin".chars().collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ];
    proptest::collection::vec(ch, 0..32).prop_map(|c| c.into_iter().collect())
}

/// Absolute request paths: mostly `/` + tricky input, sometimes anything.
fn request_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => tricky_tokens().prop_map(|s| format!("/{s}")),
        3 => tricky_chars().prop_map(|s| format!("/{s}")),
        1 => tricky_tokens(),
        1 => any::<String>(),
    ]
}

fn has_dot_segment(path: &str) -> bool {
    path.contains("/./") || path.contains("/../") || path.ends_with("/.") || path.ends_with("/..")
}

fn has_encoded(path: &str, escapes: &[&str]) -> bool {
    let upper = path.to_ascii_uppercase();
    escapes.iter().any(|e| upper.contains(e))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn normalised_paths_are_clean(raw in request_path()) {
        for opts in all_options() {
            let Ok(out) = normalize_path(&raw, opts) else {
                continue;
            };
            prop_assert!(out.starts_with('/'), "{raw:?} -> {out:?}");
            prop_assert!(!has_dot_segment(&out), "{raw:?} -> {out:?} ({opts:?})");
            prop_assert!(!out.contains("//"), "{raw:?} -> {out:?} ({opts:?})");
            prop_assert!(!out.contains('\\'), "{raw:?} -> {out:?} ({opts:?})");
            // An unreserved byte (here `.`) is always decoded.
            prop_assert!(!has_encoded(&out, &["%2E"]), "{raw:?} -> {out:?} ({opts:?})");
            if opts.encoded_slash == EncodedSlash::Reject {
                prop_assert!(
                    !has_encoded(&out, &["%2F", "%5C"]),
                    "{raw:?} -> {out:?} ({opts:?})"
                );
            }
            if opts.path_parameters == PathParameters::Reject {
                prop_assert!(
                    !out.contains(';') && !has_encoded(&out, &["%3B"]),
                    "{raw:?} -> {out:?} ({opts:?})"
                );
            } else {
                // No segment is a dot segment before its parameters either.
                for segment in out.split('/') {
                    let name = segment.split(';').next().unwrap_or("");
                    let name = name.split("%3B").next().unwrap_or("");
                    prop_assert!(
                        name != "." && name != "..",
                        "{raw:?} -> {out:?} ({opts:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn normalisation_is_idempotent_and_canonical(raw in request_path()) {
        for opts in all_options() {
            let Ok(once) = normalize_path(&raw, opts) else {
                continue;
            };
            let twice = normalize_path(&once, opts);
            prop_assert!(
                matches!(twice, Ok(Cow::Borrowed(_))),
                "{raw:?} -> {once:?} -> {twice:?} ({opts:?})"
            );
            prop_assert_eq!(twice.as_deref(), Ok(&*once));
        }
    }

    /// However a path is spelled, once it normalises into `/admin` it is routed
    /// to `/admin`'s route, never to a public one.
    #[test]
    fn protected_prefix_never_reaches_a_public_route(
        raw in request_path(),
        method in prop_oneof![
            Just(Method::GET),
            Just(Method::HEAD),
            Just(Method::POST),
            Just(Method::DELETE),
        ],
    ) {
        let tables = [table(None), table(Some(vec![Method::GET]))];
        for opts in all_options() {
            let Ok(path) = normalize_path(&raw, opts) else {
                continue;
            };
            if path != "/admin" && !path.starts_with("/admin/") {
                continue;
            }
            for t in &tables {
                if let Lookup::Found(m) = t.lookup(Some("example.com"), Some(443), &method, &path) {
                    prop_assert_eq!(*m.value, "protected", "{:?} -> {:?}", raw, path);
                }
            }
        }
    }
}

/// A protected prefix `/admin` (with `methods`) beside public routes.
fn table(methods: Option<Vec<Method>>) -> RouteTable<&'static str> {
    let route = |path: PathPattern, methods: Option<Vec<Method>>| RouteSpec {
        host: HostPattern::Any,
        port: None,
        path,
        methods,
    };
    let mut b = RouteTableBuilder::new();
    let routes = [
        (
            route(PathPattern::Prefix("/admin".into()), methods),
            "protected",
        ),
        (route(PathPattern::Prefix("/".into()), None), "public"),
        (
            route(PathPattern::Exact("/{page}/{x}".into()), None),
            "public",
        ),
        (route(PathPattern::Exact("/public".into()), None), "public"),
    ];
    for (spec, value) in routes {
        b.add(spec, value).unwrap();
    }
    b.build()
}

#[test]
fn table_sanity() {
    let t = table(Some(vec![Method::GET]));
    let at = |method: Method, path| match t.lookup(None, None, &method, path) {
        Lookup::Found(m) => Some(*m.value),
        _ => None,
    };
    assert_eq!(at(Method::GET, "/admin/x"), Some("protected"));
    assert_eq!(at(Method::DELETE, "/admin/x"), None);
    assert_eq!(at(Method::DELETE, "/docs/x"), Some("public"));
    assert_eq!(at(Method::GET, "/public"), Some("public"));
}
