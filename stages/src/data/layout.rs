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
/// Load-time facts of a table's rows (or of the code maps a VQ level
/// makes) when params fix them: height and width, in pixels or code
/// positions.
pub const HEIGHT_FACT: &str = "height";
pub const WIDTH_FACT: &str = "width";
/// Load-time fact of a code table (or a VQ level): codes per position.
pub const CODES_FACT: &str = "codes";

/// A whole-number fact of an input's facts, if stated.
pub fn fact(facts: Option<&serde_json::Value>, key: &str) -> Option<usize> {
    facts?.get(key)?.as_u64().map(|v| v as usize)
}

/// Height and width, if both are stated.
pub fn size_fact(facts: Option<&serde_json::Value>) -> Option<(usize, usize)> {
    Some((fact(facts, HEIGHT_FACT)?, fact(facts, WIDTH_FACT)?))
}
