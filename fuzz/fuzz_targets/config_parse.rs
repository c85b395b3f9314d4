//! Arbitrary bytes (as UTF-8) through the config parser: errors are fine,
//! panics, hangs and runaway memory are not.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = portcullis_config::parse(Path::new("fuzz.yaml"), text) {
        // Rendering the errors must not panic either.
        let _ = errors.to_string();
    }
});
