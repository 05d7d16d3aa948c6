//! The stage kinds, one module each, peers on a shared floor: no kind
//! imports another. What two kinds share (a model, a table layout, the
//! compute device) lives below them in [`crate::models`], [`crate::data`],
//! [`crate::device`] or [`crate::hierarchy`]; a test
//! (`kinds_import_no_other_kind` below) keeps it so.

pub mod bound;
pub mod command;
pub mod encode;
pub mod evaluate;
pub mod human_eval_export;
pub mod preprocess;
pub mod sample;
pub mod train_ar;
pub mod train_vq;

#[cfg(test)]
mod tests {
    /// Every kind's module names: `crate::kinds::X`, `super::X` or a bare
    /// `X::` from another kind would make it depend on a peer.
    const KINDS: &[&str] = &[
        "bound",
        "command",
        "encode",
        "evaluate",
        "human_eval_export",
        "preprocess",
        "sample",
        "train_ar",
        "train_vq",
    ];

    #[test]
    fn kinds_import_no_other_kind() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kinds");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("reading src/kinds") {
            let path = entry.expect("a folder entry").path();
            let Some(own) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if own == "mod" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("reading a kind's module");
            seen += 1;
            for other in KINDS.iter().filter(|k| **k != own) {
                for reach in [
                    format!("crate::kinds::{other}"),
                    format!("super::{other}"),
                    format!("crate::{other}::"),
                ] {
                    assert!(
                        !text.contains(&reach),
                        "{} reaches into the `{other}` kind (`{reach}`): move what they share into models/, data/ or its own module",
                        path.display()
                    );
                }
            }
        }
        assert_eq!(seen, KINDS.len(), "src/kinds holds exactly the nine kinds");
    }
}
