//! Ring buffer records on arbitrary bytes: `events::decode` and each concern's decoder under
//! every kind. Never a panic; a decoder answers only for its own kinds, and only when the bytes
//! hold its whole record type (a short record is refused, not read past its end).

#![no_main]

use agentwatch::events::{Event, decode};
use agentwatch_common::{
    EVENT_CGROUP_ESCAPE, EVENT_EGRESS_CAPPED, EVENT_EGRESS_DENIED, EVENT_EGRESS_WOULD_DENY,
    EVENT_EXEC, EVENT_EXEC_DENIED, EVENT_EXEC_REFUSED, EVENT_FILE_DENIED, EVENT_FILE_OPENED,
    EVENT_SOCKET_DENIED, EVENT_SOCKET_KILLED, EVENT_TAMPER_REFUSED, EgressEvent, EscapeEvent,
    ExecEvent, FileEvent, SocketEvent, TamperEvent,
};
use libfuzzer_sys::fuzz_target;

/// The record type a kind must hold, if it is a known kind.
fn record_len(kind: u32) -> Option<usize> {
    match kind {
        EVENT_EGRESS_DENIED | EVENT_EGRESS_CAPPED | EVENT_EGRESS_WOULD_DENY => {
            Some(size_of::<EgressEvent>())
        }
        EVENT_EXEC | EVENT_EXEC_DENIED | EVENT_EXEC_REFUSED => Some(size_of::<ExecEvent>()),
        EVENT_FILE_DENIED | EVENT_FILE_OPENED => Some(size_of::<FileEvent>()),
        EVENT_SOCKET_DENIED | EVENT_SOCKET_KILLED => Some(size_of::<SocketEvent>()),
        EVENT_CGROUP_ESCAPE => Some(size_of::<EscapeEvent>()),
        EVENT_TAMPER_REFUSED => Some(size_of::<TamperEvent>()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let kind = data
        .get(..4)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let event = decode(data);
    match (record_len(kind), &event) {
        (Some(len), Event::Unknown { .. }) => {
            assert!(
                data.len() < len,
                "a whole record of kind {kind} went undecoded"
            )
        }
        (Some(len), _) => assert!(
            data.len() >= len,
            "kind {kind} decoded from {} bytes",
            data.len()
        ),
        (None, e) => assert_eq!(
            e,
            &Event::Unknown {
                kind,
                len: data.len()
            }
        ),
    }
    // Audit lines are built from every decoded record; they must not panic either.
    match &event {
        Event::Egress(e) => drop(e.audit_line()),
        Event::Exec(e) => drop(e.audit_line()),
        Event::Socket(e) => drop(e.audit_line()),
        Event::Escape(e) => drop(e.audit_line(Some(String::new()), true, Some(String::new()))),
        // The daemon judges an opened file by the path as passed (no /proc lookup here: the
        // pid is arbitrary): the rules and the line must take any bytes.
        Event::File(e) => {
            let _ = agentwatch::files::admitted(&[], &e.path, e.write);
            for from in [
                agentwatch::files::PathFrom::Passed,
                agentwatch::files::PathFrom::Fd,
                agentwatch::files::PathFrom::Unknown,
            ] {
                drop(e.audit_line(&e.path, from));
            }
        }
        // No file names known: the line must still be whole (the path is null).
        Event::Tamper(e) => drop(e.audit_line(&std::collections::BTreeMap::new())),
        Event::Unknown { .. } => {}
    }
    // Each decoder under each kind (the reader passes the kind it read, which a buggy caller
    // could get wrong): only its own kinds, only whole records.
    for kind in 0..=13 {
        let fits = |len: usize| data.len() >= len;
        let is = |kinds: &[u32]| kinds.contains(&kind);
        let egress = agentwatch::egress::events::decode(kind, data);
        assert_eq!(
            egress.is_some(),
            is(&[
                EVENT_EGRESS_DENIED,
                EVENT_EGRESS_CAPPED,
                EVENT_EGRESS_WOULD_DENY
            ]) && fits(size_of::<EgressEvent>())
        );
        let exec = agentwatch::exec::decode(kind, data);
        assert_eq!(
            exec.is_some(),
            is(&[EVENT_EXEC, EVENT_EXEC_DENIED, EVENT_EXEC_REFUSED])
                && fits(size_of::<ExecEvent>())
        );
        let file = agentwatch::files::decode(kind, data);
        assert_eq!(
            file.is_some(),
            is(&[EVENT_FILE_DENIED, EVENT_FILE_OPENED]) && fits(size_of::<FileEvent>())
        );
        let socket = agentwatch::sockets::decode_socket(kind, data);
        assert_eq!(
            socket.is_some(),
            is(&[EVENT_SOCKET_DENIED, EVENT_SOCKET_KILLED]) && fits(size_of::<SocketEvent>())
        );
        let escape = agentwatch::sockets::decode_escape(kind, data);
        assert_eq!(
            escape.is_some(),
            is(&[EVENT_CGROUP_ESCAPE]) && fits(size_of::<EscapeEvent>())
        );
        let tamper = agentwatch::tamper::decode(kind, data);
        assert_eq!(
            tamper.is_some(),
            is(&[EVENT_TAMPER_REFUSED]) && fits(size_of::<TamperEvent>())
        );
    }
});
