//! The IDX reader on any pair of files: the input is the images file's
//! length (2 bytes, little-endian), the images file, then the labels file
//! (each raw or gzip); every record is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod scratch;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (len, rest) = data.split_at(2);
    let at = (u16::from_le_bytes([len[0], len[1]]) as usize).min(rest.len());
    let images = scratch::file("images", &rest[..at]);
    let labels = scratch::file("labels", &rest[at..]);
    if let Ok(reader) = stages::data::idx::IdxReader::open(&images, &labels) {
        for sample in reader {
            if sample.is_err() {
                break;
            }
        }
    }
});
