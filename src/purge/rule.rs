//! Purge rules and keys: which methods write, the keys a purge marks (`path:`, `tag:`,
//! `prefix:`), and a route's compiled `purge` rule — what a successful write on it invalidates.

use http::Method;
use toml::Spanned;

use super::template::Template;
use crate::config::{PurgeConfigOrPaths, SpanError};

/// Whether `method` writes: everything but the safe methods, extension methods included.
pub fn is_write(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The mark key of a path (every query, variant and user of it).
pub fn path_key(path: &str) -> String {
    format!("path:{path}")
}

/// The mark key of a tag.
pub fn tag_key(tag: &str) -> String {
    format!("tag:{tag}")
}

/// The mark key of a path prefix (`""`: everything).
pub fn prefix_key(prefix: &str) -> String {
    format!("prefix:{prefix}")
}

/// A route's compiled `purge` rule.
#[derive(Debug, Clone, Default)]
pub struct PurgeRule {
    pub paths: Vec<Template>,
    pub tags: Vec<Template>,
    statuses: Option<Vec<u16>>,
    /// A `200` to `PUT`/`PATCH` carries the full new representation: store it as the GET entry.
    pub write_through: bool,
}

impl PurgeRule {
    /// Compiles a rule for a route whose path has `params`.
    pub fn compile(
        config: &Spanned<PurgeConfigOrPaths>,
        params: &[String],
    ) -> Result<PurgeRule, Vec<SpanError>> {
        let rule = &config.get_ref().0;
        let (paths, tags, statuses) = (&rule.paths, &rule.tags, rule.statuses.as_ref());
        let mut errors = Vec::new();
        let mut compile = |list: &[Spanned<String>]| -> Vec<Template> {
            list.iter()
                .filter_map(|t| {
                    Template::compile(t, params)
                        .map_err(|e| errors.push(e))
                        .ok()
                })
                .collect()
        };
        let paths = compile(paths);
        let tags = compile(tags);
        if let Some(statuses) = statuses {
            if statuses.iter().any(|s| !(100..=599).contains(s)) {
                errors.push(SpanError::new(
                    config.span(),
                    "purge statuses must be HTTP statuses (100-599)",
                ));
            }
        }
        if errors.is_empty() {
            Ok(PurgeRule {
                paths,
                tags,
                statuses: statuses.cloned(),
                write_through: rule.write_through,
            })
        } else {
            Err(errors)
        }
    }

    /// The keys a triggering write to `path` purges by the rule alone: the path itself, and the
    /// rule's paths and tags filled in from the path's parameters (the route step's
    /// [`crate::routing::Matched::params`]). The origin's answer can add more (`Cache-Group-Invalidation`,
    /// `Location`).
    pub fn keys_for(&self, path: &str, params: &[(String, String)]) -> Vec<String> {
        let mut keys = vec![path_key(path)];
        keys.extend(self.paths.iter().map(|t| path_key(&t.expand(params))));
        keys.extend(self.tags.iter().map(|t| tag_key(&t.expand(params))));
        keys
    }

    /// Whether [`PurgeRule::keys_for`] reads the path's parameters.
    pub fn expands_params(&self) -> bool {
        !self.paths.is_empty() || !self.tags.is_empty()
    }

    /// When a write purges, in words (for `cachegate explain`).
    pub fn trigger_description(&self) -> String {
        match &self.statuses {
            Some(list) => {
                let list: Vec<String> = list.iter().map(u16::to_string).collect();
                format!("when the origin answers {}", list.join(", "))
            }
            None => "when the origin answers 2xx or 3xx".to_owned(),
        }
    }

    /// Whether a write answered with `status` purges: the rule's statuses, or any 2xx and 3xx.
    pub fn triggers(&self, status: u16) -> bool {
        match &self.statuses {
            Some(list) => list.contains(&status),
            None => (200..400).contains(&status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn writes_are_every_method_but_the_safe_ones() {
        for safe in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(!is_write(&Method::from_bytes(safe.as_bytes()).unwrap()));
        }
        for write in ["POST", "PUT", "PATCH", "DELETE", "PROPPATCH", "PURGE"] {
            assert!(is_write(&Method::from_bytes(write.as_bytes()).unwrap()));
        }
    }
}
