//! The outbound guard: which webhook URLs and addresses we are willing to call. A broker row is
//! written by another system; without this, a URL pointing at 169.254.169.254 or an internal
//! admin port would make us a proxy into our own network. The address check runs again at
//! connect time, on the addresses actually resolved (the HTTP client's resolver in
//! src/webhook_client.rs calls `screen_resolved`), so DNS tricks cannot bypass it.
//!
//! The refused ranges are the IANA special-purpose registries (IPv4 and IPv6, RFC 6890 and
//! updates) minus the few entries that are globally reachable anycast services nobody hosts a
//! webhook on anyway, plus IPv6 ranges that embed or tunnel to an arbitrary IPv4 address (NAT64,
//! 6to4, Teredo, IPv4-compatible): through those, an internal IPv4 address could be reached
//! with a public-looking IPv6 one. README.md lists the same table; a test keeps them equal.

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("webhook_url must use https (set delivery.allow_http to allow http)")]
    PlainHttp,
    #[error(
        "webhook_url resolves to {0}, a {1} address, which is not in delivery.allowed_networks"
    )]
    ForbiddenAddress(IpAddr, &'static str),
}

/// DNS answered, but with no address at all. Not a refusal: it is retried like any other DNS
/// failure (a zone being re-published can briefly answer empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("webhook_url host {0} resolved to no address")]
pub struct NoAddresses(pub String);

/// (range, kind) in match order: the more specific range first, so 255.255.255.255 is
/// `broadcast`, not `reserved`. IPv4-mapped IPv6 (`::ffff:0:0/96`) is not listed: such an
/// address is checked as the IPv4 address it maps.
pub const REFUSED_RANGES: &[(&str, &str)] = &[
    // IPv4
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    // IPv6
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6)"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

static REFUSED: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| {
    REFUSED_RANGES
        .iter()
        .map(|(net, kind)| {
            (
                net.parse().expect("REFUSED_RANGES holds valid CIDRs"),
                *kind,
            )
        })
        .collect()
});

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

impl NetworkPolicy {
    /// What the resolver hands the connector: the allowed addresses, else a boxed `Refusal`
    /// (permanent) or `NoAddresses` (retryable), which `webhook_client` tells apart by type.
    pub fn screen_resolved(
        &self,
        host: &str,
        resolved: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error>> {
        if resolved.is_empty() {
            return Err(Box::new(NoAddresses(host.to_owned())));
        }
        let mut refusal = None;
        let allowed: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| match self.check_ip(addr.ip()) {
                Ok(()) => true,
                Err(why) => {
                    refusal = Some(why);
                    false
                }
            })
            .collect();
        match refusal {
            Some(refusal) if allowed.is_empty() => Err(Box::new(refusal)),
            _ => Ok(allowed),
        }
    }
}

fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    REFUSED
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, kind)| *kind)
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

    fn refused_kind(text: &str) -> Option<&'static str> {
        match strict().check_url(&url(text)) {
            Err(Refusal::ForbiddenAddress(_, kind)) => Some(kind),
            Ok(()) => None,
            Err(other) => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn every_special_purpose_range_is_refused() {
        // One address inside every range, and the kind it is reported as.
        let cases = [
            ("https://0.1.2.3/", "unspecified"),
            ("https://0.0.0.0/", "unspecified"),
            ("https://10.1.2.3/", "private"),
            ("https://100.64.0.1/", "shared (carrier-grade NAT)"),
            ("https://100.127.255.254/", "shared (carrier-grade NAT)"),
            ("https://127.0.0.1/", "loopback"),
            ("https://127.255.0.9/", "loopback"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://172.16.0.1/", "private"),
            ("https://172.31.255.1/", "private"),
            ("https://192.0.0.8/", "IETF protocol assignment"),
            ("https://192.0.2.10/", "documentation"),
            ("https://192.88.99.1/", "6to4 relay anycast"),
            ("https://192.168.1.1/", "private"),
            ("https://198.18.0.1/", "benchmarking"),
            ("https://198.19.255.254/", "benchmarking"),
            ("https://198.51.100.7/", "documentation"),
            ("https://203.0.113.7/", "documentation"),
            ("https://224.0.0.1/", "multicast"),
            ("https://239.255.255.250/", "multicast"),
            ("https://240.0.0.1/", "reserved"),
            ("https://255.255.255.254/", "reserved"),
            ("https://255.255.255.255/", "broadcast"),
            ("https://[::]/", "unspecified"),
            ("https://[::1]/", "loopback"),
            ("https://[::10.0.0.1]/", "IPv4-compatible"),
            ("https://[::8.8.8.8]/", "IPv4-compatible"),
            ("https://[::ffff:10.0.0.1]/", "private"),
            ("https://[::ffff:127.0.0.1]/", "loopback"),
            ("https://[::ffff:169.254.169.254]/", "link-local"),
            ("https://[64:ff9b::10.0.0.1]/", "NAT64"),
            ("https://[64:ff9b::8.8.8.8]/", "NAT64"),
            ("https://[64:ff9b:1::a00:1]/", "NAT64"),
            ("https://[100::1]/", "discard-only"),
            ("https://[2001::a00:1]/", "Teredo"),
            ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
            ("https://[2001:2::1]/", "benchmarking"),
            ("https://[2001:10::1]/", "IETF protocol assignment"),
            ("https://[2001:db8::1]/", "documentation"),
            ("https://[2002:a00:1::1]/", "6to4"),
            ("https://[2002:7f00:1::]/", "6to4"),
            ("https://[3fff::1]/", "documentation"),
            ("https://[5f00::1]/", "segment routing (SRv6)"),
            ("https://[fc00::1]/", "private"),
            ("https://[fd00::1]/", "private"),
            ("https://[fe80::1]/", "link-local"),
            ("https://[febf::1]/", "link-local"),
            ("https://[fec0::1]/", "site-local"),
            ("https://[feff::1]/", "site-local"),
            ("https://[ff02::1]/", "multicast"),
        ];
        for (text, kind) in cases {
            assert_eq!(refused_kind(text), Some(kind), "{text}");
        }
    }

    #[test]
    fn odd_spellings_of_an_internal_address_are_still_refused() {
        // The URL parser normalises these to the IPv4 address they mean before we look.
        for text in [
            "https://2130706433/",
            "https://0x7f.1/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://[0:0:0:0:0:ffff:7f00:1]/",
            "https://[::FFFF:A9FE:A9FE]/",
        ] {
            assert!(refused_kind(text).is_some(), "{text}");
        }
    }

    #[test]
    fn public_addresses_next_to_the_ranges_pass() {
        for text in [
            "https://93.184.216.34/",
            "https://8.8.8.8/",
            "https://1.1.1.1/",
            "https://100.63.255.255/",
            "https://100.128.0.0/",
            "https://172.32.0.1/",
            "https://192.0.1.1/",
            "https://198.17.255.255/",
            "https://198.20.0.0/",
            "https://223.255.255.255/",
            "https://[2606:4700:4700::1111]/",
            "https://[2001:4860:4860::8888]/",
            "https://[2001:200::1]/",
            "https://[2003::1]/",
            "https://[64:ff9c::1]/",
            "https://[::ffff:8.8.8.8]/",
        ] {
            assert_eq!(refused_kind(text), None, "{text}");
        }
    }

    #[test]
    fn every_range_is_valid_and_listed_in_the_readme() {
        let readme = include_str!("../../README.md");
        for (net, kind) in REFUSED_RANGES {
            assert!(net.parse::<IpNet>().is_ok(), "{net}");
            assert!(
                readme.contains(&format!("| `{net}` | {kind} |")),
                "README.md's SSRF table lacks `{net}` ({kind})"
            );
        }
    }

    #[test]
    fn an_empty_dns_answer_is_retryable_not_a_refusal() {
        let error = strict()
            .screen_resolved("tms.example.com", Vec::new())
            .unwrap_err();
        assert!(error.downcast_ref::<Refusal>().is_none());
        assert_eq!(
            error.downcast_ref::<NoAddresses>(),
            Some(&NoAddresses("tms.example.com".into()))
        );
    }

    #[test]
    fn resolved_addresses_are_screened_one_by_one() {
        let public: SocketAddr = "93.184.216.34:443".parse().unwrap();
        let internal: SocketAddr = "10.0.0.1:443".parse().unwrap();
        assert_eq!(
            strict()
                .screen_resolved("mixed", vec![internal, public])
                .unwrap(),
            vec![public],
            "the internal address is dropped, the public one is used"
        );
        let error = strict()
            .screen_resolved("internal", vec![internal])
            .unwrap_err();
        assert_eq!(
            error.downcast_ref::<Refusal>(),
            Some(&Refusal::ForbiddenAddress(internal.ip(), "private"))
        );
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
