//! The rule language on any input: parse, validate, lower and format never
//! panic, and whatever parses formats to text that parses to the same tree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use trireme_compiler::rules::{format, load, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let name: Arc<str> = Arc::from("fuzz.trireme");
    let _ = load(&name, text, 0);
    if let Ok(tree) = parse::parse(text) {
        let out = format::format(&tree, text);
        let back = parse::parse(&out).expect("formatted text must parse");
        assert_eq!(back, tree);
    }
});
