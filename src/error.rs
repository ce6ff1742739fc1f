//! Typed errors. Each knows where it came from (client input, the upstream, the proxy
//! itself) and becomes a RESP error reply in exactly one place: [`Error::to_reply`].
//! Redis's own wording is used wherever Redis has one; otherwise `ERR tierproxy: …`.

use crate::respond::Value;

/// A request-level failure: the client gets one error reply, the connection stays usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A reply Redis itself would give, carried verbatim (without the leading `-`).
    #[error("{0}")]
    Redis(String),
    /// The same, for the few replies that quote client bytes which are not UTF-8 (an
    /// unknown command's name): Redis echoes them unchanged, and so do we.
    #[error("{}", String::from_utf8_lossy(.0))]
    RedisBytes(Vec<u8>),
    /// A node's own error reply (raw RESP, simple or blob error), passed on unchanged.
    #[error("{}", crate::parse::reply::error_text(.0).unwrap_or_default())]
    NodeReply(bytes::Bytes),
    #[error("upstream {addr}: {source}")]
    Upstream {
        addr: String,
        #[source]
        source: UpstreamError,
    },
    #[error("upstream topology is not known yet: {0}")]
    NoTopology(String),
    #[error("{0}")]
    Proxy(String),
}

/// What C's `%.Ns` prints of `b`: up to `max` bytes, stopping at a NUL.
fn c_str(b: &[u8], max: usize) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end.min(max)]
}

/// Why an upstream request failed. Cloneable because one failure may fail many requests.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("connect timed out after {0} ms")]
    ConnectTimeout(u64),
    #[error("no reply within {0} ms")]
    Timeout(u64),
    #[error("connection lost")]
    ConnectionLost,
    #[error("protocol error in reply: {0}")]
    Protocol(String),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("too many redirects (last: {0})")]
    TooManyRedirects(String),
}

impl Error {
    pub fn redis(msg: impl Into<String>) -> Error {
        Error::Redis(msg.into())
    }

    pub fn proxy(msg: impl Into<String>) -> Error {
        Error::Proxy(msg.into())
    }

    /// `ERR wrong number of arguments for 'get' command`
    pub fn arity(fullname: &str) -> Error {
        Error::Redis(format!(
            "ERR wrong number of arguments for '{fullname}' command"
        ))
    }

    pub fn syntax() -> Error {
        Error::redis("ERR syntax error")
    }

    pub fn crossslot() -> Error {
        Error::redis("CROSSSLOT Keys in request don't hash to the same slot")
    }

    pub fn noauth() -> Error {
        Error::redis("NOAUTH Authentication required.")
    }

    /// Redis 7's ACL refusal, quoting the command's full name (`config|set`).
    pub fn noperm(command: &str) -> Error {
        Error::redis(format!(
            "NOPERM this user has no permissions to run the '{command}' command"
        ))
    }

    pub fn wrongpass() -> Error {
        Error::redis("WRONGPASS invalid username-password pair or user is disabled.")
    }

    /// Redis's reply to an unknown command, byte for byte: it formats the name and the
    /// first arguments with C's `%.128s` / `%.*s` (at most 128 bytes, ending at a NUL).
    pub fn unknown_command(name: &[u8], args: &[bytes::Bytes]) -> Error {
        let mut list = Vec::new();
        for a in args {
            if list.len() >= 128 {
                break;
            }
            let room = 128 - list.len();
            list.push(b'\'');
            list.extend_from_slice(c_str(a, room));
            list.extend_from_slice(b"' ");
        }
        let mut msg = b"ERR unknown command '".to_vec();
        msg.extend_from_slice(c_str(name, 128));
        msg.extend_from_slice(b"', with args beginning with: ");
        msg.extend_from_slice(&list);
        Error::from_bytes(msg)
    }

    pub fn unknown_subcommand(sub: &[u8], container: &str) -> Error {
        let mut msg = b"ERR unknown subcommand '".to_vec();
        msg.extend_from_slice(c_str(sub, 128));
        msg.extend_from_slice(
            format!("'. Try {} HELP.", container.to_ascii_uppercase()).as_bytes(),
        );
        Error::from_bytes(msg)
    }

    fn from_bytes(msg: Vec<u8>) -> Error {
        match String::from_utf8(msg) {
            Ok(s) => Error::Redis(s),
            Err(e) => Error::RedisBytes(e.into_bytes()),
        }
    }

    /// The only function that turns an error into a RESP error reply.
    pub fn to_reply(&self) -> Value {
        match self {
            Error::Redis(msg) => Value::Error(msg.clone()),
            Error::NodeReply(raw) => Value::Raw(raw.clone()),
            Error::RedisBytes(msg) => {
                // As Value::Error does: no line ending inside an error line.
                let mut raw = Vec::with_capacity(msg.len() + 3);
                raw.push(b'-');
                raw.extend(msg.iter().map(|&b| match b {
                    b'\r' | b'\n' => b' ',
                    b => b,
                }));
                raw.extend_from_slice(b"\r\n");
                Value::Raw(raw.into())
            }
            other => Value::Error(format!("ERR tierproxy: {other}")),
        }
    }
}

/// Start-up and configuration failures (never reach a client).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("config: {0}")]
    Config(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream: {0}")]
    Upstream(String),
}

/// A client sent bytes that are not RESP: the connection is answered once and closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

impl ProtocolError {
    pub fn to_reply(&self) -> Value {
        Value::Error(format!("ERR {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_command_matches_redis() {
        let e = Error::unknown_command(b"foo", &[bytes::Bytes::from("a"), "b".into()]);
        assert_eq!(
            e.to_string(),
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        let e = Error::unknown_command(b"foo", &[]);
        assert_eq!(
            e.to_string(),
            "ERR unknown command 'foo', with args beginning with: "
        );
    }
}
