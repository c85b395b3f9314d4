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

/// Options for [`normalize_path`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    pub encoded_slash: EncodedSlash,
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
    if is_canonical(rest) {
        return Ok(Cow::Borrowed(raw));
    }

    // `out` is built from "/segment" units; decoded segments never contain a
    // raw '/', so the last '/' in `out` always starts the previous segment.
    let mut out = String::with_capacity(raw.len());
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
            _ => continue,
        }
        // A path ending in `/`, `/.` or `/..` names a directory.
        trailing_slash = last;
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True if normalisation would not change `rest` (the path after its leading
/// '/'): only plain path bytes, no empty segment but a trailing one, and no
/// dot segments.
fn is_canonical(rest: &str) -> bool {
    if !rest.bytes().all(|b| b == b'/' || is_pchar(b)) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let empty_inside = segment.is_empty() && segments.peek().is_some();
        if empty_inside || segment == "." || segment == ".." {
            return false;
        }
    }
    true
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
                match hi << 4 | lo {
                    0 => return Err(PathError::NullByte),
                    b'/' | b'\\' if opts.encoded_slash == EncodedSlash::Reject => {
                        return Err(PathError::EncodedSlash)
                    }
                    byte if is_unreserved(byte) => out.push(char::from(byte)),
                    byte => push_encoded(out, byte),
                }
            }
            // Some backends (IIS, Windows file servers) treat it as a separator.
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::NullByte),
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
        };
        normalize_path(raw, opts).map(Cow::into_owned)
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
        ok("/a;b=c:d@e!$&'()*+,", "/a;b=c:d@e!$&'()*+,");
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
    }
}
