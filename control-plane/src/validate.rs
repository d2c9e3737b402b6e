//! Input checks shared by the gRPC services. Each returns
//! `INVALID_ARGUMENT` naming the field.

use posfleet_runtime::window;
use tonic::Status;

pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// Lowercase letters, digits and '-', starting with a letter or digit.
pub fn slug(field: &str, value: &str, max_len: usize) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value.len() <= max_len
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{value}` must be 1 to {max_len} lowercase letters, digits or '-', starting with a letter or digit"
            ),
        ))
    }
}

/// Printable text without control characters, within a length limit.
pub fn text(field: &str, value: &str, required: bool, max_len: usize) -> Result<(), Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > max_len {
        return Err(invalid(field, format!("is longer than {max_len} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Label keys: letters, digits, '.', '_', '-', '/', at most 63 bytes.
pub fn label_key(field: &str, key: &str) -> Result<(), Status> {
    let ok = !key.is_empty()
        && key.len() <= 63
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("label key `{key}` must be 1 to 63 letters, digits, '.', '_', '-' or '/'"),
        ))
    }
}

/// An IANA time zone name such as `Europe/Paris`.
pub fn time_zone(field: &str, value: &str) -> Result<(), Status> {
    window::check_time_zone(value).map(|_| ()).map_err(|_| {
        invalid(
            field,
            format!("`{value}` is not an IANA time zone such as Europe/Paris"),
        )
    })
}

/// A bundle name as published bundles use: 1 to 64 lowercase letters,
/// digits or '-'.
pub fn bundle_name(field: &str, value: &str) -> Result<(), Status> {
    slug(field, value, 64)
}

/// A semver version such as `1.1.0`; empty only when `required` is false.
pub fn version(field: &str, value: &str, required: bool) -> Result<(), Status> {
    if value.is_empty() && !required {
        return Ok(());
    }
    if value.len() > 64 || semver::Version::parse(value).is_err() {
        let what = if required {
            "a semver version such as 1.1.0"
        } else {
            "a semver version such as 1.1.0, or empty"
        };
        return Err(invalid(field, format!("`{value}` must be {what}")));
    }
    Ok(())
}

/// A daily window: it starts at a minute of the local day and lasts at
/// least a minute and at most a day (the rules the agent applies too).
pub fn maintenance_window(start_minute: u32, duration_minutes: u32) -> Result<(), Status> {
    window::check_start_minute(start_minute.into())
        .and_then(|_| window::check_duration_minutes(duration_minutes.into()))
        .map(|_| ())
        .map_err(|e| invalid(&format!("maintenance_window.{}", e.field()), e))
}

/// Longest error string kept from an agent's report.
pub const MAX_REPORTED_ERROR_BYTES: usize = 1024;

/// An agent's error message made safe to store and show: at most 1 KiB (cut
/// on a character boundary), control characters other than newline and tab
/// replaced by spaces (PostgreSQL text cannot hold NUL).
pub fn reported_error(value: &str) -> String {
    let mut end = value.len().min(MAX_REPORTED_ERROR_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end]
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        let cases: &[(&str, bool)] = &[
            ("store-1", true),
            ("Store", false),
            ("-a", false),
            ("", false),
            ("a b", false),
        ];
        for (value, ok) in cases {
            assert_eq!(slug("id", value, 64).is_ok(), *ok, "{value}");
        }
        assert!(slug("id", &"a".repeat(65), 64).is_err());
        assert!(time_zone("tz", "Europe/Paris").is_ok());
        assert!(time_zone("tz", "Mars/Olympus").is_err());
        assert!(label_key("k", "ring/canary").is_ok());
        assert!(label_key("k", "a=b").is_err());
        assert!(text("name", "  ", true, 10).is_err());
        assert!(text("name", "a\u{7}", false, 10).is_err());
        assert!(bundle_name("name", "pos-app").is_ok());
        assert!(bundle_name("name", "pos_app").is_err());
        assert!(version("v", "1.1.0", true).is_ok());
        assert!(version("v", "1.1.0-rc.1", true).is_ok());
        assert!(version("v", "", false).is_ok());
        assert!(version("v", "", true).is_err());
        assert!(version("v", "1.1", false).is_err());
        for (start, duration, ok) in [
            (0, 1, true),
            (1439, 1440, true),
            (1440, 60, false),
            (0, 0, false),
            (0, 1441, false),
        ] {
            assert_eq!(
                maintenance_window(start, duration).is_ok(),
                ok,
                "{start}+{duration}"
            );
        }
    }

    #[test]
    fn reported_errors_are_cut_to_1_kib_on_a_character_boundary() {
        assert_eq!(reported_error("disk full\n\u{0}x"), "disk full\n x");
        let long = "é".repeat(1000); // 2000 bytes
        let cut = reported_error(&long);
        assert_eq!(cut.len(), MAX_REPORTED_ERROR_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        let odd = format!("a{long}");
        assert_eq!(reported_error(&odd).len(), MAX_REPORTED_ERROR_BYTES - 1);
    }
}
