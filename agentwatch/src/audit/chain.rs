//! The trail's hash chain: every line's `prev` is the hex SHA-256 of the line before it, of
//! its exact bytes without the newline (of the empty string for the first line of a trail).
//!
//! A line that is changed, removed or inserted breaks the link after it, unless whoever did it
//! also recomputed every later `prev`: the chain shows edits, it does not sign the trail. What
//! makes a rewritten chain visible is a hash kept elsewhere (a log shipper's copy, or the last
//! line's hash that `agentwatch audit verify` prints, written down somewhere else).

use std::{fs::File, io, os::unix::fs::FileExt as _, path::Path};

use sha2::{Digest as _, Sha256};

/// `prev` of a trail's first line: the SHA-256 of the empty string.
pub const START: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The `prev` a line after `line` carries: hex SHA-256 of `line` (without its newline).
pub fn link(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        // Writing into a String cannot fail.
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// How an existing trail file ends, as the writer needs it to go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tail {
    /// The `prev` of the next line: the link of the file's last line.
    pub prev: String,
    /// The last line has no newline at its end: a write was cut short (a crash mid-write, a
    /// full disk). The next line must start on a line of its own.
    pub torn: bool,
}

/// How much of the file is read at a time while looking for the last line's start.
const CHUNK: u64 = 8 * 1024;

/// The tail of the file at `path`: None when it is missing or empty.
///
/// Memory stays bounded whatever the file holds: the last line's start is found by reading
/// backwards chunk by chunk, and the line is hashed as it is read forwards.
pub(super) fn tail(path: &Path) -> io::Result<Option<Tail>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    let torn = last[0] != b'\n';
    // The last line ends before its newline, or at the end of a torn file.
    let end = if torn { len } else { len - 1 };
    let start = line_start(&file, end)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = start;
    while at < end {
        let n = usize::try_from((end - at).min(CHUNK)).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Some(Tail {
        prev: hex(&hasher.finalize()),
        torn,
    }))
}

/// Where the line that ends at `end` starts: just after the newline before it, or at 0.
fn line_start(file: &File, end: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let n = usize::try_from(hi - lo).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], lo)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(lo + i as u64 + 1);
        }
        hi = lo;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("aw-chain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn start_is_the_hash_of_nothing() {
        assert_eq!(link(b""), START);
        // `printf '{"a":1}' | sha256sum`
        assert_eq!(
            link(br#"{"a":1}"#),
            "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
        );
    }

    #[test]
    fn tail_finds_the_last_line_whole_or_torn() {
        let dir = scratch("tail");
        let p = dir.join("t");
        assert_eq!(tail(&p).unwrap(), None, "missing");
        std::fs::write(&p, b"").unwrap();
        assert_eq!(tail(&p).unwrap(), None, "empty");
        std::fs::write(&p, b"one\ntwo\n").unwrap();
        assert_eq!(
            tail(&p).unwrap(),
            Some(Tail {
                prev: link(b"two"),
                torn: false
            })
        );
        std::fs::write(&p, b"one\ntwo\n{\"cut").unwrap();
        assert_eq!(
            tail(&p).unwrap(),
            Some(Tail {
                prev: link(b"{\"cut"),
                torn: true
            })
        );
        std::fs::write(&p, b"only").unwrap();
        assert_eq!(tail(&p).unwrap().unwrap().prev, link(b"only"));
        // A last line longer than the chunks it is read in.
        let long = vec![b'x'; 3 * CHUNK as usize + 17];
        let mut text = b"first\n".to_vec();
        text.extend_from_slice(&long);
        text.push(b'\n');
        std::fs::write(&p, &text).unwrap();
        assert_eq!(tail(&p).unwrap().unwrap().prev, link(&long));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
