//! When plaintext is acceptable: the rule the agent and the CLI apply to an
//! `http://` address before sending a credential over it.

/// Whether `host` (from a URL: a name, an IPv4 address or a bracketed IPv6
/// one) is this machine, where plaintext crosses no network.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machine_is_loopback() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.3.4.5",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "cp.example",
            "10.0.0.5",
            "[2001:db8::1]",
            "localhost.example",
            "0.0.0.0",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
