// SPDX-License-Identifier: MIT OR Apache-2.0
//! Fuzz the policy parser and validator: any bytes, never a panic, and
//! every reported problem points inside the file.
//!
//! cargo +nightly fuzz run policy_parser -- -max_total_time=600
//!
//! The same contract runs briefly on stable in `cargo test -p reapd`
//! (`policy::proptests::parser_never_panics_*`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use reapd::engine::policy::{compile, Resolver};

/// Fixed names: the fuzzer must not hammer NSS.
struct Table;

impl Resolver for Table {
    fn user(&self, name: &str) -> Option<u32> {
        (name == "root").then_some(0)
    }
    fn group(&self, name: &str) -> Option<u32> {
        (name == "wheel").then_some(10)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = compile("fuzz.toml", text, &Table) {
        assert!(!errors.is_empty());
        let lines = text.split('\n').count();
        for e in &errors {
            assert!(e.line >= 1 && e.line <= lines, "{e}");
            assert!(e.col >= 1, "{e}");
        }
    }
});
