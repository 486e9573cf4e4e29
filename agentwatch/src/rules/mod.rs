//! The rules an agent's config states, parsed and judged: address and port rules
//! ([`egress`]), hostname rules ([`names`]), file prefixes ([`files`]), and the name syntax
//! agents and APIs share ([`valid_name`]). Nothing here touches the kernel or the network: the
//! concerns that enforce them (egress, dns, files), the config and the gateway all read them,
//! so none of those has to import another for its rule types.

pub mod egress;
pub mod files;
pub mod names;

/// Is `name` a valid agent or API scope name: `[a-z0-9-]`, 1-63 characters, not starting
/// with `-` (what a cgroup, a metric label and an env name all take)?
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
