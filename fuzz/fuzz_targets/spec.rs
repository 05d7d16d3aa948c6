//! The pipeline loader on any text: parse (YAML, references, paths, kind
//! params) and build the graph. Errors are fine; a panic is a finding.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static KINDS: OnceLock<pipeline::stage::Kinds> = OnceLock::new();
    let kinds = KINDS.get_or_init(stages::all);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = pipeline::spec::parse(text, Path::new("/fuzz/pipeline.yaml"), kinds) {
        let _ = pipeline::graph::build(&p);
    }
});
