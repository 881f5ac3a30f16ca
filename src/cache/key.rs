//! Cache keys: what makes two requests "the same" for the cache. GET and HEAD share entries
//! (HEAD is answered from a stored GET); the scheme, the host, the canonical path, the query
//! (normalized, in order or sorted, or dropped, or reduced to named parameters), the values of the varying request headers and, for
//! per-user rules, the user all take part.

use http::header::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// What of the query string takes part in the key. Parameters are compared in their
/// normalized spelling (RFC 3986 §6.2.2: escapes of unreserved characters decoded, other escapes
/// in upper case, so `?pag%65=2` is `?page=2`), never decoded further: `+`, `%20` and `%2B` are
/// three keys, since origins read them differently (a space to form decoders, a plus to others).
/// The origin receives the query as the client sent it, which reads the same as the key's
/// spelling to every origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryRule {
    /// Every parameter, in the order sent: the origin may answer `?a=1&b=2` and `?b=2&a=1`
    /// differently (and certainly repeated names in another order).
    All,
    /// Every parameter, sorted (opt-in, for origins known not to care about order).
    Sorted,
    /// None: the query never splits entries.
    Ignore,
    /// Only these parameters (normalized names), in the order sent.
    Only(Vec<String>),
}

/// The query string as it counts for the key: each parameter in its normalized spelling (see
/// [`QueryRule`]), so spellings every origin reads alike share an entry and no others do.
pub fn normalized_query(query: Option<&str>, rule: &QueryRule) -> String {
    let Some(query) = query else {
        return String::new();
    };
    if *rule == QueryRule::Ignore {
        return String::new();
    }
    let mut pairs: Vec<(String, Option<String>)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((name, value)) => (normalize_component(name), Some(normalize_component(value))),
            None => (normalize_component(p), None),
        })
        .collect();
    match rule {
        QueryRule::Only(names) => pairs.retain(|(name, _)| names.iter().any(|n| n == name)),
        QueryRule::Sorted => pairs.sort(),
        QueryRule::All | QueryRule::Ignore => {}
    }
    let mut out = String::with_capacity(query.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        if let Some(value) = value {
            out.push('=');
            out.push_str(value);
        }
    }
    out
}

/// RFC 3986 §6.2.2 syntax-based normalization of one query component: `%XX` of an unreserved
/// character becomes the character, other escapes get upper-case hex digits; everything else
/// (`+` included) stays as written. A `%` that starts no escape is written `%25`, the way lenient
/// decoders read it: left as written, `%3%30` would become `%30` and then `0` on a second pass,
/// so the key of a key would differ.
fn normalize_component(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                out.push(b as char);
                i += 3;
            }
            Some(b) => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
                i += 3;
            }
            None if bytes[i] == b'%' => {
                out.push_str("%25");
                i += 1;
            }
            // Never in a request target (URIs are ASCII); written as its escape, which every
            // decoder reads the same, so the key stays ASCII.
            None if !bytes[i].is_ascii() => {
                out.push('%');
                out.push(HEX[usize::from(bytes[i] >> 4)] as char);
                out.push(HEX[usize::from(bytes[i] & 0xf)] as char);
                i += 1;
            }
            None => {
                out.push(bytes[i] as char);
                i += 1;
            }
        }
    }
    out
}

/// The parts of a request that identify a cache entry.
#[derive(Debug, Clone)]
pub struct KeyParts<'a> {
    /// `http` or `https`: an origin may answer each differently (a redirect to https).
    pub scheme: &'a str,
    /// `None` when the rule does not separate hosts.
    pub host: Option<&'a str>,
    /// Already normalised by the route table.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub query_rule: &'a QueryRule,
    /// The user an entry belongs to, for per-user rules.
    pub user: Option<&'a str>,
}

/// A primary key (one resource) and, from it, variant keys (one per combination of the values of
/// the headers the response varies on).
///
/// The key is the identifying material itself (length-prefixed fields, so no two different
/// inputs can run together), not a digest of it: the in-process tier compares it in full, so no
/// hash collision, crafted or accidental, can hand one request's entry to another, and a hit
/// costs no cryptographic hash. The shared tier's keys are the SHA-256 of the material
/// ([`CacheKey::shared`]): fixed-length, the same on every instance, and computed only when Redis
/// is asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn primary(parts: &KeyParts<'_>) -> CacheKey {
        let query = normalized_query(parts.query, parts.query_rule);
        let host = parts.host.unwrap_or("");
        let user = parts.user.unwrap_or("");
        let mut material = String::with_capacity(
            24 + parts.scheme.len() + host.len() + parts.path.len() + query.len() + user.len(),
        );
        for field in [parts.scheme, host, parts.path, &query, user] {
            push_field(&mut material, field);
        }
        material.push(if parts.user.is_some() { 'u' } else { 's' });
        CacheKey(material)
    }

    /// The key of the variant selected by `request` for the headers in `vary` (lower-case names,
    /// as stored with the primary entry). Values are compared after trimming and collapsing
    /// whitespace, so trivially different spellings share a variant.
    pub fn variant(&self, vary: &[HeaderName], request: &HeaderMap) -> CacheKey {
        if vary.is_empty() {
            return self.clone();
        }
        let mut names: Vec<&HeaderName> = vary.iter().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        let mut material = self.0.clone();
        material.push('|');
        for name in names {
            let fields = request.get_all(name);
            let present = fields.iter().next().is_some();
            let value = if SET_VALUED.contains(&name.as_str()) {
                set_value(fields)
            } else {
                fields
                    .iter()
                    .map(|v| {
                        String::from_utf8_lossy(v.as_bytes())
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            push_field(&mut material, name.as_str());
            material.push(if present { '+' } else { '-' });
            push_field(&mut material, &value);
        }
        CacheKey(material)
    }

    /// The in-process key: the material itself.
    pub fn local(&self) -> &str {
        &self.0
    }

    /// The shared tier's key: lower-case hex SHA-256 of the material.
    pub fn shared(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }
}

/// Request fields whose value is a set of case-insensitive members (RFC 9110 §12.5): the order
/// of the members and their case and spacing do not change what the client accepts, so
/// `Accept-Language: en, fr` and `fr,EN` select the same variant. (Weights stay part of each
/// member: `en;q=0.5` is not `en`.)
pub const SET_VALUED: [&str; 4] = [
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
];

/// A set-valued field's members, each lower case without spaces, sorted, deduplicated.
fn set_value(fields: http::header::GetAll<'_, http::HeaderValue>) -> String {
    let mut members: Vec<String> = fields
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|m| {
                    m.chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>()
                        .to_ascii_lowercase()
                })
                .filter(|m| !m.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    members.sort();
    members.dedup();
    members.join(",")
}

/// Appends `field` as `<length>:<field>`: a netstring, so field boundaries are unambiguous.
fn push_field(out: &mut String, field: &str) {
    use std::fmt::Write;
    let _ = write!(out, "{}:", field.len());
    out.push_str(field);
}

/// Lower-case hex, without a formatting call per byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, query: Option<&str>, rule: &QueryRule, user: Option<&str>) -> CacheKey {
        CacheKey::primary(&KeyParts {
            scheme: "http",
            host: Some("api.test"),
            path,
            query,
            query_rule: rule,
            user,
        })
    }

    #[test]
    fn queries_keep_their_order_unless_sorted_and_compare_normalized() {
        assert_eq!(
            normalized_query(Some("b=2&a=1&&a=0"), &QueryRule::All),
            "b=2&a=1&a=0"
        );
        assert_eq!(
            normalized_query(Some("b=2&a=1&&a=0"), &QueryRule::Sorted),
            "a=0&a=1&b=2"
        );
        assert_eq!(normalized_query(Some("b=2&a=1"), &QueryRule::Ignore), "");
        let only = QueryRule::Only(vec!["page".into()]);
        assert_eq!(
            normalized_query(Some("utm=x&page=2&pager=9&pag%65=3"), &only),
            "page=2&page=3",
            "names are compared decoded"
        );
        assert_eq!(
            normalized_query(Some("q=a%2b&r=%7e&%41"), &QueryRule::All),
            "q=a%2B&r=~&A",
            "unreserved escapes decoded, others in upper case"
        );
        let all = |q| normalized_query(Some(q), &QueryRule::All);
        // Origins read these differently (a space to form decoders, a plus to others): three
        // entries, each filled by the spelling the origin received.
        assert_ne!(all("q=a+b"), all("q=a%20b"));
        assert_ne!(all("q=a+b"), all("q=a%2Bb"));
        assert_ne!(all("q=a%20b"), all("q=a%2Bb"));
        assert_eq!(
            all("q=%C3%A9&x=%zz"),
            "q=%C3%A9&x=%25zz",
            "UTF-8 kept; a % that starts no escape is its own escape"
        );
        assert_eq!(all("%3%30"), "%2530");
        assert_eq!(
            all("%253%30"),
            all("%3%30"),
            "one key for the two spellings"
        );
        let once = all("%3%30");
        assert_eq!(all(&once), once, "a key's key is itself");
        assert_eq!(all("q=é"), "q=%C3%A9", "raw non-ASCII is its escape");
        assert_ne!(
            normalized_query(Some("q=a%26b"), &QueryRule::All),
            normalized_query(Some("q=a&b"), &QueryRule::All),
            "an encoded & stays data"
        );
        assert_ne!(
            key("/p", Some("b=2&a=1"), &QueryRule::All, None),
            key("/p", Some("a=1&b=2"), &QueryRule::All, None)
        );
        assert_eq!(
            key("/p", Some("b=2&a=1"), &QueryRule::Sorted, None),
            key("/p", Some("a=1&b=2"), &QueryRule::Sorted, None)
        );
        assert_ne!(
            key("/p", Some("a=1"), &QueryRule::All, None),
            key("/p", Some("a=2"), &QueryRule::All, None)
        );
    }

    #[test]
    fn users_never_share_entries_with_each_other_or_with_anonymous_requests() {
        let all = QueryRule::All;
        let alice = key("/me", None, &all, Some("alice"));
        assert_ne!(alice, key("/me", None, &all, Some("bob")));
        assert_ne!(alice, key("/me", None, &all, None));
        assert_ne!(
            key("/me", None, &all, Some("")),
            key("/me", None, &all, None),
            "an empty subject is still a user"
        );
        assert_ne!(
            key("/a", Some("b"), &all, None),
            key("/ab", None, &all, None),
            "fields cannot run together"
        );
    }

    #[test]
    fn variants_follow_the_vary_headers() {
        let base = key("/p", None, &QueryRule::All, None);
        let vary = [HeaderName::from_static("accept-encoding")];
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", "gzip,  br".parse().unwrap());
        let mut gzip_spaced = HeaderMap::new();
        gzip_spaced.insert("accept-encoding", " gzip, br ".parse().unwrap());
        let none = HeaderMap::new();
        assert_eq!(
            base.variant(&vary, &gzip),
            base.variant(&vary, &gzip_spaced)
        );
        assert_ne!(base.variant(&vary, &gzip), base.variant(&vary, &none));
        assert_eq!(base.variant(&[], &gzip), base, "no Vary, one variant");
        let languages = [HeaderName::from_static("accept-language")];
        let mut en_fr = HeaderMap::new();
        en_fr.insert("accept-language", "en, fr".parse().unwrap());
        let mut fr_en = HeaderMap::new();
        fr_en.append("accept-language", "FR".parse().unwrap());
        fr_en.append("accept-language", "en".parse().unwrap());
        let mut weighted = HeaderMap::new();
        weighted.insert("accept-language", "en;q=0.5, fr".parse().unwrap());
        assert_eq!(
            base.variant(&languages, &en_fr),
            base.variant(&languages, &fr_en),
            "a set: order, case and lines do not matter"
        );
        assert_ne!(
            base.variant(&languages, &en_fr),
            base.variant(&languages, &weighted)
        );
        let mut empty = HeaderMap::new();
        empty.insert("accept-language", "".parse().unwrap());
        assert_ne!(
            base.variant(&languages, &empty),
            base.variant(&languages, &none),
            "present but empty is not absent"
        );
    }
}
