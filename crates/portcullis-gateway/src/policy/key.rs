//! Keys built from request values (rate-limit counters, cache entries): each part
//! length-prefixed, bytes outside printable ASCII and `\` escaped, so two requests
//! share a key only when every part is byte-for-byte the same.

use std::fmt::Write as _;

/// Appends one part: `<len>:<bytes, escaped>`.
pub(crate) fn push_part(key: &mut String, value: &[u8]) {
    let _ = write!(key, "{}:", value.len());
    for &b in value {
        if b.is_ascii() && b != b'\\' {
            key.push(b as char);
        } else {
            let _ = write!(key, "\\x{b:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_never_collide() {
        let key = |parts: &[&[u8]]| {
            let mut k = String::new();
            for p in parts {
                push_part(&mut k, p);
            }
            k
        };
        assert_ne!(key(&[b"a:1b"]), key(&[b"a", b"b"]));
        assert_ne!(key(&[b"\xff"]), key(&[b"\\xff"]));
        assert_ne!(key(&[&[0xfe]]), key(&[&[0xff]]));
        assert_eq!(key(&[b"a", b"b"]), key(&[b"a", b"b"]));
    }
}
