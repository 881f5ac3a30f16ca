//! Property tests for the code that reads hostile input: request paths, query strings,
//! `Cache-Control` values, shared-tier entries (anything may sit in Redis) and configuration
//! files. None may panic; canonical forms are idempotent.

use std::borrow::Cow;

use bytes::Bytes;
use cachegate::cache::directives::CacheControl;
use cachegate::cache::entry::Entry;
use cachegate::cache::key::{normalized_query, QueryRule};
use cachegate::config::LoadedConfig;
use cachegate::routing::canonical::{canonical_path, PathRules};
use cachegate::snapshot::Snapshot;
use http::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL};
use proptest::prelude::*;

/// Path-like text: the characters that matter to canonicalisation, often.
fn path_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(";".to_owned()),
        Just("\\".to_owned()),
        Just("%".to_owned()),
        Just("%2e".to_owned()),
        Just("%2F".to_owned()),
        Just("%5c".to_owned()),
        Just("%41".to_owned()),
        Just("%c3%a9".to_owned()),
        Just("%00".to_owned()),
        "[a-zA-Z0-9_~-]{1,4}",
        "%[0-9a-fA-FzZ]{0,2}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(piece, 0..16).prop_map(|parts| format!("/{}", parts.concat()))
}

fn rules() -> impl Strategy<Value = PathRules> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(a, b, c, d)| {
        PathRules {
            ignore_trailing_slash: a,
            case_insensitive: b,
            strip_path_parameters: c,
            keep_encoded_slash: d,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn canonical_paths_are_idempotent_and_clean(path in path_text(), rules in rules()) {
        if let Ok(canonical) = canonical_path(&path, &rules) {
            let canonical = canonical.into_owned();
            prop_assert!(canonical.starts_with('/'));
            prop_assert!(canonical.is_ascii(), "{canonical}");
            prop_assert!(!canonical.contains("//"), "{canonical}");
            for segment in canonical.split('/') {
                prop_assert!(segment != "." && segment != "..", "{canonical}");
            }
            if rules.ignore_trailing_slash && canonical.len() > 1 {
                prop_assert!(!canonical.ends_with('/'), "{canonical}");
            }
            if !rules.keep_encoded_slash {
                prop_assert!(!canonical.to_ascii_uppercase().contains("%2F"), "{canonical}");
            }
            let again = canonical_path(&canonical, &rules);
            prop_assert_eq!(again, Ok(Cow::Borrowed(canonical.as_str())));
        }
    }

    #[test]
    fn a_trailing_slash_changes_nothing_when_ignored(path in path_text()) {
        let rules = PathRules::default();
        let with_slash = format!("{path}/");
        prop_assert_eq!(
            canonical_path(&path, &rules).map(Cow::into_owned),
            canonical_path(&with_slash, &rules).map(Cow::into_owned)
        );
    }

    #[test]
    fn normalised_queries_are_idempotent(query in "[a-z0-9=&+%;~. -]{0,40}|\\PC{0,20}") {
        for rule in [QueryRule::All, QueryRule::Sorted, QueryRule::Only(vec!["a".into(), "page".into()])] {
            let once = normalized_query(Some(&query), &rule);
            prop_assert!(once.is_ascii());
            prop_assert_eq!(normalized_query(Some(&once), &rule), once.clone(), "{:?}", rule);
        }
    }

    #[test]
    fn cache_control_values_never_panic(value in "\\PC{0,60}|[a-z-]{1,16}(=\"?[0-9a-z]{0,30}\"?)?(, ?[a-z-]{1,16}(=[0-9]{0,25})?){0,4}") {
        if let Ok(value) = HeaderValue::from_str(&value) {
            let mut headers = HeaderMap::new();
            headers.insert(CACHE_CONTROL, value);
            let cc = CacheControl::parse(&headers);
            for d in [cc.max_age, cc.s_maxage, cc.stale_while_revalidate, cc.stale_if_error].into_iter().flatten() {
                prop_assert!(d.as_secs() <= 1 << 31);
            }
        }
    }

    #[test]
    fn any_bytes_in_the_shared_tier_decode_or_fail_cleanly(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Entry::decode(Bytes::from(data));
    }

    #[test]
    fn entries_round_trip_and_their_times_saturate(
        status in 100u16..=999,
        times in prop::array::uniform6(any::<u64>()),
        path in "/[a-z0-9/]{0,30}",
        tags in prop::collection::vec("[a-z:0-9]{1,12}", 0..4),
        body in prop::collection::vec(any::<u8>(), 0..200),
        headers in prop::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,30}"), 0..6),
        compress in any::<bool>(),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        let entry = Entry {
            status,
            headers: map,
            body: Bytes::from(body),
            stored_at_ms: times[0],
            fresh_for_ms: times[1],
            stale_while_revalidate_ms: times[2],
            stale_if_error_ms: times[3],
            keep_ms: times[4],
            stamp: times[5],
            path,
            depends_on: tags,
            vary: vec![HeaderName::from_static("accept")],
        };
        let encoded = entry.encode_compressed(compress.then_some(0));
        let decoded = Entry::decode(encoded).expect("an encoded entry decodes");
        prop_assert_eq!(&decoded, &entry);
        let _ = (decoded.fresh_until_ms(), decoded.retained_ms());
    }

    #[test]
    fn any_configuration_text_is_accepted_or_refused_without_panic(text in config_text()) {
        let path = std::path::Path::new("fuzz.toml");
        if let Ok(loaded) = LoadedConfig::from_source(path, text) {
            let _ = Snapshot::compile(&loaded);
        }
    }
}

/// Configuration-like text: a valid file with one of its values replaced by something odd.
fn config_text() -> impl Strategy<Value = String> {
    const BASE: &str = r#"
[server]
threads = 1
trailing_slash = "ignore"
[[listeners]]
address = "127.0.0.1:18080"
[upstream]
addresses = ["http://127.0.0.1:3000"]
connect_timeout = "1s"
[defaults]
unmatched = "deny"
[[routes]]
path = "/products/{id:int}"
methods = ["GET"]
cache = { ttl = "30s", query = ["page"], vary = ["accept"] }
rate_limit = { limits = [ { rate = "10/second", burst = 5, key = "ip" } ] }
purge = ["/products"]
"#;
    let odd = prop_oneof![
        "\\PC{0,12}",
        Just("\"/a/{b\"".to_owned()),
        Just("\"/{*x}/{y}\"".to_owned()),
        Just("\"99999999999999999999s\"".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("\"0/second\"".to_owned()),
        Just("\"${UNSET_VARIABLE_FOR_FUZZING}\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("-1".to_owned()),
    ];
    let anchors = [
        "1",
        "\"ignore\"",
        "\"127.0.0.1:18080\"",
        "\"1s\"",
        "\"deny\"",
        "\"/products/{id:int}\"",
        "\"30s\"",
        "\"10/second\"",
        "5",
        "[\"page\"]",
    ];
    (0..anchors.len(), odd).prop_map(move |(i, odd)| BASE.replacen(anchors[i], &odd, 1))
}
