//! Replies: the one place RESP replies are built and encoded, in the client's protocol.
//!
//! Forwarded replies leave as the raw bytes the upstream sent (the upstream connection
//! speaks the client's protocol version, so no conversion is needed). Replies the proxy
//! makes itself are [`Value`]s, encoded here for RESP2 or RESP3; error replies are written
//! only through [`Value::error`] and [`crate::error::Error::to_reply`].

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol version a client speaks (`HELLO 2|3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Resp2,
    Resp3,
}

impl Proto {
    pub fn version(self) -> i64 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

/// A reply built by the proxy. RESP3-only kinds degrade to their RESP2 shape when encoded
/// for a RESP2 client, the way Redis itself does.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(&'static str),
    SimpleOwned(String),
    /// Full error line without the leading `-`, e.g. `ERR syntax error`.
    Error(String),
    Int(i64),
    Bulk(Bytes),
    /// RESP3 verbatim string (`=`); RESP2: a bulk string.
    Verbatim(Bytes),
    Null,
    /// RESP2 null array (`*-1`); RESP3: null.
    NullArray,
    Array(Vec<Value>),
    /// RESP3 map; RESP2: a flat array of key, value, key, value.
    Map(Vec<(Value, Value)>),
    /// RESP3 set; RESP2: an array.
    Set(Vec<Value>),
    /// RESP3 push (`>`), out-of-band data such as pub/sub messages; RESP2: an array.
    Push(Vec<Value>),
    /// Already encoded bytes for this client's protocol (a forwarded reply).
    Raw(Bytes),
}

impl Value {
    pub fn ok() -> Value {
        Value::Simple("OK")
    }

    pub fn error(msg: impl Into<String>) -> Value {
        Value::Error(msg.into())
    }

    pub fn bulk(b: impl Into<Bytes>) -> Value {
        Value::Bulk(b.into())
    }

    pub fn bulk_str(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub fn encode(&self, proto: Proto, out: &mut BytesMut) {
        match self {
            Value::Simple(s) => line(out, b'+', s.as_bytes()),
            // Redis never puts a newline inside a status or error line; neither do we.
            Value::SimpleOwned(s) => line(out, b'+', &one_line(s)),
            Value::Error(e) => line(out, b'-', &one_line(e)),
            Value::Int(i) => int_line(out, b':', *i),
            Value::Bulk(b) => bulk(out, b'$', b),
            Value::Verbatim(b) => match proto {
                Proto::Resp2 => bulk(out, b'$', b),
                Proto::Resp3 => {
                    int_line(out, b'=', b.len() as i64 + 4);
                    out.put_slice(b"txt:");
                    out.put_slice(b);
                    out.put_slice(b"\r\n");
                }
            },
            Value::Null => match proto {
                Proto::Resp2 => out.put_slice(b"$-1\r\n"),
                Proto::Resp3 => out.put_slice(b"_\r\n"),
            },
            Value::NullArray => match proto {
                Proto::Resp2 => out.put_slice(b"*-1\r\n"),
                Proto::Resp3 => out.put_slice(b"_\r\n"),
            },
            Value::Array(items) => {
                int_line(out, b'*', items.len() as i64);
                for v in items {
                    v.encode(proto, out);
                }
            }
            Value::Set(items) | Value::Push(items) => {
                let tag = match (proto, self) {
                    (Proto::Resp2, _) => b'*',
                    (Proto::Resp3, Value::Set(_)) => b'~',
                    (Proto::Resp3, _) => b'>',
                };
                int_line(out, tag, items.len() as i64);
                for v in items {
                    v.encode(proto, out);
                }
            }
            Value::Map(pairs) => {
                match proto {
                    Proto::Resp2 => int_line(out, b'*', pairs.len() as i64 * 2),
                    Proto::Resp3 => int_line(out, b'%', pairs.len() as i64),
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
            Value::Raw(b) => out.put_slice(b),
        }
    }

    pub fn to_bytes(&self, proto: Proto) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(proto, &mut out);
        out.freeze()
    }
}

fn one_line(s: &str) -> Vec<u8> {
    s.bytes()
        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b })
        .collect()
}

fn line(out: &mut BytesMut, tag: u8, s: &[u8]) {
    out.reserve(s.len() + 3);
    out.put_u8(tag);
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn int_line(out: &mut BytesMut, tag: u8, i: i64) {
    let mut buf = itoa::Buffer::new();
    out.put_u8(tag);
    out.put_slice(buf.format(i).as_bytes());
    out.put_slice(b"\r\n");
}

fn bulk(out: &mut BytesMut, tag: u8, b: &[u8]) {
    out.reserve(b.len() + 16);
    int_line(out, tag, b.len() as i64);
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

/// Encodes a command as a RESP multibulk (what we send upstream for commands we build).
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut BytesMut) {
    int_line(out, b'*', args.len() as i64);
    for a in args {
        bulk(out, b'$', a.as_ref());
    }
}

pub fn command_bytes<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out = BytesMut::new();
    encode_command(args, &mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_both_protocols() {
        let v = Value::Map(vec![(Value::bulk_str("a"), Value::Int(1))]);
        assert_eq!(&v.to_bytes(Proto::Resp2)[..], b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(&v.to_bytes(Proto::Resp3)[..], b"%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(&Value::Null.to_bytes(Proto::Resp2)[..], b"$-1\r\n");
        assert_eq!(&Value::Null.to_bytes(Proto::Resp3)[..], b"_\r\n");
        assert_eq!(
            &Value::error("ERR a\r\nb").to_bytes(Proto::Resp2)[..],
            b"-ERR a  b\r\n"
        );
    }
}
