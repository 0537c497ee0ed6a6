//! `KeyTemplate`: the Redis key of a record, from a template such as `user:{user_id}` or
//! `{country}:{user_id}`.
//!
//! Owns: template parsing and rendering. Invariants: a template has at least one field; a
//! rendered key contains every field's value (strings unescaped, numbers and booleans as their
//! text was written); a missing, null or composite field is an error that names the field.
//! `{a.b}` reads field `b` of the object in field `a` when there is no field named `a.b`.

use super::record::Fields;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String, Escape),
}

/// How a field's text goes into the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// As it is (a Redis key).
    None,
    /// Percent-encoded (an HTTP request target).
    Url,
    /// As the content of a JSON string (an HTTP request body).
    Json,
}

/// The byte between an HTTP key's request target and its body (`KeyTemplate::with_body`,
/// `lookup::BODY_SEPARATOR`): a target cannot hold it.
const BODY_SEPARATOR: char = crate::lookup::BODY_SEPARATOR as char;

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    source: String,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {flag} template `{template}`: {reason}. Example: {example}")]
pub struct TemplateError {
    flag: &'static str,
    template: String,
    reason: String,
    example: &'static str,
}

/// Why a record could not be given a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    MissingField(String),
    UnusableField {
        field: String,
        kind: &'static str,
    },
    /// A string field whose text is not valid Unicode (a lone surrogate escape).
    BadString {
        field: String,
        reason: String,
    },
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
            KeyError::BadString { field, reason } => {
                write!(f, "field `{field}` cannot be part of a key: {reason}")
            }
        }
    }
}

/// What a raw JSON value is, by its first byte (the value is valid JSON).
fn kind_of(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Appends the value at `path` in `fields` to `key`: the field of that name, or else, for
/// `a.b`, field `b` of the object in field `a` (and so on down). `field` is the whole path, for
/// errors.
fn append_field(
    key: &mut String,
    fields: &Fields,
    path: &str,
    field: &str,
) -> Result<(), KeyError> {
    if let Some(raw) = fields.get(path) {
        return append_value(key, raw, field);
    }
    let missing = || KeyError::MissingField(field.to_string());
    let (head, rest) = path.split_once('.').ok_or_else(missing)?;
    let outer = fields.get(head).ok_or_else(missing)?;
    if kind_of(outer) != "an object" {
        return Err(missing());
    }
    let inner = Fields::parse(outer).map_err(|e| KeyError::BadString {
        field: field.to_string(),
        reason: string_error(outer, &e),
    })?;
    append_field(key, &inner, rest, field)
}

/// Appends one scalar value: a string unescaped, a number or boolean as written.
fn append_value(key: &mut String, raw: &str, field: &str) -> Result<(), KeyError> {
    match kind_of(raw) {
        // Without escapes, the text between the quotes is the string.
        "a string" if !raw.contains('\\') => key.push_str(&raw[1..raw.len() - 1]),
        "a string" => {
            let s: String = serde_json::from_str(raw).map_err(|e| KeyError::BadString {
                field: field.to_string(),
                reason: string_error(raw, &e),
            })?;
            key.push_str(&s);
        }
        "a number" | "a boolean" => key.push_str(raw),
        kind => {
            return Err(KeyError::UnusableField {
                field: field.to_string(),
                kind,
            })
        }
    }
    Ok(())
}

impl KeyTemplate {
    /// Parses `user:{user_id}`; `{{` and `}}` stand for literal braces.
    pub fn parse(template: &str) -> Result<KeyTemplate, TemplateError> {
        Self::parse_as(template, "--key", "'user:{user_id}'", false)
    }

    /// Parses an HTTP request target, `/users/{user_id}?full=1`: each field's text goes in
    /// percent-encoded (all but `A-Z a-z 0-9 - . _ ~`), so a value cannot change the path.
    pub fn parse_target(template: &str) -> Result<KeyTemplate, TemplateError> {
        Self::parse_as(
            template,
            "--http",
            "'http://127.0.0.1:8080/users/{user_id}'",
            true,
        )
    }

    /// This request target's template followed by a request body's (`--http-body`), after
    /// `BODY_SEPARATOR`: the key then names both, so the cache and coalescing tell two bodies
    /// apart. The body's fields go in as JSON string content (quotes and backslashes escaped);
    /// write its literal braces as `{{` and `}}`. The body needs no field of its own.
    pub fn with_body(mut self, body: &str) -> Result<KeyTemplate, TemplateError> {
        let example = r#"'{{"user":"{user_id}"}}'"#;
        let parsed = Self::parse_parts(body, "--http-body", example, Escape::Json, false)?;
        self.parts.push(Part::Literal(BODY_SEPARATOR.to_string()));
        self.parts.extend(parsed);
        self.source = format!("{} with body {body}", self.source);
        Ok(self)
    }

    /// The parameters of a PostgreSQL query, one template per `$n` (`--params`), each field's
    /// text as it is (the server casts the text to the parameter's type); the key holds them
    /// separated by `postgres::PARAM_SEPARATOR`, a byte a text parameter cannot hold.
    pub fn parse_params(templates: &[String]) -> Result<KeyTemplate, TemplateError> {
        let example = "'{user_id}'";
        let mut parts = vec![];
        for (i, template) in templates.iter().enumerate() {
            if i > 0 {
                parts.push(Part::Literal(
                    (crate::postgres::PARAM_SEPARATOR as char).to_string(),
                ));
            }
            parts.extend(Self::parse_parts(
                template,
                "--params",
                example,
                Escape::None,
                false,
            )?);
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(..))) {
            return Err(TemplateError {
                flag: "--params",
                template: templates.join(" "),
                reason: "no `{field}` in them, so every record would get the same key".into(),
                example,
            });
        }
        Ok(KeyTemplate {
            parts,
            source: templates.join(", "),
        })
    }

    fn parse_as(
        template: &str,
        flag: &'static str,
        example: &'static str,
        url_encoded: bool,
    ) -> Result<KeyTemplate, TemplateError> {
        let escape = if url_encoded {
            Escape::Url
        } else {
            Escape::None
        };
        let parts = Self::parse_parts(template, flag, example, escape, true)?;
        Ok(KeyTemplate {
            parts,
            source: template.to_string(),
        })
    }

    /// The parts of `template`; with `needs_field`, one without a `{field}` is refused.
    fn parse_parts(
        template: &str,
        flag: &'static str,
        example: &'static str,
        escape: Escape,
        needs_field: bool,
    ) -> Result<Vec<Part>, TemplateError> {
        let err = |reason: &str| TemplateError {
            flag,
            template: template.to_string(),
            reason: reason.to_string(),
            example,
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
                    parts.push(Part::Field(field.trim().to_string(), escape));
                }
                '}' => return Err(err("a `}` without its `{`")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if needs_field && !parts.iter().any(|p| matches!(p, Part::Field(..))) {
            return Err(err(
                "no `{field}` in it, so every record would get the same key",
            ));
        }
        Ok(parts)
    }

    /// The template as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The fields the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f, _) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The key of `record`: strings unescaped, numbers and booleans as written in the input
    /// (so `18446744073709551617` stays itself, not a rounded float).
    pub fn render(&self, record: &Fields) -> Result<String, KeyError> {
        let mut key = String::with_capacity(self.source.len() + 16);
        let mut value = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => key.push_str(l),
                Part::Field(f, Escape::None) => append_field(&mut key, record, f, f)?,
                Part::Field(f, escape) => {
                    value.clear();
                    append_field(&mut value, record, f, f)?;
                    match escape {
                        Escape::Url => percent_encode(&mut key, &value),
                        _ => json_escape(&mut key, &value),
                    }
                }
            }
        }
        Ok(key)
    }
}

/// Appends `text` with every byte but RFC 3986's unreserved characters as `%XX`.
fn percent_encode(out: &mut String, text: &str) {
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Appends `text` as the content of a JSON string (without the quotes).
fn json_escape(out: &mut String, text: &str) {
    let quoted = serde_json::to_string(text).expect("a string serializes");
    out.push_str(&quoted[1..quoted.len() - 1]);
}

/// serde_json's error for a string that does not decode, in a user's words: a lone
/// surrogate escape (`\uD800`-`\uDFFF` without its pair) is named as such.
fn string_error(text: &str, e: &serde_json::Error) -> String {
    let lone = text.match_indices("\\u").find_map(|(i, _)| {
        let hex = text.get(i + 2..i + 6)?;
        let unit = u16::from_str_radix(hex, 16).ok()?;
        (0xD800..=0xDFFF)
            .contains(&unit)
            .then(|| format!("\\u{hex}"))
    });
    match lone {
        Some(escape) => format!(
            "it holds the surrogate escape {escape} without its pair, which is not valid \
             Unicode ({e})"
        ),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Fields {
        Fields::parse(&v.to_string()).unwrap()
    }

    fn raw(text: &str) -> Fields {
        Fields::parse(text).unwrap()
    }

    #[test]
    fn a_body_follows_the_target_with_its_fields_json_escaped() {
        let t = KeyTemplate::parse_target("/score/{id}")
            .unwrap()
            .with_body(r#"{{"user":"{name}","n":{n}}}"#)
            .unwrap();
        let r = obj(json!({"id": 7, "name": "a \"b\"", "n": 3}));
        assert_eq!(
            t.render(&r).unwrap(),
            "/score/7\0{\"user\":\"a \\\"b\\\"\",\"n\":3}"
        );
        let fixed = KeyTemplate::parse_target("/s/{id}")
            .unwrap()
            .with_body("{{}}")
            .unwrap();
        assert_eq!(fixed.render(&r).unwrap(), "/s/7\0{}");
    }

    #[test]
    fn request_targets_percent_encode_field_values() {
        let t = KeyTemplate::parse_target("/users/{id}?region={r}").unwrap();
        let r = obj(json!({"id": "a b/c", "r": "é&x"}));
        assert_eq!(t.render(&r).unwrap(), "/users/a%20b%2Fc?region=%C3%A9%26x");
        let err = KeyTemplate::parse_target("/users/")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--http"), "{err}");
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

    #[test]
    fn numbers_keep_their_text_so_large_ids_do_not_collide() {
        let t = KeyTemplate::parse("user:{id}").unwrap();
        let a = t.render(&raw(r#"{"id":18446744073709551616}"#)).unwrap();
        let b = t.render(&raw(r#"{"id":18446744073709551617}"#)).unwrap();
        assert_eq!(a, "user:18446744073709551616");
        assert_eq!(b, "user:18446744073709551617");
        assert_eq!(t.render(&raw(r#"{"id":1.50}"#)).unwrap(), "user:1.50");
        assert_eq!(t.render(&raw(r#"{"id":"\u00e9"}"#)).unwrap(), "user:é");
    }

    #[test]
    fn nested_fields_and_lone_surrogates() {
        let t = KeyTemplate::parse("{user.id}:{user.geo.cc}").unwrap();
        let r = raw(r#"{"user":{"id":7,"geo":{"cc":"NL"}}}"#);
        assert_eq!(t.render(&r).unwrap(), "7:NL");
        // A field literally named `user.id` wins over the path.
        let t = KeyTemplate::parse("{user.id}").unwrap();
        assert_eq!(
            t.render(&raw(r#"{"user.id":1,"user":{"id":2}}"#)).unwrap(),
            "1"
        );
        assert_eq!(
            t.render(&raw(r#"{"user":{"name":2}}"#)).unwrap_err(),
            KeyError::MissingField("user.id".into())
        );
        let e = KeyTemplate::parse("{id}")
            .unwrap()
            .render(&raw(r#"{"id":"\ud800"}"#))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("surrogate escape \\ud800") && e.contains("`id`"),
            "{e}"
        );
    }
}
