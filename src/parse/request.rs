//! Client request framing: RESP multibulk and inline commands, with Redis's own limits
//! and `Protocol error: …` wording (Redis 7 `processMultibulkBuffer`/`processInlineBuffer`).
//!
//! Parsing is zero-copy: a batch of complete requests is cut off the read buffer as one
//! frozen `Bytes`, and each argument is a slice of it. The original frame bytes are kept
//! so that a forwarded request goes upstream exactly as the client sent it.

use bytes::{Bytes, BytesMut};

use crate::error::ProtocolError;

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest inline command or count line.
pub const PROTO_INLINE_MAX_SIZE: usize = 64 * 1024;
/// Redis's limits for clients that have not authenticated yet.
const UNAUTH_MAX_MULTIBULK: i64 = 10;
const UNAUTH_MAX_BULK: i64 = 16384;

/// A request's arguments: up to three (GET key, SET key value, HGET key field) without
/// an allocation of their own, which was a third of parsing a GET (callgrind).
pub type Args = smallvec::SmallVec<[Bytes; 3]>;

/// One client command.
#[derive(Debug, Clone)]
pub struct Request {
    pub args: Args,
    /// The bytes to forward: the client's own multibulk, or the inline command re-encoded.
    pub raw: Bytes,
}

impl Request {
    pub fn from_args(args: impl Into<Args>) -> Request {
        let args = args.into();
        let raw = crate::respond::command_bytes(&args);
        Request { args, raw }
    }
}

/// A request's arguments from text (unit tests).
#[cfg(test)]
pub fn args(v: &[&str]) -> Vec<Bytes> {
    v.iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect()
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub proto_max_bulk_len: i64,
    /// Apply Redis's tighter limits for clients that have not authenticated.
    pub unauthenticated: bool,
}

#[derive(Debug)]
enum Frame {
    /// `nargs` argument ranges from `first` in the batch's range list, and the frame's
    /// own range (one scratch list per batch: no allocation per command).
    Multi {
        first: usize,
        nargs: usize,
        start: usize,
        end: usize,
    },
    Inline(Vec<Bytes>),
    /// Empty multibulk or blank inline line: consumed, answered with nothing (as Redis).
    Empty,
}

/// A multibulk cut short by the end of the buffer, kept between reads so that each byte of
/// a large request is scanned once (as Redis keeps `multibulklen`/`bulklen` per client).
/// It always describes the request at the front of the buffer, with offsets from there.
#[derive(Debug, Default)]
pub struct Partial {
    count: usize,
    /// Where the next argument's `$len` line starts.
    pos: usize,
    /// The arguments parsed so far.
    ranges: Vec<(usize, usize)>,
    /// Parsed under the unauthenticated limits: a change of auth state (AUTH, RESET)
    /// makes the request be parsed again from its start, under the new limits.
    unauthenticated: bool,
}

/// Per-connection parser state: the partial request, if any, and the scratch lists of
/// a batch (kept for the next one while small).
#[derive(Debug, Default)]
pub struct ParseState {
    partial: Option<Partial>,
    frames: Vec<Frame>,
    ranges: Vec<(usize, usize)>,
}

/// Scratch lists longer than this are not kept between batches.
const KEEP_SCRATCH: usize = 256;

impl ParseState {
    #[cfg(test)]
    pub(crate) fn is_partial(&self) -> bool {
        self.partial.is_some()
    }
}

/// Cuts as many complete requests as possible (at most `max`) off the front of `buf`.
/// On a protocol error the requests before it are still returned, with the error; the
/// caller answers them, then the error, then closes the connection. `state` carries a
/// partial request from one call to the next: `buf` may only grow at its end in between.
pub fn parse_batch(
    buf: &mut BytesMut,
    limits: Limits,
    max: usize,
    out: &mut Vec<Request>,
    state: &mut ParseState,
) -> Result<(), ProtocolError> {
    let mut frames = std::mem::take(&mut state.frames);
    let mut ranges = std::mem::take(&mut state.ranges);
    let result = parse_into(buf, limits, max, out, state, &mut frames, &mut ranges);
    frames.clear();
    ranges.clear();
    if frames.capacity() <= KEEP_SCRATCH && ranges.capacity() <= KEEP_SCRATCH {
        state.frames = frames;
        state.ranges = ranges;
    }
    result
}

fn parse_into(
    buf: &mut BytesMut,
    limits: Limits,
    max: usize,
    out: &mut Vec<Request>,
    state: &mut ParseState,
    frames: &mut Vec<Frame>,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<(), ProtocolError> {
    let mut pos = 0usize;
    let mut result = Ok(());
    if let Some(p) = state
        .partial
        .take()
        .filter(|p| p.unauthenticated == limits.unauthenticated)
    {
        if max == 0 {
            state.partial = Some(p);
            return Ok(());
        }
        *ranges = p.ranges;
        match parse_args(buf, limits, 0, ranges, 0, p.count, p.pos) {
            Ok(Step::Done(frame, used)) => {
                frames.push(frame);
                pos = used;
            }
            Ok(Step::Partial(at)) => {
                state.partial = Some(Partial {
                    count: p.count,
                    pos: at,
                    ranges: std::mem::take(ranges),
                    unauthenticated: p.unauthenticated,
                });
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    while frames.len() < max && pos < buf.len() && !(limits.unauthenticated && pos > 0) {
        let mark = ranges.len();
        match parse_one(&buf[pos..], limits, pos, ranges) {
            Ok(Step::Done(frame, used)) => {
                frames.push(frame);
                pos += used;
            }
            Ok(Step::Partial(at)) => {
                // Keep what was parsed of a multibulk, relative to its own start (the
                // front of the buffer once the complete requests are cut off).
                if let Some((count, at)) = at {
                    state.partial = Some(Partial {
                        count,
                        pos: at,
                        ranges: ranges[mark..]
                            .iter()
                            .map(|&(s, e)| (s - pos, e - pos))
                            .collect(),
                        unauthenticated: limits.unauthenticated,
                    });
                }
                ranges.truncate(mark);
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        // Only the first request of a batch may be affected by a change of auth state;
        // the caller re-parses after AUTH anyway because it processes in order (the loop
        // condition stops after one request while unauthenticated).
    }
    if pos > 0 {
        let batch = buf.split_to(pos).freeze();
        for frame in frames.drain(..) {
            match frame {
                Frame::Multi {
                    first,
                    nargs,
                    start,
                    end,
                } => out.push(Request {
                    args: ranges[first..first + nargs]
                        .iter()
                        .map(|&(s, e)| batch.slice(s..e))
                        .collect(),
                    raw: batch.slice(start..end),
                }),
                Frame::Inline(args) => out.push(Request::from_args(args)),
                Frame::Empty => {}
            }
        }
    }
    result
}

/// The arguments of one complete request's forwarded bytes (`Request::raw`, always a
/// multibulk), zero-copy: for diagnostics such as the slow log.
pub fn args_of(raw: &Bytes) -> Vec<Bytes> {
    let limits = Limits {
        proto_max_bulk_len: i64::MAX,
        unauthenticated: false,
    };
    let mut ranges = Vec::new();
    match raw.first() {
        Some(b'*') => match parse_one(raw, limits, 0, &mut ranges) {
            Ok(Step::Done(..)) => ranges.iter().map(|&(s, e)| raw.slice(s..e)).collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn find_cr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\r')
}

/// Redis's `string2ll`: strict decimal, no leading `+`, no spaces.
fn parse_ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || digits[0] == b'0' {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub((d - b'0') as i64)?
        } else {
            v.checked_add((d - b'0') as i64)?
        };
    }
    Some(v)
}

/// What parsing the request at the front of a buffer came to.
enum Step<P> {
    /// A complete request, and the bytes it used.
    Done(Frame, usize),
    /// More bytes are needed; `P` says how far a multibulk got.
    Partial(P),
}

/// Parses one request at the start of `buf` (which starts at `base` in the batch),
/// appending its argument ranges, relative to the batch, to `ranges`. A multibulk cut
/// short reports its argument count and where its next argument starts.
fn parse_one(
    buf: &[u8],
    limits: Limits,
    base: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<Step<Option<(usize, usize)>>, ProtocolError> {
    if buf[0] != b'*' {
        return Ok(match parse_inline(buf)? {
            Some((frame, used)) => Step::Done(frame, used),
            None => Step::Partial(None),
        });
    }
    let cr = match find_cr(buf) {
        Some(cr) => cr,
        None if buf.len() > PROTO_INLINE_MAX_SIZE => {
            return Err(ProtocolError("too big mbulk count string".into()))
        }
        None => return Ok(Step::Partial(None)),
    };
    if cr + 2 > buf.len() {
        return Ok(Step::Partial(None));
    }
    let count = match parse_ll(&buf[1..cr]) {
        Some(n) if n <= i32::MAX as i64 => n,
        _ => return Err(ProtocolError("invalid multibulk length".into())),
    };
    if limits.unauthenticated && count > UNAUTH_MAX_MULTIBULK {
        return Err(ProtocolError("unauthenticated multibulk length".into()));
    }
    let pos = cr + 2;
    if count <= 0 {
        return Ok(Step::Done(Frame::Empty, pos));
    }
    let count = count as usize;
    let first = ranges.len();
    Ok(
        match parse_args(buf, limits, base, ranges, first, count, pos)? {
            Step::Done(frame, used) => Step::Done(frame, used),
            Step::Partial(at) => Step::Partial(Some((count, at))),
        },
    )
}

/// Parses the `$len` arguments of a multibulk of `count` whose first `ranges.len() -
/// first` arguments are already parsed, from `pos` in `buf` (the request's own bytes,
/// which start at `base` in the batch). Stops at the first incomplete argument.
fn parse_args(
    buf: &[u8],
    limits: Limits,
    base: usize,
    ranges: &mut Vec<(usize, usize)>,
    first: usize,
    count: usize,
    mut pos: usize,
) -> Result<Step<usize>, ProtocolError> {
    while ranges.len() - first < count {
        if pos >= buf.len() {
            return Ok(Step::Partial(pos));
        }
        let rest = &buf[pos..];
        // The usual `$<len>\r\n<arg>\r\n`, whole and within every limit, in one pass;
        // anything else (cut short, malformed, over a limit) takes the checks below.
        if let Some((start, len)) = plain_bulk(rest, limits) {
            let (start, end) = (pos + start, pos + start + len);
            if end + 2 <= buf.len() {
                ranges.push((base + start, base + end));
                pos = end + 2;
                continue;
            }
        }
        let cr = match find_cr(rest) {
            Some(cr) => cr,
            None if rest.len() > PROTO_INLINE_MAX_SIZE => {
                return Err(ProtocolError("too big bulk count string".into()))
            }
            None => return Ok(Step::Partial(pos)),
        };
        if cr + 2 > rest.len() {
            return Ok(Step::Partial(pos));
        }
        if rest[0] != b'$' {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                rest[0] as char
            )));
        }
        let len = match parse_ll(&rest[1..cr]) {
            Some(n) if n >= 0 && n <= limits.proto_max_bulk_len => n,
            _ => return Err(ProtocolError("invalid bulk length".into())),
        };
        if limits.unauthenticated && len > UNAUTH_MAX_BULK {
            return Err(ProtocolError("unauthenticated bulk length".into()));
        }
        let start = pos + cr + 2;
        let end = start + len as usize;
        if end + 2 > buf.len() {
            // The `$len` line is read again next time: a few bytes, not the argument.
            return Ok(Step::Partial(pos));
        }
        ranges.push((base + start, base + end));
        pos = end + 2;
    }
    Ok(Step::Done(
        Frame::Multi {
            first,
            nargs: count,
            start: base,
            end: base + pos,
        },
        pos,
    ))
}

/// A `$<len>\r` line at the front of `buf` with a length Redis accepts under `limits`
/// (1 to 18 digits, no leading zero, no sign): where the argument starts and its length.
/// `None` for anything else, which the general path then takes.
#[inline]
fn plain_bulk(buf: &[u8], limits: Limits) -> Option<(usize, usize)> {
    if buf.first() != Some(&b'$') {
        return None;
    }
    let mut len: u64 = 0;
    let mut i = 1;
    while let Some(&d) = buf.get(i) {
        if !d.is_ascii_digit() {
            break;
        }
        len = len * 10 + u64::from(d - b'0');
        i += 1;
        if i > 19 {
            return None;
        }
    }
    let digits = i - 1;
    let ok = buf.get(i) == Some(&b'\r')
        && i + 1 < buf.len()
        && digits > 0
        && (buf[1] != b'0' || digits == 1)
        && (len as i64) <= limits.proto_max_bulk_len
        && !(limits.unauthenticated && len > UNAUTH_MAX_BULK as u64);
    ok.then_some((i + 2, len as usize))
}

fn parse_inline(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    // Redis finds the line's end with strchr(), which stops at a NUL: a NUL before the
    // newline leaves the request incomplete until the 64 KiB inline limit ends it.
    let nl = match buf.iter().position(|&b| b == b'\n' || b == 0) {
        Some(nl) if buf[nl] == b'\n' => nl,
        _ if buf.len() > PROTO_INLINE_MAX_SIZE => {
            return Err(ProtocolError("too big inline request".into()))
        }
        _ => return Ok(None),
    };
    let mut line = &buf[..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    let args =
        split_args(line).ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))?;
    if args.is_empty() {
        return Ok(Some((Frame::Empty, nl + 1)));
    }
    Ok(Some((
        Frame::Inline(args.into_iter().map(Bytes::from).collect()),
        nl + 1,
    )))
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// C's `isspace` in the "C" locale (Rust's `is_ascii_whitespace` lacks `\v`).
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Redis's `sdssplitargs`: whitespace-separated words, "double quotes" with C escapes
/// (`\n \r \t \b \a \xHH`), 'single quotes' with `\'` only. A closing quote must be
/// followed by whitespace or the end. `None` for unbalanced quotes. Redis splits a C
/// string, so a NUL byte ends the line: what follows it is ignored (and an open quote
/// is then unbalanced).
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && is_c_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            if inq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && hex_val(line[i + 2]).is_some()
                    && hex_val(line[i + 3]).is_some()
                {
                    let hi = hex_val(line[i + 2])?;
                    let lo = hex_val(line[i + 3])?;
                    cur.push(hi * 16 + lo);
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !is_c_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if insq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !is_c_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        break;
                    }
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        proto_max_bulk_len: 512 * 1024 * 1024,
        unauthenticated: false,
    };

    fn parse(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, Result<(), ProtocolError>, usize) {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        let r = parse_batch(
            &mut buf,
            L,
            usize::MAX,
            &mut out,
            &mut ParseState::default(),
        );
        let reqs = out
            .iter()
            .map(|r| r.args.iter().map(|a| a.to_vec()).collect())
            .collect();
        (reqs, r, buf.len())
    }

    #[test]
    fn multibulk_pipeline_and_partial() {
        let (reqs, r, left) =
            parse(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nGE");
        assert!(r.is_ok());
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1], vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(left, 10);
    }

    #[test]
    fn raw_is_the_original_frame() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n"[..]);
        let mut out = Vec::new();
        parse_batch(&mut buf, L, 100, &mut out, &mut ParseState::default()).unwrap();
        assert_eq!(&out[0].raw[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(&out[1].raw[..], b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn a_nul_ends_an_inline_line_as_in_redis() {
        assert_eq!(
            split_args(b"ECHO a\0b c"),
            Some(vec![b"ECHO".to_vec(), b"a".to_vec()])
        );
        assert_eq!(split_args(b"ECHO \"a\0b\""), None);
        assert_eq!(split_args(b"\0"), Some(vec![]));
        assert_eq!(
            split_args(b"\x0bECHO\x0ba"),
            Some(vec![b"ECHO\x0ba".to_vec()])
        );
    }

    #[test]
    fn inline_quotes() {
        let (reqs, r, _) = parse(b"set k \"a b\\x41\\n\" 'c\\'d'\r\n\r\n");
        assert!(r.is_ok());
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            reqs[0],
            vec![
                b"set".to_vec(),
                b"k".to_vec(),
                b"a bA\n".to_vec(),
                b"c'd".to_vec()
            ]
        );
        let (_, r, _) = parse(b"set k \"abc\r\n");
        assert_eq!(r.unwrap_err().0, "unbalanced quotes in request");
    }

    #[test]
    fn redis_protocol_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "invalid multibulk length"),
            (b"*1\r\n+PING\r\n", "expected '+', got '+'"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*3000000000\r\n", "invalid multibulk length"),
        ];
        for (input, want) in cases {
            let (_, r, _) = parse(input);
            let got = r.unwrap_err().0;
            if want.starts_with("expected") {
                assert_eq!(got, "expected '$', got '+'");
            } else {
                assert_eq!(&got, want);
            }
        }
        let mut big = vec![b'*'];
        big.extend(std::iter::repeat_n(b'1', 70 * 1024));
        let (_, r, _) = parse(&big);
        assert_eq!(r.unwrap_err().0, "too big mbulk count string");
    }

    #[test]
    fn bulk_len_limit() {
        let mut buf = BytesMut::from(&b"*1\r\n$11\r\nhello world\r\n"[..]);
        let mut out = Vec::new();
        let lim = Limits {
            proto_max_bulk_len: 10,
            unauthenticated: false,
        };
        let r = parse_batch(&mut buf, lim, 100, &mut out, &mut ParseState::default());
        assert_eq!(r.unwrap_err().0, "invalid bulk length");
    }

    /// The one-pass bulk path and the general one agree on every edge of a length line:
    /// fed whole, and fed a byte at a time (every cut of the line and the argument).
    #[test]
    fn bulk_length_edges_whole_and_byte_by_byte() {
        let ok: &[(&[u8], &[&[u8]])] = &[
            (b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", &[b"GET", b""]),
            (b"*1\r\n$10\r\n0123456789\r\n", &[b"0123456789"]),
            (b"*1\r\n$1\r\n\r\r\n", &[b"\r"]),
        ];
        let bad: &[(&[u8], &str)] = &[
            (b"*1\r\n$01\r\nx\r\n", "invalid bulk length"),
            (b"*1\r\n$+1\r\nx\r\n", "invalid bulk length"),
            (b"*1\r\n$\r\n", "invalid bulk length"),
            (b"*1\r\n$1x\r\n", "invalid bulk length"),
            (b"*1\r\n$99999999999999999999\r\n", "invalid bulk length"),
            (b"*1\r\n$11\r\n", "invalid bulk length"), // over the limit of 10
        ];
        let lim = Limits {
            proto_max_bulk_len: 10,
            unauthenticated: false,
        };
        let run = |input: &[u8], step: usize| {
            let (mut buf, mut out, mut st) = (BytesMut::new(), Vec::new(), ParseState::default());
            let mut r = Ok(());
            for chunk in input.chunks(step) {
                buf.extend_from_slice(chunk);
                r = parse_batch(&mut buf, lim, 100, &mut out, &mut st);
                if r.is_err() {
                    break;
                }
            }
            (out, r)
        };
        for step in [usize::MAX, 1] {
            for (input, want) in ok {
                let (out, r) = run(input, step);
                assert!(r.is_ok(), "{input:?}: {r:?}");
                assert_eq!(out.len(), 1, "{input:?}");
                let args: Vec<&[u8]> = out[0].args.iter().map(|a| &a[..]).collect();
                assert_eq!(&args, want);
                assert_eq!(&out[0].raw[..], *input);
            }
            for (input, want) in bad {
                let (out, r) = run(input, step);
                assert!(out.is_empty(), "{input:?}");
                assert_eq!(r.unwrap_err().0, *want, "{input:?}");
            }
        }
        let unauth = Limits {
            proto_max_bulk_len: i64::MAX,
            unauthenticated: true,
        };
        let mut buf = BytesMut::from(&b"*1\r\n$16385\r\n"[..]);
        let r = parse_batch(
            &mut buf,
            unauth,
            1,
            &mut Vec::new(),
            &mut ParseState::default(),
        );
        assert_eq!(r.unwrap_err().0, "unauthenticated bulk length");
    }

    #[test]
    fn empty_frames_are_skipped() {
        let (reqs, r, left) = parse(b"*0\r\n\r\n*-1\r\n*1\r\n$4\r\nPING\r\n");
        assert!(r.is_ok());
        assert_eq!(reqs.len(), 1);
        assert_eq!(left, 0);
    }
}
