//! Value types the TOML schema uses: durations (`"60s"`), byte sizes (`"64KiB"`) and strings with
//! `${ENV}` interpolation. Each parses itself during deserialization, so a bad value is reported at
//! its own line and column. Also the parsers of values read as strings and checked during
//! validation — rates (`"100/minute"`) and addresses (`"10.0.0.0/8"`) — and URL redaction for
//! messages.

use super::error::Invalid;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration written as a string: `"500ms"`, `"60s"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {text:?} ({e}): write a number and a unit, like \"500ms\", \"60s\" or \"5m\""
            ))
        })
    }
}

/// A size in bytes: a whole number, or a string with a unit (`"512B"`, `"64KiB"`, `"10MB"`, `"1GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, Invalid> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| {
            format!("invalid size {text:?}: write a whole number and a unit, like \"64KiB\" or \"10MB\"")
        })?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(Invalid(format!(
                    "invalid size unit {other:?} in {text:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                )))
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| Invalid(format!("size {text:?} is too large")))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 65536 or \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A string in which `${NAME}` is replaced by the environment variable `NAME`, and
/// `${NAME:-fallback}` falls back to `fallback` when `NAME` is unset or empty. `$$` is a literal `$`.
///
/// Interpolation happens inside string values only, so a secret containing quotes or newlines can
/// never change the structure of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvString {
    pub value: String,
    /// Names of variables that were unset and replaced by their fallback.
    pub defaulted: Vec<String>,
}

impl EnvString {
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Interpolates `text` with `lookup` as the environment.
    pub fn interpolate(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<EnvString, Invalid> {
        let mut out = String::with_capacity(text.len());
        let mut defaulted = Vec::new();
        let mut rest = text;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(inner) = after.strip_prefix('{') {
                let end = inner.find('}').ok_or_else(|| {
                    format!("unclosed `${{` in {text:?}: write ${{NAME}} or ${{NAME:-default}}")
                })?;
                let expr = &inner[..end];
                let (name, fallback) = match expr.split_once(":-") {
                    Some((name, fallback)) => (name, Some(fallback)),
                    None => (expr, None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(Invalid(format!(
                        "invalid environment variable name {name:?} in {text:?}: use letters, digits and _"
                    )));
                }
                match (lookup(name).filter(|v| !v.is_empty()), fallback) {
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(fallback)) => {
                        out.push_str(fallback);
                        defaulted.push(name.to_owned());
                    }
                    (None, None) => {
                        return Err(Invalid(format!(
                            "environment variable `{name}` is not set: set it, or give a default with ${{{name}:-default}}"
                        )))
                    }
                }
                rest = &inner[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(EnvString {
            value: out,
            defaulted,
        })
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        EnvString::interpolate(&text, |name| std::env::var(name).ok()).map_err(de::Error::custom)
    }
}

/// A URL fit for logs and messages: its user and password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// An address or CIDR: `"10.0.0.0/8"`, `"127.0.0.1"`, `"::1"`.
pub fn parse_cidr(text: &str) -> Result<IpNet, Invalid> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|e| Invalid(e.to_string()))
}

/// `"100/minute"`, `"10/second"`, `"1000/hour"`, `"5/day"`, `"50/10s"`.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), Invalid> {
    let hint = "write a count and a period, like \"100/minute\", \"10/second\" or \"50/10s\"";
    let (count, period) = text
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {text:?}: {hint}"))?;
    let count: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| {
            format!("invalid rate {text:?}: the count must be a whole number above 0")
        })?;
    let period = match period.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other)
            .map_err(|_| format!("invalid rate {text:?}: {hint}"))?,
    };
    if period.as_micros() < u128::from(count) {
        return Err(Invalid(format!(
            "invalid rate {text:?}: more than a million requests a second"
        )));
    }
    Ok((count, period))
}

// The configuration's JSON Schema (`cachegate schema`) for the values parsed from strings.

impl schemars::JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A number and a unit, like \"500ms\", \"60s\", \"5m\" or \"1h 30m\"",
            "pattern": "^\\s*\\d+\\s*[a-zA-Zµ]+(\\s*\\d+\\s*[a-zA-Zµ]+)*\\s*$"
        })
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Bytes: a whole number, or a string with a unit (B, KB, KiB, MB, MiB, GB, GiB), like \"64KiB\"",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^\\s*\\d+\\s*(B|KB|KiB|MB|MiB|GB|GiB)?\\s*$"}
            ]
        })
    }
}

impl schemars::JsonSchema for EnvString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EnvString".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Text in which ${NAME} is the environment variable NAME and ${NAME:-fallback} falls back when it is unset or empty"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr\"et".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_replaces_defaults_and_escapes() {
        let s = EnvString::interpolate("a=${SECRET} b=${MISSING:-dflt} c=$$ d=$x", env).unwrap();
        assert_eq!(s.value, "a=s3cr\"et b=dflt c=$ d=$x");
        assert_eq!(s.defaulted, vec!["MISSING".to_string()]);
        assert_eq!(
            EnvString::interpolate("${EMPTY:-e}", env).unwrap().value,
            "e"
        );
    }

    #[test]
    fn interpolation_errors_say_what_to_do() {
        let err = EnvString::interpolate("${MISSING}", env).unwrap_err();
        assert!(err.0.contains("`MISSING` is not set"), "{err}");
        assert!(EnvString::interpolate("${OPEN", env)
            .unwrap_err()
            .0
            .contains("unclosed"));
        assert!(EnvString::interpolate("${BAD-NAME}", env)
            .unwrap_err()
            .0
            .contains("invalid environment variable name"));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("512").unwrap().0, 512);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(
            redact_url("redis://user:pw@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn rates_parse_with_words_and_durations() {
        assert_eq!(
            parse_rate("100/minute").unwrap(),
            (100, Duration::from_secs(60))
        );
        assert_eq!(
            parse_rate("10/second").unwrap(),
            (10, Duration::from_secs(1))
        );
        assert_eq!(parse_rate("50/10s").unwrap(), (50, Duration::from_secs(10)));
        assert!(parse_rate("0/minute").is_err());
        assert!(parse_rate("ten/minute").is_err());
        assert!(parse_rate("100 per minute").is_err());
    }
}
