//! `${...}` references: a stage's own params, top-level vars and other
//! stages' params, substituted into params and `cmd` (see the module doc
//! of [`super`]).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::error::SourcePos;

pub(super) struct Resolver<'a> {
    pub(super) own: &'a HashMap<String, Value>,
    pub(super) vars: &'a HashMap<String, (Value, SourcePos)>,
    pub(super) stages: &'a HashMap<String, HashMap<String, Value>>,
    /// A fan-out copy's values (`${matrix.NAME}`).
    pub(super) matrix: &'a HashMap<String, Value>,
}

impl Resolver<'_> {
    pub(super) fn resolve(&self, v: &Value) -> std::result::Result<Value, String> {
        Ok(match v {
            Value::String(s) => self.resolve_str(s)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.resolve(i))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.resolve(v)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }

    fn lookup(&self, name: &str, seen: &mut HashSet<String>) -> std::result::Result<Value, String> {
        if !seen.insert(name.to_string()) {
            return Err(format!("`${{{name}}}` refers to itself"));
        }
        let found = match name.split_once('.') {
            // `${vars.seed}` names the var even where the stage has a param `seed`.
            Some(("vars", var)) => self
                .vars
                .get(var)
                .map(|(v, _)| v.clone())
                .ok_or_else(|| format!("`${{{name}}}`: there is no top-level var `{var}`"))?,
            Some(("matrix", key)) => self
                .matrix
                .get(key)
                .cloned()
                .ok_or_else(|| format!("`${{{name}}}`: the stage's `matrix` has no `{key}`"))?,
            Some((stage, param)) => self
                .stages
                .get(stage)
                .ok_or_else(|| format!("`${{{name}}}`: there is no stage `{stage}`"))?
                .get(param)
                .ok_or_else(|| format!("`${{{name}}}`: stage `{stage}` has no param `{param}`"))?
                .clone(),
            None => match (self.own.get(name), self.vars.get(name)) {
                (Some(v), _) => v.clone(),
                (None, Some((v, _))) => v.clone(),
                (None, None) => {
                    return Err(format!(
                        "`${{{name}}}` is neither a param of this stage nor a top-level var"
                    ));
                }
            },
        };
        // One level of indirection is allowed (a param that is itself `${var}`).
        match &found {
            Value::String(s) if s.contains("${") && !s.contains("$${") => {
                self.resolve_str_seen(s, seen)
            }
            _ => Ok(found),
        }
    }

    fn resolve_str(&self, s: &str) -> std::result::Result<Value, String> {
        self.resolve_str_seen(s, &mut HashSet::new())
    }

    fn resolve_str_seen(
        &self,
        s: &str,
        seen: &mut HashSet<String>,
    ) -> std::result::Result<Value, String> {
        if !s.contains("${") {
            return Ok(Value::String(s.to_string()));
        }
        // Whole-string reference keeps the value's type.
        if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
            && !inner.contains(['{', '}', '$'])
            && !s.starts_with("$${")
        {
            return self.lookup(inner.trim(), seen);
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            if i > 0 && rest.as_bytes()[i - 1] == b'$' {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "unclosed `${` (write `$${` for a literal `${`)".to_string())?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err("empty reference `${}`".into());
            }
            let mut branch = seen.clone();
            match self.lookup(name, &mut branch)? {
                Value::String(v) => out.push_str(&v),
                Value::Null => return Err(format!("`${{{name}}}` is null")),
                other => out.push_str(&other.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    }
}
