//! The canonical request path: the one spelling of a path that routing, rate-limit keys, cache
//! keys and purge targets all use, and the spelling the origin receives.
//!
//! Clients can write one resource many ways (`/products/2`, `/products/2/`, `//products/./2`,
//! `/products/%32`, `/Products/2` on a case-insensitive origin, `/products/2;x` on a servlet
//! container). If the gateway judged the spelling while the origin judged the resource, every
//! spelling would be a way around a route's auth, limits and purges. So the gateway decides the
//! canonical form once, before routing, and forwards exactly that form: what the origin acts on
//! is always what the gateway checked.
//!
//! The rules ([`PathRules`], from `[server]`):
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes
//!   keep their encoding with upper-case hex; malformed escapes and `%00` are refused;
//! - `.` and `..` segments are resolved (RFC 3986 §5.2.4), empty segments merged;
//! - `;` path parameters are refused, or stripped from each segment (as servlet containers do);
//! - an encoded slash (`%2F`) or a backslash (`\`, `%5C`), which some origins read as a segment
//!   separator, is refused, or kept as data in its segment;
//! - a trailing slash is dropped (`/a/` is `/a`) unless it is significant;
//! - letters are lower-cased when the origin's paths are case-insensitive.
//!
//! [`canonical_path`] is idempotent: a canonical path is its own canonical form.

use std::borrow::Cow;
use std::fmt;

use http::Method;

use crate::config::{EncodedSlash, PathParameters, ServerConfig, TrailingSlash};

/// How the origin reads paths; the gateway reads them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRules {
    /// `/a/` and `/a` are one resource (the default).
    pub ignore_trailing_slash: bool,
    /// `/A` and `/a` are one resource; the origin receives lower case.
    pub case_insensitive: bool,
    /// `;` path parameters: refused (`false`, the default) or stripped (`true`).
    pub strip_path_parameters: bool,
    /// `%2F`, `%5C` and `\`: refused (`false`, the default) or kept as data (`true`).
    pub keep_encoded_slash: bool,
}

impl PathRules {
    /// The rules `[server]` describes.
    pub fn from_config(server: &ServerConfig) -> PathRules {
        PathRules {
            ignore_trailing_slash: server.trailing_slash == TrailingSlash::Ignore,
            case_insensitive: server.case_insensitive_paths,
            strip_path_parameters: server.path_parameters == PathParameters::Strip,
            keep_encoded_slash: server.encoded_slash == EncodedSlash::Keep,
        }
    }
}

impl Default for PathRules {
    fn default() -> Self {
        PathRules {
            ignore_trailing_slash: true,
            case_insensitive: false,
            strip_path_parameters: false,
            keep_encoded_slash: false,
        }
    }
}

/// Why a path has no canonical form; the request is refused with `400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form (does not start with `/`).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%00` or a control character.
    ControlCharacter,
    /// `;` with `path_parameters = "reject"`.
    PathParameter,
    /// `%2F`, `%5C` or `\` with `encoded_slash = "reject"`.
    EncodedSlash,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path must start with `/`",
            PathError::BadEscape => {
                "the request path has a `%` that is not followed by two hexadecimal digits"
            }
            PathError::ControlCharacter => "the request path contains a NUL or control character",
            PathError::PathParameter => {
                "the request path contains `;` path parameters, which this gateway refuses (the origin may read them differently); remove them"
            }
            PathError::EncodedSlash => {
                "the request path contains an encoded slash (`%2F`) or a backslash, which this gateway refuses (the origin may read it as a separator)"
            }
        })
    }
}

impl std::error::Error for PathError {}

/// The canonical form of a request path under `rules`; borrowed when already canonical.
pub fn canonical_path<'a>(path: &'a str, rules: &PathRules) -> Result<Cow<'a, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(path, rules) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<String> = Vec::new();
    for raw in path[1..].split('/') {
        let raw = match raw.find(';') {
            Some(_) if !rules.strip_path_parameters => return Err(PathError::PathParameter),
            Some(at) => &raw[..at],
            None => raw,
        };
        let segment = decode_segment(raw, rules)?;
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    // A trailing slash survives only where it is significant; `/.` and `/..` end in a directory.
    let last = path.rsplit('/').next().unwrap_or_default();
    let last = if rules.strip_path_parameters {
        last.split(';').next().unwrap_or_default()
    } else {
        last
    };
    let ends_as_directory = last.is_empty() || is_dot_segment(last, 1) || is_dot_segment(last, 2);
    if out.is_empty() || (ends_as_directory && !rules.ignore_trailing_slash) {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Whether `segment` is `.` (n = 1) or `..` (n = 2), encoded or not.
fn is_dot_segment(segment: &str, n: usize) -> bool {
    let mut dots = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(b".") {
            rest = r;
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == n
}

/// The common case, checked without allocating: nothing to decode, resolve or fold.
fn is_plain(path: &str, rules: &PathRules) -> bool {
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b';' | b'\\' => return false,
            b'/' if i > 0 && bytes[i - 1] == b'/' => return false,
            b'.' if bytes[i - 1] == b'/' => return false,
            b'A'..=b'Z' if rules.case_insensitive => return false,
            0..=0x20 | 0x7f.. => return false,
            _ => {}
        }
    }
    !(rules.ignore_trailing_slash && path.len() > 1 && path.ends_with('/'))
}

/// Decodes the unreserved escapes of one segment, upper-cases the hex of the others, folds case
/// when asked, and refuses what the rules refuse.
fn decode_segment(raw: &str, rules: &PathRules) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let value = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEscape)?;
            i += 3;
            match value {
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                b'/' | b'\\' if !rules.keep_encoded_slash => return Err(PathError::EncodedSlash),
                v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => {
                    out.push(fold(v, rules) as char)
                }
                v => {
                    out.push('%');
                    out.push_str(&format!("{v:02X}"));
                }
            }
            continue;
        }
        match b {
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'\\' if !rules.keep_encoded_slash => return Err(PathError::EncodedSlash),
            b'\\' => out.push_str("%5C"),
            // Request targets are ASCII (the URI parser guarantees it); anything else is
            // kept encoded so the canonical form stays ASCII too.
            0x80.. | b' ' => out.push_str(&format!("%{b:02X}")),
            _ => out.push(fold(b, rules) as char),
        }
        i += 1;
    }
    Ok(out)
}

fn fold(b: u8, rules: &PathRules) -> u8 {
    if rules.case_insensitive {
        b.to_ascii_lowercase()
    } else {
        b
    }
}

/// The method as the origin reads it: a known method in any casing (`delete`, `Get`) is that
/// method, since many origins upper-case it; extension methods are left as they are.
pub fn canonical_method(method: &Method) -> Option<Method> {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ];
    let name = method.as_str();
    if name.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    KNOWN
        .iter()
        .find(|known| known.as_str().eq_ignore_ascii_case(name))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(path: &str) -> Result<String, PathError> {
        canonical_path(path, &PathRules::default()).map(Cow::into_owned)
    }

    #[test]
    fn spellings_of_one_path_have_one_form() {
        for spelling in [
            "/products/7",
            "/products/7/",
            "//products///7",
            "/products/./7",
            "/products/x/../7",
            "/products/%37",
            "/%70roducts/7",
            "/products/%2e/7",
            "/products/%2E%2e/products/7",
        ] {
            assert_eq!(canon(spelling).unwrap(), "/products/7", "{spelling}");
        }
        assert_eq!(canon("/").unwrap(), "/");
        assert_eq!(canon("/..").unwrap(), "/");
        assert_eq!(canon("/a/.").unwrap(), "/a");
        assert_eq!(canon("/a%20b").unwrap(), "/a%20b");
        assert_eq!(canon("/a%c3%a9").unwrap(), "/a%C3%A9");
    }

    #[test]
    fn ambiguous_spellings_are_refused_by_default() {
        assert_eq!(canon("/a;x"), Err(PathError::PathParameter));
        assert_eq!(canon("/a/..;/b"), Err(PathError::PathParameter));
        assert_eq!(canon("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(canon("/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(canon("/a\\b"), Err(PathError::EncodedSlash));
        assert_eq!(canon("/a%00"), Err(PathError::ControlCharacter));
        assert_eq!(canon("/100%"), Err(PathError::BadEscape));
        assert_eq!(canon("/%zz"), Err(PathError::BadEscape));
        assert_eq!(canon("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn rules_follow_the_origin() {
        let rules = PathRules {
            ignore_trailing_slash: false,
            case_insensitive: true,
            strip_path_parameters: true,
            keep_encoded_slash: true,
        };
        let canon = |p| canonical_path(p, &rules).unwrap().into_owned();
        assert_eq!(canon("/Kit/RL/"), "/kit/rl/");
        assert_eq!(canon("/kit;jsessionid=1/rl;x"), "/kit/rl");
        assert_eq!(canon("/a/..;/b"), "/b");
        assert_eq!(canon("/a%2fb"), "/a%2Fb");
        assert_eq!(canon("/a/./"), "/a/");
        assert_eq!(canon("/a/."), "/a/");
    }

    #[test]
    fn known_methods_in_any_case_are_upper_cased() {
        let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(canonical_method(&m("delete")), Some(Method::DELETE));
        assert_eq!(canonical_method(&m("Get")), Some(Method::GET));
        assert_eq!(canonical_method(&m("GET")), None);
        assert_eq!(canonical_method(&m("purge")), None);
    }
}
