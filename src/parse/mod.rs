//! Parsing: client requests in, upstream replies framed, and the command table.

pub mod reply;
pub mod request;
#[cfg(test)]
mod roundtrip;
pub mod table;
