//! Range requests answered from a stored complete response (RFC 9110 §14).
//!
//! Only a single byte range is served from cache (`bytes=0-99`, `bytes=100-`, `bytes=-100`);
//! a request for several ranges gets the whole `200` (a server may ignore `Range`, §14.2), and
//! so does one whose `If-Range` does not match the stored representation (§13.1.5). A range
//! that starts past the end is `416` with `Content-Range: bytes */length`.

use http::header::{HeaderMap, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};

/// What to send for a stored `200` of `length` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole representation.
    Full,
    /// `206` with bytes `first..=last`.
    Partial { first: u64, last: u64 },
    /// `416`: no byte of the representation is in the range.
    Unsatisfiable,
}

/// Decides how a `GET` with `request` headers is answered from a stored `200` with `stored`
/// headers and a body of `length` bytes.
pub fn answer(request: &HeaderMap, stored: &HeaderMap, length: u64) -> RangeAnswer {
    let Some(range) = request.get(RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(condition) = request.get(IF_RANGE) {
        if !if_range_holds(condition.as_bytes(), stored) {
            return RangeAnswer::Full;
        }
    }
    let Some(spec) = single_byte_range(range) else {
        return RangeAnswer::Full;
    };
    match spec {
        Spec::From(first, last) => {
            if first >= length {
                RangeAnswer::Unsatisfiable
            } else {
                let last = last.map_or(length - 1, |l| l.min(length - 1));
                RangeAnswer::Partial { first, last }
            }
        }
        Spec::Suffix(0) => RangeAnswer::Unsatisfiable,
        Spec::Suffix(_) if length == 0 => RangeAnswer::Unsatisfiable,
        Spec::Suffix(n) => RangeAnswer::Partial {
            first: length - n.min(length),
            last: length - 1,
        },
    }
}

enum Spec {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// The one range of a `bytes=` range set; `None` for another unit, a syntax error (which makes
/// the field ignored, §14.2) or several ranges.
fn single_byte_range(value: &str) -> Option<Spec> {
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut ranges = set.split(',').map(str::trim).filter(|r| !r.is_empty());
    let range = ranges.next()?;
    if ranges.next().is_some() {
        return None;
    }
    let (first, last) = range.split_once('-')?;
    let number = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => number(suffix).map(Spec::Suffix),
        (first, "") => number(first).map(|f| Spec::From(f, None)),
        (first, last) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last).then_some(Spec::From(first, Some(last)))
        }
    }
}

/// `If-Range` (§13.1.5): an entity tag must equal the stored strong `ETag`; a date must equal the
/// stored `Last-Modified` exactly.
fn if_range_holds(condition: &[u8], stored: &HeaderMap) -> bool {
    let condition = condition.trim_ascii();
    if condition.starts_with(b"\"") {
        return stored
            .get(ETAG)
            .is_some_and(|etag| etag.as_bytes().trim_ascii() == condition);
    }
    if condition.starts_with(b"W/") {
        return false;
    }
    stored
        .get(LAST_MODIFIED)
        .is_some_and(|modified| modified.as_bytes().trim_ascii() == condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(range: &str, if_range: Option<&str>, length: u64) -> RangeAnswer {
        let mut request = HeaderMap::new();
        request.insert(RANGE, range.parse().unwrap());
        if let Some(condition) = if_range {
            request.insert(IF_RANGE, condition.parse().unwrap());
        }
        let mut stored = HeaderMap::new();
        stored.insert(ETAG, "\"v1\"".parse().unwrap());
        stored.insert(
            LAST_MODIFIED,
            "Tue, 01 Dec 2026 10:00:00 GMT".parse().unwrap(),
        );
        answer(&request, &stored, length)
    }

    #[test]
    fn single_ranges_are_served_and_the_rest_is_whole_or_refused() {
        use RangeAnswer::*;
        assert_eq!(ask("bytes=0-9", None, 100), Partial { first: 0, last: 9 });
        assert_eq!(
            ask("bytes=90-200", None, 100),
            Partial {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            ask("bytes=95-", None, 100),
            Partial {
                first: 95,
                last: 99
            }
        );
        assert_eq!(
            ask("bytes=-10", None, 100),
            Partial {
                first: 90,
                last: 99
            }
        );
        assert_eq!(ask("bytes=-500", None, 100), Partial { first: 0, last: 99 });
        assert_eq!(ask("BYTES = 1-1", None, 100), Partial { first: 1, last: 1 });
        assert_eq!(ask("bytes=100-", None, 100), Unsatisfiable);
        assert_eq!(ask("bytes=-0", None, 100), Unsatisfiable);
        assert_eq!(ask("bytes=0-", None, 0), Unsatisfiable);
        assert_eq!(ask("bytes=0-1,5-6", None, 100), Full, "several ranges");
        assert_eq!(ask("bytes=5-1", None, 100), Full, "invalid: ignored");
        assert_eq!(ask("bytes=a-b", None, 100), Full);
        assert_eq!(ask("items=0-1", None, 100), Full, "another unit");
        assert_eq!(
            ask("bytes=0-1", Some("\"v1\""), 100),
            Partial { first: 0, last: 1 }
        );
        assert_eq!(ask("bytes=0-1", Some("\"v2\""), 100), Full);
        assert_eq!(
            ask("bytes=0-1", Some("W/\"v1\""), 100),
            Full,
            "weak never matches"
        );
        assert_eq!(
            ask("bytes=0-1", Some("Tue, 01 Dec 2026 10:00:00 GMT"), 100),
            Partial { first: 0, last: 1 }
        );
        assert_eq!(
            ask("bytes=0-1", Some("Wed, 02 Dec 2026 10:00:00 GMT"), 100),
            Full
        );
    }
}
