//! The CIFAR reader on any file (the first byte picks CIFAR-10 or -100);
//! every record is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stages::data::cifar::{CifarReader, Variant};

mod scratch;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let variant = if which % 2 == 0 {
        Variant::Cifar10
    } else {
        Variant::Cifar100
    };
    let file = scratch::file("batch.bin", rest);
    if let Ok(reader) = CifarReader::open(variant, &[file]) {
        for sample in reader {
            if sample.is_err() {
                break;
            }
        }
    }
});
