//! The worker's job file on any bytes: `read_job` (what `haic-pipe worker
//! --job FILE` does first), then the round trip the driver relies on: a
//! job written out reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod scratch;

fuzz_target!(|data: &[u8]| {
    let file = scratch::file("job.json", data);
    let Ok(job) = pipeline::stage::read_job(&file) else {
        return;
    };
    let written = serde_json::to_value(&job).expect("a job serialises");
    let again: pipeline::stage::Job =
        serde_json::from_value(written.clone()).expect("a written job reads back");
    assert_eq!(serde_json::to_value(&again).expect("serialises"), written);
});
