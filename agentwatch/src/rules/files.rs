//! `[agents.files] allow` entries: path prefixes, and how they judge a path.

use agentwatch_common::FILE_RULE_MAX;

/// One `[agents.files] allow` entry: a path prefix, read-only with `:ro`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRule {
    pub prefix: String,
    pub read_only: bool,
}

impl FileRule {
    /// Parses `"/srv/app/"` or `"/usr/:ro"`: an absolute path without `.` or `..` components
    /// (the kernel compares the resolved path, which never has them), at most
    /// FILE_RULE_MAX bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (prefix, read_only) = match text.strip_suffix(":ro") {
            Some(p) => (p, true),
            None => (text, false),
        };
        if !prefix.starts_with('/') {
            return Err(format!("`{text}` must be an absolute path prefix"));
        }
        if prefix.contains('\0') {
            return Err(format!("`{text}` contains a NUL byte"));
        }
        if prefix.len() > FILE_RULE_MAX {
            return Err(format!(
                "`{text}` is longer than {FILE_RULE_MAX} bytes, the longest prefix the kernel compares"
            ));
        }
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(format!(
                "`{text}` must be a plain path: no `.` or `..` components and no `//` (the \
                 kernel compares the path it resolved, which has none)"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            read_only,
        })
    }

    /// Does this rule admit `path` (absolute, resolved) for `write`?
    pub fn admits(&self, path: &str, write: bool) -> bool {
        if write && self.read_only {
            return false;
        }
        path.starts_with(&self.prefix)
            || self
                .prefix
                .strip_suffix('/')
                .is_some_and(|dir| !dir.is_empty() && path == dir)
    }
}

/// Does any rule admit `path` for `write`? (What the kernel's trie answers.)
pub fn admitted(rules: &[FileRule], path: &str, write: bool) -> bool {
    // The longest matching prefix decides, as in the kernel's trie: `/srv/:ro` with
    // `/srv/app/` lets the agent write under /srv/app/ only.
    let best = rules
        .iter()
        .filter(|r| r.admits(path, false))
        .max_by_key(|r| r.prefix.len());
    best.is_some_and(|r| !write || !r.read_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_refuses_what_the_kernel_could_not_match() {
        assert_eq!(
            FileRule::parse("/usr/:ro"),
            Ok(FileRule {
                prefix: "/usr/".into(),
                read_only: true
            })
        );
        assert_eq!(
            FileRule::parse("/tmp/x"),
            Ok(FileRule {
                prefix: "/tmp/x".into(),
                read_only: false
            })
        );
        for bad in ["usr/", "", ":ro", "/a/../b", "/a/./b", "/a//b", "/a/.."] {
            assert!(FileRule::parse(bad).is_err(), "{bad}");
        }
        let long = format!("/{}", "a".repeat(FILE_RULE_MAX));
        assert!(FileRule::parse(&long).unwrap_err().contains("longer than"));
    }

    #[test]
    fn judges_like_the_kernel_trie() {
        let rules: Vec<FileRule> = ["/srv/app/", "/usr/:ro", "/srv/:ro"]
            .iter()
            .map(|r| FileRule::parse(r).unwrap())
            .collect();
        assert!(admitted(&rules, "/srv/app/data", true));
        assert!(admitted(&rules, "/srv/app", true), "the directory itself");
        assert!(!admitted(&rules, "/srv/application", true));
        assert!(
            admitted(&rules, "/srv/application", false),
            "/srv/ is readable"
        );
        assert!(admitted(&rules, "/usr/lib/x", false));
        assert!(!admitted(&rules, "/usr/lib/x", true), "read-only");
        assert!(!admitted(&rules, "/etc/shadow", false));
        assert!(!admitted(&rules, "/", false));
    }
}
