//! DNS messages as the forwarder sees them: queries from agents, answers from upstream, and the
//! replies it builds. Parsing and building are hickory-proto's; this only decides.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
};

use crate::rules::names::{canonical, same_name};

/// The DNS header: shorter than this, a packet cannot even be answered with an error.
const HEADER_LEN: usize = 12;

/// An agent's query, checked.
#[derive(Debug, Clone)]
pub struct Query {
    pub message: Message,
    /// The name asked, as its labels: what rules and answers are judged on.
    pub qname: Name,
    /// The name asked, canonical text (lowercase, no trailing dot): for logs, audit lines and
    /// `agentwatch learn`, never for a decision.
    pub name: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
}

/// Why a packet is not a query the forwarder answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Not even a header: nothing to answer.
    Drop,
    /// Answer with this rcode under the packet's id.
    Reply { id: u16, rcode: ResponseCode },
}

/// Reads a packet from an agent. A query must be a standard query with exactly one question
/// (what every stub resolver sends; more than one has no defined meaning).
pub fn parse_query(bytes: &[u8]) -> Result<Query, Malformed> {
    if bytes.len() < HEADER_LEN {
        return Err(Malformed::Drop);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let formerr = Malformed::Reply {
        id,
        rcode: ResponseCode::FormErr,
    };
    let message = Message::from_vec(bytes).map_err(|_| formerr.clone())?;
    if message.metadata.message_type != MessageType::Query {
        // A response sent to a resolver: nothing to answer, and answering could loop.
        return Err(Malformed::Drop);
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(Malformed::Reply {
            id,
            rcode: ResponseCode::NotImp,
        });
    }
    let [question] = message.queries.as_slice() else {
        return Err(formerr);
    };
    Ok(Query {
        qname: question.name.clone(),
        name: canonical(&question.name),
        qtype: question.query_type,
        qclass: question.query_class,
        message,
    })
}

/// A reply to `query` with `rcode` and no records (REFUSED, SERVFAIL).
pub fn error_reply(query: &Message, rcode: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(query.metadata.id, query.metadata.op_code, rcode);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries.clone_from(&query.queries);
    // Building a reply from a message hickory just parsed does not fail; if it ever did, an
    // empty reply is dropped by the agent like a lost packet (fail closed).
    reply.to_vec().unwrap_or_default()
}

/// A reply with only a header (for a packet that did not parse).
pub fn bare_reply(id: u16, rcode: ResponseCode) -> Vec<u8> {
    Message::error_msg(id, OpCode::Query, rcode)
        .to_vec()
        .unwrap_or_default()
}

/// The query to send upstream: the agent's, under an id of the forwarder's own.
pub fn upstream_query(query: &Query, id: u16) -> Result<Vec<u8>, String> {
    let mut message = query.message.clone();
    message.metadata.id = id;
    message.to_vec().map_err(|e| e.to_string())
}

/// Upstream's answer, checked against the question.
#[derive(Debug, Clone)]
pub struct Answer {
    pub message: Message,
    /// The A and AAAA records that answer the name asked, through its CNAME chain, with
    /// their TTLs in seconds.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// Reads upstream's reply to `query` (sent under `id`). Besides the id, the answer must carry
/// the question asked (name by its labels, type and class): a forged answer has to guess the
/// id and echo the question, as RFC 5452 has resolvers check.
pub fn read_answer(bytes: &[u8], query: &Query, id: u16) -> Result<Answer, String> {
    let message = Message::from_vec(bytes).map_err(|e| format!("unreadable answer: {e}"))?;
    if message.metadata.id != id || message.metadata.message_type != MessageType::Response {
        return Err("not the answer to this query".to_owned());
    }
    let same_question = match message.queries.as_slice() {
        [q] => {
            same_name(&q.name, &query.qname)
                && q.query_type == query.qtype
                && q.query_class == query.qclass
        }
        _ => false,
    };
    if !same_question {
        return Err("the answer is for another question".to_owned());
    }
    let addrs = chain_addresses(&message, &query.qname);
    Ok(Answer { message, addrs })
}

/// The addresses at the end of `name`'s CNAME chain in the answer section. Only records of
/// names in the chain count: an answer cannot slip in an address for a name nobody asked.
/// Names are compared on their labels, like rules.
fn chain_addresses(message: &Message, name: &Name) -> Vec<(IpAddr, u32)> {
    let in_chain = |chain: &[&Name], n: &Name| chain.iter().any(|c| same_name(c, n));
    let mut chain = vec![name];
    // Each pass adds at least one name or stops; the chain is no longer than the answer.
    loop {
        let before = chain.len();
        for r in &message.answers {
            if let RData::CNAME(target) = &r.data
                && in_chain(&chain, &r.name)
                && !in_chain(&chain, &target.0)
            {
                chain.push(&target.0);
            }
        }
        if chain.len() == before {
            break;
        }
    }
    message
        .answers
        .iter()
        .filter(|r| in_chain(&chain, &r.name))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect()
}

/// The reply the agent gets: upstream's answer under the agent's id, with every TTL lowered to
/// at most `max_ttl` seconds, so that the agent's cache does not outlive the kernel's entry.
pub fn reply(mut answer: Message, id: u16, max_ttl: u32) -> Result<Vec<u8>, String> {
    answer.metadata.id = id;
    for r in answer
        .answers
        .iter_mut()
        .chain(answer.authorities.iter_mut())
        .chain(answer.additionals.iter_mut())
    {
        r.ttl = r.ttl.min(max_ttl);
    }
    answer.to_vec().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::Query as Question,
        rr::{
            Name, Record,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    #[test]
    fn queries_are_read_with_their_canonical_name() {
        let q = parse_query(&query("API.Example.com.", RecordType::AAAA)).unwrap();
        assert_eq!(q.name, "api.example.com");
        assert_eq!(q.qtype, RecordType::AAAA);
        assert_eq!(q.qname, Name::from_ascii("API.Example.com.").unwrap());
    }

    #[test]
    fn an_answer_to_another_question_is_refused() {
        let q = parse_query(&query("api.example.com", RecordType::A)).unwrap();
        let answer = |question: Question| {
            let owner = question.name.clone();
            let mut m = Message::response(42, OpCode::Query);
            m.add_query(question);
            m.add_answer(Record::from_rdata(
                owner,
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 66))),
            ));
            m.to_vec().unwrap()
        };
        let name = |s: &str| Name::from_ascii(s).unwrap();
        // The question asked, in another case and without the root: the same question.
        let same = answer(Question::query(name("API.EXAMPLE.COM"), RecordType::A));
        assert_eq!(
            read_answer(&same, &q, 42).unwrap().addrs,
            [(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)), 60)]
        );
        let mut other_class = Question::query(name("api.example.com."), RecordType::A);
        other_class.query_class = DNSClass::CH;
        // The same text with a dot inside a label (`api\.example.com`) is another name.
        let mut dotted = Name::from_labels([&b"api.example"[..], b"com"]).unwrap();
        dotted.set_fqdn(true);
        for question in [
            Question::query(name("other.example.com."), RecordType::A),
            Question::query(name("api.example.com."), RecordType::AAAA),
            other_class,
            Question::query(dotted, RecordType::A),
        ] {
            let bytes = answer(question.clone());
            assert_eq!(
                read_answer(&bytes, &q, 42).err().as_deref(),
                Some("the answer is for another question"),
                "{question:?}"
            );
        }
        // No question at all, or two.
        let mut none = Message::response(42, OpCode::Query);
        none.add_answer(Record::from_rdata(
            name("api.example.com."),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 66))),
        ));
        assert!(read_answer(&none.to_vec().unwrap(), &q, 42).is_err());
        let mut two = none.clone();
        two.add_query(Question::query(name("api.example.com."), RecordType::A));
        two.add_query(Question::query(name("api.example.com."), RecordType::A));
        assert!(read_answer(&two.to_vec().unwrap(), &q, 42).is_err());
    }

    #[test]
    fn junk_gets_formerr_or_nothing() {
        assert_eq!(parse_query(&[1, 2, 3]).err(), Some(Malformed::Drop));
        let mut junk = vec![0xab, 0xcd];
        junk.extend(std::iter::repeat_n(0xff, 3000));
        assert_eq!(
            parse_query(&junk).err(),
            Some(Malformed::Reply {
                id: 0xabcd,
                rcode: ResponseCode::FormErr
            })
        );
        let mut two = Message::query();
        two.metadata.id = 9;
        let n = Name::from_ascii("a.example.com").unwrap();
        two.add_query(Question::query(n.clone(), RecordType::A));
        two.add_query(Question::query(n, RecordType::AAAA));
        assert_eq!(
            parse_query(&two.to_vec().unwrap()).err(),
            Some(Malformed::Reply {
                id: 9,
                rcode: ResponseCode::FormErr
            })
        );
    }

    #[test]
    fn only_the_asked_names_chain_counts_and_ttls_are_lowered() {
        let q = parse_query(&query("api.example.com", RecordType::A)).unwrap();
        let mut m = Message::response(99, OpCode::Query);
        m.queries.clone_from(&q.message.queries);
        let name = |s: &str| Name::from_ascii(s).unwrap();
        m.add_answer(Record::from_rdata(
            name("API.example.com."),
            300,
            RData::CNAME(CNAME(name("edge.cdn.net."))),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.cdn.net."),
            20,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.cdn.net."),
            7200,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        ));
        // Not on the chain: must not be admitted.
        m.add_answer(Record::from_rdata(
            name("other.example.org."),
            20,
            RData::A(A(Ipv4Addr::new(198, 51, 100, 1))),
        ));
        // Nor a name whose text reads like the chain's but whose labels differ.
        let mut dotted = Name::from_labels([&b"edge.cdn"[..], b"net"]).unwrap();
        dotted.set_fqdn(true);
        m.add_answer(Record::from_rdata(
            dotted,
            20,
            RData::A(A(Ipv4Addr::new(198, 51, 100, 2))),
        ));
        let bytes = m.to_vec().unwrap();
        let a = read_answer(&bytes, &q, 99).unwrap();
        assert_eq!(
            a.addrs,
            vec![
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 20),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 7200)
            ]
        );
        assert!(read_answer(&bytes, &q, 98).is_err());
        let out = Message::from_vec(&reply(a.message, 7, 3600).unwrap()).unwrap();
        assert_eq!(out.metadata.id, 7);
        assert!(out.answers.iter().all(|r| r.ttl <= 3600));
        assert_eq!(out.answers[1].ttl, 20);
    }
}
