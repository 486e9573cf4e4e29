//! What a call asks for, made canonical, and whether a scope's patterns admit it.
//!
//! The path is judged in one canonical form and forwarded in that same form, so the upstream
//! never acts on something other than what was judged:
//!
//! - only origin-form targets (`/path?query`): an absolute URL (`http://other-host/...`) would
//!   ask the gateway to go somewhere else;
//! - percent-escapes decoded, then every segment re-encoded one way (unreserved characters as
//!   they are, everything else as `%XX`, upper-case hex), so `/v3/%64omains` and `/v3/domains`
//!   are one path;
//! - an escaped `/`, `\` or NUL, or a malformed escape, is refused rather than guessed at: servers
//!   differ in whether `%2F` splits a segment, and a judge that guesses differently from the
//!   upstream is a way around it;
//! - empty segments (`//`) and `.` dropped, `..` applied; one that would climb above the root is
//!   refused;
//! - the method upper-cased (`get` is `GET`).
//!
//! The query is forwarded as sent but never decides a scope and never goes in the trail (it
//! may carry a key or personal data).
//!
//! Patterns (`allow`, `approve`): `METHOD PATH`, METHOD a method or `*`; in PATH, `*` is one
//! segment and `**`, last only, is the rest (none or more segments). A pattern's literal
//! segments are made canonical the same way, so it means what it says however it was escaped.

use std::fmt;

/// A request the gateway refuses before any scope looks at it (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the request target must be a path starting with `/`")]
    NotOriginForm,
    #[error("a malformed percent-escape in the path")]
    BadEscape,
    #[error("a `\\`, an escaped `/`, or a control character in the path")]
    EscapedSeparator,
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("`{0}` is not an HTTP method")]
    BadMethod(String),
}

/// A call's method and canonical path, as judged and as forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub method: String,
    /// Canonical, percent-encoded, starting with `/`; a trailing `/` kept as sent.
    pub path: String,
    /// The query as sent (without `?`), forwarded but never judged.
    pub query: Option<String>,
    /// Decoded segments, for matching.
    segments: Vec<Vec<u8>>,
}

impl Target {
    /// `method` and the request target `raw` (`/path?query`) made canonical.
    pub fn parse(method: &str, raw: &str) -> Result<Self, Malformed> {
        let method = canonical_method(method)?;
        let (raw_path, query) = match raw.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (raw, None),
        };
        // A fragment is never sent by a client; one that arrives is not a path character.
        if !raw_path.starts_with('/') || raw_path.contains('#') {
            return Err(Malformed::NotOriginForm);
        }
        let segments = canonical_segments(raw_path)?;
        let mut path = String::with_capacity(raw_path.len());
        for s in &segments {
            path.push('/');
            encode_segment(s, &mut path);
        }
        if path.is_empty() || (raw_path.ends_with('/') && !segments.is_empty()) {
            path.push('/');
        }
        Ok(Self {
            method,
            path,
            query,
            segments,
        })
    }

    /// The path as `learn` proposes it in an `allow` pattern: a segment that names a thing
    /// rather than a place (anything but letters, `-` and `_`, or a version such as `v3` or
    /// `v1beta`) becomes `*`; a trailing `/` is kept.
    pub fn template(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            if is_place(s) {
                // Letters, `-` and `_` only: the same text encoded or not.
                out.push_str(&String::from_utf8_lossy(s));
            } else {
                out.push('*');
            }
        }
        if out.is_empty() || self.path.ends_with('/') && !self.segments.is_empty() {
            out.push('/');
        }
        out
    }

    /// The path and query as forwarded upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// A path segment that names a place in an API (`messages`, `chat-completions`, `v3`), not
/// an identifier (`example.com`, `42`, a UUID): what stays literal in a learned template.
fn is_place(seg: &[u8]) -> bool {
    if seg.is_empty() || seg.len() > 40 {
        return false;
    }
    let word = seg
        .iter()
        .all(|b| b.is_ascii_alphabetic() || *b == b'-' || *b == b'_');
    // `v` + digits, then letters: `v1`, `v3`, `v1beta`.
    let version = seg.len() >= 2 && seg[0] == b'v' && seg[1].is_ascii_digit() && {
        let digits = seg[1..].iter().take_while(|b| b.is_ascii_digit()).count();
        seg[1 + digits..].iter().all(u8::is_ascii_lowercase)
    };
    word || version
}

/// `method` upper-cased, if it is an HTTP token (RFC 9110 `tchar`).
fn canonical_method(method: &str) -> Result<String, Malformed> {
    let ok = !method.is_empty()
        && method.len() <= 32
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(method.to_ascii_uppercase())
    } else {
        Err(Malformed::BadMethod(method.chars().take(32).collect()))
    }
}

/// The decoded segments of `path` (starting with `/`), `.`/`..`/empty ones applied.
fn canonical_segments(path: &str) -> Result<Vec<Vec<u8>>, Malformed> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for raw in path.split('/').skip(1) {
        let seg = decode(raw)?;
        match seg.as_slice() {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(Malformed::AboveRoot);
                }
            }
            _ => out.push(seg),
        }
    }
    Ok(out)
}

fn decode(raw: &str) -> Result<Vec<u8>, Malformed> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(Malformed::BadEscape)?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(Malformed::BadEscape)?;
            if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                return Err(Malformed::EscapedSeparator);
            }
            out.push(v);
            i += 3;
        } else {
            // hyper refuses most raw control characters in a request target, but not all (DEL):
            // refused here as they are escaped, so a judged path always judges the same again.
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(Malformed::EscapedSeparator);
            }
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// Appends `seg` percent-encoded: RFC 3986 unreserved characters as they are, all else `%XX`.
fn encode_segment(seg: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    for &b in seg {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// One segment of a pattern's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    /// `*`: exactly one segment.
    One,
    /// `**` (last only): the rest, none or more segments.
    Rest,
}

/// A `METHOD PATH` pattern of `allow` or `approve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// None: `*`, any method.
    method: Option<String>,
    parts: Vec<Part>,
    text: String,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses `METHOD PATH`; the error says what is wrong, for the config check.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut words = text.split_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "`{text}`: a pattern is `METHOD PATH`, e.g. `POST /v3/*/messages`"
            ));
        };
        let method = if method == "*" {
            None
        } else {
            Some(canonical_method(method).map_err(|e| format!("`{text}`: {e}"))?)
        };
        if !path.starts_with('/') || path.contains('?') || path.contains('#') {
            return Err(format!(
                "`{text}`: the path must start with `/` and hold no query or fragment (the query \
                 never decides a scope)"
            ));
        }
        let raw: Vec<&str> = path.split('/').skip(1).filter(|s| !s.is_empty()).collect();
        let mut parts = Vec::with_capacity(raw.len());
        for (i, seg) in raw.iter().enumerate() {
            match *seg {
                "**" if i + 1 == raw.len() => parts.push(Part::Rest),
                "**" => return Err(format!("`{text}`: `**` (the rest) may only come last")),
                "*" => parts.push(Part::One),
                "." | ".." => {
                    return Err(format!(
                        "`{text}`: `.` and `..` are not path segments a call can have (the \
                         gateway resolves them before judging)"
                    ));
                }
                s if s.contains('*') => {
                    return Err(format!(
                        "`{text}`: `*` stands for a whole segment (`/v3/*/messages`), not part \
                         of one"
                    ));
                }
                s => {
                    let seg = decode(s).map_err(|e| format!("`{text}`: {e}"))?;
                    parts.push(Part::Literal(seg));
                }
            }
        }
        Ok(Self {
            method,
            parts,
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }

    /// Does this pattern admit `target`?
    pub fn matches(&self, target: &Target) -> bool {
        if self.method.as_ref().is_some_and(|m| *m != target.method) {
            return false;
        }
        let segs = &target.segments;
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Rest => return true,
                Part::One => {
                    if i >= segs.len() {
                        return false;
                    }
                }
                Part::Literal(l) => {
                    if segs.get(i) != Some(l) {
                        return false;
                    }
                }
            }
        }
        segs.len() == self.parts.len()
    }
}

/// The first of `patterns` that admits `target`.
pub fn first_match<'p>(patterns: &'p [Pattern], target: &Target) -> Option<&'p Pattern> {
    patterns.iter().find(|p| p.matches(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_keep_places_and_star_identifiers() {
        let t = |m: &str, p: &str| Target::parse(m, p).unwrap().template();
        assert_eq!(t("POST", "/v3/example.com/messages"), "/v3/*/messages");
        assert_eq!(t("GET", "/v1/chat/completions?x=1"), "/v1/chat/completions");
        assert_eq!(
            t("GET", "/v1beta/users/42/repos/"),
            "/v1beta/users/*/repos/"
        );
        assert_eq!(
            t("GET", "/items/0b5e8c1a-7f3d-4d2e-9a41-3c7b2f6e8d90"),
            "/items/*"
        );
        assert_eq!(t("GET", "/"), "/");
        assert_eq!(t("GET", "/a%20b/c"), "/*/c");
        // Every template is a pattern that admits the call it came from.
        for (m, p) in [
            ("POST", "/v3/example.com/messages"),
            ("GET", "/v1beta/users/42/repos/"),
        ] {
            let target = Target::parse(m, p).unwrap();
            let pattern = Pattern::parse(&format!("{m} {}", target.template())).unwrap();
            assert!(pattern.matches(&target), "{m} {p}");
        }
    }

    fn t(method: &str, raw: &str) -> Target {
        Target::parse(method, raw).expect("parses")
    }

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).expect("pattern")
    }

    #[test]
    fn paths_are_made_canonical_before_judging_and_forwarded_so() {
        assert_eq!(t("get", "/v3/%64omains").path, "/v3/domains");
        assert_eq!(t("GET", "//v3///domains/./x/../y").path, "/v3/domains/y");
        assert_eq!(t("GET", "/a%20b/c").path, "/a%20b/c");
        assert_eq!(t("GET", "/a b").path, "/a%20b");
        assert_eq!(t("GET", "/").path, "/");
        assert_eq!(t("GET", "/a/").path, "/a/");
        assert_eq!(t("GET", "/a/..").path, "/");
        assert_eq!(t("post", "/x").method, "POST");
        let q = t("GET", "/v1/models?api_key=abc&x=%2F");
        assert_eq!(q.path, "/v1/models");
        assert_eq!(q.path_and_query(), "/v1/models?api_key=abc&x=%2F");
    }

    #[test]
    fn what_the_upstream_could_read_differently_is_refused() {
        for (raw, want) in [
            ("/v3/a%2F..%2Fadmin", Malformed::EscapedSeparator),
            ("/v3/a%2fb", Malformed::EscapedSeparator),
            ("/v3/a%5Cb", Malformed::EscapedSeparator),
            ("/v3/a\\b", Malformed::EscapedSeparator),
            ("/v3/a%00", Malformed::EscapedSeparator),
            // Found by the fuzz target: a raw DEL was taken, then refused once escaped.
            ("/a\u{7f}/", Malformed::EscapedSeparator),
            ("/a\u{1}b", Malformed::EscapedSeparator),
            ("/v3/%zz", Malformed::BadEscape),
            ("/v3/%4", Malformed::BadEscape),
            ("/..", Malformed::AboveRoot),
            ("/a/../../b", Malformed::AboveRoot),
            ("http://evil.example/v3", Malformed::NotOriginForm),
            ("v3/x", Malformed::NotOriginForm),
            ("/a#frag", Malformed::NotOriginForm),
        ] {
            assert_eq!(Target::parse("GET", raw), Err(want), "{raw}");
        }
        assert!(matches!(
            Target::parse("GE T", "/"),
            Err(Malformed::BadMethod(_))
        ));
    }

    #[test]
    fn patterns_match_whole_segments() {
        let send = p("POST /v3/*/messages");
        assert!(send.matches(&t("POST", "/v3/example.com/messages")));
        assert!(send.matches(&t("post", "/v3/example.com/messages/")));
        assert!(!send.matches(&t("GET", "/v3/example.com/messages")));
        assert!(!send.matches(&t("POST", "/v3/messages")));
        assert!(!send.matches(&t("POST", "/v3/a/b/messages")));
        assert!(!send.matches(&t("POST", "/v3/example.com/messages/x")));
        let rest = p("GET /v3/domains/**");
        assert!(rest.matches(&t("GET", "/v3/domains")));
        assert!(rest.matches(&t("GET", "/v3/domains/a/b/c")));
        assert!(!rest.matches(&t("GET", "/v3/domainsx")));
        let any = p("* /health");
        assert!(any.matches(&t("DELETE", "/health")));
        // Escapes in a pattern mean the character: `%64` is `d`.
        assert!(p("GET /v3/%64omains").matches(&t("GET", "/v3/domains")));
        // The query never decides.
        assert!(p("GET /v1/models").matches(&t("GET", "/v1/models?scope=admin")));
        // `..` cannot walk out of a matched prefix: it is applied before judging.
        assert!(!rest.matches(&t("GET", "/v3/domains/../admin")));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (text, says) in [
            ("/v3/x", "METHOD PATH"),
            ("GET v3/x", "must start with `/`"),
            ("GET /v3/**/x", "may only come last"),
            ("GET /v3/a*", "whole segment"),
            ("GET /v3/x?y=1", "no query"),
            ("GET /v3/../x", "`..`"),
            ("G(T /x", "not an HTTP method"),
            ("GET /a b", "METHOD PATH"),
        ] {
            let e = Pattern::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
