//! `-S PATH=VALUE` from the command line (DVC's `exp run -S` spelling):
//! `vars.NAME=VALUE` sets a var the file declares; `STAGE.PARAM=VALUE` or
//! `STAGE.PARAM.KEY...=VALUE` sets a stage's param (nested keys are made
//! where the file has none). VALUE is read as YAML: `64`, `0.9`, `ff`,
//! `[1, 2]`, `{a: 1}`. Overrides replace the file's values before `${...}`
//! references resolve and before the kind checks the stage, so an
//! override is checked like the YAML it stands for; an error about an
//! overridden param names the argument.

use serde_json::Value;

/// One `-S PATH=VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// `vars`, NAME or STAGE, PARAM, KEY...
    pub path: Vec<String>,
    pub value: Value,
    /// The argument as given, for messages and the run's record.
    pub text: String,
}

impl Override {
    /// Reads `PATH=VALUE`; the error says what is wrong with the argument.
    pub fn parse(arg: &str) -> Result<Override, String> {
        let Some((path, value)) = arg.split_once('=') else {
            return Err(format!(
                "`{arg}`: give PATH=VALUE, e.g. `vq1.quantiser.codebook_size=64` or `vars.seed=3`"
            ));
        };
        let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!(
                "`{arg}`: the path has an empty part; write STAGE.PARAM[.KEY...] or vars.NAME"
            ));
        }
        if path.len() < 2 {
            return Err(format!(
                "`{arg}`: `{}` names no param; write STAGE.PARAM[.KEY...] or vars.NAME",
                path.join(".")
            ));
        }
        if path[0] == "vars" && path.len() != 2 {
            return Err(format!("`{arg}`: a var is `vars.NAME`"));
        }
        let value = match serde_saphyr::from_str::<Value>(value) {
            Ok(v) => v,
            Err(e) => return Err(format!("`{arg}`: the value is not YAML: {e}")),
        };
        Ok(Override {
            path,
            value,
            text: arg.to_string(),
        })
    }

    /// Whether this override sets (part of) `stage`'s top-level `param`.
    pub fn sets(&self, stage: &str, param: &str) -> bool {
        self.path[0] == stage && self.path.get(1).is_some_and(|p| p == param)
    }

    /// `target` with the value set at `keys` (the path below the top-level
    /// param), making objects where there are none; an error names the
    /// key that holds something other than an object.
    pub fn set_in(&self, target: &mut Value, keys: &[String]) -> Result<(), String> {
        let Some((last, above)) = keys.split_last() else {
            *target = self.value.clone();
            return Ok(());
        };
        let mut at = target;
        for (i, k) in above.iter().enumerate() {
            let Value::Object(m) = at else {
                return Err(self.not_an_object(&keys[..i]));
            };
            at = m
                .entry(k.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        match at {
            Value::Object(m) => {
                m.insert(last.clone(), self.value.clone());
                Ok(())
            }
            _ => Err(self.not_an_object(above)),
        }
    }

    fn not_an_object(&self, keys: &[String]) -> String {
        let mut at = self.path[..2].to_vec();
        at.extend(keys.iter().cloned());
        format!(
            "`{}`: `{}` is not a map in the pipeline, so it has no key to set",
            self.text,
            at.join(".")
        )
    }
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Override::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_yaml_values_are_read() {
        let o = Override::parse("vq1.quantiser.codebook_size=64").unwrap();
        assert_eq!(o.path, ["vq1", "quantiser", "codebook_size"]);
        assert_eq!(o.value, Value::from(64));
        assert_eq!(Override::parse("vars.kind=msp").unwrap().value, "msp");
        assert_eq!(
            Override::parse("a.b=[1, 2]").unwrap().value,
            serde_json::json!([1, 2])
        );
        assert_eq!(Override::parse("a.b=x=y").unwrap().value, "x=y");
    }

    #[test]
    fn bad_arguments_say_what_to_write() {
        for (arg, says) in [
            ("steps", "give PATH=VALUE"),
            ("vq1=3", "names no param"),
            ("vq1..steps=3", "empty part"),
            ("vars.a.b=1", "`vars.NAME`"),
            ("a.b=[1", "not YAML"),
        ] {
            let e = Override::parse(arg).unwrap_err();
            assert!(e.contains(says), "{arg}: {e}");
        }
    }

    #[test]
    fn nested_keys_are_made_and_non_maps_refused() {
        let o = Override::parse("s.quantiser.decay=0.9").unwrap();
        let mut v = serde_json::json!({"codebook_size": 8});
        o.set_in(&mut v, &o.path[2..]).unwrap();
        assert_eq!(v, serde_json::json!({"codebook_size": 8, "decay": 0.9}));
        let mut s = Value::from("ff");
        let deep = Override::parse("s.decoder.kind.x=1").unwrap();
        let e = deep.set_in(&mut s, &deep.path[2..]).unwrap_err();
        assert!(e.contains("`s.decoder` is not a map"), "{e}");
    }
}
