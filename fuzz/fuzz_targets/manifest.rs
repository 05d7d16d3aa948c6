//! An artifact's `manifest.json` on any bytes, read from a store the way
//! the driver reads it (`ArtifactStore::manifest`), then verified against
//! the store's data and its metric points read. A manifest that reads must
//! name only files inside its data folder.
#![no_main]

use std::path::Component;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pipeline::cache::ArtifactStore;

const KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fuzz_target!(|data: &[u8]| {
    static STORE: OnceLock<(tempfile::TempDir, ArtifactStore)> = OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch folder");
        let store = ArtifactStore::new(dir.path().join("artifacts"));
        let data = store.data_dir(KEY);
        std::fs::create_dir_all(&data).expect("a data folder");
        std::fs::write(data.join("x.txt"), b"hello").expect("a data file");
        (dir, store)
    });
    std::fs::write(store.dir(KEY).join("manifest.json"), data).expect("writing the manifest");
    if let Ok(Some(m)) = store.manifest(KEY) {
        for f in &m.files {
            assert!(
                std::path::Path::new(&f.path)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            );
        }
        let _ = store.verify(KEY);
    }
    let _ = store.metric_points(KEY);
});
