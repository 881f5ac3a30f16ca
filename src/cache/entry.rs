//! A stored response and its compact binary form, shared by both tiers. The first byte is a
//! format version; an entry of another version, or one that is cut short or malformed, decodes
//! to an error, which callers treat as a miss — never a crash.
//!
//! Layout (integers big-endian): `version u8`, `status u16`, `stored_at_ms u64`,
//! `fresh_for_ms u64`, `stale_while_revalidate_ms u64`, `stale_if_error_ms u64`,
//! `vary count u16` then each name as `len u16 + bytes`, `header count u16` then each header as
//! `name len u16 + name + value len u32 + value`, then `body len u32 + body`.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Milliseconds since the Unix epoch when the response was received.
    pub stored_at_ms: u64,
    /// Freshness lifetime left when stored (lifetime minus initial age).
    pub fresh_for_ms: u64,
    pub stale_while_revalidate_ms: u64,
    pub stale_if_error_ms: u64,
    /// Request headers the response varies on (lower case).
    pub vary: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptEntry(pub &'static str);

impl fmt::Display for CorruptEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable cache entry: {}", self.0)
    }
}

impl std::error::Error for CorruptEntry {}

impl Entry {
    pub fn encode(&self) -> Bytes {
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 6)
            .sum();
        let mut out = BytesMut::with_capacity(64 + header_bytes + self.body.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u16(self.status);
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.fresh_for_ms);
        out.put_u64(self.stale_while_revalidate_ms);
        out.put_u64(self.stale_if_error_ms);
        out.put_u16(self.vary.len() as u16);
        for name in &self.vary {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
        }
        out.put_u16(self.headers.len() as u16);
        for (name, value) in &self.headers {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u32(self.body.len() as u32);
        out.put_slice(&self.body);
        out.freeze()
    }

    pub fn decode(mut data: Bytes) -> Result<Entry, CorruptEntry> {
        fn need(data: &Bytes, n: usize) -> Result<(), CorruptEntry> {
            if data.remaining() < n {
                Err(CorruptEntry("cut short"))
            } else {
                Ok(())
            }
        }
        need(&data, 1 + 2 + 8 * 4 + 2)?;
        if data.get_u8() != FORMAT_VERSION {
            return Err(CorruptEntry("unknown format version"));
        }
        let status = data.get_u16();
        if !(100..=999).contains(&status) {
            return Err(CorruptEntry("bad status"));
        }
        let stored_at_ms = data.get_u64();
        let fresh_for_ms = data.get_u64();
        let stale_while_revalidate_ms = data.get_u64();
        let stale_if_error_ms = data.get_u64();
        let vary_count = data.get_u16() as usize;
        let mut vary = Vec::with_capacity(vary_count.min(64));
        for _ in 0..vary_count {
            need(&data, 2)?;
            let len = data.get_u16() as usize;
            need(&data, len)?;
            let name = HeaderName::from_bytes(&data.split_to(len))
                .map_err(|_| CorruptEntry("bad vary name"))?;
            vary.push(name);
        }
        need(&data, 2)?;
        let header_count = data.get_u16() as usize;
        let mut headers = HeaderMap::with_capacity(header_count.min(256));
        for _ in 0..header_count {
            need(&data, 2)?;
            let len = data.get_u16() as usize;
            need(&data, len + 4)?;
            let name = HeaderName::from_bytes(&data.split_to(len))
                .map_err(|_| CorruptEntry("bad header name"))?;
            let len = data.get_u32() as usize;
            need(&data, len)?;
            let value = HeaderValue::from_maybe_shared(data.split_to(len))
                .map_err(|_| CorruptEntry("bad header value"))?;
            headers.append(name, value);
        }
        need(&data, 4)?;
        let len = data.get_u32() as usize;
        if data.remaining() != len {
            return Err(CorruptEntry("body length does not match"));
        }
        Ok(Entry {
            status,
            headers,
            body: data,
            stored_at_ms,
            fresh_for_ms,
            stale_while_revalidate_ms,
            stale_if_error_ms,
            vary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        Entry {
            status: 200,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            stored_at_ms: 1_800_000_000_000,
            fresh_for_ms: 60_000,
            stale_while_revalidate_ms: 30_000,
            stale_if_error_ms: 300_000,
            vary: vec![HeaderName::from_static("accept")],
        }
    }

    #[test]
    fn entries_round_trip() {
        let entry = sample();
        assert_eq!(Entry::decode(entry.encode()).unwrap(), entry);
    }

    #[test]
    fn every_truncation_and_foreign_data_is_an_error_not_a_panic() {
        let encoded = sample().encode();
        for cut in 0..encoded.len() {
            assert!(Entry::decode(encoded.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut foreign = encoded.to_vec();
        foreign[0] = 9;
        assert_eq!(
            Entry::decode(Bytes::from(foreign)),
            Err(CorruptEntry("unknown format version"))
        );
        let mut trailing = encoded.to_vec();
        trailing.push(0);
        assert!(Entry::decode(Bytes::from(trailing)).is_err());
        assert!(Entry::decode(Bytes::from_static(b"{\"json\": \"not an entry\"}")).is_err());
        // Arbitrary bytes: deterministic pseudo-random inputs never panic.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (state % 200) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = Entry::decode(Bytes::from(data));
        }
    }
}
