//! Route templates as the router knows them: `{id:int}` becomes `{id}` with its type kept
//! aside, static text folded like canonical paths, and typed parameters rewritten to their
//! canonical form (`/products/07` → `/products/7`). Also the checks a template must pass.

use super::canonical::PathRules;
use crate::config::Invalid;

/// How a path parameter's value is read by the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// Any text, compared as is.
    Text,
    /// An integer: `07`, `+7` and `7` are one value, written `7`.
    Int,
}

/// A template as the router knows it: `{id:int}` becomes `{id}`, with the type kept aside.
#[derive(Debug, Clone)]
pub(super) struct CompiledTemplate {
    /// The router's form of the template (types removed, canonical spelling).
    pub(super) path: String,
    /// Parameter types, by name; only typed templates need rewriting.
    pub(super) types: Vec<(String, ParamType)>,
    /// The template ends in `/` where trailing slashes are ignored: routing, keys and purges use
    /// the path without it, but that is the origin's spelling (`/items/` for FastAPI's
    /// `@router.get("/")` under `prefix="/items"`, every Django REST Framework route), so the
    /// origin receives it, whichever spelling the client sent.
    pub(super) trailing_slash: bool,
}

impl CompiledTemplate {
    pub(super) fn new(template: &str, rules: &PathRules) -> Result<CompiledTemplate, Invalid> {
        let mut path = String::with_capacity(template.len());
        let mut types = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let static_part = &rest[..open];
            path.push_str(&fold_static(static_part, rules));
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| Invalid::new("unclosed `{`"))?;
            let inner = &rest[open + 1..close];
            let (name, kind) = match inner.split_once(':') {
                None => (inner, ParamType::Text),
                Some((name, "int")) if !name.starts_with('*') => (name, ParamType::Int),
                Some((_, other)) => {
                    return Err(Invalid(format!(
                        "unknown parameter type `{other}` in `{{{inner}}}`: the only type is `int`, as in `{{id:int}}`"
                    )))
                }
            };
            path.push('{');
            path.push_str(name);
            path.push('}');
            if kind != ParamType::Text {
                types.push((name.to_owned(), kind));
            }
            rest = &rest[close + 1..];
        }
        path.push_str(&fold_static(rest, rules));
        let trailing_slash = rules.ignore_trailing_slash && path.len() > 1 && path.ends_with('/');
        if trailing_slash {
            path.pop();
        }
        Ok(CompiledTemplate {
            path,
            types,
            trailing_slash,
        })
    }

    /// The parameters of a path that matched this template, typed ones in canonical form.
    pub(super) fn canonical_params(
        &self,
        params: &matchit::Params<'_, '_>,
    ) -> Vec<(String, String)> {
        params
            .iter()
            .map(|(name, value)| {
                let typed = self.types.iter().find(|(n, _)| n == name);
                let value = match typed {
                    Some((_, ParamType::Int)) => canonical_int(value).unwrap_or(value.into()),
                    _ => value.into(),
                };
                (name.to_owned(), value.into_owned())
            })
            .collect()
    }

    /// `path` (which matched this template) with its typed parameters in canonical form, when
    /// that differs from the path as it came.
    pub(super) fn rewrite(&self, params: &matchit::Params<'_, '_>) -> Option<String> {
        // The common case, without building anything: every typed value already canonical.
        let canonical = self.types.iter().all(|(name, kind)| match kind {
            ParamType::Int => {
                let value = params.get(name).unwrap_or_default();
                canonical_int(value).is_none_or(|c| c == value)
            }
            ParamType::Text => true,
        });
        if canonical {
            return None;
        }
        let mut changed = false;
        let mut out = String::with_capacity(self.path.len() + 16);
        let mut rest = self.path.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open
                + rest[open..]
                    .find('}')
                    .expect("compiled templates pair braces");
            let name = rest[open + 1..close].trim_start_matches('*');
            let value = params.get(name).unwrap_or_default();
            match self.types.iter().find(|(n, _)| n == name) {
                Some((_, ParamType::Int)) => match canonical_int(value) {
                    Some(canonical) => {
                        changed |= canonical != value;
                        out.push_str(&canonical);
                    }
                    None => out.push_str(value),
                },
                _ => out.push_str(value),
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }
}

/// Static template text in the spelling canonical paths use (lower case on case-insensitive
/// origins).
pub(super) fn fold_static(text: &str, rules: &PathRules) -> String {
    if rules.case_insensitive {
        text.to_ascii_lowercase()
    } else {
        text.to_owned()
    }
}

/// `07`, `+7`, `-0` → `7`, `7`, `0`; `None` for anything that is not an integer.
fn canonical_int(value: &str) -> Option<std::borrow::Cow<'_, str>> {
    let plain = value
        .strip_prefix('-')
        .unwrap_or(value)
        .bytes()
        .all(|b| b.is_ascii_digit());
    let leading_zero = value.trim_start_matches('-').starts_with('0') && value.len() > 1;
    if plain && !value.is_empty() && value != "-" && !leading_zero {
        return Some(std::borrow::Cow::Borrowed(value));
    }
    canonical_int_owned(value).map(std::borrow::Cow::Owned)
}

fn canonical_int_owned(value: &str) -> Option<String> {
    let (negative, digits) = match value.as_bytes().first()? {
        b'-' => (true, &value[1..]),
        b'+' => (false, &value[1..]),
        _ => (false, value),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    Some(match (digits.is_empty(), negative) {
        (true, _) => "0".to_owned(),
        (false, true) => format!("-{digits}"),
        (false, false) => digits.to_owned(),
    })
}

pub(super) fn check_template(template: &str) -> Result<(), Invalid> {
    if !template.starts_with('/') {
        return Err(Invalid::new("it must start with `/`"));
    }
    if template.contains('?') || template.contains('#') {
        return Err(Invalid::new(
            "templates match paths only; remove the query or fragment",
        ));
    }
    let mut depth = 0i32;
    for c in template.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(Invalid::new(
                "braces must pair up, as in `/products/{id}` or `/files/{*rest}`",
            ));
        }
    }
    if depth != 0 {
        return Err(Invalid::new(
            "unclosed `{`; write parameters as `{id}` or `{*rest}`",
        ));
    }
    Ok(())
}

/// Lets the router judge the rest (empty names, catch-all placement) with its own words.
pub(super) fn check_router_template(path: &str) -> Result<(), Invalid> {
    matchit::Router::<()>::new()
        .insert(path, ())
        .map_err(|e| Invalid(e.to_string()))
}
