//! The API gateway: credentials the agent never holds (phantom tokens).
//!
//! An agent is given, per API scope, a local URL and an opaque token instead of a key. Its
//! calls come to the gateway, which knows from the kernel which agent's cgroup the calling
//! socket belongs to; checks the token is one it gave that agent; judges method and path
//! against the scope ([`judge`]); reserves a place in the scope's limits ([`limits`]); holds
//! the call for a human where the scope says so; takes every credential the agent sent out of
//! the request and puts the real one in ([`auth`], [`secrets`]; AWS calls re-signed, [`aws`]);
//! and streams the answer back.
//! Every call is audited; neither the secret nor the token is ever written anywhere.
//!
//! [`scope`] validates the config, [`upstream`] builds each scope's HTTPS client and
//! [`serve`] is the listener and the calls; [`tokens`] are the phantom tokens.

pub mod auth;
pub mod aws;
pub mod judge;
pub mod limits;
pub mod scope;
pub mod secrets;
pub mod serve;
pub mod tokens;
pub mod upstream;
