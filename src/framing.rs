//! A second, strict reading of HTTP/1.1 request framing, beside hyper's.
//!
//! hyper's chunked decoder is lenient in one place RFC 9112 §7.1 is not: it accepts whitespace
//! after a chunk size (`5 \r\n`). A lenient gateway behind a strict front proxy (or in front of a
//! strict origin) is what request smuggling is made of, so the gateway refuses that spelling
//! itself. [`FramingCheck`] follows the client's byte stream as the connection's socket hands it
//! over — request heads only as far as their framing fields (`Transfer-Encoding`,
//! `Content-Length`, `Upgrade`, `CONNECT`), bodies by their framing — and stops at the first
//! byte that breaks the grammar. The socket then gives hyper the bytes before it and, on the
//! next read, an error carrying [`FramingViolation`]: the request's head and valid body have
//! arrived, its body then fails, the origin request is aborted before its body is complete, and
//! the pipeline answers `400` with problem+json.
//!
//! It sits below both of its users: the listener's socket wrapper runs the check
//! ([`crate::server::clock`]), and the upstream request body recognises the error it leaves
//! ([`FramingViolation::within`]).
//!
//! It reads nothing else of a request and never changes a byte. A request that asks for a
//! protocol switch (`Upgrade`, `CONNECT`) ends the check for the connection: what follows may be
//! another protocol. HTTP/2 connections are not checked (their framing is binary).

/// Why a client's bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingViolation(pub &'static str);

impl std::fmt::Display for FramingViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request's framing is invalid: {}", self.0)
    }
}

impl std::error::Error for FramingViolation {}

impl FramingViolation {
    /// The violation behind `error`, if one of its sources is one.
    pub fn within(error: &(dyn std::error::Error + 'static)) -> Option<FramingViolation> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(violation) = e.downcast_ref::<FramingViolation>() {
                return Some(*violation);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if let Some(violation) = io.get_ref().and_then(|i| i.downcast_ref()) {
                    return Some(*violation);
                }
            }
            current = e.source();
        }
        None
    }
}

/// Longest head line the check keeps to read its field name (longer lines are not framing
/// fields hyper would accept within the head limit anyway, but are followed to their end).
const MAX_LINE: usize = 256;

#[derive(Debug)]
enum State {
    /// Reading a head, line by line.
    Head(Head),
    /// A body of this many more bytes.
    Length(u64),
    /// A chunk-size line.
    Size(Size),
    /// Chunk data: this many more bytes, then CRLF.
    Data(u64),
    DataCr,
    DataLf,
    /// The trailer section after the last chunk: line by line until an empty one.
    Trailer {
        empty: bool,
        cr: bool,
    },
    /// The connection switched protocols (or may have): nothing more is checked.
    Off,
}

#[derive(Debug, Default)]
struct Head {
    line: Vec<u8>,
    /// The line is longer than [`MAX_LINE`]: only its end is looked for.
    long: bool,
    started: bool,
    chunked: bool,
    length: u64,
    switch: bool,
}

#[derive(Debug, Default)]
struct Size {
    digits: usize,
    size: u64,
    /// Whitespace followed the digits: only `;` (an extension) may come now.
    space: bool,
    /// In an extension: anything up to CR.
    extension: bool,
    cr: bool,
}

/// The check of one connection (see the module docs).
#[derive(Debug)]
pub struct FramingCheck {
    state: State,
}

impl Default for FramingCheck {
    fn default() -> Self {
        FramingCheck {
            state: State::Head(Head::default()),
        }
    }
}

impl FramingCheck {
    /// Follows `bytes`; `Err` with the offset of the first byte that breaks the framing.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), (usize, FramingViolation)> {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Off => return Ok(()),
                State::Length(left) => {
                    let take = (*left).min((bytes.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.state = State::Head(Head::default());
                    }
                }
                State::Data(left) => {
                    let take = (*left).min((bytes.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if bytes[i] != b'\r' {
                        return Err((i, FramingViolation("chunk data is longer than its size")));
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if bytes[i] != b'\n' {
                        return Err((i, FramingViolation("chunk data is not followed by CRLF")));
                    }
                    self.state = State::Size(Size::default());
                    i += 1;
                }
                State::Size(size) => {
                    let b = bytes[i];
                    if size.cr {
                        if b != b'\n' {
                            return Err((
                                i,
                                FramingViolation("a chunk-size line ends in a bare CR"),
                            ));
                        }
                        self.state = if size.size == 0 {
                            State::Trailer {
                                empty: true,
                                cr: false,
                            }
                        } else {
                            State::Data(size.size)
                        };
                    } else if size.extension {
                        if b == b'\r' {
                            size.cr = true;
                        } else if b == b'\n' {
                            return Err((
                                i,
                                FramingViolation("a chunk-size line ends in a bare LF"),
                            ));
                        }
                    } else if let Some(digit) = (b as char).to_digit(16).filter(|_| !size.space) {
                        size.digits += 1;
                        // hyper refuses sizes past u64 itself; the check only has to not wrap.
                        size.size = size
                            .size
                            .saturating_mul(16)
                            .saturating_add(u64::from(digit));
                    } else if size.digits == 0 {
                        return Err((i, FramingViolation("a chunk-size line has no size")));
                    } else {
                        match b {
                            b' ' | b'\t' => size.space = true,
                            b';' => size.extension = true,
                            b'\r' if !size.space => size.cr = true,
                            b'\r' => {
                                return Err((
                                    i,
                                    FramingViolation(
                                        "whitespace after a chunk size (RFC 9112 §7.1 allows it only before an extension's ';')",
                                    ),
                                ))
                            }
                            _ => return Err((i, FramingViolation("a chunk size is not hexadecimal"))),
                        }
                    }
                    i += 1;
                }
                State::Trailer { empty, cr } => {
                    let b = bytes[i];
                    if *cr {
                        if b != b'\n' {
                            return Err((i, FramingViolation("a trailer line ends in a bare CR")));
                        }
                        if *empty {
                            self.state = State::Head(Head::default());
                        } else {
                            *empty = true;
                            *cr = false;
                        }
                    } else if b == b'\r' {
                        *cr = true;
                    } else {
                        *empty = false;
                    }
                    i += 1;
                }
                State::Head(head) => {
                    let rest = &bytes[i..];
                    let Some(end) = rest.iter().position(|b| *b == b'\n') else {
                        head.append(rest);
                        return Ok(());
                    };
                    i += end + 1;
                    // A line read whole is looked at where it lies; only one split across
                    // reads is put together first.
                    let next = if head.line.is_empty() && !head.long {
                        head.line_done(&rest[..end], false)
                    } else {
                        head.append(&rest[..end]);
                        let line = std::mem::take(&mut head.line);
                        let long = std::mem::take(&mut head.long);
                        let next = head.line_done(&line, long);
                        head.line = line;
                        head.line.clear();
                        next
                    };
                    if let Some(next) = next {
                        self.state = next;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Head {
    fn append(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_LINE {
            self.long = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    /// A line ended (`long`: only its end was kept); the body's state when it was the head's
    /// last.
    fn line_done(&mut self, line: &[u8], long: bool) -> Option<State> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() && !long {
            if !self.started {
                // Empty lines before a request line are skipped (RFC 9112 §2.2).
                return None;
            }
            return Some(if self.switch {
                State::Off
            } else if self.chunked {
                State::Size(Size::default())
            } else if self.length > 0 {
                State::Length(self.length)
            } else {
                State::Head(Head::default())
            });
        }
        if !self.started {
            self.started = true;
            self.switch = line.starts_with(b"CONNECT ");
            return None;
        }
        if long {
            return None;
        }
        let colon = line.iter().position(|b| *b == b':')?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // hyper frames by the last coding when it is chunked (and refuses the rest).
            self.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") && !self.chunked {
            let digits = value
                .split(|b| *b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            self.length = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.switch = true;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(stream: &[u8]) -> Result<(), (usize, &'static str)> {
        let mut whole = FramingCheck::default();
        let once = whole.feed(stream).map_err(|(at, v)| (at, v.0));
        // Any split of the stream gives the same verdict at the same byte.
        for split in 1..stream.len() {
            let mut parts = FramingCheck::default();
            let first = parts.feed(&stream[..split]).map_err(|(at, v)| (at, v.0));
            let verdict = first.and_then(|()| {
                parts
                    .feed(&stream[split..])
                    .map_err(|(at, v)| (at + split, v.0))
            });
            assert_eq!(verdict, once, "split at {split}");
        }
        once
    }

    const CHUNKED: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn valid_streams_pass() {
        let mut stream = b"\r\nGET /a HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
        stream.extend_from_slice(b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\n5 \r\n");
        stream.extend_from_slice(CHUNKED);
        stream
            .extend_from_slice(b"5\r\nhello\r\nA ;name=\"v\"\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n");
        stream.extend_from_slice(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(check(&stream), Ok(()));
    }

    #[test]
    fn whitespace_after_a_chunk_size_is_refused_at_its_line_end() {
        let mut stream = CHUNKED.to_vec();
        stream.extend_from_slice(b"5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n");
        let at = CHUNKED.len() + 12;
        assert_eq!(stream[at], b'\r');
        assert!(
            matches!(check(&stream), Err((a, reason)) if a == at && reason.starts_with("whitespace"))
        );
        let mut tab = CHUNKED.to_vec();
        tab.extend_from_slice(b"5\t\r\nhello\r\n0\r\n\r\n");
        assert!(check(&tab).is_err());
    }

    #[test]
    fn other_chunk_errors_and_switches() {
        for body in [&b"x\r\n"[..], b"5\nhello\r\n", b"5\r\nhelloo\r\n"] {
            let mut stream = CHUNKED.to_vec();
            stream.extend_from_slice(body);
            assert!(
                check(&stream).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // After an upgrade request anything may follow.
        let upgrade = b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n\x81\x05 \r\n";
        assert_eq!(check(upgrade), Ok(()));
    }
}
