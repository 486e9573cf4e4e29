//! `auth = "aws-sigv4:REGION:SERVICE"`: the call re-signed with the real AWS key pair.
//!
//! An AWS SDK signs each request with the key it holds (Signature Version 4): the agent's SDK
//! is given the phantom token as its access key id (and any secret: the gateway never checks
//! the agent's signature, the kernel says who calls). The gateway reads the token from the
//! `Credential=` of the agent's `Authorization`, removes that signature and its headers
//! (`x-amz-date`, `x-amz-security-token`, `x-amz-content-sha256`), and signs the request
//! again, as it will go upstream, with the key pair the daemon holds (the aws-sigv4 crate, the
//! AWS SDK for Rust's own signer).
//!
//! S3 is signed as S3 wants: the path encoded once and not normalised, and the body unsigned
//! (`x-amz-content-sha256: UNSIGNED-PAYLOAD`, allowed over HTTPS), so uploads still stream.
//! Every other service signs the body's SHA-256: the gateway reads the body first (at most
//! [`SIGNED_BODY_MAX`]), and encodes the path twice, normalised.
//!
//! Query-string signatures (presigned URLs) are not re-signed: such a call is refused, since
//! its query would carry the agent's credential upstream.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode, sign,
    },
    sign::v4,
};
use zeroize::Zeroizing;

use super::secrets::Secret;

/// Largest body the gateway reads to sign (services other than S3 sign the body's hash).
pub const SIGNED_BODY_MAX: usize = 10 * 1024 * 1024;

/// Headers of the agent's own signature: removed, the gateway's replace them.
pub const SIGNATURE_HEADERS: [&str; 3] =
    ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// Query parameters of a presigned URL: a call that carries one is refused.
const PRESIGNED: [&str; 3] = [
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-security-token",
];

/// Where and as what service the key pair signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub region: String,
    pub service: String,
}

impl Target {
    /// `REGION:SERVICE` (after `aws-sigv4:`): both `[a-z0-9-]`, non-empty.
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        match text.split_once(':') {
            Some((region, service)) if ok(region) && ok(service) => Ok(Self {
                region: region.to_owned(),
                service: service.to_owned(),
            }),
            _ => Err(format!(
                "auth `aws-sigv4:{text}`: aws-sigv4:REGION:SERVICE, both of a-z, 0-9 and `-` \
                 (e.g. aws-sigv4:us-east-1:s3)"
            )),
        }
    }

    fn s3(&self) -> bool {
        self.service == "s3"
    }
}

/// The key pair a secret holds: one line, `ACCESS_KEY_ID SECRET_ACCESS_KEY [SESSION_TOKEN]`
/// separated by spaces (a line break inside a secret is refused at load, as for every secret).
pub struct KeyPair {
    access_key: String,
    secret_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl KeyPair {
    /// Never says what the secret holds, only how it is wrong.
    pub fn from_secret(secret: &Secret) -> Result<Self, &'static str> {
        const SHAPE: &str = "an aws-sigv4 secret is one line: ACCESS_KEY_ID SECRET_ACCESS_KEY \
                             [SESSION_TOKEN], separated by spaces";
        let text = std::str::from_utf8(secret.expose()).map_err(|_| SHAPE)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match words[..] {
            [id, key] => Ok(Self {
                access_key: id.to_owned(),
                secret_key: Zeroizing::new(key.to_owned()),
                session_token: None,
            }),
            [id, key, token] => Ok(Self {
                access_key: id.to_owned(),
                secret_key: Zeroizing::new(key.to_owned()),
                session_token: Some(Zeroizing::new(token.to_owned())),
            }),
            _ => Err(SHAPE),
        }
    }
}

/// The access key id in a SigV4 `Authorization` value (`AWS4-HMAC-SHA256 Credential=ID/...`):
/// the agent's token.
pub fn token_of(authorization: &str) -> Option<String> {
    let rest = authorization.strip_prefix("AWS4-HMAC-SHA256")?;
    let credential = rest
        .split(',')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("Credential="))?;
    let id = credential.split('/').next()?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// Does the query carry a presigned URL's credential (refused: it would go upstream)?
pub fn presigned(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            PRESIGNED.iter().any(|p| name.eq_ignore_ascii_case(p))
        })
    })
}

/// Does `target` sign the body's hash (the gateway must read the body first)?
pub fn signs_body(target: &Target) -> bool {
    !target.s3()
}

/// Signs `req`, as it goes upstream (its URI absolute), adding the signature's headers;
/// `body`: the bytes it carries, or None to leave it unsigned (S3 only).
pub fn sign_request<B>(
    req: &mut hyper::Request<B>,
    body: Option<&[u8]>,
    keys: &KeyPair,
    target: &Target,
    now: SystemTime,
) -> Result<(), String> {
    let identity = Credentials::new(
        keys.access_key.clone(),
        keys.secret_key.as_str(),
        keys.session_token.as_ref().map(|t| t.to_string()),
        None,
        "agentwatch",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    if target.s3() {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    } else {
        settings.percent_encoding_mode = PercentEncodingMode::Double;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Enabled;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name(&target.service)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing: {e}"))?
        .into();
    let uri = req.uri().to_string();
    let mut pairs = Vec::with_capacity(req.headers().len());
    for (name, value) in req.headers() {
        let value = value
            .to_str()
            .map_err(|_| format!("header `{name}` is not text and cannot be signed"))?;
        pairs.push((name.as_str(), value));
    }
    let signable_body = match body {
        Some(b) => SignableBody::Bytes(b),
        None => SignableBody::UnsignedPayload,
    };
    let signable = SignableRequest::new(
        req.method().as_str(),
        &uri,
        pairs.into_iter(),
        signable_body,
    )
    .map_err(|e| format!("signing: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("signing: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_the_access_key_id_of_the_agents_signature() {
        let v = "AWS4-HMAC-SHA256 Credential=awp_TOKEN/20261207/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=abc";
        assert_eq!(token_of(v).as_deref(), Some("awp_TOKEN"));
        assert_eq!(token_of("Bearer awp_TOKEN"), None);
        assert_eq!(token_of("AWS4-HMAC-SHA256 Credential=/x"), None);
    }

    #[test]
    fn a_key_pair_is_two_or_three_words_and_its_error_never_shows_it() {
        let ok = KeyPair::from_secret(&Secret::new(b"AKIDEXAMPLE wJalr/K7MDENG".to_vec()))
            .expect("pair");
        assert_eq!(ok.access_key, "AKIDEXAMPLE");
        assert!(ok.session_token.is_none());
        let three = KeyPair::from_secret(&Secret::new(b"A B C".to_vec())).expect("three");
        assert_eq!(
            three.session_token.as_deref().map(String::as_str),
            Some("C")
        );
        for bad in [&b"only-one-word"[..], b"a b c d", b"\xff\xfe x"] {
            let e = KeyPair::from_secret(&Secret::new(bad.to_vec()))
                .err()
                .expect("refused");
            assert!(!e.contains("only-one-word"), "{e}");
        }
    }

    #[test]
    fn regions_and_services_are_checked() {
        assert_eq!(
            Target::parse("us-east-1:s3"),
            Ok(Target {
                region: "us-east-1".into(),
                service: "s3".into()
            })
        );
        for bad in ["us-east-1", ":s3", "us-east-1:", "US:s3", "a:b:c"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presigned_queries_are_found() {
        assert!(presigned(Some(
            "X-Amz-Credential=awp_x%2F2026&X-Amz-Signature=1"
        )));
        assert!(presigned(Some("a=1&x-amz-signature=2")));
        assert!(!presigned(Some("prefix=x-amz-signature")));
        assert!(!presigned(None));
    }
}
