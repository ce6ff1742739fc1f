//! The stub: what Redis holds in place of a spilled value, and the envelope for a user
//! value that happens to begin with the stub magic.
//!
//! ```text
//! offset size
//!  0      4   magic  F5 'T' 'P' 'X'   (0xF5 never occurs in UTF-8: no text value starts so)
//!  4      1   version = 1
//!  5      1   kind: 1 = object (value in the spill store), 2 = inline (value follows)
//!  6      1   codec: 0 = raw, 1 = zstd
//!  7      1   reserved = 0
//!  8      8   original length (u64 BE)
//! 16      8   stored length (u64 BE): object size, or inline payload size
//! 24     32   SHA-256 of the original value
//! 56      2   object name length (u16 BE); 0 for inline
//! 58      n   object name (kind 1) | payload, `stored length` bytes (kind 2)
//!  …     32   HMAC-SHA256 over every byte before it, with the signing key
//! ```
//! The Redis key name is not bound, so COPY, RENAME, RESTORE keep a stub valid.

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 4] = b"\xF5TPX";
pub const VERSION: u8 = 1;
const HEADER: usize = 58;
const MAC_LEN: usize = 32;
/// Bytes an inline envelope adds to its payload.
pub const ENVELOPE: usize = HEADER + MAC_LEN;
/// Longest stub with an object name (names are short): what a ranged read must fetch
/// to parse one without reading a whole large value.
pub const MAX_OBJECT_STUB: usize = HEADER + 1024 + MAC_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl TryFrom<u8> for Codec {
    type Error = StubError;
    fn try_from(b: u8) -> Result<Codec, StubError> {
        match b {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            other => Err(StubError(format!("unknown codec {other}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The value lives in the store under this name.
    Object(String),
    /// The value itself (an escaped user value).
    Inline(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stub {
    pub codec: Codec,
    pub original_len: u64,
    pub stored_len: u64,
    pub checksum: [u8; 32],
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spill stub: {0}")]
pub struct StubError(pub String);

pub fn is_stub(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

impl Stub {
    pub fn encode(&self, key: &[u8]) -> Bytes {
        let (kind, name, payload): (u8, &[u8], &[u8]) = match &self.body {
            Body::Object(n) => (1, n.as_bytes(), &[]),
            Body::Inline(p) => (2, &[], p),
        };
        let mut out = BytesMut::with_capacity(HEADER + name.len() + payload.len() + MAC_LEN);
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u8(self.codec as u8);
        out.put_u8(0);
        out.put_u64(self.original_len);
        out.put_u64(self.stored_len);
        out.put_slice(&self.checksum);
        out.put_u16(name.len() as u16);
        out.put_slice(name);
        out.put_slice(payload);
        let mut m = mac(key);
        m.update(&out);
        out.put_slice(&m.finalize().into_bytes());
        out.freeze()
    }

    /// Parses and authenticates a stub; anything forged, truncated or corrupted is an
    /// error (never a panic, never another object's name).
    pub fn decode(b: &Bytes, key: &[u8]) -> Result<Stub, StubError> {
        let bad = |why: &str| StubError(why.to_string());
        if b.len() < HEADER + MAC_LEN || !is_stub(b) {
            return Err(bad("too short"));
        }
        let (signed, tag) = b.split_at(b.len() - MAC_LEN);
        let mut m = mac(key);
        m.update(signed);
        m.verify_slice(tag).map_err(|_| {
            bad("authentication failed (forged, corrupted, or another signing key)")
        })?;
        if b[4] != VERSION {
            return Err(StubError(format!("unsupported version {}", b[4])));
        }
        let kind = b[5];
        let codec = Codec::try_from(b[6])?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let original_len = u64_at(8);
        let stored_len = u64_at(16);
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&b[24..56]);
        let name_len = u16::from_be_bytes([b[56], b[57]]) as usize;
        let rest = &signed[HEADER..];
        let body = match kind {
            1 => {
                if rest.len() != name_len || name_len == 0 {
                    return Err(bad("object name length mismatch"));
                }
                let name = std::str::from_utf8(rest).map_err(|_| bad("object name not UTF-8"))?;
                Body::Object(name.to_string())
            }
            2 => {
                if name_len != 0 || rest.len() as u64 != stored_len {
                    return Err(bad("inline length mismatch"));
                }
                Body::Inline(b.slice(HEADER..HEADER + rest.len()))
            }
            other => return Err(StubError(format!("unknown kind {other}"))),
        };
        Ok(Stub {
            codec,
            original_len,
            stored_len,
            checksum,
            body,
        })
    }

    /// The envelope for a small user value that starts with the magic.
    pub fn inline(value: Bytes) -> Stub {
        Stub {
            codec: Codec::Raw,
            original_len: value.len() as u64,
            stored_len: value.len() as u64,
            checksum: sha256(&value),
            body: Body::Inline(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = b"k1";
        let s = Stub {
            codec: Codec::Zstd,
            original_len: 1000,
            stored_len: 100,
            checksum: sha256(b"x"),
            body: Body::Object("p/abc".into()),
        };
        let b = s.encode(key);
        assert!(is_stub(&b));
        assert_eq!(Stub::decode(&b, key).unwrap(), s);
        assert!(Stub::decode(&b, b"other key").is_err());
        for i in 0..b.len() {
            let mut t = b.to_vec();
            t[i] ^= 1;
            assert!(Stub::decode(&Bytes::from(t), key).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(
                Stub::decode(&b.slice(..n), key).is_err(),
                "truncated to {n}"
            );
        }
        let v = Bytes::from_static(b"\xF5TPX looks like a stub");
        let inl = Stub::inline(v.clone()).encode(key);
        assert_eq!(Stub::decode(&inl, key).unwrap().body, Body::Inline(v));
    }
}
