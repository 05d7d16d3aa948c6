//! The `encode` stage: a trained VQ level turns its input table (images or
//! the codes of the level below) into a code table (`data::code_table`),
//! every split, row for row and in order, one batch in memory at a time
//! (plus the codes of the shard being written).
//!
//! ```yaml
//! codes1:
//!   kind: encode
//!   inputs: {level: vq1, table: prep}   # a train_vq stage and the table it trained on
//!   params: {batch_size: 256}           # optional; also `shard_rows`
//! ```

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};

use crate::data::code_table::{CODE_TABLE_FORMAT, CodeMeta, CodeShardWriter, CodeTableIndex};
use crate::data::level_table::LevelTable;
use crate::device::device;
use crate::error::Error;
use crate::models::quantiser::usage;
use crate::models::vq_level::VqLevel;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "batch_size")]
    pub batch_size: usize,
    #[serde(default = "shard_rows")]
    pub shard_rows: usize,
}

fn batch_size() -> usize {
    256
}

fn shard_rows() -> usize {
    10_000
}

fn parse_config(params: &serde_json::Map<String, serde_json::Value>) -> Result<Config, ParamError> {
    let cfg: Config = crate::params::parse(params)?;
    if cfg.batch_size == 0 || cfg.shard_rows == 0 {
        return Err(ParamError::new(
            "params.batch_size",
            "batch_size and shard_rows must be at least 1",
        ));
    }
    Ok(cfg)
}

pub struct Encode;

impl StageKind for Encode {
    fn name(&self) -> &'static str {
        "encode"
    }

    fn version(&self) -> u32 {
        // 2: code tables name the table they encoded (`haic.source_key`).
        2
    }

    fn input_names(&self) -> Option<&'static [&'static str]> {
        Some(&["level", "table"])
    }

    fn device_dependent(&self) -> bool {
        true
    }

    fn resolved_params(
        &self,
        stage: &Stage,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ParamError> {
        crate::params::resolve::<Config>(&stage.params)
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        parse_config(&stage.params)?;
        for input in ["level", "table"] {
            if !stage.inputs.contains_key(input) {
                return Err(ParamError::new(
                    "inputs",
                    "encode needs `inputs: {level: TRAIN_VQ_STAGE, table: TABLE_STAGE}`",
                ));
            }
        }
        Ok(())
    }

    /// A code table of the level's code maps (its facts: size and K).
    fn output_facts(
        &self,
        _stage: &Stage,
        inputs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> serde_json::Value {
        inputs
            .get("level")
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg = parse_config(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let device = device(&ctx.job.device)?;
        let level = VqLevel::load(ctx.input("level")?, &device)?;
        let table = LevelTable::open(ctx.input("table")?)?;
        let info = &level.info;
        if table.input != info.input
            || table.height != info.input_height
            || table.width != info.input_width
        {
            return Err(Error::Params(format!(
                "inputs.table: the level was trained on {}x{} {:?}, the table holds {}x{} {:?}; give encode the table its level trained on",
                info.input_height, info.input_width, info.input, table.height, table.width, table.input
            ))
            .into());
        }
        let meta = CodeMeta {
            height: info.code_height as u32,
            width: info.code_width as u32,
            codebook_size: info.level.quantiser.codebook_size as u32,
            class_names: table.class_names.clone(),
            producer_key: ctx.job.key.clone(),
            source_key: ctx.input_key("table")?.to_string(),
        };
        let mut index = CodeTableIndex {
            format: CODE_TABLE_FORMAT.into(),
            meta: meta.clone(),
            splits: Default::default(),
        };
        let total: u64 = table.splits.values().map(|s| s.rows).sum();
        let mut done = 0;
        for (split, si) in &table.splits {
            let mut writer = CodeShardWriter::new(ctx.out_dir(), split, &meta, cfg.shard_rows);
            let mut hist = vec![0u64; meta.codebook_size as usize];
            for file in &si.files {
                table.for_each_batch(file, cfg.batch_size, |chunk| {
                    let batch = level.batch(&chunk)?;
                    let codes = level
                        .codes(&batch)
                        .map_err(Error::candle("encoding a batch"))?;
                    let n = meta.codes_per_row();
                    let mut row16 = vec![0u16; n];
                    for (i, row) in codes.chunks_exact(n).enumerate() {
                        for (dst, &c) in row16.iter_mut().zip(row) {
                            *dst = c as u16;
                            hist[c as usize] += 1;
                        }
                        writer.push(chunk.ids[i], chunk.labels[i], &row16)?;
                    }
                    done += chunk.len() as u64;
                    ctx.progress(done, total, Some(split.clone()));
                    Ok(())
                })?;
            }
            let (perplexity, unused) = usage(&hist);
            ctx.metric(&format!("{split}.perplexity"), 0, perplexity);
            ctx.metric(&format!("{split}.unused_codes"), 0, unused as f64);
            index.splits.insert(split.clone(), writer.finish()?);
        }
        let path = ctx.out_dir().join("table.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index)?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(())
    }
}
