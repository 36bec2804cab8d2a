//! A customer record sent through the API: JSON in the form of one policy-file
//! customer, read into the policy's raw model, every problem named by its field path
//! (`subscriptions[0].plan`).
//!
//! serde stops at the first error of a whole record without saying where it is, so a
//! record that does not fit the schema is read again part by part (each subscription,
//! grant and override on its own), as policy files are.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::policy::raw;

/// One problem with a record: the field path (empty for the record as a whole) and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            field: field.into(),
            message: message.into(),
        }
    }
}

const KEYS: &[&str] = &["id", "name", "subscriptions", "grants", "overrides"];
const LISTS: &[&str] = &["subscriptions", "grants", "overrides"];

/// Fills or checks the record's `id` against the id in the path.
pub fn with_id(mut v: Value, id: &str) -> Result<Value, Vec<Problem>> {
    let Value::Object(obj) = &mut v else {
        return Err(vec![Problem::new(
            "",
            "expected a JSON object: one customer record as in a policy file",
        )]);
    };
    match obj.get("id") {
        None => {
            obj.insert("id".into(), Value::String(id.to_string()));
        }
        Some(Value::String(s)) if s == id => {}
        Some(other) => {
            return Err(vec![Problem::new(
                "id",
                format!("the record's id {other} differs from the id in the path `{id}`"),
            )]);
        }
    }
    Ok(v)
}

/// Reads a record, or says every problem it can place.
pub fn parse(v: &Value) -> Result<raw::Customer, Vec<Problem>> {
    match serde_json::from_value::<raw::Customer>(v.clone()) {
        Ok(c) => Ok(c),
        Err(whole) => {
            let mut problems = locate(v);
            if problems.is_empty() {
                problems.push(Problem::new("", whole.to_string()));
            }
            Err(problems)
        }
    }
}

fn locate(v: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let Value::Object(obj) = v else {
        return vec![Problem::new("", "expected a JSON object")];
    };
    for (k, value) in obj {
        if !KEYS.contains(&k.as_str()) {
            let hint = crate::policy::compile::did_you_mean(k, KEYS.iter().copied());
            out.push(Problem::new(k, format!("unknown field `{k}`{hint}")));
            continue;
        }
        match k.as_str() {
            "id" | "name" if !(value.is_string() || k == "name" && value.is_null()) => {
                out.push(Problem::new(k, format!("`{k}` must be a string")));
            }
            "subscriptions" => items::<raw::Subscription>(k, value, &mut out),
            "grants" => items::<raw::CustomerGrant>(k, value, &mut out),
            "overrides" => items::<raw::Override>(k, value, &mut out),
            _ => {}
        }
    }
    out
}

fn items<T: DeserializeOwned>(key: &str, v: &Value, out: &mut Vec<Problem>) {
    debug_assert!(LISTS.contains(&key));
    let Value::Array(list) = v else {
        out.push(Problem::new(key, format!("`{key}` must be a list")));
        return;
    };
    for (i, item) in list.iter().enumerate() {
        if let Err(e) = serde_json::from_value::<T>(item.clone()) {
            let msg = e.to_string();
            let mut field = format!("{key}[{i}]");
            if let Some(name) = named_field(&msg) {
                field.push('.');
                field.push_str(name);
            }
            out.push(Problem::new(field, msg));
        }
    }
}

/// The field a serde message names (`unknown field `x``, `missing field `x``).
fn named_field(msg: &str) -> Option<&str> {
    let rest = msg
        .strip_prefix("unknown field `")
        .or_else(|| msg.strip_prefix("missing field `"))?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn problems_name_the_field() {
        let v = json!({"id": "a", "subscriptions": [{"plan": "pro", "strts": "2026-01-01"}], "colour": 1});
        let p = parse(&v).unwrap_err();
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"colour"), "{p:?}");
        assert!(fields.contains(&"subscriptions[0].strts"), "{p:?}");
    }

    #[test]
    fn the_path_id_fills_or_must_match_the_record() {
        assert_eq!(with_id(json!({}), "a").unwrap()["id"], "a");
        assert!(with_id(json!({"id": "a"}), "a").is_ok());
        let p = with_id(json!({"id": "b"}), "a").unwrap_err();
        assert_eq!(p[0].field, "id");
        assert!(with_id(json!([]), "a").is_err());
    }
}
