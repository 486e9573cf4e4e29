//! Hostname rules: `PROTO NAME PORTS` with NAME `api.example.com` or `*.example.com`.
//!
//! Names are compared as DNS compares them: label by label, ASCII case-insensitive, a trailing
//! dot (the root) is the same name. `*.example.com` matches every name below `example.com` (any
//! depth) and not `example.com` itself, which needs a rule of its own.
//!
//! Matching is on the wire labels, never on the text form: a label may hold any byte, a dot
//! included, and the text form only escapes it (`evil\.wild.test` is the two labels
//! `evil.wild` and `test`). Judged on text, that name would end in `.wild.test`; judged on
//! labels it is not below `wild.test`. The canonical text is kept for what people read (rule
//! text, rule ids, audit lines).

use std::{fmt, str::FromStr};

use hickory_proto::rr::Name;

use super::egress::{Ports, Proto};

/// A name or a wildcard over the names below one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    Exact(Labels),
    /// `*.suffix`: names strictly below `suffix`.
    Below(Labels),
}

/// A rule's name: its labels, lowercase and without the root, as matching sees them, and its
/// canonical text (lowercase, no trailing dot), as the rule prints. The text is a function of
/// the labels (the escaping is one-to-one), so comparing either compares both.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    labels: Vec<Vec<u8>>,
    text: String,
}

impl Labels {
    /// `name`'s labels, lowercase, with its canonical text.
    pub fn of(name: &Name) -> Self {
        Self {
            labels: name.iter().map(<[u8]>::to_ascii_lowercase).collect(),
            text: canonical(name),
        }
    }

    /// The canonical text (lowercase, no trailing dot).
    pub fn text(&self) -> &str {
        &self.text
    }
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

/// The canonical text of a name as asked: lowercase, no trailing dot (the root's: a last
/// label ending in an escaped dot, `exl\.`, keeps it). For display and audit only: names are
/// judged on their labels ([`NamePattern::matches`], [`same_name`]).
pub fn canonical(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if name.is_fqdn() && s.ends_with('.') {
        s.pop();
    }
    s
}

/// Are `a` and `b` the same DNS name: the same labels, ASCII case-insensitive? Whether either
/// is written with the root's trailing dot does not matter (hickory's `==` says they differ).
pub fn same_name(a: &Name, b: &Name) -> bool {
    a.iter().len() == b.iter().len()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
}

impl NamePattern {
    /// Does this pattern cover `name`? Judged on its labels: `Exact` when they are the
    /// pattern's, `Below` when the pattern's are its last ones and it has at least one more.
    /// A label is compared whole, so one holding a dot (`evil.wild` in `evil\.wild.test`) never
    /// equals a label of a pattern written with plain labels, nor a run of them.
    pub fn matches(&self, name: &Name) -> bool {
        let asked: Vec<&[u8]> = name.iter().collect();
        match self {
            Self::Exact(p) => ends_with(&asked, &p.labels) && asked.len() == p.labels.len(),
            Self::Below(p) => ends_with(&asked, &p.labels) && asked.len() > p.labels.len(),
        }
    }
}

/// Are `suffix`'s labels the last labels of `asked` (ASCII case-insensitive)?
fn ends_with(asked: &[&[u8]], suffix: &[Vec<u8>]) -> bool {
    asked.len() >= suffix.len()
        && asked[asked.len() - suffix.len()..]
            .iter()
            .zip(suffix)
            .all(|(a, s)| a.eq_ignore_ascii_case(s))
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
        let labels = Labels::of(&name);
        Ok(if wild {
            Self::Below(labels)
        } else {
            Self::Exact(labels)
        })
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => f.write_str(&n.text),
            Self::Below(n) => write!(f, "*.{}", n.text),
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
        super::egress::text_id(&self.to_string())
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

    /// The rules that allow `name` (judged on its labels).
    pub fn matching<'a>(&'a self, name: &'a Name) -> impl Iterator<Item = &'a HostRule> + 'a {
        self.0.iter().filter(move |r| r.name.matches(name))
    }

    pub fn allows(&self, name: &Name) -> bool {
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
            .parse::<crate::rules::egress::EgressRule>()
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
        let parsed: crate::rules::egress::EgressRule = rule.parse().expect(rule);
        let canonical = parsed.to_string();
        assert_eq!(
            canonical.parse::<crate::rules::egress::EgressRule>(),
            Ok(parsed),
            "{canonical}"
        );
        assert_eq!(pat(r"api.exl\."), pat(r"api.exl\.\"));
        assert_ne!(pat(r"api.exl\."), pat("api.exl"));
        // The root's dot still goes.
        assert_eq!(pat("api.exl."), pat("api.exl"));
        assert_eq!(pat(r"api.exl\.."), pat(r"api.exl\."));
    }

    /// A name from wire labels, as an answer or a query carries them (any byte, dots included).
    fn wire(labels: &[&[u8]], fqdn: bool) -> Name {
        let mut n = Name::from_labels(labels.iter().copied()).unwrap();
        n.set_fqdn(fqdn);
        n
    }

    fn ascii(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn a_dot_inside_a_label_is_not_a_label_boundary() {
        // Issue 22: judged on the text `evil\.wild.test`, this name ended in `.wild.test` and
        // was admitted by `*.wild.test`; its labels are `evil.wild` and `test`.
        let evil = wire(&[b"evil.wild", b"test"], true);
        assert_eq!(canonical(&evil), r"evil\.wild.test");
        assert!(!pat("*.wild.test").matches(&evil));
        assert!(!pat("evil.wild.test").matches(&evil));
        // The same name split at the dot, as a resolver would send it, is covered.
        let plain = wire(&[b"evil", b"wild", b"test"], true);
        assert!(pat("*.wild.test").matches(&plain));
        assert!(pat("evil.wild.test").matches(&plain));
        // A dot in the last labels: `a.wild` `test` is not below `wild.test` either.
        assert!(!pat("*.wild.test").matches(&wire(&[b"x", b"a.wild", b"test"], true)));
        // Other bytes the text escapes: never a plain label.
        for odd in [
            &b"ev il"[..],
            b"ev\\il",
            b"evil\0",
            b"\xc3\xa9vil",
            b"-evil",
        ] {
            let n = wire(&[odd, b"wild", b"test"], true);
            assert!(pat("*.wild.test").matches(&n), "{n:?} is below wild.test");
            assert!(!pat("evil.wild.test").matches(&n), "{n:?}");
        }
        // A rule that names a dotted label (escaped) matches exactly that label.
        let dotted = pat(r"evil\.wild.test");
        assert!(dotted.matches(&evil));
        assert!(!dotted.matches(&plain));
        assert_eq!(dotted.to_string(), r"evil\.wild.test");
    }

    #[test]
    fn exact_names_ignore_case_and_the_trailing_dot() {
        let p = pat("API.Example.com.");
        assert_eq!(p, pat("api.example.com"));
        assert_eq!(p.to_string(), "api.example.com");
        let NamePattern::Exact(labels) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(labels.labels, [&b"api"[..], b"example", b"com"]);
        for asked in ["api.example.com", "Api.EXAMPLE.com.", "API.EXAMPLE.COM"] {
            assert!(p.matches(&ascii(asked)), "{asked}");
        }
        assert!(p.matches(&wire(&[b"aPi", b"Example", b"cOm"], false)));
        assert!(!p.matches(&ascii("x.api.example.com")));
        assert!(!p.matches(&ascii("example.com")));
        assert!(!p.matches(&ascii("api.example.co")));
        assert!(!p.matches(&ascii("api.example.com.x")));
        // Case folding is ASCII only: a byte above 0x7f is itself.
        assert!(!pat("xn--bcher-kva.de").matches(&wire(&[b"XN--BCHER-KVA\xc0", b"de"], true)));
        assert!(same_name(
            &ascii("Api.EXAMPLE.com."),
            &ascii("api.example.com")
        ));
        assert!(!same_name(
            &wire(&[b"evil.wild", b"test"], true),
            &wire(&[b"evil", b"wild", b"test"], true)
        ));
    }

    #[test]
    fn wildcards_cover_names_below_not_the_apex() {
        let p = pat("*.example.com");
        assert!(matches!(p, NamePattern::Below(_)));
        assert!(p.matches(&ascii("a.example.com")));
        assert!(p.matches(&ascii("A.Example.COM.")));
        // Any depth below.
        assert!(p.matches(&ascii("a.b.example.com")));
        assert!(p.matches(&ascii("a.b.c.d.e.example.com.")));
        // Not the apex, with or without the root's dot, in any case.
        assert!(!p.matches(&ascii("example.com")));
        assert!(!p.matches(&ascii("EXAMPLE.com.")));
        // A suffix that is not at a label boundary is another domain.
        assert!(!p.matches(&ascii("badexample.com")));
        assert!(!p.matches(&ascii("a.badexample.com")));
        assert!(!p.matches(&ascii("com")));
        // A literal `*` label asked on the wire is just a label below example.com.
        assert!(p.matches(&wire(&[b"*", b"example", b"com"], true)));
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
