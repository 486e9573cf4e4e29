//! The DNS forwarder's packet handling, chained as `dns::forwarder` chains it: an agent's
//! packet through `parse_query`, then the replies built for it, upstream's answer through
//! `read_answer` and the reply made of that answer. Never a panic, and every reply carries the
//! agent's query id.
//!
//! Input: a big-endian u16 length L, L bytes of the agent's packet, then one mode byte and
//! answer material: raw (mode even), or records behind a header and question that match the
//! query (mode odd, so that the fuzzer reaches the answer checks past the id and question).

#![no_main]

use agentwatch::dns::message::{
    Malformed, Query, bare_reply, error_reply, parse_query, read_answer, reply, upstream_query,
};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use libfuzzer_sys::fuzz_target;

/// The id the forwarder's own upstream query goes under (random in the forwarder).
const UPSTREAM_ID: u16 = 0x5a5a;

/// A reply must be read back by any resolver with `id` and `rcode`; an empty reply is the
/// forwarder's documented fail-closed answer (the agent drops it like a lost packet).
fn assert_reply(bytes: &[u8], id: u16, rcode: Option<ResponseCode>) {
    if bytes.is_empty() {
        return;
    }
    assert_eq!(bytes.get(..2), Some(&id.to_be_bytes()[..]), "reply id");
    let m = Message::from_vec(bytes).unwrap_or_else(|e| panic!("reply unreadable: {e}"));
    assert_eq!(m.metadata.id, id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    if let Some(rcode) = rcode {
        assert_eq!(m.metadata.response_code, rcode);
    }
}

/// Upstream's answer to `query`: `material`'s first byte picks raw bytes or a matching header
/// and question followed by the rest as records.
fn answer_bytes(query: &Query, material: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = material.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut m = Message::response(UPSTREAM_ID, OpCode::Query);
    m.queries.clone_from(&query.message.queries);
    let Ok(mut bytes) = m.to_vec() else {
        return Vec::new();
    };
    // Record counts (answer, authority, additional) from the next bytes, records after them.
    let (counts, records) = rest.split_at(rest.len().min(3));
    for (i, &n) in counts.iter().enumerate() {
        let at = 6 + 2 * i;
        bytes[at..at + 2].copy_from_slice(&u16::from(n % 16).to_be_bytes());
    }
    bytes.extend_from_slice(records);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (packet, material) = rest.split_at(len);
    let query = match parse_query(packet) {
        Ok(q) => q,
        Err(Malformed::Drop) => return,
        Err(Malformed::Reply { id, rcode }) => {
            assert_eq!(packet.get(..2), Some(&id.to_be_bytes()[..]));
            assert_reply(&bare_reply(id, rcode), id, Some(rcode));
            return;
        }
    };
    let id = query.message.metadata.id;
    assert_eq!(packet.get(..2), Some(&id.to_be_bytes()[..]));
    for rcode in [ResponseCode::Refused, ResponseCode::ServFail] {
        assert_reply(&error_reply(&query.message, rcode), id, Some(rcode));
    }
    if let Ok(upstream) = upstream_query(&query, UPSTREAM_ID) {
        assert_eq!(upstream.get(..2), Some(&UPSTREAM_ID.to_be_bytes()[..]));
    }
    let answer = answer_bytes(&query, material);
    let Ok(answer) = read_answer(&answer, &query, UPSTREAM_ID) else {
        return;
    };
    // The forwarder lowers TTLs to its max_ttl (at least 1 s, see config.rs).
    let max_ttl = material.last().map_or(1, |&b| u32::from(b).max(1));
    if let Ok(bytes) = reply(answer.message, id, max_ttl) {
        assert_reply(&bytes, id, None);
        let m = Message::from_vec(&bytes).expect("checked above");
        for r in m.answers.iter().chain(&m.authorities).chain(&m.additionals) {
            assert!(r.ttl <= max_ttl, "a TTL above max_ttl {max_ttl}: {r:?}");
        }
    }
});
