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

fn parse_int(s: &[u8]) -> Result<i64, ReplyError> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| ReplyError(format!("bad length {:?}", String::from_utf8_lossy(s))))
}

/// Length in bytes of the first complete reply in `buf`, `Ok(None)` if incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ReplyError> {
    // Iterative over a stack of "elements still to read" counts, so a deep or huge
    // aggregate cannot overflow our stack.
    let mut pos = 0usize;
    let mut pending: Vec<i64> = Vec::new();
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
                    if pending.len() >= MAX_DEPTH {
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
