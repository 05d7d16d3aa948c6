//! The `bound` stage: the hierarchical upper bound on the bits per
//! dimension of the image,
//! `(-log2 p(x|z1) - log2 p(z1|z2) - ... - log2 p(zL|class)) / (H*W*C)`,
//! from the validation measures of the trained AR models (valid because each
//! code map z is a deterministic function of x), next to a flat baseline's
//! bits/dim when one is given.
//!
//! ```yaml
//! bound:
//!   kind: bound
//!   inputs: {decoder1: decoder1, decoder2: decoder2, prior: prior, baseline: baseline}   # baseline optional
//! ```
//!
//! `decoder1` models the pixels given the level-1 codes, `decoderN` the
//! level-(N-1) codes given the level-N codes, `prior` the top codes. The
//! stage checks that they form that chain (each decoder conditioned on the
//! code table the next model models, by stage key) and that every model was
//! measured on the same validation rows (by ids digest). Since the mean of
//! a sum is the sum of the means, the bound on those rows is the sum of each
//! model's mean bits per image.
//!
//! Output: `bound.json` (the terms, the bound, the baseline); metrics
//! `bound.bits_per_dim`, `bound.<input>` (each term, in bits per image
//! dimension) and `baseline.bits_per_dim`.

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::Deserialize;
use serde_json::json;

use crate::error::Error;
use crate::hierarchy::{self, decoder_names};
use crate::models::ar::{ArInfo, read_info};

pub struct Bound;

/// Inputs besides the decoders.
const OTHERS: &[&str] = &["prior", "baseline"];

/// The part of a train_ar stage's `metrics.json` the bound reads.
#[derive(Debug, Deserialize)]
struct Measured {
    bits_per_image: f64,
    validation: ValidationRows,
}

#[derive(Debug, PartialEq, Deserialize)]
struct ValidationRows {
    split: String,
    rows: u64,
    ids_digest: String,
}

/// One input: its name, what it models, what it measured.
struct Term {
    name: String,
    info: ArInfo,
    measured: Measured,
}

impl StageKind for Bound {
    fn name(&self) -> &'static str {
        "bound"
    }

    fn version(&self) -> u32 {
        1
    }

    fn device_dependent(&self) -> bool {
        false
    }

    fn headline_metrics(&self) -> &'static [&'static str] {
        &["bound.bits_per_dim", "baseline.bits_per_dim"]
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let err = |m: String| ParamError::new("inputs", m);
        if !stage.inputs.contains_key("prior") {
            return Err(err(
                "bound needs `inputs: {decoder1: AR_STAGE, ..., prior: AR_STAGE}`".into(),
            ));
        }
        decoder_names("bound", stage.inputs.keys().cloned(), OTHERS, true).map_err(err)?;
        if let Some(k) = stage.params.keys().next() {
            return Err(ParamError::new(
                format!("params.{k}"),
                "bound takes no params",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let names = decoder_names("bound", ctx.job.inputs.keys().cloned(), OTHERS, true)
            .map_err(Error::Params)?;
        let load = |name: &str| -> Result<Term, StageError> {
            let dir = ctx.input(name)?;
            let path = dir.join("metrics.json");
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let measured: Measured = serde_json::from_slice(&bytes).map_err(|e| {
                Error::data(&path, None, format!("not a train_ar stage's metrics: {e}"))
            })?;
            Ok(Term {
                name: name.to_string(),
                info: read_info(dir)?,
                measured,
            })
        };
        let mut chain: Vec<Term> = names.iter().map(|n| load(n)).collect::<Result<_, _>>()?;
        chain.push(load("prior")?);
        let baseline = match ctx.job.inputs.contains_key("baseline") {
            true => Some(load("baseline")?),
            false => None,
        };
        check_chain(&chain, baseline.as_ref())?;

        let image = &chain[0].info;
        let dims = image.values_per_row() as f64;
        let total_bits: f64 = chain.iter().map(|t| t.measured.bits_per_image).sum();
        let bound = total_bits / dims;
        let mut terms = serde_json::Map::new();
        for t in &chain {
            let v = t.measured.bits_per_image / dims;
            ctx.metric(&format!("bound.{}", t.name), 0, v);
            terms.insert(t.name.clone(), json!(v));
            eprintln!("{:>10}: {v:.4} bits per image dimension", t.name);
        }
        ctx.metric("bound.bits_per_dim", 0, bound);
        eprintln!("{:>10}: {bound:.4} bits/dim", "bound");
        let mut out = json!({
            "bits_per_dim": bound,
            "terms": terms,
            "image_dims": dims,
            "validation": {
                "split": chain[0].measured.validation.split,
                "rows": chain[0].measured.validation.rows,
            },
        });
        if let Some(b) = &baseline {
            let v = b.measured.bits_per_image / dims;
            ctx.metric("baseline.bits_per_dim", 0, v);
            out["baseline_bits_per_dim"] = json!(v);
            eprintln!("{:>10}: {v:.4} bits/dim", "baseline");
        }
        let path = ctx.out_dir().join("bound.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(())
    }
}

/// Pixels -> decoder1 -> codes1 -> decoder2 -> ... -> prior, all measured
/// on the same rows; the baseline models the same pixels.
fn check_chain(chain: &[Term], baseline: Option<&Term>) -> Result<(), Error> {
    let links: Vec<(&str, &ArInfo)> = chain.iter().map(|t| (t.name.as_str(), &t.info)).collect();
    hierarchy::check_chain(&links)?;
    let first = &chain[0];
    let bad = |m: String| Err(Error::Params(m));
    let mut all: Vec<&Term> = chain.iter().collect();
    if let Some(b) = baseline {
        if b.info.target_key != first.info.target_key || b.info.condition.is_some() {
            return bad(format!(
                "inputs.{}: the baseline must model the same pixel table as `{}` (`table` the same stage) with no code map",
                b.name, first.name
            ));
        }
        all.push(b);
    }
    for t in &all[1..] {
        if t.measured.validation != first.measured.validation {
            return bad(format!(
                "inputs.{}: measured on other validation rows than `{}` ({} rows of `{}` vs {} rows of `{}`); give every AR stage the same `validation_split` and `validation_rows`",
                t.name,
                first.name,
                t.measured.validation.rows,
                t.measured.validation.split,
                first.measured.validation.rows,
                first.measured.validation.split
            ));
        }
    }
    Ok(())
}
