//! A stored response and its compact binary form, shared by both tiers. The first byte is a
//! format version; an entry of another version, or one that is cut short or malformed, decodes
//! to an error, which callers treat as a miss — never a crash.
//!
//! Layout (integers big-endian): `version u8`, `flags u8` (bit 0: the rest is one zstd frame),
//! then `status u16`, `stored_at_ms u64`, `fresh_for_ms u64`, `stale_while_revalidate_ms u64`,
//! `stale_if_error_ms u64`, `keep_ms u64`, `stamp u64`, `path len u16 + path`,
//! `dependency count u16` then each as `len u16 + bytes`, `vary count u16` then each name as
//! `len u16 + bytes`, `header count u16` then each header as
//! `name len u16 + name + value len u32 + value`, then `body len u32 + body`.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const FORMAT_VERSION: u8 = 3;
const COMPRESSED: u8 = 1;
/// Largest entry a compressed frame may expand to; anything claiming more is corrupt.
const MAX_DECOMPRESSED: u64 = 256 * 1024 * 1024;

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
    /// How long past freshness an entry with validators is kept to be revalidated
    /// (conditional request) instead of refetched whole.
    pub keep_ms: u64,
    /// The purge sequence number known when the fill started (see [`crate::purge`]).
    pub stamp: u64,
    /// The request path, for prefix purges.
    pub path: String,
    /// The purge keys the entry depends on: its path and its tags.
    pub depends_on: Vec<String>,
    /// Request headers the response varies on (lower case).
    pub vary: Vec<HeaderName>,
}

/// `headers` with every value in one allocation of its own. Values parsed by hyper are slices of
/// its connection's read buffer: kept as they are, each stored entry would hold a whole buffer
/// (kilobytes) alive for a few hundred bytes of headers.
pub fn owned_headers(headers: HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    let mut values = BytesMut::with_capacity(total);
    for value in headers.values() {
        values.put_slice(value.as_bytes());
    }
    let values = values.freeze();
    let mut owned = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, value) in headers.iter() {
        let end = at + value.len();
        // The bytes were a valid value a moment ago; a slice of them is one too.
        let copy =
            HeaderValue::from_maybe_shared(values.slice(at..end)).unwrap_or_else(|_| value.clone());
        owned.append(name.clone(), copy);
        at = end;
    }
    owned
}

/// A captured body as stored: without the spare capacity its buffer grew while capturing.
pub fn owned_body(body: BytesMut) -> Bytes {
    if body.capacity() - body.len() > 64 + body.len() / 8 {
        Bytes::copy_from_slice(&body)
    } else {
        body.freeze()
    }
}

/// Bytes an entry takes in process beyond its key, headers and body: the entry, its header
/// table's slots and the tier's slot and index. Counted, so the tier's bound is a memory bound.
pub const OVERHEAD_BYTES: usize = 512;
/// Bytes a header field's slot in a `HeaderMap` takes beyond its name and value.
pub const HEADER_OVERHEAD_BYTES: usize = 80;

impl Entry {
    /// What the entry holds in memory, as the in-process tier counts it.
    pub fn memory_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD_BYTES)
            .sum();
        let dependencies: usize = self.depends_on.iter().map(|d| d.len() + 24).sum();
        OVERHEAD_BYTES
            + headers
            + self.body.len()
            + self.path.len()
            + dependencies
            + self.vary.len() * 32
    }
}

fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(u16::MAX as usize);
    out.put_u16(len as u16);
    out.put_slice(&bytes[..len]);
}

fn get_short_text(data: &mut Bytes) -> Result<String, CorruptEntry> {
    if data.remaining() < 2 {
        return Err(CorruptEntry("cut short"));
    }
    let len = data.get_u16() as usize;
    if data.remaining() < len {
        return Err(CorruptEntry("cut short"));
    }
    String::from_utf8(data.split_to(len).to_vec()).map_err(|_| CorruptEntry("bad text"))
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
    /// When freshness ends, in milliseconds since the epoch.
    pub fn fresh_until_ms(&self) -> u64 {
        // Saturating: a foreign entry from the shared tier may carry any numbers.
        self.stored_at_ms.saturating_add(self.fresh_for_ms)
    }

    /// How long past freshness the entry is worth keeping: served stale, or revalidated.
    pub fn retained_ms(&self) -> u64 {
        let keep = if self.has_validator() {
            self.keep_ms
        } else {
            0
        };
        self.stale_while_revalidate_ms
            .max(self.stale_if_error_ms)
            .max(keep)
    }

    /// Whether the entry carries `ETag` or `Last-Modified`, so the origin can revalidate it.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// The encoding, its body compressed with zstd when the entry is larger than
    /// `compress_above` bytes and compression actually saves space.
    pub fn encode_compressed(&self, compress_above: Option<u64>) -> Bytes {
        let plain = self.encode();
        let Some(threshold) = compress_above else {
            return plain;
        };
        if (plain.len() as u64) <= threshold {
            return plain;
        }
        match zstd::bulk::compress(&plain[2..], 1) {
            Ok(packed) if packed.len() + 2 < plain.len() => {
                let mut out = BytesMut::with_capacity(packed.len() + 2);
                out.put_u8(FORMAT_VERSION);
                out.put_u8(COMPRESSED);
                out.put_slice(&packed);
                out.freeze()
            }
            _ => plain,
        }
    }

    pub fn encode(&self) -> Bytes {
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 6)
            .sum();
        let mut out = BytesMut::with_capacity(64 + header_bytes + self.body.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u8(0);
        out.put_u16(self.status);
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.fresh_for_ms);
        out.put_u64(self.stale_while_revalidate_ms);
        out.put_u64(self.stale_if_error_ms);
        out.put_u64(self.keep_ms);
        out.put_u64(self.stamp);
        put_short(&mut out, self.path.as_bytes());
        out.put_u16(self.depends_on.len() as u16);
        for key in &self.depends_on {
            put_short(&mut out, key.as_bytes());
        }
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
        need(&data, 2)?;
        if data.get_u8() != FORMAT_VERSION {
            return Err(CorruptEntry("unknown format version"));
        }
        match data.get_u8() {
            0 => {}
            COMPRESSED => {
                let size = zstd::zstd_safe::get_frame_content_size(&data)
                    .ok()
                    .flatten()
                    .filter(|size| *size <= MAX_DECOMPRESSED)
                    .ok_or(CorruptEntry("bad compressed frame"))?;
                data = zstd::bulk::decompress(&data, size as usize)
                    .map_err(|_| CorruptEntry("bad compressed frame"))?
                    .into();
            }
            _ => return Err(CorruptEntry("unknown flags")),
        }
        need(&data, 2 + 8 * 6 + 2)?;
        let status = data.get_u16();
        if !(100..=999).contains(&status) {
            return Err(CorruptEntry("bad status"));
        }
        let stored_at_ms = data.get_u64();
        let fresh_for_ms = data.get_u64();
        let stale_while_revalidate_ms = data.get_u64();
        let stale_if_error_ms = data.get_u64();
        let keep_ms = data.get_u64();
        let stamp = data.get_u64();
        let path = get_short_text(&mut data)?;
        need(&data, 2)?;
        let count = data.get_u16() as usize;
        let mut depends_on = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            depends_on.push(get_short_text(&mut data)?);
        }
        need(&data, 2)?;
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
            keep_ms,
            stamp,
            path,
            depends_on,
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
            keep_ms: 600_000,
            stamp: 42,
            path: "/products/1".into(),
            depends_on: vec!["path:/products/1".into(), "tag:products".into()],
            vary: vec![HeaderName::from_static("accept")],
        }
    }

    #[test]
    fn entries_round_trip() {
        let entry = sample();
        assert_eq!(Entry::decode(entry.encode()).unwrap(), entry);
    }

    #[test]
    fn large_entries_are_compressed_and_round_trip() {
        let mut entry = sample();
        entry.body = Bytes::from("{\"name\":\"widget\"},".repeat(500));
        let packed = entry.encode_compressed(Some(1024));
        assert_eq!(packed[1], COMPRESSED);
        assert!(packed.len() < entry.encode().len() / 4);
        assert_eq!(Entry::decode(packed.clone()).unwrap(), entry);
        for cut in 2..packed.len() {
            assert!(Entry::decode(packed.slice(..cut)).is_err(), "cut at {cut}");
        }
        let small = sample();
        assert_eq!(small.encode_compressed(Some(1024)), small.encode());
        assert_eq!(entry.encode_compressed(None), entry.encode());
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
