//! Property tests: the front-end request parser and the reply encoder/framer agree with
//! each other and with an independent RESP decoder (the `redis-protocol` crate), however
//! the bytes are cut into reads.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::reply::{frame_len, split_aggregate};
use super::request::{parse_batch, Limits, ParseState};
use crate::respond::{command_bytes, Proto, Value};

const LIMITS: Limits = Limits {
    proto_max_bulk_len: 512 * 1024 * 1024,
    unauthenticated: false,
};

fn arg() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Mostly short, with the bytes that matter to framing over-represented.
        proptest::collection::vec(
            prop_oneof![
                Just(b'\r'),
                Just(b'\n'),
                Just(b'$'),
                Just(b'*'),
                any::<u8>()
            ],
            0..12
        ),
        proptest::collection::vec(any::<u8>(), 0..3000),
    ]
}

fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(arg(), 1..8)
}

/// Feeds `input` to the parser in reads of the given sizes (cycled), as a connection
/// does, and returns every request's arguments and forwarded bytes.
fn parse_in_reads(input: &[u8], reads: &[usize]) -> Vec<(Vec<Vec<u8>>, Vec<u8>)> {
    let mut buf = BytesMut::new();
    let mut state = ParseState::default();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut i = 0;
    while fed < input.len() {
        let n = reads[i % reads.len()].max(1).min(input.len() - fed);
        i += 1;
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        parse_batch(&mut buf, LIMITS, usize::MAX, &mut out, &mut state)
            .expect("valid input must parse");
    }
    assert!(buf.is_empty(), "bytes left over: {}", buf.len());
    assert!(!state.is_partial());
    out.into_iter()
        .map(|r| (r.args.iter().map(|a| a.to_vec()).collect(), r.raw.to_vec()))
        .collect()
}

fn value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::ok()),
        "[ -~]{0,20}".prop_map(Value::SimpleOwned),
        any::<String>().prop_map(Value::Error),
        any::<i64>().prop_map(Value::Int),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Bulk(b.into())),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Verbatim(b.into())),
        Just(Value::Null),
        Just(Value::NullArray),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let inner = value(depth - 1);
    // Set members and map keys are strings and integers, as in Redis's replies (the
    // independent decoder hashes them, so it cannot take aggregates there).
    let key = || {
        prop_oneof![
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(|b| Value::Bulk(b.into())),
            "[a-z]{0,8}".prop_map(Value::SimpleOwned),
        ]
    };
    prop_oneof![
        3 => leaf,
        1 => proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
        1 => proptest::collection::vec(key(), 0..5).prop_map(Value::Set),
        1 => proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Push),
        1 => proptest::collection::vec((key(), inner), 0..4).prop_map(Value::Map),
    ]
    .boxed()
}

fn children(v: &Value) -> Option<Vec<&Value>> {
    match v {
        Value::Array(items) | Value::Set(items) | Value::Push(items) => {
            Some(items.iter().collect())
        }
        Value::Map(pairs) => Some(pairs.iter().flat_map(|(k, v)| [k, v]).collect()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Encoded commands, pipelined and cut into arbitrary reads, parse back to exactly
    /// the same arguments, each request forwarding its own bytes.
    #[test]
    fn requests_round_trip_in_any_reads(
        cmds in proptest::collection::vec(command(), 1..6),
        reads in proptest::collection::vec(1usize..4000, 1..8),
    ) {
        let encoded: Vec<Bytes> = cmds.iter().map(|c| command_bytes(c)).collect();
        let input: Vec<u8> = encoded.iter().flat_map(|b| b.iter().copied()).collect();
        let got = parse_in_reads(&input, &reads);
        prop_assert_eq!(got.len(), cmds.len());
        for ((args, raw), (want, bytes)) in got.iter().zip(cmds.iter().zip(&encoded)) {
            prop_assert_eq!(args, want);
            prop_assert_eq!(&raw[..], &bytes[..]);
        }
    }

    /// Whatever the proxy encodes is one complete reply to our framer and to an
    /// independent decoder, no proper prefix is complete, and aggregates split into
    /// their children's own encodings.
    #[test]
    fn replies_frame_the_same_as_an_independent_decoder(v in value(3), resp3 in any::<bool>()) {
        let proto = if resp3 { Proto::Resp3 } else { Proto::Resp2 };
        let bytes = v.to_bytes(proto);
        prop_assert_eq!(frame_len(&bytes), Ok(Some(bytes.len())));
        let theirs = if resp3 {
            redis_protocol::resp3::decode::complete::decode(&bytes).map(|o| o.map(|(_, n)| n))
        } else {
            redis_protocol::resp2::decode::decode(&bytes).map(|o| o.map(|(_, n)| n))
        };
        prop_assert_eq!(theirs.ok().flatten(), Some(bytes.len()));
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            if cut > 0 && cut < bytes.len() {
                prop_assert_eq!(frame_len(&bytes[..cut]), Ok(None));
            }
        }
        if let Some(kids) = children(&v) {
            let parts = split_aggregate(&bytes).expect("an aggregate splits");
            prop_assert_eq!(parts.len(), kids.len());
            for (part, kid) in parts.iter().zip(kids) {
                prop_assert_eq!(&part[..], &kid.to_bytes(proto)[..]);
            }
        }
    }
}

/// A request of many arguments arriving a few bytes at a time is parsed in time linear
/// in its size: each read resumes where the last stopped instead of starting over.
#[test]
fn a_large_request_in_small_reads_resumes() {
    let args: Vec<Vec<u8>> = (0..50_000).map(|i| format!("a{i}").into_bytes()).collect();
    let input = command_bytes(&args);
    let got = parse_in_reads(&input, &[7, 13, 1, 64]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, args);
}
