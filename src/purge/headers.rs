//! The origin's tag headers: `Cache-Groups` and `Surrogate-Key` say what a response depends
//! on, `Cache-Group-Invalidation` what a write's response invalidates (RFC 9875).

use http::header::{HeaderMap, HeaderName};

/// Tags the origin gives a response (space-separated); read, then removed before the client
/// sees the response.
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// Tags the origin gives a response (RFC 9875: a structured list of strings).
pub const CACHE_GROUPS: HeaderName = HeaderName::from_static("cache-groups");
/// Tags a write's response asks to invalidate (RFC 9875).
pub const CACHE_GROUP_INVALIDATION: HeaderName =
    HeaderName::from_static("cache-group-invalidation");

/// The members of RFC 9875 list fields (`"a", "b"`; parameters ignored).
fn group_list<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|member| {
            let member = member.split(';').next().unwrap_or_default().trim();
            let member = member
                .strip_prefix('"')
                .and_then(|m| m.strip_suffix('"'))
                .unwrap_or(member);
            (!member.is_empty()).then(|| member.to_owned())
        })
}

/// The tags an origin's response carries: `Cache-Groups` members and `Surrogate-Key` words.
pub fn response_tags(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    let surrogate = headers
        .get_all(&SURROGATE_KEY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .map(str::to_owned);
    group_list(headers, &CACHE_GROUPS).chain(surrogate)
}

/// The tags a write's response asks to invalidate (`Cache-Group-Invalidation`).
pub fn invalidated_tags(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    group_list(headers, &CACHE_GROUP_INVALIDATION)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn tags_come_from_cache_groups_and_surrogate_key() {
        let mut headers = HeaderMap::new();
        headers.append(
            CACHE_GROUPS,
            "\"products\", \"product:7\";x=1".parse().unwrap(),
        );
        headers.append(SURROGATE_KEY, "listing  shop:2".parse().unwrap());
        let tags: Vec<String> = response_tags(&headers).collect();
        assert_eq!(tags, ["products", "product:7", "listing", "shop:2"]);
        headers.append(CACHE_GROUP_INVALIDATION, "\"products\"".parse().unwrap());
        assert_eq!(invalidated_tags(&headers).collect::<Vec<_>>(), ["products"]);
    }
}
