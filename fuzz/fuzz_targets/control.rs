//! The control socket's request parser on arbitrary bytes (a request line as a peer sends it):
//! never a panic, and a request that parses serializes and parses back equal (the CLI and the
//! daemon speak through exactly this pair).

#![no_main]

use agentwatch::control::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(data) {
        let bytes = serde_json::to_vec(&request).expect("a parsed request serializes");
        let back: Request = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{request:?} -> {bytes:?} does not parse back: {e}"));
        assert_eq!(back, request);
    }
    // The CLI's side: the daemon's answer, from a daemon that may be older or newer.
    if let Ok(response) = serde_json::from_slice::<Response>(data) {
        let bytes = serde_json::to_vec(&response).expect("a parsed response serializes");
        let back: Response = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{response:?} -> {bytes:?} does not parse back: {e}"));
        // Not `back == response`: serde_json's float parsing may move a number in `data` by
        // one ULP, which is serde_json's documented trade-off, not this protocol's.
        assert_eq!((back.ok, &back.error), (response.ok, &response.error));
        let _ = response.into_result();
    }
});
