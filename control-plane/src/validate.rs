//! Input checks shared by the gRPC services. Each returns
//! `INVALID_ARGUMENT` naming the field.

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
    value.parse::<chrono_tz::Tz>().map(|_| ()).map_err(|_| {
        invalid(
            field,
            format!("`{value}` is not an IANA time zone such as Europe/Paris"),
        )
    })
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
    }
}
