//! The policies of `sluice enrich`, parsed from the command line.
//!
//! Owns: the spelling of every policy flag and its errors. Invariant: a parse error names the
//! flag's value and lists what is accepted.

use crate::retry::{Jitter, RetryPolicy};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What happens to a record whose key has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// Write the record unchanged (with `--missing-marker FIELD` set to true, if given).
    Keep,
    /// Leave the record out (counted and reported).
    Drop,
    /// Stop with an error naming the line and the key.
    Fail,
}

impl FromStr for OnMissing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(OnMissing::Keep),
            "drop" => Ok(OnMissing::Drop),
            "fail" => Ok(OnMissing::Fail),
            _ => Err(format!("`{s}`: expected keep, drop or fail")),
        }
    }
}

/// What happens to a record that is not valid JSON, not an object, or lacks a key field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnBadRecord {
    Fail,
    Skip,
    DeadLetter(PathBuf),
}

/// What happens to a record whose lookup timed out (or failed after its retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnFailedLookup {
    Fail,
    /// Write the record unenriched.
    Emit,
    Drop,
    DeadLetter(PathBuf),
}

fn with_file(
    values: &[String],
    flag: &str,
    choices: &str,
) -> Result<(String, Option<PathBuf>), String> {
    match values {
        [policy] => match policy.split_once(':') {
            Some(("dead-letter", path)) if !path.is_empty() => {
                Ok(("dead-letter".into(), Some(path.into())))
            }
            _ => Ok((policy.clone(), None)),
        },
        [policy, file] => Ok((policy.clone(), Some(PathBuf::from(file)))),
        _ => Err(format!("{flag} takes {choices}")),
    }
}

impl OnBadRecord {
    /// Parses `fail`, `skip`, `dead-letter FILE` (or `dead-letter:FILE`).
    pub fn parse(values: &[String]) -> Result<Self, String> {
        const CHOICES: &str = "fail, skip or dead-letter FILE";
        match with_file(values, "--on-bad-record", CHOICES)? {
            (p, None) if p == "fail" => Ok(OnBadRecord::Fail),
            (p, None) if p == "skip" => Ok(OnBadRecord::Skip),
            (p, Some(file)) if p == "dead-letter" => Ok(OnBadRecord::DeadLetter(file)),
            (p, _) => Err(format!("--on-bad-record `{p}`: expected {CHOICES}")),
        }
    }
}

impl OnFailedLookup {
    /// Parses `fail`, `emit`, `drop`, `dead-letter FILE` (or `dead-letter:FILE`).
    pub fn parse(flag: &str, values: &[String]) -> Result<Self, String> {
        const CHOICES: &str = "fail, emit, drop or dead-letter FILE";
        match with_file(values, flag, CHOICES)? {
            (p, None) if p == "fail" => Ok(OnFailedLookup::Fail),
            (p, None) if p == "emit" => Ok(OnFailedLookup::Emit),
            (p, None) if p == "drop" => Ok(OnFailedLookup::Drop),
            (p, Some(file)) if p == "dead-letter" => Ok(OnFailedLookup::DeadLetter(file)),
            (p, _) => Err(format!("{flag} `{p}`: expected {CHOICES}")),
        }
    }
}

/// `--retry none | fixed:ATTEMPTS:DELAY | exp:ATTEMPTS:INITIAL:MAX[:JITTER]`.
#[derive(Debug, Clone, PartialEq)]
pub enum RetrySpec {
    None,
    Fixed {
        attempts: u32,
        delay: Duration,
    },
    Exponential {
        attempts: u32,
        initial: Duration,
        max: Duration,
        jitter: Jitter,
    },
}

impl FromStr for RetrySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = |why: String| {
            format!("--retry `{s}`: {why}; expected none, fixed:ATTEMPTS:DELAY or exp:ATTEMPTS:INITIAL:MAX[:none|full|equal|decorrelated]")
        };
        let duration =
            |d: &str| humantime::parse_duration(d).map_err(|e| err(format!("`{d}`: {e}")));
        let attempts = |a: &str| match a.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(err(format!(
                "`{a}` is not a number of attempts (1 or more)"
            ))),
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["none"] => Ok(RetrySpec::None),
            ["fixed", a, d] => Ok(RetrySpec::Fixed {
                attempts: attempts(a)?,
                delay: duration(d)?,
            }),
            ["exp", a, i, m, rest @ ..] if rest.len() <= 1 => {
                let jitter = match rest.first().copied().unwrap_or("none") {
                    "none" => Jitter::None,
                    "full" => Jitter::Full,
                    "equal" => Jitter::Equal,
                    "decorrelated" => Jitter::Decorrelated,
                    j => return Err(err(format!("unknown jitter `{j}`"))),
                };
                Ok(RetrySpec::Exponential {
                    attempts: attempts(a)?,
                    initial: duration(i)?,
                    max: duration(m)?,
                    jitter,
                })
            }
            _ => Err(err("unknown form".into())),
        }
    }
}

impl RetrySpec {
    /// The policy, retrying on errors that `retryable` accepts.
    pub fn policy<O, E>(
        &self,
        retryable: impl Fn(&E) -> bool + Send + Sync + 'static,
    ) -> RetryPolicy<O, E> {
        match *self {
            RetrySpec::None => RetryPolicy::none(),
            RetrySpec::Fixed { attempts, delay } => {
                RetryPolicy::fixed(attempts, delay).on_error(retryable)
            }
            RetrySpec::Exponential {
                attempts,
                initial,
                max,
                jitter,
            } => RetryPolicy::exponential(attempts, initial, max, 2.0, jitter).on_error(retryable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn policies_parse_and_errors_list_the_choices() {
        assert_eq!(OnBadRecord::parse(&v(&["skip"])), Ok(OnBadRecord::Skip));
        assert_eq!(
            OnBadRecord::parse(&v(&["dead-letter", "bad.jsonl"])),
            Ok(OnBadRecord::DeadLetter("bad.jsonl".into()))
        );
        assert_eq!(
            OnFailedLookup::parse("--on-timeout", &v(&["dead-letter:t.jsonl"])),
            Ok(OnFailedLookup::DeadLetter("t.jsonl".into()))
        );
        let e = OnFailedLookup::parse("--on-timeout", &v(&["maybe"])).unwrap_err();
        assert!(e.contains("maybe") && e.contains("emit"), "{e}");
        assert!(
            OnBadRecord::parse(&v(&["dead-letter"])).is_err(),
            "dead-letter needs a file"
        );
        assert_eq!("keep".parse(), Ok(OnMissing::Keep));
    }

    #[test]
    fn retry_specs_parse() {
        assert_eq!("none".parse(), Ok(RetrySpec::None));
        assert_eq!(
            "fixed:3:10ms".parse(),
            Ok(RetrySpec::Fixed {
                attempts: 3,
                delay: Duration::from_millis(10)
            })
        );
        assert_eq!(
            "exp:5:1ms:100ms:full".parse(),
            Ok(RetrySpec::Exponential {
                attempts: 5,
                initial: Duration::from_millis(1),
                max: Duration::from_millis(100),
                jitter: Jitter::Full
            })
        );
        assert!("fixed:0:1ms".parse::<RetrySpec>().is_err());
        assert!("exp:3:1ms"
            .parse::<RetrySpec>()
            .unwrap_err()
            .contains("expected none"));
    }
}
