//! The token an agent presents, taken out of its request, and the real credential put in.
//!
//! An agent's SDK sends its "key" the way it always does: `Authorization: Bearer KEY`, Basic
//! with the key as password (or as user, as some APIs take it), `x-api-key`, `api-key`,
//! `x-goog-api-key`, or the header the scope's `auth = "header:NAME"` names. Every one of those
//! headers is read for the token, every copy of it (a request may carry a header twice), and
//! then every one is removed, whatever its case: nothing the agent sent as a credential goes
//! upstream, the phantom token least of all. Then the secret goes in as `auth` says. A request
//! that carries two different tokens is refused, not resolved by picking one.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hyper::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHORIZATION};

use super::{secrets::Secret, tokens::PREFIX};

/// How the secret is sent upstream (`auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer SECRET`.
    Bearer,
    /// `Authorization: Basic base64(USER:SECRET)`.
    Basic { user: String },
    /// `NAME: SECRET`.
    Header(HeaderName),
    /// The request re-signed with the AWS key pair the secret holds ([`super::aws`]).
    AwsSigV4(super::aws::Target),
}

impl Auth {
    /// Parses `bearer`, `basic:USER` or `header:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "bearer" {
            return Ok(Self::Bearer);
        }
        if let Some(user) = text.strip_prefix("basic:") {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                return Err(format!(
                    "auth `{text}`: the user of basic:USER must be non-empty, without `:`"
                ));
            }
            return Ok(Self::Basic {
                user: user.to_owned(),
            });
        }
        if let Some(rest) = text.strip_prefix("aws-sigv4:") {
            return super::aws::Target::parse(rest).map(Self::AwsSigV4);
        }
        if let Some(name) = text.strip_prefix("header:") {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("auth `{text}`: `{name}` is not a header name"))?;
            if is_hop_by_hop(&header) || header == hyper::header::HOST {
                return Err(format!(
                    "auth `{text}`: `{name}` is a header the gateway itself sets or removes"
                ));
            }
            return Ok(Self::Header(header));
        }
        Err(format!(
            "auth `{text}`: one of `bearer`, `basic:USER`, `header:NAME`, \
             `aws-sigv4:REGION:SERVICE`"
        ))
    }

    /// The scope's own credential header, which also carries the token.
    fn header(&self) -> Option<&HeaderName> {
        match self {
            Self::Header(h) => Some(h),
            _ => None,
        }
    }
}

/// Headers that carry API credentials in the SDKs agents use.
const CREDENTIAL_HEADERS: [&str; 3] = ["x-api-key", "api-key", "x-goog-api-key"];

/// What the agent's request presented as its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    None,
    One(String),
    /// Two different values: refused.
    Conflicting,
}

/// Finds the token in `headers` (see the module) and removes every credential header.
pub fn take_token(headers: &mut HeaderMap, auth: &Auth) -> Presented {
    let mut found: Option<String> = None;
    let mut conflict = false;
    let mut note = |v: Option<String>| {
        if let Some(v) = v {
            match &found {
                Some(f) if *f != v => conflict = true,
                Some(_) => {}
                None => found = Some(v),
            }
        }
    };
    let mut names: Vec<HeaderName> = vec![AUTHORIZATION, PROXY_AUTHORIZATION];
    names.extend(
        CREDENTIAL_HEADERS
            .iter()
            .map(|n| HeaderName::from_static(n)),
    );
    if let Some(h) = auth.header() {
        names.push(h.clone());
    }
    if matches!(auth, Auth::AwsSigV4(_)) {
        // The agent's own signature's headers: the gateway's signature replaces them.
        for h in super::aws::SIGNATURE_HEADERS {
            headers.remove(h);
        }
    }
    for name in &names {
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else {
                // Not text: not a token of ours, still removed below.
                continue;
            };
            let text = text.trim();
            if *name == AUTHORIZATION || *name == PROXY_AUTHORIZATION {
                note(from_authorization(text));
            } else if !text.is_empty() {
                note(Some(text.to_owned()));
            }
        }
        headers.remove(name);
    }
    match (found, conflict) {
        (_, true) => Presented::Conflicting,
        (Some(t), false) => Presented::One(t),
        (None, false) => Presented::None,
    }
}

/// The token in an `Authorization` value: Bearer's credential, or Basic's password (its user
/// when the password is empty or the user is the token).
fn from_authorization(value: &str) -> Option<String> {
    if let Some(id) = super::aws::token_of(value) {
        return Some(id);
    }
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(rest).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        return Some(if user.starts_with(PREFIX) || pass.is_empty() {
            user.to_owned()
        } else {
            pass.to_owned()
        });
    }
    None
}

/// Puts `secret` into `headers` as `auth` says (an AWS signature is made later, over the
/// whole request).
pub fn inject(headers: &mut HeaderMap, auth: &Auth, secret: &Secret) -> Result<(), String> {
    let value = |bytes: Vec<u8>| {
        let mut v = HeaderValue::from_bytes(&bytes)
            .map_err(|_| "the secret cannot be sent in a header".to_owned())?;
        // Kept out of HTTP/2 header compression tables, where a later request could probe it.
        v.set_sensitive(true);
        // The copy the header value was built from is zeroed here.
        drop(zeroize::Zeroizing::new(bytes));
        Ok::<_, String>(v)
    };
    match auth {
        Auth::Bearer => {
            let mut b = b"Bearer ".to_vec();
            b.extend_from_slice(secret.expose());
            headers.insert(AUTHORIZATION, value(b)?);
        }
        Auth::Basic { user } => {
            let mut plain = zeroize::Zeroizing::new(format!("{user}:").into_bytes());
            plain.extend_from_slice(secret.expose());
            let mut b = b"Basic ".to_vec();
            b.extend_from_slice(zeroize::Zeroizing::new(STANDARD.encode(&*plain)).as_bytes());
            headers.insert(AUTHORIZATION, value(b)?);
        }
        Auth::Header(name) => {
            headers.insert(name.clone(), value(secret.expose().to_vec())?);
        }
        // Signed once the whole request is known (`aws::sign_request`).
        Auth::AwsSigV4(_) => {}
    }
    Ok(())
}

/// Hop-by-hop headers (RFC 9110 7.6.1): for one connection, never forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Removes hop-by-hop headers, and those `Connection` names, from a request or response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in hop {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "awp_TOKEN";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn the_token_is_found_however_the_sdk_sends_it_and_every_credential_removed() {
        let basic_pass = format!("Basic {}", STANDARD.encode(format!("api:{T}")));
        let basic_user = format!("Basic {}", STANDARD.encode(format!("{T}:")));
        let bearer = format!("Bearer {T}");
        let lower_bearer = format!("bearer {T}");
        for pairs in [
            vec![("Authorization", bearer.as_str())],
            vec![("authorization", lower_bearer.as_str())],
            vec![("Authorization", basic_pass.as_str())],
            vec![("Authorization", basic_user.as_str())],
            vec![("X-Api-Key", T)],
            vec![("api-key", T)],
            vec![("x-goog-api-key", T)],
            // The same token twice (an SDK sending both forms) is one token.
            vec![("x-api-key", T), ("Authorization", bearer.as_str())],
            vec![("x-api-key", T), ("X-API-KEY", T)],
        ] {
            let mut h = headers(&pairs);
            h.append("accept", HeaderValue::from_static("*/*"));
            assert_eq!(
                take_token(&mut h, &Auth::Bearer),
                Presented::One(T.into()),
                "{pairs:?}"
            );
            assert_eq!(h.len(), 1, "{pairs:?}: {h:?}");
            assert!(h.contains_key("accept"));
        }
    }

    #[test]
    fn two_different_credentials_are_refused_and_still_removed() {
        let bearer = format!("Bearer {T}");
        let mut h = headers(&[("Authorization", &bearer), ("x-api-key", "sk-other")]);
        assert_eq!(take_token(&mut h, &Auth::Bearer), Presented::Conflicting);
        assert!(h.is_empty());
        let mut h = headers(&[("x-api-key", T), ("x-api-key", "awp_other")]);
        assert_eq!(take_token(&mut h, &Auth::Bearer), Presented::Conflicting);
        assert!(h.is_empty());
    }

    #[test]
    fn the_scopes_own_header_carries_the_token_too() {
        let auth = Auth::parse("header:X-Mail-Key").expect("auth");
        let mut h = headers(&[("x-mail-key", T)]);
        assert_eq!(take_token(&mut h, &auth), Presented::One(T.into()));
        assert!(h.is_empty());
        let mut h = headers(&[("x-mail-key", T)]);
        // Not this scope's header: left alone (not a credential the gateway knows).
        assert_eq!(take_token(&mut h, &Auth::Bearer), Presented::None);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_secret_goes_in_as_auth_says() {
        let s = Secret::new(b"sk-real".to_vec());
        let mut h = HeaderMap::new();
        inject(&mut h, &Auth::Bearer, &s).expect("inject");
        assert_eq!(h["authorization"], "Bearer sk-real");
        assert!(h["authorization"].is_sensitive());
        let mut h = HeaderMap::new();
        inject(&mut h, &Auth::Basic { user: "api".into() }, &s).expect("inject");
        assert_eq!(
            h["authorization"],
            format!("Basic {}", STANDARD.encode("api:sk-real")).as_str()
        );
        let mut h = HeaderMap::new();
        inject(&mut h, &Auth::parse("header:x-api-key").expect("auth"), &s).expect("inject");
        assert_eq!(h["x-api-key"], "sk-real");
    }

    #[test]
    fn bad_auth_settings_say_why() {
        for (text, says) in [
            ("token", "one of"),
            ("basic:", "non-empty"),
            ("basic:a:b", "without `:`"),
            ("header:bad name", "not a header name"),
            ("header:connection", "sets or removes"),
            ("header:host", "sets or removes"),
        ] {
            let e = Auth::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
    }
}
