//! The config of the gateway: `[secrets]` and each agent's `[[agents.apis]]`, validated.
//!
//! Only the form is checked here (the config check needs no privileges); whether a secret can
//! be read, and with what mode, is checked when the daemon loads it ([`super::secrets`]), and a
//! reload whose secrets cannot all be read is refused whole like any other bad config.

use std::{
    collections::{BTreeMap, HashSet},
    ops::Range,
    path::PathBuf,
};

use serde::Deserialize;
use toml::Spanned;

use super::{auth::Auth, judge::Pattern, secrets::SecretSource};

/// One `[secrets]` entry as written: exactly one of the three sources.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    credential: Option<String>,
}

/// One `[[agents.apis]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    name: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    ca_file: Option<Spanned<PathBuf>>,
    secret: Spanned<String>,
    #[serde(default)]
    auth: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    per_minute: Option<Spanned<i64>>,
    #[serde(default)]
    per_day: Option<Spanned<i64>>,
    #[serde(default)]
    approve: Vec<Spanned<String>>,
    #[serde(default)]
    approve_timeout: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
}

/// Where a scope's allowed calls go: `https://HOST[:PORT][/BASE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// Prefixed to every forwarded path; empty or starting with `/`, never ending with one.
    pub base: String,
}

impl Upstream {
    /// The authority as sent in `Host` / `:authority`.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// One API scope of an agent, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    pub name: String,
    pub upstream: Upstream,
    pub ca_file: Option<PathBuf>,
    /// The `[secrets]` entry it injects.
    pub secret: String,
    pub auth: Auth,
    pub allow: Vec<Pattern>,
    pub approve: Vec<Pattern>,
    /// How long a held call waits for a human before it is refused.
    pub approve_timeout: std::time::Duration,
    pub per_minute: Option<u32>,
    pub per_day: Option<u32>,
    /// Variables `launch` sets, `{url}` and `{token}` filled in.
    pub env: Vec<(String, String)>,
}

/// A held call waits this long for a human by default: long enough to be paged and look,
/// short enough that an agent (and the SDK's own timeout) is not left hanging for an hour.
pub const DEFAULT_APPROVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Never longer than a day: a call nobody decided on in that time is stale.
const MAX_APPROVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Most calls a `per_day` may allow: each call in the window is remembered (an exact sliding
/// window), 16 bytes apiece.
pub const MAX_PER_DAY: i64 = 10_000_000;

/// `[secrets]` validated: name -> source. Errors as (span, message).
pub fn secrets(
    raw: &BTreeMap<String, Spanned<RawSecret>>,
    err: &mut impl FnMut(Range<usize>, String),
) -> BTreeMap<String, SecretSource> {
    let mut out = BTreeMap::new();
    for (name, s) in raw {
        let span = s.span();
        if !crate::rules::valid_name(name) {
            err(
                span.clone(),
                format!("secret name `{name}` must be 1-63 characters of a-z, 0-9 and `-`"),
            );
        }
        let s = s.get_ref();
        let source = match (&s.file, &s.env, &s.credential) {
            (Some(f), None, None) if f.is_absolute() => SecretSource::File(f.clone()),
            (Some(f), None, None) => {
                err(
                    span,
                    format!(
                        "secret `{name}`: file `{}` must be an absolute path",
                        f.display()
                    ),
                );
                continue;
            }
            (None, Some(v), None) if !v.is_empty() => SecretSource::Env(v.clone()),
            (None, None, Some(c)) if valid_credential(c) => SecretSource::Credential(c.clone()),
            (None, None, Some(c)) => {
                err(
                    span,
                    format!("secret `{name}`: credential `{c}` must be a file name, without `/`"),
                );
                continue;
            }
            _ => {
                err(
                    span,
                    format!(
                        "secret `{name}` needs exactly one of file = \"PATH\", env = \"VARIABLE\" \
                         or credential = \"NAME\""
                    ),
                );
                continue;
            }
        };
        out.insert(name.clone(), source);
    }
    out
}

/// One agent's `apis` validated against the `secrets` there are.
pub fn apis(
    raw: &[RawApi],
    secrets: &BTreeMap<String, SecretSource>,
    err: &mut impl FnMut(Range<usize>, String),
) -> Vec<Api> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for a in raw {
        let name = a.name.get_ref().clone();
        let mut ok = true;
        let mut bad = |span: Range<usize>, msg: String| {
            ok = false;
            err(span, format!("api `{name}`: {msg}"));
        };
        if !crate::rules::valid_name(&name) {
            bad(
                a.name.span(),
                "the name must be 1-63 characters of a-z, 0-9 and `-`".into(),
            );
        }
        if !seen.insert(name.clone()) {
            bad(a.name.span(), "a second scope of the same name".into());
        }
        let upstream = upstream(a.upstream.get_ref()).unwrap_or_else(|e| {
            bad(a.upstream.span(), e);
            Upstream {
                host: String::new(),
                port: 443,
                base: String::new(),
            }
        });
        if let Some(ca) = &a.ca_file
            && !ca.get_ref().is_absolute()
        {
            bad(ca.span(), "ca_file must be an absolute path".into());
        }
        if !secrets.contains_key(a.secret.get_ref()) {
            let known: Vec<&str> = secrets.keys().map(String::as_str).collect();
            bad(
                a.secret.span(),
                format!(
                    "secret `{}` is not in [secrets] (there: {})",
                    a.secret.get_ref(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let auth = match &a.auth {
            None => Auth::Bearer,
            Some(s) => Auth::parse(s.get_ref()).unwrap_or_else(|e| {
                bad(s.span(), e);
                Auth::Bearer
            }),
        };
        let mut patterns = |list: &[Spanned<String>], key: &str| -> Vec<Pattern> {
            list.iter()
                .filter_map(|p| {
                    Pattern::parse(p.get_ref())
                        .map_err(|e| bad(p.span(), format!("{key} {e}")))
                        .ok()
                })
                .collect()
        };
        let allow = patterns(&a.allow, "allow");
        let approve = patterns(&a.approve, "approve");
        let approve_timeout = match &a.approve_timeout {
            None => DEFAULT_APPROVE_TIMEOUT,
            Some(t) => match humantime::parse_duration(t.get_ref()) {
                Ok(d) if d >= std::time::Duration::from_secs(1) && d <= MAX_APPROVE_TIMEOUT => d,
                Ok(_) => {
                    bad(t.span(), "approve_timeout must be 1s to 24h".into());
                    DEFAULT_APPROVE_TIMEOUT
                }
                Err(e) => {
                    bad(t.span(), format!("approve_timeout `{}`: {e}", t.get_ref()));
                    DEFAULT_APPROVE_TIMEOUT
                }
            },
        };
        let mut limit = |v: &Option<Spanned<i64>>, key: &str, max: i64| {
            v.as_ref().and_then(|v| match u32::try_from(*v.get_ref()) {
                Ok(n) if n >= 1 && i64::from(n) <= max => Some(n),
                _ => {
                    bad(
                        v.span(),
                        format!(
                            "{key} must be 1 to {max} (to refuse every call, leave `allow` empty)"
                        ),
                    );
                    None
                }
            })
        };
        let per_minute = limit(&a.per_minute, "per_minute", i64::from(u32::MAX));
        let per_day = limit(&a.per_day, "per_day", MAX_PER_DAY);
        let mut env = Vec::new();
        for (k, v) in &a.env {
            if let Err(e) = env_entry(k, v.get_ref()) {
                bad(v.span(), e);
            } else {
                env.push((k.clone(), v.get_ref().clone()));
            }
        }
        if ok {
            out.push(Api {
                name,
                upstream,
                ca_file: a.ca_file.as_ref().map(|c| c.get_ref().clone()),
                secret: a.secret.get_ref().clone(),
                auth,
                allow,
                approve,
                approve_timeout,
                per_minute,
                per_day,
                env,
            });
        }
    }
    out
}

/// Does `secret` hold what `api`'s `auth` sends (an AWS key pair for `aws-sigv4`)? The
/// error names the scope and the secret, never what it holds.
pub fn secret_fits(api: &Api, secret: &super::secrets::Secret) -> Result<(), String> {
    match &api.auth {
        Auth::AwsSigV4(_) => super::aws::KeyPair::from_secret(secret)
            .map(|_| ())
            .map_err(|e| format!("api `{}`: secret `{}`: {e}", api.name, api.secret)),
        _ => Ok(()),
    }
}

fn valid_credential(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// `https://HOST[:PORT][/BASE]`, parsed by http's URI parser.
fn upstream(text: &str) -> Result<Upstream, String> {
    let uri: hyper::Uri = text
        .parse()
        .map_err(|e| format!("upstream `{text}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "upstream `{text}` must be https:// (the secret never crosses a network in the clear)"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("upstream `{text}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "upstream `{text}` carries credentials in the URL; put them in [secrets]"
        ));
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(format!(
            "upstream `{text}` may not carry a query or fragment"
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("upstream `{text}` has no host"));
    }
    let base = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream {
        host,
        port: authority.port_u16().unwrap_or(443),
        base,
    })
}

/// An `env` entry: a variable name (not one of agentwatch's own) and a value whose only
/// placeholders are `{url}` and `{token}`.
fn env_entry(key: &str, value: &str) -> Result<(), String> {
    let name_ok = key
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !name_ok {
        return Err(format!("env `{key}` is not a variable name"));
    }
    if key.starts_with("AGENTWATCH_") {
        return Err(format!(
            "env `{key}`: AGENTWATCH_ variables are set by launch itself"
        ));
    }
    let mut rest = value;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("env `{key}`: an unclosed `{{` in `{value}`"))?;
        let placeholder = &after[..close];
        if placeholder != "url" && placeholder != "token" {
            return Err(format!(
                "env `{key}`: `{{{placeholder}}}` is not a placeholder; {{url}} and {{token}} are"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// `value` with `{url}` and `{token}` filled in.
pub fn fill(value: &str, url: &str, token: &str) -> String {
    value.replace("{url}", url).replace("{token}", token)
}

/// `AGENTWATCH_API_<NAME>_URL` / `_TOKEN`: NAME upper-cased, `-` as `_`.
pub fn env_names(scope: &str) -> (String, String) {
    let n = scope.to_ascii_uppercase().replace('-', "_");
    (
        format!("AGENTWATCH_API_{n}_URL"),
        format!("AGENTWATCH_API_{n}_TOKEN"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        secrets: BTreeMap<String, Spanned<RawSecret>>,
        #[serde(default)]
        apis: Vec<RawApi>,
    }

    fn check(text: &str) -> (Vec<Api>, Vec<String>) {
        let doc: Doc = toml::from_str(text).expect("toml");
        let mut errors = Vec::new();
        let s = secrets(&doc.secrets, &mut |_, m| errors.push(m));
        let a = apis(&doc.apis, &s, &mut |_, m| errors.push(m));
        (a, errors)
    }

    const GOOD: &str = r#"
[secrets]
mailgun = { file = "/etc/agentwatch/secrets/mailgun" }
openai = { env = "OPENAI_KEY" }
anthropic = { credential = "anthropic" }

[[apis]]
name = "mail"
upstream = "https://api.mailgun.net"
secret = "mailgun"
auth = "basic:api"
allow = ["POST /v3/*/messages", "GET /v3/domains/**"]
per_minute = 60
per_day = 1000
approve = ["POST /v3/*/messages"]
env = { MAILGUN_API_BASE = "{url}", MAILGUN_API_KEY = "{token}" }

[[apis]]
name = "llm"
upstream = "https://[::1]:8443/v1/"
ca_file = "/etc/ssl/test-ca.pem"
secret = "openai"
allow = ["POST /chat/completions"]
"#;

    #[test]
    fn the_contract_example_validates() {
        let (apis, errors) = check(GOOD);
        assert_eq!(errors, Vec::<String>::new());
        assert_eq!(apis.len(), 2);
        let mail = &apis[0];
        assert_eq!(mail.upstream.authority(), "api.mailgun.net");
        assert_eq!(mail.upstream.base, "");
        assert_eq!(mail.auth, Auth::Basic { user: "api".into() });
        assert_eq!((mail.per_minute, mail.per_day), (Some(60), Some(1000)));
        assert_eq!(mail.allow.len(), 2);
        assert_eq!(mail.approve.len(), 1);
        let llm = &apis[1];
        assert_eq!(llm.upstream.authority(), "[::1]:8443");
        assert_eq!(llm.upstream.base, "/v1");
        assert_eq!(llm.auth, Auth::Bearer);
    }

    #[test]
    fn each_mistake_is_named() {
        for (edit, says) in [
            (
                ("https://api.mailgun.net", "http://api.mailgun.net"),
                "must be https://",
            ),
            (
                ("https://api.mailgun.net", "https://u:p@api.mailgun.net"),
                "credentials in the URL",
            ),
            (
                ("https://api.mailgun.net", "https://api.mailgun.net/?k=1"),
                "query",
            ),
            (
                ("secret = \"mailgun\"", "secret = \"nope\""),
                "is not in [secrets]",
            ),
            (("auth = \"basic:api\"", "auth = \"token\""), "one of"),
            (
                ("per_minute = 60", "per_minute = 0"),
                "per_minute must be 1",
            ),
            (
                ("per_day = 1000", "per_day = 99999999999"),
                "per_day must be 1",
            ),
            (
                ("\"GET /v3/domains/**\"", "\"GET /v3/**/x\""),
                "may only come last",
            ),
            (
                ("{url}\", MAILGUN_API_KEY", "{uri}\", MAILGUN_API_KEY"),
                "not a placeholder",
            ),
            (("MAILGUN_API_BASE", "AGENTWATCH_X"), "set by launch"),
            (("name = \"llm\"", "name = \"mail\""), "same name"),
            (
                ("per_day = 1000", "per_day = 1000\napprove_timeout = \"2d\""),
                "1s to 24h",
            ),
            (
                (
                    "per_day = 1000",
                    "per_day = 1000\napprove_timeout = \"soon\"",
                ),
                "approve_timeout `soon`",
            ),
            (
                ("{ env = \"OPENAI_KEY\" }", "{ env = \"A\", file = \"/x\" }"),
                "exactly one",
            ),
            (
                (
                    "{ file = \"/etc/agentwatch/secrets/mailgun\" }",
                    "{ file = \"rel\" }",
                ),
                "absolute",
            ),
            (
                (
                    "{ credential = \"anthropic\" }",
                    "{ credential = \"../x\" }",
                ),
                "without `/`",
            ),
        ] {
            let text = GOOD.replacen(edit.0, edit.1, 1);
            assert_ne!(text, GOOD, "{edit:?} edits nothing");
            let (_, errors) = check(&text);
            assert!(
                errors.iter().any(|e| e.contains(says)),
                "{edit:?}: {errors:?}"
            );
        }
    }

    #[test]
    fn env_names_and_placeholders() {
        assert_eq!(
            env_names("mail-eu"),
            (
                "AGENTWATCH_API_MAIL_EU_URL".to_owned(),
                "AGENTWATCH_API_MAIL_EU_TOKEN".to_owned()
            )
        );
        assert_eq!(fill("{url}/v1 {token}", "http://u", "t"), "http://u/v1 t");
    }
}
