//! The client's address: the socket peer, unless the peer is a configured trusted proxy, in
//! which case `X-Forwarded-For` (or `Forwarded`) is read from the right, skipping trusted hops.
//! Rate limits, logs and the forwarding headers all use it.

use std::net::IpAddr;

use http::header::HeaderMap;
use ipnet::IpNet;
use toml::Spanned;

use crate::config::values::parse_cidr;

/// Peers allowed to tell us who the client is.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn compile(entries: &[Spanned<String>]) -> TrustedProxies {
        // Validated with the configuration.
        TrustedProxies(
            entries
                .iter()
                .filter_map(|e| parse_cidr(e.get_ref()).ok())
                .collect(),
        )
    }

    /// Whether `ip` is a configured trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if hops.is_empty() {
            hops = headers
                .get_all("forwarded")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split([',', ';']))
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("for=")
                        .or_else(|| p.trim().strip_prefix("For="))
                })
                .filter_map(|v| {
                    let v = v.trim_matches('"');
                    let v = v
                        .strip_prefix('[')
                        .map_or(v, |v| v.split(']').next().unwrap_or(v));
                    v.parse::<IpAddr>()
                        .ok()
                        .or_else(|| v.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok()))
                })
                .collect();
        }
        // The rightmost address not added by one of our own proxies is the client.
        hops.into_iter()
            .rev()
            .find(|ip| !self.trusts(*ip))
            .unwrap_or(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers() {
        let trusted = TrustedProxies(vec![parse_cidr("10.0.0.0/8").unwrap()]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.1, 10.0.0.5".parse().unwrap(),
        );
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            trusted.client_ip(proxy, &headers),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            trusted.client_ip(stranger, &headers),
            stranger,
            "untrusted peers cannot claim an address"
        );

        let mut forwarded = HeaderMap::new();
        forwarded.insert(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trusted.client_ip(proxy, &forwarded),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}
