//! `Cache-Control` directives (RFC 9111 §5.2), parsed once from a header map, and the targeted
//! fields (`CDN-Cache-Control`, RFC 9213) that replace it for the gateway.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, CACHE_CONTROL, PRAGMA};

/// The directives cachegate acts on. Unknown directives are ignored, as §5.2.3 requires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<Duration>,
    pub s_maxage: Option<Duration>,
    pub no_store: bool,
    /// `no-cache` without field names: store, but revalidate before every reuse.
    pub no_cache: bool,
    /// `private` without field names: never stored by a shared cache.
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// `must-understand` (§5.2.2.3): store only statuses the cache understands, then ignore
    /// `no-store`.
    pub must_understand: bool,
    /// `no-cache="a, b"`: these response fields (lower case) are not stored (§5.2.2.4).
    pub no_cache_fields: Vec<String>,
    /// `private="a, b"`: these response fields (lower case) are not stored (§5.2.2.7).
    pub private_fields: Vec<String>,
    /// Request only: `max-stale` (with no value: any staleness).
    pub max_stale: Option<Option<Duration>>,
    /// Request only.
    pub min_fresh: Option<Duration>,
    /// Request only.
    pub only_if_cached: bool,
    /// Parsed from a targeted field (RFC 9213) rather than `Cache-Control`: `Expires` is then
    /// ignored too.
    pub targeted: bool,
}

/// The largest delta-seconds value a cache needs to represent (RFC 9111 §1.2.2: larger values,
/// and calculations that overflow, count as 2^31 seconds).
pub const MAX_DELTA: Duration = Duration::from_secs(1 << 31);

/// A delta-seconds value (§1.2.2): a non-negative integer, at most [`MAX_DELTA`]; anything else
/// is invalid and the directive is ignored.
pub fn delta_seconds(value: &str) -> Option<Duration> {
    let value = value.trim().trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_DELTA))
}

/// Milliseconds in `d`, saturating instead of wrapping.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CacheControl {
    /// Parses every `Cache-Control` field of `headers`. `Pragma: no-cache` counts as `no-cache`
    /// when there is no `Cache-Control` (§5.4).
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let (cc, any) = CacheControl::parse_fields(headers.get_all(CACHE_CONTROL));
        if any {
            return cc;
        }
        let pragma_no_cache = headers
            .get_all(PRAGMA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
            });
        CacheControl {
            no_cache: pragma_no_cache,
            ..cc
        }
    }

    /// Parses a response's caching policy for the gateway (RFC 9213): the first of `targeted`
    /// (most specific first, e.g. `Cachegate-Cache-Control`, then `CDN-Cache-Control`) with a
    /// non-empty value replaces `Cache-Control` and `Expires`; without one, `Cache-Control`.
    pub fn parse_response(headers: &HeaderMap, targeted: &[HeaderName]) -> CacheControl {
        for name in targeted {
            let values = headers.get_all(name);
            let present = values
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| !v.trim().is_empty()));
            // RFC 9213 §2.1: a targeted field is a Structured Field dictionary; one that fails
            // to parse (or gives a directive a value of the wrong type) is ignored as a whole.
            let valid = values
                .iter()
                .all(|v| v.to_str().is_ok_and(targeted_field_is_valid));
            if present && valid {
                let (cc, _) = CacheControl::parse_fields(values);
                return CacheControl {
                    targeted: true,
                    ..cc
                };
            }
        }
        CacheControl::parse(headers)
    }

    /// The directives of every value of one field; also whether there was any value.
    fn parse_fields(values: http::header::GetAll<'_, http::HeaderValue>) -> (CacheControl, bool) {
        let mut cc = CacheControl::default();
        let mut any = false;
        for value in values {
            let Ok(value) = value.to_str() else { continue };
            any = true;
            for directive in split_directives(value) {
                let directive = without_parameters(directive);
                let (name, argument) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim())),
                    None => (directive.trim(), None),
                };
                match name.to_ascii_lowercase().as_str() {
                    "max-age" => cc.max_age = argument.and_then(delta_seconds),
                    "s-maxage" => cc.s_maxage = argument.and_then(delta_seconds),
                    "no-store" => cc.no_store = true,
                    // With field names, only those fields need revalidation (or must not be
                    // stored); treating them as whole-response directives would be stricter
                    // than needed, so the qualified forms are left to the field handling.
                    "no-cache" => match argument {
                        None => cc.no_cache = true,
                        Some(fields) => cc.no_cache_fields.extend(field_names(fields)),
                    },
                    "private" => match argument {
                        None => cc.private = true,
                        Some(fields) => cc.private_fields.extend(field_names(fields)),
                    },
                    "must-understand" => cc.must_understand = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "stale-while-revalidate" => {
                        cc.stale_while_revalidate = argument.and_then(delta_seconds)
                    }
                    "stale-if-error" => cc.stale_if_error = argument.and_then(delta_seconds),
                    "max-stale" => cc.max_stale = Some(argument.and_then(delta_seconds)),
                    "min-fresh" => cc.min_fresh = argument.and_then(delta_seconds),
                    "only-if-cached" => cc.only_if_cached = true,
                    _ => {}
                }
            }
        }
        (cc, any)
    }
}

/// A directive without its Structured Field parameters (`max-age=60;x=1` → `max-age=60`);
/// a `;` inside a quoted string stays.
fn without_parameters(directive: &str) -> &str {
    let mut quoted = false;
    for (i, c) in directive.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return directive[..i].trim_end(),
            _ => {}
        }
    }
    directive
}

/// Whether a targeted field's value is a valid Structured Field dictionary (RFC 9651 §3.2) whose
/// delta-seconds directives carry integers.
fn targeted_field_is_valid(value: &str) -> bool {
    let mut rest = value.trim_matches([' ', '\t']).as_bytes();
    if rest.is_empty() {
        return true;
    }
    loop {
        let Some((key, after)) = sf_key(rest) else {
            return false;
        };
        rest = after;
        if let Some(after) = rest.strip_prefix(b"=") {
            let integer_expected = matches!(
                key,
                b"max-age" | b"s-maxage" | b"stale-while-revalidate" | b"stale-if-error"
            );
            match sf_item(after) {
                Some((is_integer, after)) if is_integer || !integer_expected => rest = after,
                _ => return false,
            }
        } else {
            // A bare key is `true`; its parameters follow.
            match sf_parameters(rest) {
                Some(after) => rest = after,
                None => return false,
            }
        }
        rest = rest.trim_ascii_start();
        match rest.split_first() {
            None => return true,
            Some((b',', after)) => {
                rest = after.trim_ascii_start();
                if rest.is_empty() {
                    return false;
                }
            }
            Some(_) => return false,
        }
    }
}

/// A dictionary key (RFC 9651 §3.1.2): lower-case letter or `*`, then `a-z0-9_-.*`.
fn sf_key(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = *input.first()?;
    if !(first.is_ascii_lowercase() || first == b'*') {
        return None;
    }
    let end = input
        .iter()
        .position(|&b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b)))
        .unwrap_or(input.len());
    Some(input.split_at(end))
}

/// A member value: an item with parameters or an inner list. Also whether it is an integer.
fn sf_item(input: &[u8]) -> Option<(bool, &[u8])> {
    if let Some(mut rest) = input.strip_prefix(b"(") {
        loop {
            rest = rest.trim_ascii_start();
            if let Some(after) = rest.strip_prefix(b")") {
                return Some((false, sf_parameters(after)?));
            }
            let (_, after) = sf_bare_item(rest)?;
            rest = sf_parameters(after)?;
            if !rest.starts_with(b" ") && !rest.starts_with(b")") {
                return None;
            }
        }
    }
    let (is_integer, after) = sf_bare_item(input)?;
    Some((is_integer, sf_parameters(after)?))
}

/// `;key[=bare-item]` parameters.
fn sf_parameters(mut input: &[u8]) -> Option<&[u8]> {
    while let Some(after) = input.strip_prefix(b";") {
        let (_, after) = sf_key(after.trim_ascii_start())?;
        input = match after.strip_prefix(b"=") {
            Some(value) => sf_bare_item(value)?.1,
            None => after,
        };
    }
    Some(input)
}

/// A bare item: integer, decimal, string, token, byte sequence or boolean. Also whether it is an
/// integer.
fn sf_bare_item(input: &[u8]) -> Option<(bool, &[u8])> {
    let first = *input.first()?;
    match first {
        b'-' | b'0'..=b'9' => {
            let digits = usize::from(first == b'-');
            let end = input[digits..]
                .iter()
                .position(|b| !b.is_ascii_digit() && *b != b'.')
                .map_or(input.len(), |p| p + digits);
            let number = &input[digits..end];
            let dots = number.iter().filter(|b| **b == b'.').count();
            let integer_digits = number.iter().take_while(|b| b.is_ascii_digit()).count();
            let valid = match dots {
                0 => (1..=15).contains(&number.len()),
                1 => {
                    (1..=12).contains(&integer_digits)
                        && (2..=4).contains(&(number.len() - integer_digits))
                }
                _ => false,
            };
            valid.then_some((dots == 0, &input[end..]))
        }
        b'"' => {
            let mut i = 1;
            while i < input.len() {
                match input[i] {
                    b'\\' if matches!(input.get(i + 1), Some(b'"' | b'\\')) => i += 2,
                    b'"' => return Some((false, &input[i + 1..])),
                    0x20..=0x7e if input[i] != b'\\' => i += 1,
                    _ => return None,
                }
            }
            None
        }
        b':' => {
            let end = input[1..].iter().position(|b| *b == b':')? + 1;
            input[1..end]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b))
                .then_some((false, &input[end + 1..]))
        }
        b'?' => matches!(input.get(1), Some(b'0' | b'1')).then_some((false, &input[2..])),
        b if b.is_ascii_alphabetic() || b == b'*' => {
            let end = input
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(b)))
                .unwrap_or(input.len());
            Some((false, &input[end..]))
        }
        _ => None,
    }
}

/// The field names of a qualified `no-cache="..."` / `private="..."`, lower case.
fn field_names(argument: &str) -> impl Iterator<Item = String> + '_ {
    argument
        .trim_matches('"')
        .split(',')
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
}

/// Splits a directive list on commas that are not inside a quoted string
/// (`no-cache="a, b", max-age=5` is two directives).
fn split_directives(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(values: &[&str]) -> CacheControl {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(CACHE_CONTROL, v.parse().unwrap());
        }
        CacheControl::parse(&headers)
    }

    #[test]
    fn directives_parse_across_fields_case_insensitively() {
        let parsed = cc(&[
            "Max-Age=60, s-maxage=\"120\"",
            "must-revalidate, stale-while-revalidate=30",
        ]);
        assert_eq!(parsed.max_age, Some(Duration::from_secs(60)));
        assert_eq!(parsed.s_maxage, Some(Duration::from_secs(120)));
        assert!(parsed.must_revalidate);
        assert_eq!(parsed.stale_while_revalidate, Some(Duration::from_secs(30)));
    }

    #[test]
    fn qualified_forms_and_bad_values() {
        let parsed =
            cc(&["private=\"set-cookie, x-a\", no-cache=\"x-b\", max-age=-1, max-age=abc"]);
        assert!(
            !parsed.private && !parsed.no_cache,
            "field-qualified forms are not whole-response"
        );
        assert_eq!(parsed.max_age, None, "invalid delta-seconds are ignored");
        assert!(cc(&["no-store"]).no_store);
        assert!(cc(&["private"]).private);
        assert_eq!(cc(&["max-stale"]).max_stale, Some(None));
        assert_eq!(
            cc(&["max-age=99999999999999999999"])
                .max_age
                .map(|d| d.as_secs() > 0),
            Some(true)
        );
    }

    #[test]
    fn pragma_counts_only_without_cache_control() {
        let mut headers = HeaderMap::new();
        headers.insert(PRAGMA, "no-cache".parse().unwrap());
        assert!(CacheControl::parse(&headers).no_cache);
        headers.insert(CACHE_CONTROL, "max-age=5".parse().unwrap());
        assert!(!CacheControl::parse(&headers).no_cache);
    }
}
