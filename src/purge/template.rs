//! Path and tag templates: text with `{name}` placeholders filled from a route's path parameters.

use toml::Spanned;

use crate::config::SpanError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Param(String),
}

/// A compiled template such as `/products/{id}` or `product:{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Compiles `source`; every `{name}` must be one of `params` (the route's path parameters).
    pub fn compile(source: &Spanned<String>, params: &[String]) -> Result<Template, SpanError> {
        let text = source.get_ref();
        let mut parts = Vec::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(SpanError::new(
                    source.span(),
                    format!("template {text:?} has a `{{` without its `}}`"),
                ));
            };
            // `{id:int}` is the parameter `id`, as in the route's template.
            let inner = rest[open + 1..open + close].trim_start_matches('*');
            let name = inner.split_once(':').map_or(inner, |(name, _)| name);
            if !params.iter().any(|p| p == name) {
                let known = if params.is_empty() {
                    "the route's path has no parameters".to_owned()
                } else {
                    format!("the route's path parameters are: {}", params.join(", "))
                };
                return Err(SpanError::new(
                    source.span(),
                    format!("template {text:?} uses `{{{name}}}`, but {known}"),
                ));
            }
            parts.push(Part::Param(name.to_owned()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template(parts))
    }

    /// Rewrites the template's text the way canonical paths spell it: `fold` on each piece of
    /// text, and a trailing slash dropped when `drop_trailing_slash` (not from `/` itself).
    pub fn respell(&mut self, fold: impl Fn(&str) -> String, drop_trailing_slash: bool) {
        let whole_is_root = matches!(self.0.as_slice(), [Part::Text(t)] if t == "/");
        for part in &mut self.0 {
            if let Part::Text(text) = part {
                *text = fold(text);
            }
        }
        if drop_trailing_slash && !whole_is_root {
            if let Some(Part::Text(text)) = self.0.last_mut() {
                if text.ends_with('/') {
                    text.pop();
                }
            }
            if matches!(self.0.last(), Some(Part::Text(t)) if t.is_empty()) {
                self.0.pop();
            }
        }
    }

    /// The template filled with `params` (name → value); a missing parameter fills as empty.
    pub fn expand(&self, params: &[(String, String)]) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Param(name) => {
                    if let Some((_, value)) = params.iter().find(|(n, _)| n == name) {
                        out.push_str(value);
                    }
                }
            }
        }
        out
    }
}

/// The parameter names of a route path template: `/products/{id}/{*rest}` → `id`, `rest`.
pub fn path_params(template: &str) -> Vec<String> {
    template
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        // `{id:int}` is the parameter `id`: the type is the router's business.
        .map(|name| {
            let name = name.trim_start_matches('*');
            name.split_once(':')
                .map_or(name, |(name, _)| name)
                .to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spanned(text: &str) -> Spanned<String> {
        toml::from_str::<toml::Table>(&format!("v = {text:?}"))
            .ok()
            .and_then(|_| {
                #[derive(serde::Deserialize)]
                struct V {
                    v: Spanned<String>,
                }
                toml::from_str::<V>(&format!("v = {text:?}"))
                    .ok()
                    .map(|v| v.v)
            })
            .unwrap()
    }

    #[test]
    fn templates_fill_from_route_parameters() {
        let params = path_params("/shops/{shop}/products/{id}");
        assert_eq!(params, ["shop", "id"]);
        let t = Template::compile(&spanned("/shops/{shop}/products/{id}"), &params).unwrap();
        let values = [("shop".into(), "s1".into()), ("id".into(), "7".into())];
        assert_eq!(t.expand(&values), "/shops/s1/products/7");
        let tag = Template::compile(&spanned("product:{id}"), &params).unwrap();
        assert_eq!(tag.expand(&values), "product:7");
        let plain = Template::compile(&spanned("/products"), &params).unwrap();
        assert_eq!(plain.expand(&values), "/products");
        // A typed parameter is named without its type.
        assert_eq!(path_params("/products/{id:int}/{*rest}"), ["id", "rest"]);
    }

    #[test]
    fn purge_paths_may_be_typed_and_are_spelled_as_canonical_paths() {
        let params = path_params("/Users/{user_id:int}/orders/{id:int}");
        let values = [("user_id".into(), "3".into()), ("id".into(), "7".into())];
        let mut orders =
            Template::compile(&spanned("/Users/{user_id:int}/orders/"), &params).unwrap();
        orders.respell(|t| t.to_ascii_lowercase(), true);
        assert_eq!(orders.expand(&values), "/users/3/orders");
        let mut item = Template::compile(&spanned("/items/{id}/"), &params).unwrap();
        item.respell(str::to_owned, true);
        assert_eq!(item.expand(&values), "/items/7");
        let mut root = Template::compile(&spanned("/"), &params).unwrap();
        root.respell(str::to_owned, true);
        assert_eq!(root.expand(&values), "/");
        let mut kept = Template::compile(&spanned("/items/"), &params).unwrap();
        kept.respell(str::to_owned, false);
        assert_eq!(kept.expand(&values), "/items/");
    }

    #[test]
    fn unknown_parameters_and_broken_braces_are_config_errors() {
        let params = path_params("/products/{id}");
        let e = Template::compile(&spanned("/users/{user}"), &params).unwrap_err();
        assert!(e.message.contains("`{user}`"), "{}", e.message);
        assert!(e.message.contains("id"), "{}", e.message);
        assert!(Template::compile(&spanned("/products/{id"), &params).is_err());
    }
}
