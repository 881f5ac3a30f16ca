//! Schema of a route's `purge` rule: what a successful write invalidates.

use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A route's `purge` table. A write (any method but GET, HEAD, OPTIONS and TRACE) answered with
/// one of `statuses` purges the request's own path, these paths and tags, and the `Location` /
/// `Content-Location` targets on the same host.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeConfig {
    /// Path templates; `{name}` is the write route's path parameter of that name.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub paths: Vec<Spanned<String>>,
    /// Tag templates, like a cache rule's `tags`.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<Spanned<String>>,
    /// Statuses that trigger the purge. Default: every 2xx and 3xx.
    pub statuses: Option<Vec<u16>>,
    /// A `200` answer to `PUT`/`PATCH` is the target's full new representation: store it as the
    /// target's GET entry (write-through) instead of only purging.
    #[serde(default)]
    pub write_through: bool,
}

/// `purge = ["/products", "/products/{id}"]` (paths only), or the full table.
#[derive(Debug)]
pub struct PurgeConfigOrPaths(pub PurgeConfig);

impl<'de> Deserialize<'de> for PurgeConfigOrPaths {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PurgeVisitor;
        impl<'de> Visitor<'de> for PurgeVisitor {
            type Value = PurgeConfigOrPaths;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of paths like [\"/products\", \"/products/{id}\"], or a table like { paths = [...], tags = [...] }",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let paths = Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(PurgeConfigOrPaths(PurgeConfig {
                    paths,
                    ..PurgeConfig::default()
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                PurgeConfig::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(PurgeConfigOrPaths)
            }
        }
        deserializer.deserialize_any(PurgeVisitor)
    }
}

impl schemars::JsonSchema for PurgeConfigOrPaths {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Purge".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let table = generator.subschema_for::<PurgeConfig>();
        schemars::json_schema!({
            "description": "A list of paths like [\"/products\", \"/products/{id}\"], or a table like { paths = [...], tags = [...] }",
            "anyOf": [
                {"type": "array", "items": {"type": "string"}},
                table
            ]
        })
    }
}
