//! The hierarchy as stages see it: AR models given as inputs `decoder1` ..
//! `decoderN` and `prior`, and the checks that they form one chain
//! (pixels <- decoder1 <- level-1 codes <- decoder2 <- ... <- prior), by the
//! stage keys each model recorded in its `ar.json`. `bound` and `sample`
//! read their inputs through here.

use crate::data::level_table::InputKind;
use crate::error::Error;
use crate::models::ar::ArInfo;

/// The decoder inputs `decoder1..decoderN` in order (none is allowed when
/// `decoders_required` is false); `others` are the kind's other inputs. An
/// error names the input that does not belong or the gap.
pub fn decoder_names(
    kind: &str,
    inputs: impl Iterator<Item = String>,
    others: &[&str],
    decoders_required: bool,
) -> Result<Vec<String>, String> {
    let mut numbers = Vec::new();
    for name in inputs {
        if others.contains(&name.as_str()) {
            continue;
        }
        match name
            .strip_prefix("decoder")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n >= 1 => numbers.push(n),
            _ => {
                return Err(format!(
                    "{kind} has no input `{name}`; its inputs are decoder1, decoder2, ... (one per level) and {}",
                    others.join(", ")
                ));
            }
        }
    }
    numbers.sort();
    if (decoders_required && numbers.is_empty())
        || numbers.iter().enumerate().any(|(i, &n)| n != i + 1)
    {
        return Err(format!(
            "{kind} needs decoder1..decoderN without gaps (one AR decoder per level), got {numbers:?}"
        ));
    }
    Ok(numbers.iter().map(|n| format!("decoder{n}")).collect())
}

/// `chain`: (input name, model) from decoder1 up to the prior. The bottom
/// models pixels, each decoder is conditioned on the codes the next model
/// models, and the top has no code map.
pub fn check_chain(chain: &[(&str, &ArInfo)]) -> Result<(), Error> {
    check_links(chain)?;
    let (top, t) = chain[chain.len() - 1];
    if t.condition.is_some() {
        return Err(Error::Params(format!(
            "inputs.{top}: the prior is conditioned on a code map; the top of the chain models the top codes given the class only"
        )));
    }
    Ok(())
}

/// The links of a chain (bottom first): the bottom model models pixels and
/// each decoder is conditioned on the codes the model above it models.
pub fn check_links(chain: &[(&str, &ArInfo)]) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Params(m));
    let Some(&(first, info)) = chain.first() else {
        return bad("no AR model given".into());
    };
    if !matches!(info.target, InputKind::Pixels { .. }) {
        return bad(format!(
            "inputs.{first}: models codes; the bottom of the chain (decoder1, or the prior alone) must model the pixels"
        ));
    }
    for pair in chain.windows(2) {
        let ((lower, l), (upper, u)) = (pair[0], pair[1]);
        if l.condition_key.as_deref() != Some(u.target_key.as_str()) {
            return bad(format!(
                "inputs.{lower}: is not conditioned on the codes that `{upper}` models; the decoder of each level must take as `condition` the code table the next model has as `table`"
            ));
        }
    }
    Ok(())
}
