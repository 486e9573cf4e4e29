//! Phantom tokens: what an agent holds instead of a key.
//!
//! A token is 32 random bytes from the OS (getrandom), written `awp_` + base64url. It names one
//! scope of one agent for one launch, and it is a second factor only: the gateway first knows
//! from the kernel which agent's cgroup the calling socket belongs to, then checks that the
//! token is one it gave that agent. So a token copied out of an agent's environment is
//! worthless from anywhere else, and one that leaked from a dead launch is worthless too.
//!
//! The daemon keeps only each token's SHA-256: a look-up by digest takes the same time however
//! much of a guess is right, and the daemon's memory holds nothing an agent could present.
//! Revocation (kill switch, lease end, agent gone from the config) drops an agent's digests at
//! once; the gateway checks the table on every call, not once per connection.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest as _, Sha256};

/// What a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub agent: String,
    pub scope: String,
    /// Which launch it was given to (increasing per daemon), for the trail.
    pub launch: u64,
}

/// The tokens the gateway has given out, by digest.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Grant>,
    next_launch: u64,
}

/// The prefix of every token: recognisable in a leaked file or a secret scanner's rules.
pub const PREFIX: &str = "awp_";

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// A launch number for a new launch of some agent.
    pub fn next_launch(&mut self) -> u64 {
        self.next_launch += 1;
        self.next_launch
    }

    /// A new token for `scope` of `agent`, in launch `launch`.
    pub fn mint(
        &mut self,
        agent: &str,
        scope: &str,
        launch: u64,
    ) -> Result<String, getrandom::Error> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)?;
        // base64url without padding: a token goes in headers and URLs unescaped.
        let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        self.by_digest.insert(
            digest(&token),
            Grant {
                agent: agent.to_owned(),
                scope: scope.to_owned(),
                launch,
            },
        );
        Ok(token)
    }

    /// The grant `token` stands for, if it is one of ours and still valid.
    pub fn check(&self, token: &str) -> Option<&Grant> {
        if !token.starts_with(PREFIX) {
            return None;
        }
        self.by_digest.get(&digest(token))
    }

    /// Drops every token of `agent`; returns their digests and grants.
    pub fn take_agent(&mut self, agent: &str) -> Vec<([u8; 32], Grant)> {
        let digests: Vec<[u8; 32]> = self
            .by_digest
            .iter()
            .filter(|(_, g)| g.agent == agent)
            .map(|(d, _)| *d)
            .collect();
        digests
            .into_iter()
            .filter_map(|d| self.by_digest.remove(&d).map(|g| (d, g)))
            .collect()
    }

    /// Drops the tokens of scopes of `agent` that `keep` no longer names (a reload removed
    /// them); returns how many there were.
    pub fn revoke_scopes_except(&mut self, agent: &str, keep: &[&str]) -> usize {
        let before = self.by_digest.len();
        self.by_digest
            .retain(|_, g| g.agent != agent || keep.contains(&g.scope.as_str()));
        before - self.by_digest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_stands_for_its_grant_until_revoked() {
        let mut t = Tokens::default();
        let launch = t.next_launch();
        let mail = t.mint("mailer", "mail", launch).expect("mint");
        let llm = t.mint("mailer", "llm", launch).expect("mint");
        let second = t.next_launch();
        let other = t.mint("other", "mail", second).expect("mint");
        assert!(mail.starts_with(PREFIX));
        assert_eq!(mail.len(), PREFIX.len() + 43);
        assert_ne!(mail, llm);
        assert_eq!(t.check(&mail).map(|g| g.scope.as_str()), Some("mail"));
        assert_eq!(t.check("awp_guess"), None);
        assert_eq!(t.check(&mail[PREFIX.len()..]), None);
        assert_eq!(t.revoke_scopes_except("mailer", &["llm"]), 1);
        assert_eq!(t.check(&mail), None);
        assert!(t.check(&llm).is_some());
        assert_eq!(t.take_agent("mailer").len(), 1);
        assert_eq!(t.check(&llm), None);
        assert_eq!(t.check(&other).map(|g| g.agent.as_str()), Some("other"));
    }
}
