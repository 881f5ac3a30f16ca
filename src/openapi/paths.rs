//! The document's paths as gateway routes: templates (integer parameters typed, catch-alls,
//! one name per router position), collections, route names, and the base path of its servers.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The path template as the gateway writes it: `{id}` becomes `{id:int}` when the document
/// types the parameter as an integer; a last parameter that may hold slashes (GitHub's
/// `x-multi-segment`, as in `/contents/{path}` for `docs/readme.md`) becomes a catch-all
/// `{*path}`; several parameters in one segment (`{base}...{head}`) become one (`{base_head}`),
/// since a route parameter is a whole segment.
pub(super) fn gateway_template(document: &Value, path: &str, item: &Value) -> String {
    let mut integers = BTreeSet::new();
    let mut multi_segment = BTreeSet::new();
    let operations = ["get", "head", "post", "put", "patch", "delete"]
        .iter()
        .filter_map(|m| item.get(*m));
    let lists = std::iter::once(item).chain(operations);
    for list in lists.filter_map(|v| v.get("parameters").and_then(Value::as_array)) {
        for parameter in list {
            let parameter = resolve(document, parameter);
            if parameter.get("in").and_then(Value::as_str) != Some("path") {
                continue;
            }
            let Some(name) = parameter.get("name").and_then(Value::as_str) else {
                continue;
            };
            let kind = parameter
                .pointer("/schema/type")
                .or_else(|| parameter.get("type"));
            let is_integer = match kind {
                Some(Value::String(t)) => t == "integer",
                // 3.1: `type: [integer, "null"]`.
                Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
                _ => false,
            };
            if is_integer {
                integers.insert(name.to_owned());
            }
            if parameter.get("x-multi-segment").and_then(Value::as_bool) == Some(true) {
                multi_segment.insert(name.to_owned());
            }
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    let written: Vec<String> = segments
        .iter()
        .enumerate()
        .map(|(at, segment)| {
            let names = segment_params(segment);
            match names.as_slice() {
                [] => (*segment).to_owned(),
                [name] if *segment == format!("{{{name}}}") => {
                    if at == last && multi_segment.contains(*name) {
                        format!("{{*{name}}}")
                    } else if integers.contains(*name) {
                        format!("{{{name}:int}}")
                    } else {
                        (*segment).to_owned()
                    }
                }
                several => format!("{{{}}}", several.join("_")),
            }
        })
        .collect();
    written.join("/")
}

/// The parameter names in one path segment: `{base}...{head}` → `base`, `head`.
fn segment_params(segment: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = segment;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        names.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    names
}

/// Gives parameters at one position of the path tree one name (the first seen):
/// `/attestations/{attestation_id}` beside `/attestations/{subject_digest}` both use
/// `{attestation_id}`, since a router position holds one parameter.
pub(super) fn unify_parameter_names(templates: &mut BTreeMap<String, String>) {
    let mut named: BTreeMap<String, String> = BTreeMap::new();
    for template in templates.values_mut() {
        let mut prefix = String::new();
        let mut segments = Vec::new();
        for segment in template.split('/') {
            let written = match segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .filter(|inner| !inner.starts_with('*'))
            {
                Some(inner) => {
                    let (name, kind) = inner
                        .split_once(':')
                        .map_or((inner, None), |(n, k)| (n, Some(k)));
                    let position = format!("{prefix}/{{}}");
                    let name = named
                        .entry(position)
                        .or_insert_with(|| name.to_owned())
                        .clone();
                    match kind {
                        Some(kind) => format!("{{{name}:{kind}}}"),
                        None => format!("{{{name}}}"),
                    }
                }
                None => segment.to_owned(),
            };
            prefix.push('/');
            prefix.push_str(&untyped(&written));
            segments.push(written);
        }
        *template = segments.join("/");
    }
}

/// A catch-all (`{*branch}`) where another path has a parameter at the same position
/// (`/branches/{branch}/protection`) would swallow that path: it becomes a plain parameter, whose
/// value then cannot hold a slash (clients send one as `%2F`, which needs `[server]
/// encoded_slash = "keep"`).
pub(super) fn demote_blocking_catch_alls(templates: &mut BTreeMap<String, String>) {
    let all: Vec<String> = templates.values().map(|t| untyped(t)).collect();
    for template in templates.values_mut() {
        let Some(at) = template.rfind("/{*") else {
            continue;
        };
        let prefix = untyped(&template[..=at]);
        let blocked = all.iter().any(|other| {
            other
                .strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with('{') && !rest.starts_with("{*"))
        });
        if blocked {
            template.replace_range(at + 1..at + 3, "{");
        }
    }
}

/// Paths as the gateway routes them: a query in a path key (`/responses?beta=true`) dropped,
/// the operations of keys that then coincide merged (the first key's operation per method).
pub(super) fn merged_paths(document: &Value) -> BTreeMap<String, Value> {
    let mut merged: BTreeMap<String, Value> = BTreeMap::new();
    let Some(paths) = document.get("paths").and_then(Value::as_object) else {
        return merged;
    };
    for (key, item) in paths {
        let path = key.split('?').next().unwrap_or(key).to_owned();
        match (merged.get_mut(&path), item.as_object()) {
            (Some(Value::Object(into)), Some(from)) => {
                for (name, value) in from {
                    into.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
            _ => {
                merged.entry(path).or_insert_with(|| item.clone());
            }
        }
    }
    merged
}

/// `{"$ref": "#/components/parameters/Id"}` → the object it points at (local references only).
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix('#')
            .and_then(|pointer| document.pointer(pointer))
            .unwrap_or(value),
        None => value,
    }
}

/// Health and status endpoints, whose answers a cache would make stale.
pub(super) fn is_probe(template: &str) -> bool {
    let last = template.rsplit('/').next().unwrap_or_default();
    matches!(
        last.to_ascii_lowercase().as_str(),
        "health" | "healthz" | "livez" | "ready" | "readyz" | "status" | "ping" | "metrics"
    )
}

/// The list a write to an item changes, as a purge path (parameters untyped: purge templates
/// name parameters, the route types them): `/products/{id:int}` → `/products` when the
/// document has that path, also spelled `/products/` (FastAPI's and Django REST Framework's
/// collections).
pub(super) fn collection_of(template: &str, templates: &BTreeSet<String>) -> Option<String> {
    let (parent, last) = template.trim_end_matches('/').rsplit_once('/')?;
    if !last.starts_with('{') || parent.is_empty() {
        return None;
    }
    let found = templates
        .iter()
        .find(|t| t.as_str() != "/" && t.trim_end_matches('/') == parent)?;
    Some(untyped(found))
}

/// `/users/{user_id:int}/orders` → `/users/{user_id}/orders`.
pub(super) fn untyped(template: &str) -> String {
    template.replace(":int}", "}")
}

/// `/shops/{shop}/products/{id:int}` → `shops-shop-products-id`.
pub(super) fn route_name(template: &str) -> String {
    let words: Vec<String> = template
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|segment| {
            let segment = segment.trim_matches(|c| c == '{' || c == '}');
            let segment = segment.split(':').next().unwrap_or(segment);
            segment
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect()
        })
        .collect();
    if words.is_empty() {
        "root".to_owned()
    } else {
        words.join("-")
    }
}

pub(super) fn unique(names: &mut BTreeSet<String>, name: String) -> String {
    let mut candidate = name.clone();
    let mut n = 2;
    while !names.insert(candidate.clone()) {
        candidate = format!("{name}-{n}");
        n += 1;
    }
    candidate
}

/// The document's server URLs, in order, with `{variables}` at their defaults.
fn server_urls(document: &Value) -> Vec<String> {
    let Some(servers) = document.get("servers").and_then(Value::as_array) else {
        return Vec::new();
    };
    servers
        .iter()
        .filter_map(|server| {
            let mut url = server.get("url")?.as_str()?.to_owned();
            if let Some(variables) = server.get("variables").and_then(Value::as_object) {
                for (name, variable) in variables {
                    if let Some(default) = variable.get("default").and_then(Value::as_str) {
                        url = url.replace(&format!("{{{name}}}"), default);
                    }
                }
            }
            Some(url)
        })
        .collect()
}

/// The first server URL that names a host (relative ones name the document's own host).
pub(super) fn server_url(document: &Value) -> Option<String> {
    server_urls(document)
        .iter()
        // A variable without a default (`http://{hostname}`) names no host yet.
        .filter(|url| !url.contains('{'))
        .filter_map(|url| url.parse::<http::Uri>().ok())
        // The gateway forwards the request's own path: the origin is scheme and authority.
        .find_map(|uri| Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?)))
}

/// The path the first server URL puts before every path of the document (`/v2` for
/// `https://host/v2/` or `/v2`), without a trailing slash; empty when there is none.
pub(super) fn base_path(document: &Value) -> String {
    let Some(url) = server_urls(document).into_iter().next() else {
        return String::new();
    };
    let url = url.split(['?', '#']).next().unwrap_or_default();
    // What follows the authority of an absolute URL (`http://{hostname}/api` → `/api`, even
    // with a variable left in the host).
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |at| &rest[at..]),
        None => url,
    };
    let path = path.trim_end_matches('/');
    if path.starts_with('/') {
        path.to_owned()
    } else {
        String::new()
    }
}
