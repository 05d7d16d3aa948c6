//! What the training stages (`train_vq`, `train_ar`) share: the defaults of
//! their schedule params and the checks of them.

pub fn batch_size() -> usize {
    64
}
pub fn validate_every() -> u64 {
    200
}
pub fn validation_split() -> String {
    "val".into()
}
pub fn validation_rows() -> usize {
    1000
}
pub fn checkpoint_every() -> u64 {
    100
}
pub fn log_every() -> u64 {
    10
}

/// The schedule params of a training stage, for [`check_schedule`].
pub struct Schedule {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub validate_every: u64,
    pub validation_rows: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

/// `(field, message)` for the first param out of range.
pub fn check_schedule(s: Schedule) -> Result<(), (String, String)> {
    let bad = |field: &str, msg: String| Err((format!("params.{field}"), msg));
    if s.steps == 0 {
        return bad("steps", "steps must be at least 1".into());
    }
    if s.batch_size == 0 {
        return bad("batch_size", "batch_size must be at least 1".into());
    }
    if s.lr.is_nan() || s.lr <= 0.0 {
        return bad(
            "optimizer",
            format!("optimizer.lr is {}; it must be positive", s.lr),
        );
    }
    if s.validate_every == 0 || s.checkpoint_every == 0 || s.log_every == 0 {
        return bad(
            "validate_every",
            "validate_every, checkpoint_every and log_every must be at least 1".into(),
        );
    }
    if s.validation_rows == 0 {
        return bad(
            "validation_rows",
            "validation_rows must be at least 1".into(),
        );
    }
    Ok(())
}
