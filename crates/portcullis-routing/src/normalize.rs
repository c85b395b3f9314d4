//! Request path normalisation.
//!
//! This runs before routing and before any auth decision, so every spelling
//! of a path that a backend could interpret as "the same" path must come out
//! of here identical. Otherwise `/public/%2e%2e/admin` routes like `/public/*`
//! but is served as `/admin`.

use std::borrow::Cow;

/// What to do with `%2F` / `%5C` (encoded `/` and `\`) inside a segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EncodedSlash {
    /// Refuse the request: backends disagree on whether they are separators.
    #[default]
    Reject,
    /// Keep them encoded (uppercase) as part of the segment; never a separator.
    Keep,
}

/// What to do with `;` path parameters (`/a;jsessionid=1/b`, RFC 3986 3.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathParameters {
    /// Refuse any `;`, raw or encoded (`%3B`): Tomcat, Jetty and Spring strip
    /// `;...` from a segment before matching it, so `/admin;x` would be served
    /// as `/admin` while it routes as something else.
    #[default]
    Reject,
    /// Keep `;` as part of its segment (`%3B` stays encoded). A segment that is
    /// a dot segment before its first `;` or `%3B` (`..;x`, `.;x`, `%2e%2e;`)
    /// is still refused: those backends read `..;x` as `..`.
    ///
    /// Routes still see `/a;x` and `/a` as different paths; only use this for
    /// backends that do not strip path parameters, or route on prefixes only.
    Keep,
}

/// Options for [`normalize_path`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    pub encoded_slash: EncodedSlash,
    pub path_parameters: PathParameters,
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("request path does not start with '/'")]
    NotAbsolute,
    #[error("request path contains a malformed percent-encoding")]
    InvalidEncoding,
    #[error("request path contains a NUL byte")]
    NullByte,
    #[error("request path contains an encoded slash or backslash (%2F or %5C)")]
    EncodedSlash,
    #[error("request path contains a backslash")]
    Backslash,
    #[error("request path contains a `;` path parameter")]
    PathParameter,
}

/// Normalises `raw` (a URI path without query) into its canonical form:
/// unreserved characters decoded, other escapes uppercased, empty and dot
/// segments removed (a trailing slash is kept).
///
/// Already-canonical paths — nearly all of them — are returned borrowed.
pub fn normalize_path(raw: &str, opts: NormalizeOptions) -> Result<Cow<'_, str>, PathError> {
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    if is_canonical(rest, opts) {
        return Ok(Cow::Borrowed(raw));
    }
    normalize_owned(rest, opts).map(Cow::Owned)
}

/// The slow path of [`normalize_path`] for `rest`, the path after its leading '/'.
fn normalize_owned(rest: &str, opts: NormalizeOptions) -> Result<String, PathError> {
    // `out` is built from "/segment" units; decoded segments never contain a
    // raw '/', so the last '/' in `out` always starts the previous segment.
    let mut out = String::with_capacity(rest.len() + 1);
    let mut trailing_slash = false;
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        out.push('/');
        decode_segment(segment, opts, &mut out)?;
        // Dot segments are resolved after decoding, so `%2e%2e` is `..` too.
        match &out[start + 1..] {
            "" | "." => out.truncate(start),
            ".." => {
                out.truncate(start);
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
            }
            decoded if is_dot_with_parameter(decoded) => return Err(PathError::PathParameter),
            _ => continue,
        }
        // A path ending in `/`, `/.` or `/..` names a directory.
        trailing_slash = last;
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// True if normalisation would not change `rest` (the path after its leading
/// '/') and would not refuse it: only plain path bytes and canonical escapes
/// (uppercase, of a byte that stays encoded), no empty segment but a trailing
/// one, and no dot segments.
fn is_canonical(rest: &str, opts: NormalizeOptions) -> bool {
    let bytes = rest.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return false;
            };
            let (Some(hi), Some(lo)) = (upper_hex_value(hi), upper_hex_value(lo)) else {
                return false;
            };
            if !matches!(classify_escape(hi << 4 | lo, opts), Ok(Escape::Keep)) {
                return false;
            }
            i += 3;
            continue;
        }
        let plain = match b {
            b'/' => true,
            b';' => opts.path_parameters == PathParameters::Keep,
            b => is_pchar(b),
        };
        if !plain {
            return false;
        }
        i += 1;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let empty_inside = segment.is_empty() && segments.peek().is_some();
        if empty_inside
            || (segment.starts_with('.')
                && (segment == "." || segment == ".." || is_dot_with_parameter(segment)))
        {
            return false;
        }
    }
    true
}

/// True for a (decoded) segment that is `.` or `..` before its first `;` or
/// `%3B`: `..;x`, `.;jsessionid=1`, `..%3B`. Backends that strip path
/// parameters (some after decoding `%3B`) read it as a dot segment.
fn is_dot_with_parameter(segment: &str) -> bool {
    let end = [segment.find(';'), segment.find("%3B")]
        .into_iter()
        .flatten()
        .min();
    end.is_some_and(|end| matches!(&segment[..end], "." | ".."))
}

/// What becomes of a percent-encoded byte.
enum Escape {
    /// Unreserved: decoded.
    Decode,
    /// Kept encoded, with uppercase hex digits.
    Keep,
}

fn classify_escape(byte: u8, opts: NormalizeOptions) -> Result<Escape, PathError> {
    match byte {
        0 => Err(PathError::NullByte),
        b'/' | b'\\' if opts.encoded_slash == EncodedSlash::Reject => Err(PathError::EncodedSlash),
        b';' if opts.path_parameters == PathParameters::Reject => Err(PathError::PathParameter),
        byte if is_unreserved(byte) => Ok(Escape::Decode),
        _ => Ok(Escape::Keep),
    }
}

/// Appends the canonical form of one segment to `out`.
fn decode_segment(
    segment: &str,
    opts: NormalizeOptions,
    out: &mut String,
) -> Result<(), PathError> {
    let mut bytes = segment.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = bytes.next().and_then(hex_value);
                let lo = bytes.next().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::InvalidEncoding);
                };
                let byte = hi << 4 | lo;
                match classify_escape(byte, opts)? {
                    Escape::Decode => out.push(char::from(byte)),
                    Escape::Keep => push_encoded(out, byte),
                }
            }
            // Some backends (IIS, Windows file servers) treat it as a separator.
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::NullByte),
            b';' if opts.path_parameters == PathParameters::Reject => {
                return Err(PathError::PathParameter)
            }
            b if is_pchar(b) => out.push(char::from(b)),
            // Not allowed raw in a path (controls, space, non-ASCII): escape it
            // so the output stays a valid, ASCII-only URI path.
            b => push_encoded(out, b),
        }
    }
    Ok(())
}

fn push_encoded(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Like [`hex_value`], for the uppercase digits of a canonical escape only.
fn upper_hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `pct-encoded` (handled separately).
fn is_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> Result<String, PathError> {
        normalize_path(raw, NormalizeOptions::default()).map(Cow::into_owned)
    }

    fn keep(raw: &str) -> Result<String, PathError> {
        let opts = NormalizeOptions {
            encoded_slash: EncodedSlash::Keep,
            ..NormalizeOptions::default()
        };
        normalize_path(raw, opts).map(Cow::into_owned)
    }

    const KEEP_PARAMS: NormalizeOptions = NormalizeOptions {
        encoded_slash: EncodedSlash::Reject,
        path_parameters: PathParameters::Keep,
    };

    fn params(raw: &str) -> Result<String, PathError> {
        normalize_path(raw, KEEP_PARAMS).map(Cow::into_owned)
    }

    #[track_caller]
    fn ok(raw: &str, want: &str) {
        assert_eq!(norm(raw).as_deref(), Ok(want), "normalising {raw:?}");
    }

    #[test]
    fn traversal_is_resolved() {
        ok("/public/../admin", "/admin");
        ok("/public/%2e%2e/admin", "/admin");
        ok("/public/%2E%2E/admin", "/admin");
        ok("/public/.%2e/admin", "/admin");
        ok("/public/%2E./admin", "/admin");
        ok("/../../etc/passwd", "/etc/passwd");
        ok("/a/b/%2e%2e/%2e%2e/%2e%2e/c", "/c");
    }

    #[test]
    fn dot_and_empty_segments() {
        ok("//admin", "/admin");
        ok("/a/./b", "/a/b");
        ok("/a/%2e/b", "/a/b");
        ok("/..", "/");
        ok("/.", "/");
        ok("/a/..", "/");
        ok("/a/b/..", "/a/");
        ok("/a/.", "/a/");
        ok("/a/b/../", "/a/");
        ok("/a//b/", "/a/b/");
        ok("/a//", "/a/");
        ok("//", "/");
        ok("/", "/");
        ok("/...", "/...");
        ok("/a/.hidden", "/a/.hidden");
    }

    #[test]
    fn encodings() {
        ok("/%41", "/A");
        ok("/%7e%2D", "/~-");
        ok("/a%3fb", "/a%3Fb");
        ok("/%c3%a9", "/%C3%A9");
        ok("/%252e%252e", "/%252e%252e");
        ok("/a b", "/a%20b");
        ok("/caf\u{e9}", "/caf%C3%A9");
        ok("/a{b}", "/a%7Bb%7D");
        ok("/a=c:d@e!$&'()*+,", "/a=c:d@e!$&'()*+,");
        ok("/%21%3d", "/%21%3D");
    }

    #[test]
    fn path_parameters_rejected_by_default() {
        for raw in [
            "/a;b",
            "/admin;x",
            "/a/..;/admin",
            "/;",
            "/a%3Bb",
            "/a%3bb",
            "/a/%2e%2e%3bx/admin",
            "/a;b/../c",
        ] {
            assert_eq!(norm(raw), Err(PathError::PathParameter), "{raw:?}");
        }
    }

    #[test]
    fn path_parameters_kept() {
        let kept = |raw: &str, want: &str| {
            assert_eq!(params(raw).as_deref(), Ok(want), "normalising {raw:?}");
        };
        kept("/a;b=c/d", "/a;b=c/d");
        kept("/a/b;jsessionid=1", "/a/b;jsessionid=1");
        kept("/;x/a", "/;x/a");
        kept("/..x;y/a", "/..x;y/a");
        kept("/...;x", "/...;x");
        // Never decoded into a delimiter, and canonicalised to uppercase.
        kept("/a%3bb", "/a%3Bb");
        kept("/a%3Bb", "/a%3Bb");
        kept("/a/./b;c/../d;e", "/a/d;e");
    }

    #[test]
    fn dot_segments_with_parameters_rejected_when_kept() {
        for raw in [
            "/a/..;x/admin",
            "/a/.;x/admin",
            "/a/%2e%2e;x/admin",
            "/a/%2E.;x",
            "/a/..;",
            "/a/.;jsessionid=1",
            "/..;",
            "/a/..%3Bx/admin",
            "/a/..%3b/admin",
            "/a/.%3B",
        ] {
            assert_eq!(params(raw), Err(PathError::PathParameter), "{raw:?}");
        }
    }

    #[test]
    fn rejected() {
        assert_eq!(norm(""), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
        assert_eq!(norm("http://x/a"), Err(PathError::NotAbsolute));
        assert_eq!(norm("/%zz"), Err(PathError::InvalidEncoding));
        assert_eq!(norm("/a%2"), Err(PathError::InvalidEncoding));
        assert_eq!(norm("/a%"), Err(PathError::InvalidEncoding));
        assert_eq!(norm("/a%00"), Err(PathError::NullByte));
        assert_eq!(norm("/a\0"), Err(PathError::NullByte));
        assert_eq!(norm("/a\\..\\admin"), Err(PathError::Backslash));
    }

    #[test]
    fn encoded_slash() {
        assert_eq!(norm("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/a%5cb"), Err(PathError::EncodedSlash));
        assert_eq!(keep("/a%2fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(keep("/a%5cb").as_deref(), Ok("/a%5Cb"));
        // Kept slashes are never separators, so they cannot smuggle a `..`.
        assert_eq!(
            keep("/a/..%2f..%2fadmin").as_deref(),
            Ok("/a/..%2F..%2Fadmin")
        );
    }

    #[test]
    fn fast_path_borrows() {
        let opts = NormalizeOptions::default();
        for raw in [
            "/",
            "/a/b/",
            "/api/v1/users/42",
            "/a/.well-known",
            "/a..b/c.d",
        ] {
            let got = normalize_path(raw, opts);
            assert!(matches!(got, Ok(Cow::Borrowed(_))), "{raw:?} -> {got:?}");
            assert_eq!(got.as_deref(), Ok(raw));
        }
        assert!(matches!(normalize_path("/a/./b", opts), Ok(Cow::Owned(_))));
        // Canonical escapes stay on the fast path; others do not.
        let got = normalize_path("/a%20b/%C3%A9", opts);
        assert!(matches!(got, Ok(Cow::Borrowed(_))), "{got:?}");
        for raw in ["/a%20b/%c3", "/%41", "/a%2Fb", "/a%3B", "/a;b", "/a%2"] {
            assert!(
                !matches!(normalize_path(raw, opts), Ok(Cow::Borrowed(_))),
                "{raw:?}"
            );
        }
        let got = normalize_path("/a;b/c%3B", KEEP_PARAMS);
        assert!(matches!(got, Ok(Cow::Borrowed(_))), "{got:?}");
        assert_eq!(
            normalize_path("/a/..;b", KEEP_PARAMS),
            Err(PathError::PathParameter)
        );
    }

    /// Paths built from segments of the tokens that matter to the fast path.
    fn tricky_path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let token = prop_oneof![
            3 => Just("."),
            2 => Just(";"),
            2 => Just("a"),
            1 => Just("%2e"),
            1 => Just("%2E"),
            1 => Just("%3B"),
            1 => Just("%3b"),
            1 => Just("%2F"),
            1 => Just("%20"),
            1 => Just("%41"),
            1 => Just("%C3"),
            1 => Just("%c3"),
            1 => Just("%"),
            1 => Just("\\"),
            1 => Just("é"),
        ];
        let segment = proptest::collection::vec(token, 0..4).prop_map(|t| t.concat());
        proptest::collection::vec(segment, 1..5).prop_map(|s| s.join("/"))
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1024))]

        /// The fast path only accepts what the slow path would return unchanged.
        #[test]
        fn fast_path_agrees_with_slow_path(rest in tricky_path()) {
            for slash in [EncodedSlash::Reject, EncodedSlash::Keep] {
                for params in [PathParameters::Reject, PathParameters::Keep] {
                    let opts = NormalizeOptions { encoded_slash: slash, path_parameters: params };
                    if is_canonical(&rest, opts) {
                        let want = format!("/{rest}");
                        proptest::prop_assert_eq!(normalize_owned(&rest, opts), Ok(want));
                    }
                }
            }
        }
    }
}
