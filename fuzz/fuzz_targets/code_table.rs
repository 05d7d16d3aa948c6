//! The code-table reader on any file as a Parquet shard (the first byte
//! gives the codes per row), in batches of 7 rows.
#![no_main]

use std::sync::Once;

use libfuzzer_sys::fuzz_target;

mod scratch;

fuzz_target!(|data: &[u8]| {
    // parquet panics on some malformed files; the reader catches that and
    // returns an error (stages::data::parquet_read). libFuzzer's panic hook
    // would abort at the panic itself, so it gives way to a silent one; a
    // panic that escapes the reader still aborts (libfuzzer-sys aborts on
    // any panic that unwinds out of this closure).
    static HOOK: Once = Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&per_row, rest)) = data.split_first() else {
        return;
    };
    let file = scratch::file("codes.parquet", rest);
    let _ = stages::data::code_table::for_each_code_batch(&file, per_row as usize, 7, |_| Ok(()));
});
