//! The API gateway's judging of a call on arbitrary input: the method and request target made
//! canonical, the scope's patterns, and the credential headers taken out. Never a panic, and:
//! a canonical path is a fixed point (judging it again gives itself), holds no empty, `.` or
//! `..` segment and no escaped `/`, `\` or control character (what an upstream could read
//! differently from the judge); the literal pattern of a canonical path admits it; and after
//! the token is taken, no credential header is left to go upstream. The template `learn`
//! proposes from a call is a pattern that admits that call. For an aws-sigv4 scope, none of
//! the agent's signature headers is left either.

#![no_main]

use agentwatch::gateway::{
    auth::{Auth, take_token},
    judge::{Pattern, Target},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, Vec<(String, Vec<u8>)>, u8)| {
    let (method, raw, headers, kind) = input;
    if let Ok(t) = Target::parse(method, raw) {
        assert!(t.path.starts_with('/'), "{t:?}");
        for seg in t.path.split('/').skip(1) {
            assert!(seg != "." && seg != "..", "{raw:?} -> {t:?}");
            let lower = seg.to_ascii_lowercase();
            for bad in ["%2f", "%5c", "%00", "\\"] {
                assert!(!lower.contains(bad), "{raw:?} -> {t:?}");
            }
        }
        let inner = t.path.trim_end_matches('/');
        assert!(!inner.contains("//"), "{raw:?} -> {t:?}");
        let again = Target::parse(&t.method, &t.path_and_query())
            .unwrap_or_else(|e| panic!("{raw:?} -> {t:?} does not parse again: {e}"));
        assert_eq!(again.path, t.path);
        assert_eq!(again.method, t.method);
        if let Ok(p) = Pattern::parse(&format!("{} {}", t.method, t.path)) {
            assert!(p.matches(&t), "{p} does not admit {t:?}");
        }
        // What `learn` proposes from this call is a pattern that admits it.
        let learned = format!("{} {}", t.method, t.template());
        let p = Pattern::parse(&learned)
            .unwrap_or_else(|e| panic!("{raw:?}: learned `{learned}` is no pattern: {e}"));
        assert!(p.matches(&t), "learned {p} does not admit {t:?}");
    }
    let mut map = hyper::HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_bytes(&value),
        ) {
            map.append(n, v);
        }
    }
    let auth = match kind % 3 {
        0 => Auth::Bearer,
        1 => Auth::Basic { user: "api".into() },
        _ => Auth::AwsSigV4(agentwatch::gateway::aws::Target {
            region: "us-east-1".into(),
            service: "s3".into(),
        }),
    };
    // The AWS readers take any text.
    for value in map.values() {
        if let Ok(v) = value.to_str() {
            let _ = agentwatch::gateway::aws::token_of(v);
        }
    }
    let _ = agentwatch::gateway::aws::presigned(Some(raw));
    let _ = take_token(&mut map, &auth);
    if matches!(auth, Auth::AwsSigV4(_)) {
        // Nothing of the agent's own signature is left to go upstream.
        for name in agentwatch::gateway::aws::SIGNATURE_HEADERS {
            assert!(!map.contains_key(name), "{name} left in {map:?}");
        }
    }
    for name in [
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
    ] {
        assert!(!map.contains_key(name), "{name} left in {map:?}");
    }
});
