//! The outbound guard: which webhook URLs and addresses we are willing to call. A broker row is
//! written by another system; without this, a URL pointing at 169.254.169.254 or an internal
//! admin port would make us a proxy into our own network. The address check runs again at
//! connect time, on the addresses actually resolved, so DNS tricks cannot bypass it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("webhook_url must use https (set delivery.allow_http to allow http)")]
    PlainHttp,
    #[error(
        "webhook_url resolves to {0}, a {1} address, which is not in delivery.allowed_networks"
    )]
    ForbiddenAddress(IpAddr, &'static str),
    #[error("webhook_url host {0} did not resolve to any address")]
    Unresolvable(String),
}

#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    pub allow_http: bool,
    pub allowed_networks: Vec<IpNet>,
}

impl NetworkPolicy {
    /// The checks that need no DNS: the scheme, and the host when it is an IP literal.
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refusal> {
        if url.scheme() == "http" && !self.allow_http {
            return Err(Refusal::PlainHttp);
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = match ip {
            // ::ffff:10.0.0.1 is 10.0.0.1.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match forbidden_kind(ip) {
            Some(kind) if !self.allowed_networks.iter().any(|net| net.contains(&ip)) => {
                Err(Refusal::ForbiddenAddress(ip, kind))
            }
            _ => Ok(()),
        }
    }
}

fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64 {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("multicast")
    } else if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("unspecified")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else {
        None
    }
}

/// DNS resolution for the HTTP client that drops forbidden addresses, and refuses the
/// connection when none is left.
pub struct GuardedResolver {
    pub policy: Arc<NetworkPolicy>,
}

impl actix_tls::connect::Resolve for GuardedResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> futures::future::LocalBoxFuture<'a, Result<Vec<SocketAddr>, Box<dyn std::error::Error>>>
    {
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            let mut refusal = Refusal::Unresolvable(host.to_owned());
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match self.policy.check_ip(addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusal = why;
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(refusal) as Box<dyn std::error::Error>);
            }
            Ok(allowed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> NetworkPolicy {
        NetworkPolicy::default()
    }

    fn url(text: &str) -> url::Url {
        url::Url::parse(text).unwrap()
    }

    #[test]
    fn http_needs_allow_http() {
        assert_eq!(
            strict().check_url(&url("http://tms.example.com/")),
            Err(Refusal::PlainHttp)
        );
        let relaxed = NetworkPolicy {
            allow_http: true,
            ..strict()
        };
        assert_eq!(relaxed.check_url(&url("http://tms.example.com/")), Ok(()));
        assert_eq!(strict().check_url(&url("https://tms.example.com/")), Ok(()));
    }

    #[test]
    fn internal_addresses_are_refused() {
        let cases = [
            ("https://127.0.0.1/", "loopback"),
            ("https://10.1.2.3/", "private"),
            ("https://172.16.0.1/", "private"),
            ("https://192.168.1.1/", "private"),
            ("https://100.64.0.1/", "private"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://224.0.0.1/", "multicast"),
            ("https://0.0.0.0/", "unspecified"),
            ("https://[::1]/", "loopback"),
            ("https://[fd00::1]/", "private"),
            ("https://[fe80::1]/", "link-local"),
            ("https://[::ffff:10.0.0.1]/", "private"),
            ("https://[::]/", "unspecified"),
        ];
        for (text, kind) in cases {
            match strict().check_url(&url(text)) {
                Err(Refusal::ForbiddenAddress(_, found)) => assert_eq!(found, kind, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(strict().check_url(&url("https://93.184.216.34/")), Ok(()));
    }

    #[test]
    fn allowed_networks_open_exactly_what_they_list() {
        let policy = NetworkPolicy {
            allow_http: true,
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert_eq!(policy.check_url(&url("http://127.0.0.1:8080/")), Ok(()));
        assert!(policy.check_url(&url("http://10.0.0.1/")).is_err());
    }
}
