//! Upstream reply framing without decoding: finds where one RESP2/RESP3 reply ends so the
//! raw bytes can be handed to the client unchanged, and splits aggregates for merging.

use bytes::Bytes;

/// Nesting deeper than this is treated as a broken upstream, not followed.
const MAX_DEPTH: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError(pub String);

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    let cr = memchr_cr(rest)?;
    if from + cr + 1 < buf.len() {
        Some(from + cr)
    } else {
        None
    }
}

fn memchr_cr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\r')
}

/// A decimal `i64` as Redis writes it (an optional sign, then digits); every length
/// and count of every reply goes through here, so it is done by hand.
fn parse_int(s: &[u8]) -> Result<i64, ReplyError> {
    let bad = || ReplyError(format!("bad length {:?}", String::from_utf8_lossy(s)));
    let (neg, digits) = match s.split_first() {
        Some((b'-', d)) => (true, d),
        Some((b'+', d)) => (false, d),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(bad());
    }
    if digits.len() <= 18 {
        // Cannot overflow.
        let mut n: i64 = 0;
        for &b in digits {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return Err(bad());
            }
            n = n * 10 + d as i64;
        }
        return Ok(if neg { -n } else { n });
    }
    let mut n: i64 = 0;
    for &b in digits {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err(bad());
        }
        // Accumulated on the sign's side, so that i64::MIN parses too.
        n = n
            .checked_mul(10)
            .and_then(|n| {
                if neg {
                    n.checked_sub(d as i64)
                } else {
                    n.checked_add(d as i64)
                }
            })
            .ok_or_else(bad)?;
    }
    Ok(n)
}

/// The length of a complete non-aggregate reply of the common kinds (bulk, status,
/// error, integer) at the start of `buf`; `None` for anything else or incomplete, which
/// [`frame_len`] then works out the long way.
#[inline]
fn flat_len(buf: &[u8]) -> Option<usize> {
    let tag = *buf.first()?;
    if !matches!(tag, b'$' | b'+' | b'-' | b':') {
        return None;
    }
    let eol = line_end(buf, 1)?;
    if tag != b'$' {
        return Some(eol + 2);
    }
    let n = parse_int(&buf[1..eol]).ok()?;
    if n < 0 {
        return Some(eol + 2);
    }
    let end = eol + 2 + n as usize + 2;
    (end <= buf.len()).then_some(end)
}

/// Counts of elements still to read per open aggregate: the first levels inline (no
/// allocation for the replies Redis sends), deeper ones on the heap.
struct Levels {
    inline: [i64; 8],
    depth: usize,
    deeper: Vec<i64>,
}

impl Levels {
    fn push(&mut self, r: i64) {
        if self.depth < self.inline.len() {
            self.inline[self.depth] = r;
        } else {
            self.deeper.push(r);
        }
        self.depth += 1;
    }

    fn pop(&mut self) -> Option<i64> {
        self.depth = self.depth.checked_sub(1)?;
        if self.depth < self.inline.len() {
            Some(self.inline[self.depth])
        } else {
            self.deeper.pop()
        }
    }
}

/// Length in bytes of the first complete reply in `buf`, `Ok(None)` if incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ReplyError> {
    // Most replies are one complete bulk string, status or integer: measured without
    // the aggregate bookkeeping below.
    if let Some(n) = flat_len(buf) {
        return Ok(Some(n));
    }
    // Iterative over a stack of "elements still to read" counts, so a deep or huge
    // aggregate cannot overflow our stack.
    let mut pos = 0usize;
    let mut pending = Levels {
        inline: [0; 8],
        depth: 0,
        deeper: Vec::new(),
    };
    let mut remaining: i64 = 1;
    loop {
        while remaining == 0 {
            match pending.pop() {
                Some(r) => remaining = r,
                None => return Ok(Some(pos)),
            }
        }
        if pos >= buf.len() {
            return Ok(None);
        }
        let tag = buf[pos];
        let Some(eol) = line_end(buf, pos + 1) else {
            return Ok(None);
        };
        let header = &buf[pos + 1..eol];
        let after = eol + 2;
        remaining -= 1;
        match tag {
            b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => pos = after,
            b'$' | b'!' | b'=' => {
                let n = parse_int(header)?;
                if n < 0 {
                    pos = after;
                } else {
                    let end = after + n as usize + 2;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = parse_int(header)?;
                pos = after;
                let items = match tag {
                    b'%' | b'|' => n.max(0) * 2,
                    _ => n.max(0),
                };
                // An attribute precedes the real value: that value still has to be read.
                let items = if tag == b'|' { items + 1 } else { items };
                if items > 0 {
                    if pending.depth >= MAX_DEPTH {
                        return Err(ReplyError("nesting too deep".into()));
                    }
                    pending.push(remaining);
                    remaining = items;
                }
            }
            other => {
                return Err(ReplyError(format!(
                    "unexpected type byte {:?}",
                    other as char
                )))
            }
        }
    }
}

/// The elements of an array reply (`*N` / `~N` / `>N` / `%N` flattened), each as its raw
/// bytes. `None` if the reply is not an aggregate (for example an error).
pub fn split_aggregate(reply: &Bytes) -> Option<Vec<Bytes>> {
    let tag = *reply.first()?;
    if !matches!(tag, b'*' | b'~' | b'>' | b'%') {
        return None;
    }
    let eol = line_end(reply, 1)?;
    let n = parse_int(&reply[1..eol]).ok()?;
    let n = if tag == b'%' { n * 2 } else { n };
    let mut pos = eol + 2;
    let mut items = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = frame_len(&reply[pos..]).ok()??;
        items.push(reply.slice(pos..pos + len));
        pos += len;
    }
    Some(items)
}

/// The elements of an array, set or push reply, borrowed where they lie (no
/// allocation): `None` if the reply is not one, or is a null array. An element cut
/// short ends the walk.
pub fn elements(reply: &[u8]) -> Option<impl Iterator<Item = &[u8]>> {
    if !matches!(*reply.first()?, b'*' | b'~' | b'>') {
        return None;
    }
    let eol = line_end(reply, 1)?;
    let n = parse_int(&reply[1..eol]).ok()?;
    if n < 0 {
        return None;
    }
    let mut pos = eol + 2;
    Some((0..n).map_while(move |_| {
        let rest = reply.get(pos..)?;
        let len = frame_len(rest).ok()??;
        pos += len;
        Some(&rest[..len])
    }))
}

/// A null reply: `$-1`, `*-1` (RESP2) or `_` (RESP3).
pub fn is_null(reply: &[u8]) -> bool {
    reply.starts_with(b"$-1\r\n") || reply.starts_with(b"*-1\r\n") || reply.starts_with(b"_\r\n")
}

/// A SCAN-family reply (`[cursor, [element…]]`): the next cursor and the elements.
pub fn scan_reply(raw: &Bytes) -> Option<(Bytes, Vec<Bytes>)> {
    let parts = split_aggregate(raw)?;
    let cursor = Bytes::copy_from_slice(as_str(parts.first()?)?);
    let items = split_aggregate(parts.get(1)?)?
        .iter()
        .filter_map(|m| as_str(m).map(Bytes::copy_from_slice))
        .collect();
    Some((cursor, items))
}

/// The integer of a `:N` reply.
pub fn as_int(reply: &[u8]) -> Option<i64> {
    if reply.first() != Some(&b':') {
        return None;
    }
    let eol = line_end(reply, 1)?;
    parse_int(&reply[1..eol]).ok()
}

pub fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-') | Some(b'!'))
}

/// The text of a simple or blob error reply, without the type byte.
pub fn error_text(reply: &[u8]) -> Option<String> {
    match reply.first()? {
        b'-' => {
            let eol = line_end(reply, 1)?;
            Some(String::from_utf8_lossy(&reply[1..eol]).into_owned())
        }
        b'!' => {
            let eol = line_end(reply, 1)?;
            let n = parse_int(&reply[1..eol]).ok()? as usize;
            reply
                .get(eol + 2..eol + 2 + n)
                .map(|s| String::from_utf8_lossy(s).into_owned())
        }
        _ => None,
    }
}

/// The payload of a bulk (`$`) or simple (`+`) string reply; `None` for anything else.
pub fn as_str(reply: &[u8]) -> Option<&[u8]> {
    let eol = line_end(reply, 1)?;
    match reply.first()? {
        b'+' => Some(&reply[1..eol]),
        b'$' | b'=' => {
            let n = parse_int(&reply[1..eol]).ok()?;
            if n < 0 {
                return None;
            }
            reply.get(eol + 2..eol + 2 + n as usize)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_aggregates_and_integers_at_the_edges() {
        // Twelve levels: past the inline ones, onto the heap, and back.
        let mut deep = Vec::new();
        for _ in 0..12 {
            deep.extend_from_slice(b"*2\r\n:1\r\n");
        }
        deep.extend_from_slice(b"$1\r\nx\r\n");
        let n = deep.len();
        deep.extend_from_slice(b"+next\r\n");
        assert_eq!(frame_len(&deep), Ok(Some(n)));
        assert_eq!(frame_len(&deep[..n - 1]), Ok(None));
        let mut too_deep = Vec::new();
        for _ in 0..=MAX_DEPTH {
            too_deep.extend_from_slice(b"*1\r\n");
        }
        assert!(frame_len(&too_deep).is_err());

        assert_eq!(as_int(b":9223372036854775807\r\n"), Some(i64::MAX));
        assert_eq!(as_int(b":-9223372036854775808\r\n"), Some(i64::MIN));
        assert_eq!(as_int(b":9223372036854775808\r\n"), None);
        assert_eq!(as_int(b":-0\r\n"), Some(0));
        assert_eq!(as_int(b":\r\n"), None);
        assert_eq!(as_int(b":-\r\n"), None);
        assert_eq!(as_int(b":1x\r\n"), None);
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(b"*1 \r\n").is_err());
    }

    #[test]
    fn elements_are_walked_where_they_lie() {
        let r = b"*3\r\n$7\r\nmessage\r\n:5\r\n*2\r\n$1\r\na\r\n+b\r\n";
        let parts: Vec<&[u8]> = elements(r).unwrap().collect();
        assert_eq!(
            parts,
            [
                &b"$7\r\nmessage\r\n"[..],
                b":5\r\n",
                b"*2\r\n$1\r\na\r\n+b\r\n"
            ]
        );
        let inner: Vec<&[u8]> = elements(parts[2]).unwrap().filter_map(as_str).collect();
        assert_eq!(inner, [&b"a"[..], b"b"]);
        assert!(elements(b"*-1\r\n").is_none());
        assert!(elements(b"$1\r\na\r\n").is_none());
        assert_eq!(elements(b"*0\r\n").unwrap().count(), 0);
        // Cut short: the walk ends at the incomplete element.
        assert_eq!(elements(b"*2\r\n:1\r\n$5\r\nab").unwrap().count(), 1);
        assert!(is_null(b"*-1\r\n") && is_null(b"$-1\r\n") && is_null(b"_\r\n"));
        assert!(!is_null(b"*0\r\n"));
    }

    #[test]
    fn lengths() {
        assert_eq!(frame_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"+OK\r"), Ok(None));
        assert_eq!(frame_len(b"$3\r\nabc\r\n+x"), Ok(Some(9)));
        assert_eq!(frame_len(b"$3\r\nab"), Ok(None));
        assert_eq!(frame_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"*2\r\n:1\r\n*1\r\n$1\r\na\r\n"), Ok(Some(19)));
        assert_eq!(frame_len(b"*2\r\n:1\r\n*1\r\n$1\r\na\r"), Ok(None));
        assert_eq!(frame_len(b"*0\r\n"), Ok(Some(4)));
        assert_eq!(frame_len(b"*-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"%1\r\n+a\r\n:1\r\n"), Ok(Some(12)));
        assert_eq!(frame_len(b"|1\r\n+a\r\n:1\r\n+v\r\n"), Ok(Some(16)));
        assert_eq!(frame_len(b"_\r\n"), Ok(Some(3)));
        assert!(frame_len(b"?x\r\n").is_err());
    }

    #[test]
    fn split() {
        let r = Bytes::from_static(b"*3\r\n$1\r\na\r\n$-1\r\n:5\r\n");
        let items = split_aggregate(&r).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(&items[1][..], b"$-1\r\n");
        assert_eq!(as_int(&items[2]), Some(5));
        assert_eq!(as_str(&items[0]), Some(&b"a"[..]));
    }
}
