//! Where tables lie inside an artifact, for the stage kinds that write them
//! and the ones that read them: a `sample` stage keeps its image table under
//! `images/` and its code tables under `codes/levelN/`, in the split
//! [`SAMPLES_SPLIT`]; a `preprocess` stage's image table is the artifact.

use std::path::{Path, PathBuf};

/// The split of the sampled image and code tables.
pub const SAMPLES_SPLIT: &str = "samples";

/// The folder of a `sample` artifact holding its image table.
pub const SAMPLES_IMAGES: &str = "images";

/// The folder of a `sample` artifact holding its code tables, one `levelN`
/// folder each.
pub const SAMPLES_CODES: &str = "codes";

/// The image table an input holds: a `sample` stage keeps it in `images/`,
/// a `preprocess` stage's artifact is one.
pub fn image_table_dir(dir: &Path) -> PathBuf {
    let images = dir.join(SAMPLES_IMAGES);
    if images.join("table.json").is_file() {
        images
    } else {
        dir.to_path_buf()
    }
}

/// The load-time fact (`StageKind::output_facts`) an image table's stage
/// gives when its params fix it: the pixel channels of its images.
pub const PIXEL_CHANNELS_FACT: &str = "pixel_channels";
