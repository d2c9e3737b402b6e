//! Redaction of secrets from log lines before they leave the till
//! (`log_redact_patterns`). A pattern's match is replaced by `[REDACTED]`;
//! when the pattern has a group named `secret`, only that group is, so
//! `password=hunter2` reads `password=[REDACTED]`.

use regex::{Captures, Regex, RegexBuilder};
use std::borrow::Cow;

pub const REDACTED: &str = "[REDACTED]";

/// The patterns a till redacts unless configured otherwise.
pub const DEFAULT_PATTERNS: &[&str] = &[
    // Payment card numbers: 15 to 19 digits, grouped by spaces or dashes or not.
    r"\b(?:\d[ -]?){14,18}\d\b",
    // password=…, passwd: …, secret=…, token=…, api_key=…
    r"(?i)\b(?:password|passwd|pwd|secret|token|api[_-]?key)\s*[=:]\s*(?P<secret>[^\s,;&]+)",
    // Authorization: Bearer …
    r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/=-]+)",
];

/// Largest compiled pattern accepted (the `regex` crate's own measure).
const MAX_COMPILED_BYTES: usize = 1024 * 1024;

pub struct Redactor {
    patterns: Vec<Regex>,
}

impl Redactor {
    /// Compiles `patterns`; an error names the pattern that does not.
    pub fn new(patterns: &[String]) -> Result<Redactor, String> {
        let patterns = patterns
            .iter()
            .map(|pattern| {
                RegexBuilder::new(pattern)
                    .size_limit(MAX_COMPILED_BYTES)
                    .build()
                    .map_err(|e| {
                        format!(
                            "`{pattern}` is not a valid pattern: {}",
                            e.to_string().replace('\n', " ")
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Redactor { patterns })
    }

    /// `line` with every match redacted.
    pub fn redact<'a>(&self, line: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(line);
        for pattern in &self.patterns {
            if let Cow::Owned(changed) = pattern.replace_all(&out, |caps: &Captures| {
                let whole = caps.get(0).map_or("", |m| m.as_str());
                match (caps.get(0), caps.name("secret")) {
                    (Some(all), Some(secret)) => format!(
                        "{}{REDACTED}{}",
                        &whole[..secret.start() - all.start()],
                        &whole[secret.end() - all.start()..]
                    ),
                    _ => REDACTED.to_string(),
                }
            }) {
                out = Cow::Owned(changed);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Redactor {
        Redactor::new(
            &DEFAULT_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn the_default_patterns_redact_card_numbers_passwords_and_tokens() {
        let redactor = defaults();
        for (line, expected) in [
            (
                "paid with 4111 1111 1111 1111 ok",
                "paid with [REDACTED] ok",
            ),
            ("card=5500-0000-0000-0004;", "card=[REDACTED];"),
            ("pan 378282246310005 amex", "pan [REDACTED] amex"),
            (
                "login user=ann password=hunter2 from 10.0.0.4",
                "login user=ann password=[REDACTED] from 10.0.0.4",
            ),
            ("db PASSWD: s3cr3t!", "db PASSWD: [REDACTED]"),
            ("api_key=abc123&x=1", "api_key=[REDACTED]&x=1"),
            (
                "Authorization: Bearer eyJhbGciOi.J9.sig-_x",
                "Authorization: Bearer [REDACTED]",
            ),
            // Left alone: amounts, times, short numbers, a 13-digit epoch.
            (
                "total 1234.56 at 1733150000000 till 7",
                "total 1234.56 at 1733150000000 till 7",
            ),
            ("no secrets here", "no secrets here"),
        ] {
            assert_eq!(redactor.redact(line), expected, "{line}");
        }
    }

    #[test]
    fn configured_patterns_replace_the_defaults() {
        let redactor = Redactor::new(&[r"loyalty-\d+".to_string()]).unwrap();
        assert_eq!(
            redactor.redact("loyalty-998877 password=x"),
            "[REDACTED] password=x"
        );
        let none = Redactor::new(&[]).unwrap();
        assert_eq!(none.redact("password=x"), "password=x");
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let error = Redactor::new(&["ok".into(), "(unclosed".into()])
            .err()
            .unwrap();
        assert!(
            error.starts_with("`(unclosed` is not a valid pattern"),
            "{error}"
        );
    }
}
