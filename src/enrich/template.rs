//! `KeyTemplate`: the Redis key of a record, from a template such as `user:{user_id}` or
//! `{country}:{user_id}`.
//!
//! Owns: template parsing and rendering. Invariants: a template has at least one field; a
//! rendered key contains every field's value (strings as they are, numbers and booleans in
//! their JSON form); a missing, null or composite field is an error that names the field.

use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    source: String,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --key template `{template}`: {reason}. Example: 'user:{{user_id}}'")]
pub struct TemplateError {
    template: String,
    reason: String,
}

/// Why a record could not be given a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    MissingField(String),
    UnusableField { field: String, kind: &'static str },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::MissingField(field) => write!(f, "field `{field}` is missing"),
            KeyError::UnusableField { field, kind } => {
                write!(
                    f,
                    "field `{field}` is {kind}; a key needs a string, number or boolean"
                )
            }
        }
    }
}

impl KeyTemplate {
    /// Parses `user:{user_id}`; `{{` and `}}` stand for literal braces.
    pub fn parse(template: &str) -> Result<KeyTemplate, TemplateError> {
        let err = |reason: &str| TemplateError {
            template: template.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = vec![];
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') => return Err(err("`{` inside a field name")),
                            Some(c) => field.push(c),
                            None => return Err(err("a `{` is not closed")),
                        }
                    }
                    if field.trim().is_empty() {
                        return Err(err("an empty field name `{}`"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field.trim().to_string()));
                }
                '}' => return Err(err("a `}` without its `{`")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(err(
                "no `{field}` in it, so every record would get the same key",
            ));
        }
        Ok(KeyTemplate {
            parts,
            source: template.to_string(),
        })
    }

    /// The fields the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The key of `record`.
    pub fn render(&self, record: &Map<String, Value>) -> Result<String, KeyError> {
        let mut key = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(l) => key.push_str(l),
                Part::Field(f) => match record.get(f) {
                    None => return Err(KeyError::MissingField(f.clone())),
                    Some(Value::String(s)) => key.push_str(s),
                    Some(Value::Number(n)) => key.push_str(&n.to_string()),
                    Some(Value::Bool(b)) => key.push_str(if *b { "true" } else { "false" }),
                    Some(Value::Null) => {
                        return Err(KeyError::UnusableField {
                            field: f.clone(),
                            kind: "null",
                        })
                    }
                    Some(Value::Array(_)) => {
                        return Err(KeyError::UnusableField {
                            field: f.clone(),
                            kind: "an array",
                        })
                    }
                    Some(Value::Object(_)) => {
                        return Err(KeyError::UnusableField {
                            field: f.clone(),
                            kind: "an object",
                        })
                    }
                },
            }
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_one_or_more_fields() {
        let t = KeyTemplate::parse("{country}:{user_id}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["country", "user_id"]);
        let r = obj(json!({"country": "NL", "user_id": 7}));
        assert_eq!(t.render(&r).unwrap(), "NL:7");
        let t = KeyTemplate::parse("user:{user_id}:{{x}}").unwrap();
        assert_eq!(
            t.render(&obj(json!({"user_id": "u1"}))).unwrap(),
            "user:u1:{x}"
        );
    }

    #[test]
    fn bad_templates_and_records_say_what_is_wrong() {
        assert!(KeyTemplate::parse("user:")
            .unwrap_err()
            .to_string()
            .contains("no `{field}`"));
        assert!(KeyTemplate::parse("user:{id").is_err());
        assert!(KeyTemplate::parse("user:{}").is_err());
        let t = KeyTemplate::parse("user:{user_id}").unwrap();
        assert_eq!(
            t.render(&obj(json!({"id": 1}))).unwrap_err().to_string(),
            "field `user_id` is missing"
        );
        assert!(t
            .render(&obj(json!({"user_id": null})))
            .unwrap_err()
            .to_string()
            .contains("null"));
    }
}
