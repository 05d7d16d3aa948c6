//! The rating server's inputs on any bytes: the package's `manifest.json`
//! (the first two bytes give its length) and the JSON answer the page posts
//! after it, checked the way the server checks them (`human_eval`'s
//! `read_manifest`, `Answer`, `check_answer`), and the tasks CSV. An
//! accepted answer must name a task of the package and a source it shows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stages::human_eval::{Answer, read_manifest, tasks_csv};

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (manifest, answer) = rest.split_at(len);
    let Ok(manifest) = read_manifest(manifest) else {
        return;
    };
    let _ = tasks_csv(&manifest, "https://example.org/");
    let Ok(answer) = serde_json::from_slice::<Answer>(answer) else {
        return;
    };
    if let Ok((task, chosen)) = manifest.check_answer(&answer) {
        assert_eq!(task.id, answer.task_id);
        assert!(chosen == task.left.source || chosen == task.right.source);
    }
});
