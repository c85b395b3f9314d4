//! Arbitrary bytes (as UTF-8) through `normalize_path` with every option set:
//! the output is idempotent, canonical and free of dot segments.

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use portcullis_routing::{normalize_path, EncodedSlash, NormalizeOptions, PathParameters};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    for encoded_slash in [EncodedSlash::Reject, EncodedSlash::Keep] {
        for path_parameters in [PathParameters::Reject, PathParameters::Keep] {
            let opts = NormalizeOptions {
                encoded_slash,
                path_parameters,
            };
            let Ok(once) = normalize_path(raw, opts) else {
                continue;
            };
            assert!(once.starts_with('/'), "{raw:?} -> {once:?}");
            assert!(
                !(once.contains("/./")
                    || once.contains("/../")
                    || once.ends_with("/.")
                    || once.ends_with("/..")),
                "dot segment: {raw:?} -> {once:?} ({opts:?})"
            );
            assert!(!once.contains("//"), "{raw:?} -> {once:?} ({opts:?})");
            if path_parameters == PathParameters::Reject {
                assert!(!once.contains(';'), "{raw:?} -> {once:?} ({opts:?})");
            }
            let twice = normalize_path(&once, opts);
            assert!(
                matches!(twice, Ok(Cow::Borrowed(_))),
                "not canonical: {raw:?} -> {once:?} -> {twice:?} ({opts:?})"
            );
            assert_eq!(twice.as_deref(), Ok(&*once), "not idempotent: {raw:?}");
        }
    }
});
