//! Validation of a parsed configuration: what the types cannot say (addresses that parse,
//! PEM files that hold what they should, limits in range, settings that contradict each other),
//! section by section, every error at its value's span.

use toml::Spanned;

use super::{values, Config, EnvString, SpanError, MAX_HEADER_LIMIT};

/// Checks that need no compilation: values in range, files present, sections supported.
pub(super) fn validate(config: &Config) -> Vec<SpanError> {
    let mut errors = Vec::new();
    for section in [
        listeners, telemetry, server, upstream, limits, store, rate_limit, admin,
    ] {
        section(config, &mut errors);
    }
    errors
}

/// `[[listeners]]`: at least one, addresses, TLS files.
fn listeners(config: &Config, errors: &mut Vec<SpanError>) {
    if config.listeners.get_ref().is_empty() {
        errors.push(SpanError::new(
            config.listeners.span(),
            "at least one listener is needed: add [[listeners]] with address = \"127.0.0.1:8080\"",
        ));
    }
    for listener in config.listeners.get_ref() {
        let address = listener.address.get_ref().as_str();
        if address.parse::<std::net::SocketAddr>().is_err() {
            errors.push(SpanError::new(
                listener.address.span(),
                format!("invalid listener address {address:?}: write ip:port, like \"127.0.0.1:8080\" or \"[::]:8443\""),
            ));
        }
        if let Some(tls) = &listener.tls {
            check_pem(&tls.cert_file, PemKind::Certificates, errors);
            check_pem(&tls.key_file, PemKind::PrivateKey, errors);
        }
    }
}

/// `[telemetry]`: the OTLP endpoint.
fn telemetry(config: &Config, errors: &mut Vec<SpanError>) {
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        let url = endpoint.get_ref().as_str();
        let valid = url.parse::<http::Uri>().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http") | Some("https")) && uri.authority().is_some()
        });
        if !valid {
            errors.push(SpanError::new(
                endpoint.span(),
                format!("otlp_endpoint {url:?} is not an http:// or https:// URL, like \"http://127.0.0.1:4318\""),
            ));
        }
    }
}

/// `[server]`: threads, trusted proxies.
fn server(config: &Config, errors: &mut Vec<SpanError>) {
    if let Some(threads) = &config.server.threads {
        if *threads.get_ref() == 0 {
            errors.push(SpanError::new(
                threads.span(),
                "server.threads must be at least 1",
            ));
        }
    }

    for proxy in &config.server.trusted_proxies {
        if values::parse_cidr(proxy.get_ref()).is_err() {
            errors.push(SpanError::new(
                proxy.span(),
                format!("invalid trusted proxy {:?}: write an address or a CIDR, like \"10.0.0.0/8\" or \"::1\"", proxy.get_ref()),
            ));
        }
    }
}

/// `[upstream]`: timeouts, the CA file.
fn upstream(config: &Config, errors: &mut Vec<SpanError>) {
    let upstream = &config.upstream;
    for (name, value) in [
        ("connect_timeout", upstream.connect_timeout),
        ("read_timeout", upstream.read_timeout),
        ("write_timeout", upstream.write_timeout),
    ] {
        if value.0.is_zero() {
            errors.push(SpanError::new(
                upstream.addresses.span(),
                format!("upstream.{name} must be greater than zero"),
            ));
        }
    }
    if let Some(ca) = &upstream.tls_ca_file {
        check_pem(ca, PemKind::Certificates, errors);
    }
}

/// `[limits]`: the request-head ceiling.
fn limits(config: &Config, errors: &mut Vec<SpanError>) {
    let header_limit = &config.limits.max_request_header_bytes;
    if header_limit.get_ref().0 < 1024 || header_limit.get_ref().0 > MAX_HEADER_LIMIT {
        errors.push(SpanError::new(
            header_limit.span(),
            format!(
                "max_request_header_bytes must be between 1KiB and {MAX_HEADER_LIMIT} bytes (the HTTP parser's own ceiling)"
            ),
        ));
    }
}

/// `[store]`: one Redis or a cluster, TLS, the budget and the breaker.
fn store(config: &Config, errors: &mut Vec<SpanError>) {
    if let Some(store) = &config.store {
        if let (Some(_), Some(cluster)) = (&store.redis_url, &store.redis_cluster) {
            errors.push(SpanError::new(
                cluster.span(),
                "set either redis_url (one Redis) or redis_cluster (seed nodes of a cluster), not both",
            ));
        }
        if let Some(cluster) = &store.redis_cluster {
            if cluster.get_ref().is_empty() {
                errors.push(SpanError::new(
                    cluster.span(),
                    "redis_cluster needs at least one seed node",
                ));
            }
            for node in cluster.get_ref() {
                if let Err(e) = redis::Client::open(node.as_str()) {
                    errors.push(SpanError::new(
                        cluster.span(),
                        format!(
                            "invalid redis_cluster node {:?}: {e}",
                            values::redact_url(node.as_str())
                        ),
                    ));
                }
            }
        }
        if let Some(ca) = &store.tls_ca_file {
            check_pem(ca, PemKind::Certificates, errors);
        }
        if store.timeout.0.is_zero() || store.circuit_failures == 0 {
            errors.push(SpanError::new(
                0..0,
                "store.timeout must be greater than zero and store.circuit_failures at least 1",
            ));
        }
    }
    if let Some(url) = config.store.as_ref().and_then(|s| s.redis_url.as_ref()) {
        if let Err(e) = redis::Client::open(url.get_ref().as_str()) {
            errors.push(SpanError::new(
                url.span(),
                format!(
                    "invalid redis_url: {e}; write redis://host:port or rediss://host:port for TLS"
                ),
            ));
        }
    }
}

/// `[rate_limit]`: the failed-authentication rate, the IPv6 prefix, instances.
fn rate_limit(config: &Config, errors: &mut Vec<SpanError>) {
    if let Some(rate) = &config.rate_limit.auth_failures {
        if let Err(message) = values::parse_rate(rate.get_ref()) {
            errors.push(SpanError::new(rate.span(), message));
        }
    }
    let prefix = &config.rate_limit.ipv6_prefix;
    if !(1..=128).contains(prefix.get_ref()) {
        errors.push(SpanError::new(
            prefix.span(),
            "rate_limit.ipv6_prefix must be between 1 and 128 (64: one subscriber's network)",
        ));
    }
    if config.rate_limit.instances == 0 {
        errors.push(SpanError::new(
            0..0,
            "rate_limit.instances must be at least 1",
        ));
    }
}

/// `[admin]`: its address, its token, `purge_method`.
fn admin(config: &Config, errors: &mut Vec<SpanError>) {
    if let Some(admin) = &config.admin {
        let purge_method = admin.purge_method.as_ref().filter(|p| *p.get_ref());
        let no_token = admin.token.as_ref().is_none_or(|t| t.as_str().is_empty());
        if let (Some(purge_method), true) = (purge_method, no_token) {
            errors.push(SpanError::new(
                purge_method.span(),
                "purge_method needs [admin] token: PURGE requests are authorised by it",
            ));
        }
        let address = admin.address.get_ref().as_str();
        if address.parse::<std::net::SocketAddr>().is_err() {
            errors.push(SpanError::new(
                admin.address.span(),
                format!(
                    "invalid admin address {address:?}: write ip:port, like \"127.0.0.1:9901\""
                ),
            ));
        }
        let exposed = address
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        if exposed && no_token {
            errors.push(SpanError::new(
                admin.address.span(),
                format!(
                    "the admin listener on {address} is reachable from other machines but has no token; set [admin] token (e.g. token = \"${{ADMIN_TOKEN}}\") or bind it to 127.0.0.1"
                ),
            ));
        }
        let clash = config
            .listeners
            .get_ref()
            .iter()
            .any(|l| l.address.get_ref().as_str() == address);
        if clash {
            errors.push(SpanError::new(
                admin.address.span(),
                format!(
                    "the admin address {address} is also a listener address; give it its own port"
                ),
            ));
        }
    }
}

enum PemKind {
    Certificates,
    PrivateKey,
}

/// Checks that a PEM file exists and holds what it should, so a bad path fails `check`, not
/// start-up; read the way the listeners and clients will read it ([`crate::tls`]).
fn check_pem(path: &Spanned<EnvString>, kind: PemKind, errors: &mut Vec<SpanError>) {
    let file = path.get_ref().as_str();
    let problem = match kind {
        PemKind::Certificates => match crate::tls::certificates(file) {
            Ok(certs) if !certs.is_empty() => None,
            Ok(_) => Some(format!(
                "{file:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            )),
            Err(e) => Some(e.to_string()),
        },
        PemKind::PrivateKey => crate::tls::private_key(file).err().map(|e| e.to_string()),
    };
    if let Some(problem) = problem {
        errors.push(SpanError::new(path.span(), problem));
    }
}
