//! The local API's line format, statsd-like, one report per line:
//!
//! ```text
//! NAME:N|c     add N (a non-negative integer) to the count of NAME
//! NAME|c       add 1
//! NAME:X|v     a value X (a finite number) of NAME
//! ```
//!
//! NAME is a valid signal name ([`valid_name`]) that the agent does not
//! report itself ([`AGENT_SIGNALS`]).

use posfleet_proto::signals::{AGENT_SIGNALS, valid_name};

/// One report of the program.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Count { name: String, n: u64 },
    Value { name: String, value: f64 },
}

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("`{0}` is not NAME:N|c, NAME|c or NAME:X|v")]
    Malformed(String),
    #[error(
        "`{0}` is not a signal name: 1 to 64 characters of a-z, 0-9 and _, starting with a letter"
    )]
    InvalidName(String),
    #[error("`{0}` is reported by the agent itself")]
    Reserved(String),
    #[error("`{0}` is not a count: a non-negative integer")]
    InvalidCount(String),
    #[error("`{0}` is not a value: a finite number")]
    InvalidValue(String),
}

/// Parses one line (surrounding whitespace ignored).
pub fn parse_line(line: &str) -> Result<Report, LineError> {
    let line = line.trim();
    let malformed = || LineError::Malformed(line.to_string());
    let (head, kind) = line.rsplit_once('|').ok_or_else(malformed)?;
    let (name, amount) = match head.split_once(':') {
        Some((name, amount)) => (name, Some(amount)),
        None => (head, None),
    };
    if !valid_name(name) {
        return Err(LineError::InvalidName(name.to_string()));
    }
    if AGENT_SIGNALS.contains(&name) {
        return Err(LineError::Reserved(name.to_string()));
    }
    let name = name.to_string();
    match (kind, amount) {
        ("c", None) => Ok(Report::Count { name, n: 1 }),
        ("c", Some(amount)) => match amount.parse::<u64>() {
            Ok(n) if amount.bytes().all(|b| b.is_ascii_digit()) => Ok(Report::Count { name, n }),
            _ => Err(LineError::InvalidCount(amount.to_string())),
        },
        ("v", Some(amount)) => match amount.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Report::Value { name, value }),
            _ => Err(LineError::InvalidValue(amount.to_string())),
        },
        _ => Err(malformed()),
    }
}

/// The lines of a datagram that hold something (blank ones are skipped).
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|line| !line.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expected: Result<Report, LineError>) {
        assert_eq!(parse_line(line), expected, "{line}");
    }

    fn count(name: &str, n: u64) -> Result<Report, LineError> {
        Ok(Report::Count {
            name: name.into(),
            n,
        })
    }

    fn value(name: &str, value: f64) -> Result<Report, LineError> {
        Ok(Report::Value {
            name: name.into(),
            value,
        })
    }

    #[test]
    fn lines_are_parsed_or_refused_with_the_reason() {
        use LineError::*;
        check("transactions:3|c", count("transactions", 3));
        check("failed_tenders|c", count("failed_tenders", 1));
        check("  transactions:0|c\r", count("transactions", 0));
        check("checkout_seconds:0.75|v", value("checkout_seconds", 0.75));
        check("basket_items:-2e1|v", value("basket_items", -20.0));
        check("transactions:3", Err(Malformed("transactions:3".into())));
        check(
            "transactions:3|g",
            Err(Malformed("transactions:3|g".into())),
        );
        check(
            "checkout_seconds|v",
            Err(Malformed("checkout_seconds|v".into())),
        );
        check("", Err(Malformed(String::new())));
        check("Transactions:1|c", Err(InvalidName("Transactions".into())));
        check(":1|c", Err(InvalidName(String::new())));
        check("card-read:1|c", Err(InvalidName("card-read".into())));
        check("a:b:1|c", Err(InvalidCount("b:1".into())));
        check("service_crashes|c", Err(Reserved("service_crashes".into())));
        check(
            "health_check_seconds:1|v",
            Err(Reserved("health_check_seconds".into())),
        );
        check("transactions:-1|c", Err(InvalidCount("-1".into())));
        check("transactions:+1|c", Err(InvalidCount("+1".into())));
        check("transactions:1.5|c", Err(InvalidCount("1.5".into())));
        check(
            "transactions:99999999999999999999|c",
            Err(InvalidCount("99999999999999999999".into())),
        );
        check("checkout_seconds:NaN|v", Err(InvalidValue("NaN".into())));
        check("checkout_seconds:inf|v", Err(InvalidValue("inf".into())));
        check("checkout_seconds:fast|v", Err(InvalidValue("fast".into())));
    }

    #[test]
    fn blank_lines_are_skipped() {
        let text = "a|c\n\n  \nb:2|c\n";
        assert_eq!(lines(text).collect::<Vec<_>>(), ["a|c", "b:2|c"]);
    }
}
