//! Kubernetes label selectors (`a=b,c!=d,e in (f,g),!h`), as the API server parses them.

use std::collections::BTreeMap;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Parses the `labelSelector` query parameter. The error text follows the API server's
    /// wording closely enough for a client to show it.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut out = Vec::new();
        for term in split_top_level(text)? {
            let term = term.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err("found ',', expected: identifier after ','".into());
            }
            out.push(parse_term(term)?);
        }
        Ok(Selector(out))
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas that are not inside `( … )`.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| "found ')', expected: identifier".to_string())?;
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("found '', expected: ')'".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if valid_key(k) {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if valid_value(v) {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value: {v:?}"))
    }
}

fn set(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("found '{}', expected: '('", text.trim()))?;
    inner.split(',').map(value).collect()
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key(k)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key(k)?, value(v)?));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(Requirement::Equals(key(k)?, value(v)?));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(Requirement::Equals(key(k)?, value(v)?));
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let k = words.next().unwrap_or_default();
    match words.next().map(str::trim_start) {
        None => Ok(Requirement::Exists(key(k)?)),
        Some(rest) => {
            if let Some(s) = rest.strip_prefix("notin") {
                Ok(Requirement::NotIn(key(k)?, set(s)?))
            } else if let Some(s) = rest.strip_prefix("in") {
                Ok(Requirement::In(key(k)?, set(s)?))
            } else {
                Err(format!(
                    "found '{rest}', expected: in, notin, =, ==, !=, or end of string"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_sets_and_existence() {
        let l = labels(&[("kubernetes.io/service-name", "pg-r"), ("cnpg.io/cluster", "pg")]);
        for (sel, want) in [
            ("", true),
            ("kubernetes.io/service-name=pg-r", true),
            ("kubernetes.io/service-name==pg-r", true),
            ("kubernetes.io/service-name!=pg-r", false),
            ("kubernetes.io/service-name in (pg-rw,pg-r)", true),
            ("kubernetes.io/service-name notin (pg-rw, pg-r)", false),
            ("cnpg.io/cluster=pg,kubernetes.io/service-name=pg-r", true),
            ("cnpg.io/cluster", true),
            ("!cnpg.io/cluster", false),
            ("!other", true),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        assert_eq!(
            Selector::parse("a=b,").unwrap_err(),
            "found ',', expected: identifier after ','"
        );
        assert!(Selector::parse("a in (b").is_err());
        assert!(Selector::parse("a=b c").is_err());
    }
}
