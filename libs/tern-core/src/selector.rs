//! Label selectors, as Kubernetes writes them: requirements separated by commas, all of which a
//! device's labels must meet. `site=berlin` (or `==`), `env!=prod`, `camera` (has the label),
//! `!legacy` (has not), `tier in (a,b)`, `tier notin (a,b)`.

use std::collections::BTreeMap;

use crate::ValidationError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(requirement(part)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b=c`).
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn requirement(part: &str) -> Result<Requirement, ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(
            "selector",
            format!(
                "{why} in {part:?}: expected key=value, key!=value, key, !key, key in (a,b) or key notin (a,b)"
            ),
        )
    };
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "=!(),".contains(c)) {
            Err(bad("an invalid label key"))
        } else {
            Ok(k.to_string())
        }
    };
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(key(k)?, v.trim().to_string()));
    }
    for (word, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = part.split_once(word) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| bad("a set must be in parentheses"))?;
            let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
            return Ok(if negated {
                Requirement::NotIn(key(k)?, values)
            } else {
                Requirement::In(key(k)?, values)
            });
        }
    }
    match part.strip_prefix('!') {
        Some(k) => Ok(Requirement::Absent(key(k)?)),
        None => Ok(Requirement::Exists(key(part)?)),
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
    fn every_requirement_kind_selects_as_kubernetes_does() {
        let berlin_cam = labels(&[("site", "berlin"), ("camera", "yes"), ("tier", "a")]);
        let paris = labels(&[("site", "paris"), ("env", "prod"), ("tier", "c")]);
        for (selector, expected) in [
            ("", [true, true]),
            ("site=berlin", [true, false]),
            ("site==paris", [false, true]),
            ("env!=prod", [true, false]),
            ("camera", [true, false]),
            ("!camera", [false, true]),
            ("tier in (a, b)", [true, false]),
            ("tier notin (a,b)", [false, true]),
            ("site=berlin,camera,tier in (a,c)", [true, false]),
        ] {
            let parsed = Selector::parse(selector).expect(selector);
            assert_eq!(
                [parsed.matches(&berlin_cam), parsed.matches(&paris)],
                expected,
                "{selector}"
            );
        }
    }

    #[test]
    fn malformed_selectors_name_the_field() {
        for bad in ["tier in a,b", "=x", "a b", "!"] {
            let err = Selector::parse(bad).expect_err(bad);
            assert_eq!(err.field, "selector");
        }
    }
}
