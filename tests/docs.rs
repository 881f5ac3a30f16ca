//! The README's configuration reference and the JSON Schema (`cachegate schema`) document
//! exactly the keys the configuration accepts.
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
        ("`[telemetry]`", accepted("[telemetry]\n@\n")),
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

fn schema() -> serde_json::Value {
    serde_json::from_str(&cachegate::config::json_schema()).unwrap()
}

/// The object schema reached by following `path` (property names; arrays are stepped through)
/// from the root, through `$ref`s and the `anyOf` members that describe tables.
fn schema_keys(schema: &serde_json::Value, path: &[&str]) -> BTreeSet<String> {
    fn table<'a>(
        root: &'a serde_json::Value,
        node: &'a serde_json::Value,
    ) -> &'a serde_json::Value {
        if let Some(reference) = node.get("$ref").and_then(|r| r.as_str()) {
            return table(root, root.pointer(&reference[1..]).unwrap());
        }
        if let Some(items) = node.get("items") {
            return table(root, items);
        }
        if let Some(members) = node.get("anyOf").and_then(|m| m.as_array()) {
            if let Some(found) = members
                .iter()
                .map(|m| table(root, m))
                .find(|t| t.get("properties").is_some())
            {
                return found;
            }
        }
        node
    }
    let mut node = table(schema, schema);
    for key in path {
        node = table(schema, &node["properties"][*key]);
    }
    assert_eq!(
        node["additionalProperties"], false,
        "{path:?}: the schema must refuse unknown keys, as the loader does"
    );
    node["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no table at {path:?}"))
        .keys()
        .cloned()
        .collect()
}

/// Every table: the keys the schema names are the keys the loader accepts.
#[test]
fn the_schema_and_the_loader_accept_the_same_keys() {
    let schema = schema();
    let tables: [(&[&str], &str); 20] = [
        (&[], "@\n"),
        (&["server"], "[server]\n@\n"),
        (&["upstream"], "[upstream]\n@\n"),
        (&["limits"], "[limits]\n@\n"),
        (&["store"], "[store]\n@\n"),
        (&["rate_limit"], "[rate_limit]\n@\n"),
        (&["cache"], "[cache]\n@\n"),
        (&["admin"], "[admin]\n@\n"),
        (&["telemetry"], "[telemetry]\n@\n"),
        (&["auth"], "[auth]\n@\n"),
        (&["auth", "providers"], "[auth]\n[[auth.providers]]\n@\n"),
        (&["listeners"], "[[listeners]]\n@\n"),
        (
            &["listeners", "tls"],
            "[[listeners]]\naddress = \"x\"\n[listeners.tls]\n@\n",
        ),
        (&["defaults"], "[defaults]\n@\n"),
        (&["routes"], "[[routes]]\n@\n"),
        (
            &["routes", "auth"],
            "[[routes]]\npath = \"/\"\nauth = { @ }\n",
        ),
        (
            &["routes", "cache"],
            "[[routes]]\npath = \"/\"\ncache = { @ }\n",
        ),
        (
            &["routes", "rate_limit"],
            "[[routes]]\npath = \"/\"\nrate_limit = { @ }\n",
        ),
        (
            &["routes", "purge"],
            "[[routes]]\npath = \"/\"\npurge = { @ }\n",
        ),
        (
            &["routes", "rate_limit", "limits"],
            "[[routes]]\npath = \"/\"\nrate_limit = { limits = [ { @ } ] }\n",
        ),
    ];
    for (path, template) in tables {
        assert_eq!(
            schema_keys(&schema, path),
            accepted(template),
            "schema vs loader at {path:?}"
        );
    }
}

/// The committed schema is what `cachegate schema` prints, every shipped configuration names it
/// on its first line (for taplo-based editors), and every shipped configuration is valid by it.
#[test]
fn shipped_configurations_carry_and_satisfy_the_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let committed = std::fs::read_to_string(root.join("cachegate.schema.json")).unwrap();
    assert!(
        committed == cachegate::config::json_schema(),
        "config/cachegate.schema.json is out of date: run `cachegate schema > config/cachegate.schema.json`"
    );
    let validator = jsonschema::validator_for(&schema()).expect("a valid JSON Schema");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next(),
            Some("#:schema ./cachegate.schema.json"),
            "{} must start with the #:schema line",
            path.display()
        );
        let table: toml::Table = toml::from_str(&text).unwrap();
        let json = serde_json::to_value(&table).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        checked += 1;
    }
    assert!(checked >= 5);

    // And the schema refuses what the loader refuses: an unknown key, a wrong type.
    for (bad, what) in [
        (
            r#"{"listeners": [], "upstream": {"addresses": []}, "zz": 1}"#,
            "unknown key",
        ),
        (
            r#"{"listeners": [], "upstream": {"addresses": []}, "server": {"threads": "two"}}"#,
            "wrong type",
        ),
        (
            r#"{"listeners": [], "upstream": {"addresses": []}, "defaults": {"auth": "sometimes"}}"#,
            "unknown mode",
        ),
        (r#"{"listeners": []}"#, "missing [upstream]"),
    ] {
        let value: serde_json::Value = serde_json::from_str(bad).unwrap();
        assert!(
            !validator.is_valid(&value),
            "the schema accepts a {what}: {bad}"
        );
    }
}
