//! The README's configuration reference documents exactly the keys the configuration accepts.
//!
//! The accepted keys come from the deserializer itself: every table rejects unknown keys, and
//! its error lists the keys it expects, so probing each table with an unknown key yields its
//! schema. Adding a field without documenting it (or documenting one that does not exist)
//! fails here.

use std::collections::BTreeSet;
use std::path::Path;

use cachegate::config::LoadedConfig;

const PROBE: &str = "zz_not_a_key";

/// The keys a table accepts, from the error for an unknown key placed where `template` has `@`.
fn accepted(template: &str) -> BTreeSet<String> {
    let source = template.replace('@', &format!("{PROBE} = 1"));
    let err = LoadedConfig::from_source(Path::new("probe.toml"), source.clone())
        .expect_err("the probe key must be refused")
        .to_string();
    let expected = err
        .split_once(&format!("unknown field `{PROBE}`, expected "))
        .unwrap_or_else(|| panic!("no unknown-field error for:\n{source}\n{err}"))
        .1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Backticked keys in the first column of the README tables under each `### ` heading.
fn documented() -> Vec<(String, BTreeSet<String>)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let reference = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("a Configuration reference section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut sections: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in reference.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            sections.push((heading.to_owned(), BTreeSet::new()));
        } else if let (Some(rest), Some((_, keys))) =
            (line.strip_prefix("| `"), sections.last_mut())
        {
            if let Some((key, _)) = rest.split_once("` |") {
                keys.insert(key.to_owned());
            }
        }
    }
    sections
}

fn prefixed(prefix: &str, keys: BTreeSet<String>) -> BTreeSet<String> {
    keys.into_iter().map(|k| format!("{prefix}{k}")).collect()
}

fn section<'a>(
    sections: &'a [(String, BTreeSet<String>)],
    heading_start: &str,
) -> &'a BTreeSet<String> {
    &sections
        .iter()
        .find(|(h, _)| h.starts_with(heading_start))
        .unwrap_or_else(|| panic!("no README section `### {heading_start}...`"))
        .1
}

#[test]
fn every_table_heading_is_a_top_level_key() {
    let sections = documented();
    let headings: BTreeSet<String> = sections
        .iter()
        .flat_map(|(h, _)| {
            h.split('`')
                .skip(1)
                .step_by(2)
                .map(|t| t.trim_matches(['[', ']']).to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.contains('.'))
        .collect();
    assert_eq!(headings, accepted("@\n"));
}

#[test]
fn each_table_documents_exactly_its_keys() {
    let sections = documented();
    let tables = [
        ("`[server]`", accepted("[server]\n@\n")),
        ("`[upstream]`", accepted("[upstream]\n@\n")),
        ("`[limits]`", accepted("[limits]\n@\n")),
        ("`[store]`", accepted("[store]\n@\n")),
        ("`[rate_limit]`", accepted("[rate_limit]\n@\n")),
        ("`[cache]`", accepted("[cache]\n@\n")),
        ("`[admin]`", accepted("[admin]\n@\n")),
        ("`[auth]`", accepted("[auth]\n@\n")),
        (
            "`[[auth.providers]]`",
            accepted("[auth]\n[[auth.providers]]\n@\n"),
        ),
    ];
    for (heading, schema) in tables {
        assert_eq!(
            section(&sections, heading),
            &schema,
            "README section {heading} vs the schema"
        );
    }

    let mut listeners = accepted("[[listeners]]\n@\n");
    listeners.remove("tls");
    listeners.extend(prefixed(
        "tls.",
        accepted("[[listeners]]\naddress = \"x\"\n[listeners.tls]\n@\n"),
    ));
    assert_eq!(
        section(&sections, "`[[listeners]]`"),
        &listeners,
        "README section [[listeners]]"
    );

    // [defaults] and [[routes]]: the shared policy keys, the route's own keys, and the fields
    // of the auth table, the rate_limit table and each limit.
    let policy = accepted("[defaults]\n@\n");
    let mut expected = policy.clone();
    let route_only: BTreeSet<String> = accepted("[[routes]]\n@\n")
        .difference(&policy)
        .cloned()
        .collect();
    expected.extend(prefixed("routes.", route_only));
    expected.extend(prefixed(
        "auth.",
        accepted("[[routes]]\npath = \"/\"\nauth = { @ }\n"),
    ));
    expected.extend(prefixed(
        "cache.",
        accepted("[[routes]]\npath = \"/\"\ncache = { @ }\n"),
    ));
    expected.extend(prefixed(
        "rate_limit.",
        accepted("[[routes]]\npath = \"/\"\nrate_limit = { @ }\n"),
    ));
    expected.extend(prefixed(
        "purge.",
        accepted("[[routes]]\npath = \"/\"\npurge = { @ }\n"),
    ));
    expected.extend(prefixed(
        "rate_limit.limits[].",
        accepted("[[routes]]\npath = \"/\"\nrate_limit = { limits = [ { @ } ] }\n"),
    ));
    assert_eq!(
        section(&sections, "`[defaults]`"),
        &expected,
        "README section [defaults] and [[routes]]"
    );
}
