//! HTTP caching as the RFCs write it, on the real binaries: an origin (`/__respond`) that sends
//! exactly the headers a test asks for, and the gateway in pure RFC 9111 mode (a rule with no
//! `ttl`) unless a test says otherwise. Each test is a row of the README's conformance table.

mod common;

use std::time::{Duration, SystemTime};

use common::{config_for, get, x_cache, Gateway, Upstream};

/// A gateway whose `/__respond` route has the cache rule `rule`.
fn gateway(upstream: &Upstream, rule: &str) -> Gateway {
    Gateway::start(&config_for(
        &[&upstream.url()],
        &format!("[[routes]]\npath = \"/__respond\"\ncache = {{ {rule} }}\n"),
    ))
}

/// `/__respond` answering with `headers` (`status` sets the status).
fn respond(headers: &[(&str, &str)]) -> String {
    let query: Vec<String> = headers
        .iter()
        .map(|(name, value)| {
            let name = match *name {
                "status" | "cache-control" | "expires" | "age" | "date" | "vary" | "etag"
                | "last-modified" => name.to_string(),
                other => format!("h.{other}"),
            };
            format!("{name}={}", encode(value))
        })
        .collect();
    format!("/__respond?{}", query.join("&"))
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends the same request twice; whether the second was answered from cache.
async fn stored(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> bool {
    let first = get(gateway, path, headers).await;
    assert_ne!(x_cache(&first), "HIT", "{path}: a first request cannot hit");
    x_cache(&get(gateway, path, headers).await) == "HIT"
}

fn http_date(at: SystemTime) -> String {
    httpdate::fmt_http_date(at)
}

/// RFC 9111 §3 and §4.2.2: explicit freshness makes any final status storable; without it
/// (no rule `ttl`), only the heuristically cacheable statuses are stored, from `Last-Modified`.
#[tokio::test]
async fn explicit_freshness_stores_any_final_status_and_heuristics_only_the_listed_ones() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    for status in [
        "200", "204", "299", "302", "303", "307", "308", "400", "500", "502", "503", "504", "599",
    ] {
        assert!(
            stored(
                &gw,
                &respond(&[("status", status), ("cache-control", "max-age=3600")]),
                &[]
            )
            .await,
            "{status} with max-age=3600"
        );
    }
    let modified = http_date(SystemTime::now() - Duration::from_secs(10 * 24 * 3600));
    let heuristic =
        |status: &'static str| respond(&[("status", status), ("last-modified", modified.as_str())]);
    assert!(
        stored(&gw, &heuristic("200"), &[]).await,
        "200 with only Last-Modified: 10% of 10 days"
    );
    assert!(stored(&gw, &heuristic("404"), &[]).await);
    assert!(
        !stored(&gw, &heuristic("500"), &[]).await,
        "500 is not heuristically cacheable"
    );
    assert!(
        !stored(&gw, &respond(&[("status", "200")]), &[]).await,
        "nothing to go on: not stored"
    );
    assert!(
        !stored(
            &gw,
            &respond(&[("status", "206"), ("cache-control", "max-age=3600")]),
            &[]
        )
        .await,
        "a 206 is never stored as the representation"
    );

    // A rule listing statuses wins over the origin.
    let listed = gateway(&upstream, "statuses = [200]");
    assert!(
        !stored(
            &listed,
            &respond(&[("status", "500"), ("cache-control", "max-age=3600")]),
            &[]
        )
        .await
    );
}

/// RFC 9110 §6.6.1 and RFC 9111 §4.3.4: a hit keeps the stored `Date` (its `Age` grows); a `304`
/// revalidation updates the stored headers, `Date` included.
#[tokio::test]
async fn a_hit_keeps_the_stored_date_and_a_304_updates_it() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "keep = \"60s\"");
    let path = respond(&[("cache-control", "max-age=2"), ("etag", "\"v1\"")]);
    let first = get(&gw, &path, &[]).await;
    let stored_date = first
        .header("date")
        .expect("the origin sends Date")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let hit = get(&gw, &path, &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(hit.header("date"), Some(stored_date.as_str()));
    assert!(hit.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revalidated = get(&gw, &path, &[]).await;
    assert_eq!(x_cache(&revalidated), "REVALIDATED");
    let new_date = revalidated.header("date").unwrap().to_owned();
    assert_ne!(
        new_date, stored_date,
        "the 304's Date replaced the stored one"
    );
    let next = get(&gw, &path, &[]).await;
    assert_eq!(x_cache(&next), "HIT");
    assert_eq!(next.header("date"), Some(new_date.as_str()));
    assert_eq!(upstream.served("GET /__respond 304").await, 1);
}

/// RFC 9111 §5.1: of `Age: 1, 2` the first member counts; an invalid `Age` makes the response
/// stale (cachegate's choice, see `age_field`), so it is not served from cache as fresh.
#[tokio::test]
async fn an_invalid_age_is_ignored_and_a_list_counts_its_first_member() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    // §5.1: a cache SHOULD ignore an `Age` that is not a non-negative integer.
    for age in ["3a", "-1", "1.5"] {
        let path = respond(&[("cache-control", "max-age=60"), ("age", age)]);
        assert!(stored(&gw, &path, &[]).await, "Age: {age} is ignored");
        let age: u64 = get(&gw, &path, &[])
            .await
            .header("age")
            .unwrap()
            .parse()
            .unwrap();
        assert!(age < 5, "counted from zero, not the invalid value: {age}");
    }
    let listed = respond(&[("cache-control", "max-age=60"), ("age", "5, 100")]);
    assert!(stored(&gw, &listed, &[]).await, "Age 5 of 60 s: fresh");
    let age: u64 = get(&gw, &listed, &[])
        .await
        .header("age")
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..60).contains(&age), "age {age}");
    assert!(
        !stored(
            &gw,
            &respond(&[("cache-control", "max-age=60"), ("age", "100")]),
            &[]
        )
        .await,
        "older than its lifetime"
    );
}

/// RFC 9213: `CDN-Cache-Control` replaces `Cache-Control` and `Expires` for the gateway, the
/// gateway's own field replaces both, and neither reaches the client.
#[tokio::test]
async fn targeted_cache_control_takes_precedence_and_stays_with_the_gateway() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    let cdn = respond(&[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ]);
    let first = get(&gw, &cdn, &[]).await;
    assert_eq!(first.header("cache-control"), Some("no-store"));
    assert!(first.header("cdn-cache-control").is_none());
    let hit = get(&gw, &cdn, &[]).await;
    assert_eq!(x_cache(&hit), "HIT", "CDN-Cache-Control wins over no-store");
    assert!(hit.header("cdn-cache-control").is_none());
    assert_eq!(
        hit.header("cache-control"),
        Some("no-store"),
        "for the client"
    );

    assert!(
        !stored(
            &gw,
            &respond(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "private"),
            ]),
            &[]
        )
        .await
    );
    // RFC 9213 §2.1: a targeted field that is not a valid Structured Field dictionary, or gives
    // a directive a value of the wrong type, is ignored as a whole (`Cache-Control` decides).
    for invalid in [
        "max-age=60, &&&&&",
        "max-age=\"60\"",
        "Max-Age=60",
        "max-age=60,",
    ] {
        assert!(
            !stored(
                &gw,
                &respond(&[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", invalid)
                ]),
                &[]
            )
            .await,
            "{invalid:?} is ignored"
        );
    }
    assert!(
        stored(
            &gw,
            &respond(&[
                ("cache-control", "no-store"),
                (
                    "cdn-cache-control",
                    "max-age=60;x=?1, public, no-cache=\"set-cookie\""
                ),
            ]),
            &[]
        )
        .await,
        "a valid dictionary with parameters and strings is used"
    );
    let own = respond(&[
        ("cdn-cache-control", "max-age=60"),
        ("cachegate-cache-control", "no-store"),
    ]);
    let resp = get(&gw, &own, &[]).await;
    assert!(resp.header("cachegate-cache-control").is_none());
    assert_ne!(
        x_cache(&get(&gw, &own, &[]).await),
        "HIT",
        "the gateway's own field wins"
    );
    let future = http_date(SystemTime::now() + Duration::from_secs(3600));
    assert!(
        !stored(
            &gw,
            &respond(&[
                ("expires", future.as_str()),
                ("cdn-cache-control", "must-revalidate"),
            ]),
            &[]
        )
        .await,
        "Expires is ignored when a targeted field is present"
    );

    // The field's name is configurable.
    let renamed = Gateway::start(&config_for(
        &[&upstream.url()],
        "[cache]\ncache_control_field = \"Edge-Control\"\n[[routes]]\npath = \"/__respond\"\ncache = { }\n",
    ));
    let path = respond(&[
        ("cache-control", "no-store"),
        ("edge-control", "max-age=60"),
    ]);
    assert!(stored(&renamed, &path, &[]).await);
    assert!(get(&renamed, &path, &[])
        .await
        .header("edge-control")
        .is_none());
}

/// RFC 9111 §3.5: without `allow_authorized`, a request with credentials is answered from, and
/// fills, only entries the origin marked `public`, `s-maxage` or `must-revalidate`.
#[tokio::test]
async fn requests_with_credentials_share_only_what_the_origin_made_public() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    let credentials = [("authorization", "Basic dXNlcjpwYXNz")];
    for directive in [
        "public, max-age=60",
        "s-maxage=60",
        "max-age=60, must-revalidate",
    ] {
        let path = respond(&[("cache-control", directive)]);
        assert!(stored(&gw, &path, &credentials).await, "{directive}");
        assert_eq!(x_cache(&get(&gw, &path, &[]).await), "HIT", "{directive}");
    }
    let plain = respond(&[("cache-control", "max-age=60")]);
    assert!(
        !stored(&gw, &plain, &credentials).await,
        "not stored from a request with credentials"
    );
    assert!(
        stored(&gw, &plain, &[]).await,
        "stored from an anonymous one"
    );
    assert_eq!(
        x_cache(&get(&gw, &plain, &credentials).await),
        "MISS",
        "and not served to a request with credentials"
    );
}

/// RFC 9111 §5.2.2.4 and §5.2.2.7: `no-cache="f"` and `private="f"` store the response without `f`.
#[tokio::test]
async fn fields_named_by_no_cache_and_private_are_not_stored() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    let path = respond(&[
        (
            "cache-control",
            "max-age=60, no-cache=\"x-secret\", private=\"x-user, x-other\"",
        ),
        ("x-secret", "s3"),
        ("x-user", "alice"),
        ("x-kept", "yes"),
    ]);
    let first = get(&gw, &path, &[]).await;
    assert_eq!(
        first.header("x-secret"),
        Some("s3"),
        "the filling client gets them"
    );
    let hit = get(&gw, &path, &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert!(hit.header("x-secret").is_none());
    assert!(hit.header("x-user").is_none());
    assert_eq!(hit.header("x-kept"), Some("yes"));
}

/// RFC 9110 §14: one byte range of a stored `200` is answered `206` from cache, `If-Range`
/// decides between the part and the whole, several ranges get the whole, and a range past the
/// end is `416`.
#[tokio::test]
async fn byte_ranges_are_served_from_a_stored_representation() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    let path = respond(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
    let whole = get(&gw, &path, &[]).await;
    let body = whole.body.clone();
    let length = body.len();
    assert!(length > 10);

    let part = get(&gw, &path, &[("range", "bytes=2-5")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(x_cache(&part), "HIT");
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 2-5/{length}").as_str())
    );
    assert_eq!(part.body, body.slice(2..6));
    let suffix = get(&gw, &path, &[("range", "bytes=-3")]).await;
    assert_eq!(suffix.status, 206);
    assert_eq!(suffix.body, body.slice(length - 3..));
    let open = get(&gw, &path, &[("range", "bytes=7-")]).await;
    assert_eq!(open.body, body.slice(7..));

    let matching = get(
        &gw,
        &path,
        &[("range", "bytes=0-0"), ("if-range", "\"v1\"")],
    )
    .await;
    assert_eq!(matching.status, 206);
    let changed = get(
        &gw,
        &path,
        &[("range", "bytes=0-0"), ("if-range", "\"v0\"")],
    )
    .await;
    assert_eq!((changed.status.as_u16(), changed.body.len()), (200, length));
    let several = get(&gw, &path, &[("range", "bytes=0-0,2-3")]).await;
    assert_eq!((several.status.as_u16(), several.body.len()), (200, length));

    let outside = get(&gw, &path, &[("range", &format!("bytes={length}-"))]).await;
    assert_eq!(outside.status, 416);
    assert_eq!(
        outside.header("content-range"),
        Some(format!("bytes */{length}").as_str())
    );
    assert_eq!(
        outside.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        upstream.served("GET /__respond").await,
        1,
        "all from one fill"
    );
}

/// Vary on a set-valued field: `en, fr` and `FR,en` select one variant, `de` another.
#[tokio::test]
async fn vary_on_set_valued_fields_ignores_order_case_and_spacing() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    let path = respond(&[("cache-control", "max-age=60"), ("vary", "Accept-Language")]);
    let first = get(&gw, &path, &[("accept-language", "en, fr")]).await;
    assert_eq!(x_cache(&first), "MISS");
    let same = get(&gw, &path, &[("accept-language", "FR,en")]).await;
    assert_eq!(x_cache(&same), "HIT");
    let other = get(&gw, &path, &[("accept-language", "de")]).await;
    assert_eq!(x_cache(&other), "MISS");
}

/// RFC 9110 §5.6.7 and RFC 9111 §5.3: `Expires` in the obsolete RFC 850 and asctime formats is
/// understood; an invalid one means already expired.
#[tokio::test]
async fn expires_in_obsolete_formats_is_understood_and_an_invalid_one_has_expired() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    for expires in [
        "Thursday, 01-Jan-37 00:00:00 GMT",
        "Thu Jan  1 00:00:00 2037",
        "Thu, 01 Jan 2037 00:00:00 GMT",
    ] {
        assert!(
            stored(&gw, &respond(&[("expires", expires)]), &[]).await,
            "{expires}"
        );
    }
    assert!(!stored(&gw, &respond(&[("expires", "soon")]), &[]).await);
}

/// RFC 9111 §5.2.2.3: `must-understand` lets a cache that understands the status ignore
/// `no-store`, and forbids storing statuses it does not understand.
#[tokio::test]
async fn must_understand_overrides_no_store_only_for_understood_statuses() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "");
    assert!(
        stored(
            &gw,
            &respond(&[("cache-control", "must-understand, no-store, max-age=60")]),
            &[]
        )
        .await
    );
    assert!(
        !stored(
            &gw,
            &respond(&[
                ("status", "299"),
                ("cache-control", "must-understand, no-store, max-age=60"),
            ]),
            &[]
        )
        .await
    );
}

/// RFC 9111 §5.2.1, a deliberate difference: on a shared route a client's `no-cache` does not
/// send the request to the origin (any client could otherwise defeat the cache for everyone);
/// a rule with `honor_client_cache_control` (the default on per-user routes) obeys it.
#[tokio::test]
async fn client_no_cache_is_ignored_on_shared_routes_unless_the_rule_honours_it() {
    let upstream = Upstream::start();
    let path = respond(&[("cache-control", "max-age=60")]);
    let shared = gateway(&upstream, "");
    get(&shared, &path, &[]).await;
    let forced = get(&shared, &path, &[("cache-control", "no-cache")]).await;
    assert_eq!(x_cache(&forced), "HIT");
    let honouring = gateway(&upstream, "honor_client_cache_control = true");
    get(&honouring, &path, &[]).await;
    let forced = get(&honouring, &path, &[("cache-control", "no-cache")]).await;
    assert_eq!(x_cache(&forced), "BYPASS");
}
