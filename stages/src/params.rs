//! Stage params -> a kind's typed config, with errors that name the param.

use pipeline::ParamError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserialises `params`; an error names the field and the message, the field being
/// the param path's first part (`params.source`) for the spec's position
/// lookup, the message naming the whole path (`params: source.train: ...`).
pub fn parse<T: DeserializeOwned>(
    params: &serde_json::Map<String, Value>,
) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(Value::Object(params.clone())).map_err(|e| {
        let path = e.path().to_string();
        let first = path.split(['.', '[']).next().unwrap_or("").to_string();
        let field = if first.is_empty() || first == "?" {
            "kind".to_string()
        } else {
            format!("params.{first}")
        };
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        ParamError::new(field, format!("params: {at}{}", e.into_inner()))
    })
}

/// The job's params as an object (absent params are an empty one).
pub fn object(params: &Value) -> serde_json::Map<String, Value> {
    match params {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    }
}

/// `params` as the kind reads them: parsed into `T`, every default applied,
/// and written back (the stage key and the registry hold this).
pub fn resolve<T: DeserializeOwned + Serialize>(
    params: &serde_json::Map<String, Value>,
) -> Result<serde_json::Map<String, Value>, ParamError> {
    let typed: T = parse(params)?;
    match serde_json::to_value(&typed) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ParamError::new(
            "kind",
            format!("internal: params resolve to {other}, not an object"),
        )),
        Err(e) => Err(ParamError::new(
            "kind",
            format!("internal: writing the resolved params: {e}"),
        )),
    }
}
