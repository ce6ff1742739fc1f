//! The front end's decoder and command classifier on arbitrary client bytes.
//!
//! The first input byte picks how the rest arrives (read size) and whether the client
//! has authenticated; the rest is the byte stream. Checks, beyond "no panic, no
//! unbounded allocation":
//! - parsing the stream in reads of any size yields exactly the requests (and the
//!   protocol error) that parsing it whole does: the resumable partial-request state is
//!   invisible;
//! - every request's forwarded bytes re-parse to the same arguments;
//! - the command table (a real Redis 7.0 `COMMAND` reply) classifies every request
//!   without panicking, and the key positions it returns are inside the request.

#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tierproxy::parse::request::{args_of, parse_batch, Limits, ParseState, Request};
use tierproxy::parse::table::{CommandTable, Lookup};

static TABLE: OnceLock<CommandTable> = OnceLock::new();

/// Feeds `input` in reads of `read` bytes; returns the requests and the error, if any.
fn parse_stream(input: &[u8], read: usize, limits: Limits) -> (Vec<Request>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut state = ParseState::default();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        // Parse until no progress (unauthenticated parsing takes one request per call).
        loop {
            let before = out.len();
            let len = buf.len();
            if let Err(e) = parse_batch(&mut buf, limits, usize::MAX, &mut out, &mut state) {
                return (out, Some(e.0));
            }
            if out.len() == before && buf.len() == len {
                break;
            }
        }
        if fed == input.len() {
            return (out, None);
        }
        let n = read.min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let table = TABLE.get_or_init(|| {
        CommandTable::from_command_reply(include_bytes!("../command-reply.resp"))
            .expect("the stored COMMAND reply parses")
    });
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        proto_max_bulk_len: 1 << 20,
        unauthenticated: mode & 0x80 != 0,
    };
    let read = 1 + (mode & 0x7f) as usize * 13;
    let (whole, whole_err) = parse_stream(input, usize::MAX, limits);
    let (chunked, chunked_err) = parse_stream(input, read, limits);
    assert_eq!(whole_err, chunked_err, "the error depends on how the bytes arrived");
    assert_eq!(whole.len(), chunked.len());
    for (a, b) in whole.iter().zip(&chunked) {
        assert_eq!(a.args, b.args);
        assert_eq!(a.raw, b.raw);
    }
    for req in &whole {
        assert!(!req.args.is_empty());
        assert_eq!(args_of(&req.raw), req.args, "raw bytes re-parse to the arguments");
        if let Lookup::Found(info) = table.lookup(&req.args) {
            let _ = info.arity_ok(req.args.len());
            let _ = info.may_write();
            for i in info.key_indices(&req.args) {
                assert!(i > 0 && i < req.args.len(), "key index {i} outside the request");
                let _ = tierproxy::upstream::key_slot(&req.args[i]);
            }
        }
    }
});
