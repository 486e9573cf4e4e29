//! Hostname rules: `PROTO NAME PORTS` with NAME `api.example.com` or `*.example.com`.
//!
//! Names are compared as DNS compares them: ASCII case-insensitive, a trailing dot (the root)
//! is the same name. `*.example.com` matches every name below `example.com` (any depth) and not
//! `example.com` itself, which needs a rule of its own.

use std::{fmt, str::FromStr};

use hickory_proto::rr::Name;

use crate::egress::rules::{Ports, Proto};

/// A name or a wildcard over the names below one, lowercase, without the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    Exact(String),
    /// `*.suffix`: names strictly below `suffix`.
    Below(String),
}

/// Why a hostname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("`{0}` is not a valid DNS name: {1}")]
    Invalid(String, String),
    #[error("`{0}` is not ASCII: write internationalised names in their punycode form (xn--...)")]
    NotAscii(String),
    #[error("`{0}`: a wildcard is only allowed as the whole first label (`*.example.com`)")]
    Wildcard(String),
    #[error(
        "`{0}` would allow every name under a top-level domain; name the domain (`*.example.com`)"
    )]
    TopLevel(String),
    #[error("`{0}` is a single label; hostname rules need a domain name (`host.example.com`)")]
    SingleLabel(String),
}

/// The canonical form of a name as asked: lowercase, no trailing dot (the root's: a last
/// label ending in an escaped dot, `exl\.`, keeps it).
pub fn canonical(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if name.is_fqdn() && s.ends_with('.') {
        s.pop();
    }
    s
}

impl NamePattern {
    /// Does this pattern cover `name` (canonical form)?
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(n) => n == name,
            Self::Below(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl FromStr for NamePattern {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_ascii() {
            return Err(NameError::NotAscii(s.to_owned()));
        }
        // The trailing dot (the root) is left to the name parser: trimmed off the text, it
        // would also take the dot of an escape (`exl\.`) and change the name.
        let lower = s.to_ascii_lowercase();
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if rest.contains('*') {
            return Err(NameError::Wildcard(s.to_owned()));
        }
        let name =
            Name::from_ascii(rest).map_err(|e| NameError::Invalid(s.to_owned(), e.to_string()))?;
        if rest.is_empty() || name.num_labels() == 0 {
            return Err(NameError::Invalid(s.to_owned(), "empty name".to_owned()));
        }
        // The parsed name's last label, not the text's last `.`-separated piece: escapes
        // (`\.` inside a label, a trailing `\`) make the two differ, and the canonical text
        // written back must be judged as the rule was.
        if name
            .iter()
            .next_back()
            .is_some_and(|tld| tld.iter().all(u8::is_ascii_digit))
        {
            return Err(NameError::Invalid(
                s.to_owned(),
                "no top-level domain is numeric: a mistyped address?".to_owned(),
            ));
        }
        let labels = name.num_labels();
        if wild && labels < 2 {
            return Err(NameError::TopLevel(s.to_owned()));
        }
        if !wild && labels < 2 {
            return Err(NameError::SingleLabel(s.to_owned()));
        }
        let canon = canonical(&name);
        Ok(if wild {
            Self::Below(canon)
        } else {
            Self::Exact(canon)
        })
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => f.write_str(n),
            Self::Below(n) => write!(f, "*.{n}"),
        }
    }
}

/// Does `s` look like a hostname rather than an address (so its errors speak of names)?
pub fn looks_like_name(s: &str) -> bool {
    s.starts_with("*.") || (s.chars().any(|c| c.is_alphabetic()) && !s.contains(':'))
}

/// One hostname rule of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostRule {
    pub proto: Proto,
    pub name: NamePattern,
    pub ports: Ports,
}

impl HostRule {
    /// A stable identity: the first 8 bytes of the SHA-256 of the rule's canonical text. The
    /// kernel keeps it with each address the rule admitted, so a reload (or a new daemon) keeps
    /// exactly the addresses whose rule is still configured, with no other state.
    pub fn id(&self) -> u64 {
        crate::egress::rules::text_id(&self.to_string())
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.proto, self.name, self.ports)
    }
}

/// An agent's hostname rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRules(pub Vec<HostRule>);

impl HostRules {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rules that allow `name` (canonical form).
    pub fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HostRule> + 'a {
        self.0.iter().filter(move |r| r.name.matches(name))
    }

    pub fn allows(&self, name: &str) -> bool {
        self.matching(name).next().is_some()
    }

    pub fn ids(&self) -> std::collections::HashSet<u64> {
        self.0.iter().map(HostRule::id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> NamePattern {
        s.parse().unwrap()
    }

    #[test]
    fn a_numeric_last_label_is_refused_however_it_is_written() {
        // Found by fuzz/fuzz_targets/egress_rules.rs: the trailing `\` hid the numeric last
        // label from a check on the text, so the rule was accepted while its canonical text
        // (`udp apixap2\.0.2 587`) was refused.
        let rule = r"udp APIxap2\.0.2.\ 587";
        let err = rule
            .parse::<crate::egress::rules::EgressRule>()
            .expect_err(rule);
        assert!(
            err.to_string().contains("no top-level domain is numeric"),
            "{err}"
        );
        // An escaped dot is inside a label: `x.5` is not numeric, and the text reads back.
        let p = pat(r"api.x\.5");
        assert_eq!(pat(&p.to_string()), p);
    }

    #[test]
    fn a_last_label_ending_in_an_escaped_dot_reads_back_as_itself() {
        // Found by fuzz/fuzz_targets/egress_rules.rs (3.5 million inputs in): the escaped dot
        // ending the last label was taken for the root's trailing dot and dropped, leaving a
        // dangling `\` in the canonical text (`tcp api.exl\ 22`), which reads as another name.
        let rule = r"tcp api.exl\.\ 22";
        let parsed: crate::egress::rules::EgressRule = rule.parse().expect(rule);
        let canonical = parsed.to_string();
        assert_eq!(
            canonical.parse::<crate::egress::rules::EgressRule>(),
            Ok(parsed),
            "{canonical}"
        );
        assert_eq!(pat(r"api.exl\."), pat(r"api.exl\.\"));
        assert_ne!(pat(r"api.exl\."), pat("api.exl"));
        // The root's dot still goes.
        assert_eq!(pat("api.exl."), pat("api.exl"));
        assert_eq!(pat(r"api.exl\.."), pat(r"api.exl\."));
    }

    #[test]
    fn exact_names_ignore_case_and_the_trailing_dot() {
        let p = pat("API.Example.com.");
        assert_eq!(p, NamePattern::Exact("api.example.com".into()));
        assert!(p.matches("api.example.com"));
        assert!(!p.matches("x.api.example.com"));
        assert!(!p.matches("example.com"));
        let asked = Name::from_ascii("Api.EXAMPLE.com.").unwrap();
        assert!(p.matches(&canonical(&asked)));
    }

    #[test]
    fn wildcards_cover_names_below_not_the_apex() {
        let p = pat("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        // A suffix that is not at a label boundary is another domain.
        assert!(!p.matches("badexample.com"));
        assert!(!p.matches("a.badexample.com"));
        assert_eq!(p.to_string(), "*.example.com");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        assert!(matches!(
            "*.com".parse::<NamePattern>(),
            Err(NameError::TopLevel(_))
        ));
        assert!(matches!(
            "a.*.com".parse::<NamePattern>(),
            Err(NameError::Wildcard(_))
        ));
        assert!(matches!(
            "*x.com".parse::<NamePattern>(),
            Err(NameError::Wildcard(_))
        ));
        assert!(matches!(
            "localhost".parse::<NamePattern>(),
            Err(NameError::SingleLabel(_))
        ));
        assert!(matches!(
            "bücher.de".parse::<NamePattern>(),
            Err(NameError::NotAscii(_))
        ));
        assert!(matches!(
            "a..b.com".parse::<NamePattern>(),
            Err(NameError::Invalid(..))
        ));
        assert!("10.0.0.x1".parse::<NamePattern>().is_ok());
        assert!(matches!(
            "10.0.x.1".parse::<NamePattern>(),
            Err(NameError::Invalid(..))
        ));
    }

    #[test]
    fn rule_ids_follow_the_rule_text() {
        let r = |p: u16| HostRule {
            proto: Proto::Tcp,
            name: pat("api.example.com"),
            ports: Ports { lo: p, hi: p },
        };
        assert_eq!(r(443).id(), r(443).id());
        assert_ne!(r(443).id(), r(444).id());
        assert_eq!(r(443).to_string(), "tcp api.example.com 443");
    }
}
