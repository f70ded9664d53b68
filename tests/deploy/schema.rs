//! The part of JSON Schema (draft 7) that `values.schema.json` uses — `type`, `properties`,
//! `required`, `additionalProperties`, `enum`, `items`, `minItems`, `minLength`, `minimum`,
//! `maximum`, `pattern` — checked the way `helm install` checks values. An unknown keyword
//! in the schema is an error, so the schema cannot say more than this test checks.

use serde_json::Value;

const KEYWORDS: &[&str] = &[
    "$schema",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "items",
    "minItems",
    "minLength",
    "minimum",
    "maximum",
    "pattern",
];

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every violation of `schema` by `value`, each with its path.
pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        errors.push(format!("{path}: schema is not an object"));
        return;
    };
    for k in s.keys() {
        if !KEYWORDS.contains(&k.as_str()) {
            errors.push(format!(
                "{path}: schema keyword {k:?} is not checked by this test"
            ));
        }
    }
    let actual = type_name(value);
    if let Some(t) = s.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let ok = allowed.contains(&actual) || (actual == "integer" && allowed.contains(&"number"));
        if !ok {
            errors.push(format!("{path}: is {actual}, want {allowed:?}"));
            return;
        }
    }
    if let Some(Value::Array(options)) = s.get("enum") {
        if !options.contains(value) {
            errors.push(format!("{path}: {value} is not one of {options:?}"));
        }
    }
    match value {
        Value::String(text) => {
            if let Some(n) = s.get("minLength").and_then(Value::as_u64) {
                if (text.chars().count() as u64) < n {
                    errors.push(format!("{path}: shorter than {n}"));
                }
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                let re = regex::Regex::new(p).expect("valid pattern");
                if !re.is_match(text) {
                    errors.push(format!("{path}: {text:?} does not match {p}"));
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if s.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m) {
                errors.push(format!("{path}: {x} is below the minimum"));
            }
            if s.get("maximum").and_then(Value::as_f64).is_some_and(|m| x > m) {
                errors.push(format!("{path}: {x} is above the maximum"));
            }
        }
        Value::Array(items) => {
            if s.get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| (items.len() as u64) < m)
            {
                errors.push(format!("{path}: fewer items than allowed"));
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(Value::Array(required)) = s.get("required") {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(format!("{path}.{r}: is required"));
                    }
                }
            }
            for (k, v) in map {
                let sub = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                    (Some(ps), _) => validate(ps, v, &sub, errors),
                    (None, Some(Value::Bool(false))) => errors.push(format!("{sub}: unknown key")),
                    (None, Some(extra @ Value::Object(_))) => validate(extra, v, &sub, errors),
                    (None, _) => {}
                }
            }
        }
        _ => {}
    }
}
