//! Input checks shared by the gRPC services. Each returns
//! `INVALID_ARGUMENT` naming the field.

use posfleet_runtime::window;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tonic::Status;

pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// Lowercase letters, digits and '-', starting with a letter or digit.
pub fn slug(field: &str, value: &str, max_len: usize) -> Result<(), Status> {
    name_of(
        field,
        value,
        max_len,
        &['-'],
        "lowercase letters, digits or '-'",
    )
}

/// 1 to `max_len` lowercase ASCII letters, digits and `extra` characters
/// (`allowed` says which, for the message), starting with a letter or
/// digit.
fn name_of(
    field: &str,
    value: &str,
    max_len: usize,
    extra: &[char],
    allowed: &str,
) -> Result<(), Status> {
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !value.is_empty()
        && value.len() <= max_len
        && value.starts_with(plain)
        && value.chars().all(|c| plain(c) || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{value}` must be 1 to {max_len} {allowed}, starting with a letter or digit"),
        ))
    }
}

/// Longest user name.
pub const MAX_USER_NAME_BYTES: usize = 64;

/// A user name: lowercase letters, digits, '-', '_' and '.', starting with
/// a letter or digit (what a token name may be, plus '_' and '.', so
/// `first.last` works).
pub fn user_name(field: &str, value: &str) -> Result<(), Status> {
    name_of(
        field,
        value,
        MAX_USER_NAME_BYTES,
        &['-', '_', '.'],
        "lowercase letters, digits, '-', '_' or '.'",
    )
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

/// Most bytes a progress report may give for one bundle (downloaded,
/// total, from the origin, from peers): 1 TiB, far above any bundle
/// (agents refuse bundles over 8 GiB) and its retries. A larger value is
/// refused, so the fleet's byte counters cannot be driven to absurd values.
pub const MAX_REPORTED_BYTES: u64 = 1 << 40;

/// Whether a till's P2P listen address may be handed to the other tills of
/// its store to dial. The rule: `/ip4/<ip>/tcp/<port>` or
/// `/ip4/<ip>/udp/<port>/quic-v1` (or `/ip6/…`), optionally ending in
/// `/p2p/<peer id>`, with a port other than 0 and an IP a store LAN can
/// have: private IPv4 (10/8, 172.16/12, 192.168/16), shared address space
/// (100.64/10), IPv4 link-local (169.254/16) or IPv6 unique local
/// (fc00::/7). Loopback only when `loopback_ok` (the till itself calls
/// from loopback: everything runs on one machine). Anything else —
/// loopback from a real till, unspecified, public, multicast, broadcast,
/// DNS names, relays — would make the store's tills dial somewhere other
/// than a till of their LAN, and is dropped.
pub fn store_lan_addr(addr: &str, loopback_ok: bool) -> bool {
    let parts: Vec<&str> = addr.split('/').collect();
    let ["", family, ip, rest @ ..] = parts.as_slice() else {
        return false;
    };
    let ip: IpAddr = match *family {
        "ip4" => match ip.parse::<Ipv4Addr>() {
            Ok(ip) => ip.into(),
            Err(_) => return false,
        },
        "ip6" => match ip.parse::<Ipv6Addr>() {
            Ok(ip) => ip.into(),
            Err(_) => return false,
        },
        _ => return false,
    };
    let transport = match rest {
        ["tcp", port, tail @ ..] => Some((port, tail)),
        ["udp", port, "quic-v1", tail @ ..] => Some((port, tail)),
        _ => None,
    };
    let Some((port, tail)) = transport else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let tail_ok = match tail {
        [] => true,
        ["p2p", id] => !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
        _ => false,
    };
    port_ok && tail_ok && lan_ip(ip.to_canonical(), loopback_ok)
}

fn lan_ip(ip: IpAddr, loopback_ok: bool) -> bool {
    if ip.is_loopback() {
        return loopback_ok;
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || v4.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => v6.segments()[0] & 0xfe00 == 0xfc00,
    }
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
        for (value, ok) in [
            ("alice", true),
            ("jean.dupont", true),
            ("ops_1", true),
            ("b-2", true),
            ("Alice", false),
            (".alice", false),
            ("_x", false),
            ("a b", false),
            ("a@b", false),
            ("", false),
        ] {
            assert_eq!(user_name("name", value).is_ok(), ok, "{value}");
        }
        assert!(user_name("name", &"a".repeat(65)).is_err());
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
    fn loopback_and_public_p2p_addresses_are_refused_by_the_store_lan_rule() {
        for (addr, from_loopback, kept) in [
            ("/ip4/10.0.0.5/tcp/7410", false, true),
            ("/ip4/192.168.1.20/udp/7410/quic-v1", false, true),
            ("/ip4/172.16.3.4/tcp/7410/p2p/12D3KooWabc", false, true),
            ("/ip4/100.64.0.9/tcp/7410", false, true),
            ("/ip4/169.254.10.1/tcp/7410", false, true),
            ("/ip6/fd00::5/tcp/7410", false, true),
            ("/ip6/::ffff:10.0.0.5/tcp/7410", false, true),
            // Loopback: the other tills would dial themselves.
            ("/ip4/127.0.0.1/tcp/7410", false, false),
            ("/ip4/127.9.9.9/tcp/5432", false, false),
            ("/ip6/::1/tcp/7410", false, false),
            ("/ip6/::ffff:127.0.0.1/tcp/7410", false, false),
            // ... unless everything runs on one machine.
            ("/ip4/127.0.0.1/tcp/7410", true, true),
            // Not on a store LAN, or not an address at all.
            ("/ip4/0.0.0.0/tcp/7410", true, false),
            ("/ip4/8.8.8.8/tcp/53", false, false),
            ("/ip6/2001:db8::1/tcp/7410", false, false),
            ("/ip4/224.0.0.251/udp/5353/quic-v1", false, false),
            ("/ip4/255.255.255.255/tcp/7410", false, false),
            ("/dns4/localhost/tcp/7410", true, false),
            ("/ip4/10.0.0.5/tcp/0", false, false),
            ("/ip4/10.0.0.5/tcp/70000", false, false),
            ("/ip4/10.0.0.5/udp/7410", false, false),
            ("/ip4/10.0.0.5/tcp/7410/p2p-circuit", false, false),
            ("/ip4/10.0.0.5/tcp/7410/p2p/x/tcp/1", false, false),
            ("/ip4/10.0.0/tcp/7410", false, false),
        ] {
            assert_eq!(
                store_lan_addr(addr, from_loopback),
                kept,
                "{addr} (till on loopback: {from_loopback})"
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
