//! The code-table reader on any file as a Parquet shard (the first byte
//! gives the codes per row), in batches of 7 rows.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod scratch;

fuzz_target!(|data: &[u8]| {
    let Some((&per_row, rest)) = data.split_first() else {
        return;
    };
    let file = scratch::file("codes.parquet", rest);
    let _ = stages::data::code_table::for_each_code_batch(&file, per_row as usize, 7, |_| Ok(()));
});
