//! Checks of network addresses and SPIFFE names written in the config.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Checks a `host:port` endpoint: `host` is an IPv4 address, a bracketed IPv6 address
/// (`[::1]:502`) or a DNS name; `port` is 1..=65535. Returns what is wrong, as a phrase.
pub(crate) fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("is not host:port (the port is missing)".to_owned());
    };
    match port.parse::<u16>() {
        Ok(0) => return Err("has port 0; give the port to connect to (1..=65535)".to_owned()),
        Ok(_) => {}
        Err(_) => {
            return Err(format!(
                "has port {port:?}, which is not a number in 1..=65535"
            ));
        }
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err("has an unclosed '[' around the host".to_owned());
        };
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "has {inner:?} in brackets, which is not an IPv6 address"
            )),
        };
    }
    if host.contains(':') {
        return Err("has an IPv6 host without brackets (write [addr]:port)".to_owned());
    }
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    if host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host) {
        Ok(())
    } else {
        Err(format!(
            "has host {host:?}, which is neither an IP address nor a DNS name"
        ))
    }
}

/// A DNS name per RFC 1123: dot-separated labels of 1 to 63 letters, digits and '-', not
/// starting or ending with '-'; at most 253 bytes; a trailing dot is allowed.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    // A name made only of digits and dots that did not parse as IPv4 (such as 300.1.1.1) is a
    // mistyped address, not a name.
    let all_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    labels_ok && !all_numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "127.0.0.1:502",
            "plc-1.local:5020",
            "localhost:1",
            "[::1]:502",
            "[fe80::1]:65535",
            "PLC7:502",
        ] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "127.0.0.1:x",
            ":502",
            "::1:502",
            "[::1:502",
            "[zz]:502",
            "plc_1:502",
            "-plc:502",
            "300.1.1.1:502",
            "a b:502",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }
}
