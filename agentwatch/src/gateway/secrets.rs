//! Credentials only the daemon holds (`[secrets]`).
//!
//! A secret is read when the config is loaded, and again at every reload (which is how one is
//! rotated: calls already forwarded keep the value they were sent with, the next call gets the
//! new one). Its source is one of:
//!
//! - `file = PATH`: a regular file owned by the daemon's user (root) that neither group nor
//!   others may read. Anything looser is refused with its path and mode: a key others can read
//!   has already left the daemon's hands. The mode is read from the opened file (fstat), so a
//!   symlink is judged by the file it names.
//! - `env = NAME`: the daemon's environment (a systemd `Environment=`, a Kubernetes secret
//!   mounted as a variable).
//! - `credential = NAME`: `$CREDENTIALS_DIRECTORY/NAME`, systemd's `LoadCredential=`, checked
//!   like a file.
//!
//! The value never reaches a log, trail, metric, status or error message: [`Secret`] has no
//! `Display` and its `Debug` prints nothing of it, and every error names the source, never the
//! content. Its bytes are zeroed when it is dropped (`zeroize`), and one line break at the end
//! of a file is not part of it (editors add one). A value that could not be sent in an HTTP
//! header (control characters) is refused at load, not at the first call.

use std::{
    fmt,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// Where a secret comes from, as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    Credential(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Env(v) => write!(f, "environment variable {v}"),
            Self::Credential(c) => write!(f, "systemd credential {c}"),
        }
    }
}

/// A credential's bytes, zeroed on drop. Printing one shows nothing of it.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps `bytes` (tests and the loaders here).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes, for the one place that injects them into an upstream request.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Why a secret could not be loaded. Never carries any of its bytes.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret `{name}`: reading {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret `{name}`: {path} is not a regular file")]
    NotAFile { name: String, path: PathBuf },
    #[error(
        "secret `{name}`: {path} may be read by group or others (mode {mode:04o}); only its owner \
         may (chmod 600)"
    )]
    Readable {
        name: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("secret `{name}`: {path} is owned by uid {uid}, not by the daemon's uid {daemon}")]
    Owner {
        name: String,
        path: PathBuf,
        uid: u32,
        daemon: u32,
    },
    #[error("secret `{name}`: the daemon's environment has no variable {var}")]
    NoVariable { name: String, var: String },
    #[error(
        "secret `{name}`: credential {credential} needs $CREDENTIALS_DIRECTORY (systemd's \
         LoadCredential=), which the daemon's environment does not have"
    )]
    NoCredentials { name: String, credential: String },
    #[error("secret `{name}` ({from}) is empty")]
    Empty { name: String, from: SecretSource },
    #[error(
        "secret `{name}` ({from}) holds a control character (a line break inside, a NUL): it \
         could not be sent in an HTTP header"
    )]
    Unsendable { name: String, from: SecretSource },
}

/// Secrets larger than this are refused: API keys are short, and a large file named by mistake
/// (a certificate bundle, a log) should not be sent as one.
const MAX_SECRET: u64 = 16 * 1024;

/// Reads secret `name` from `source`.
pub fn load(name: &str, source: &SecretSource) -> Result<Secret, SecretError> {
    let bytes = match source {
        SecretSource::File(path) => read_private_file(name, path)?,
        SecretSource::Env(var) => std::env::var_os(var)
            .map(|v| Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v)))
            .ok_or_else(|| SecretError::NoVariable {
                name: name.to_owned(),
                var: var.clone(),
            })?,
        SecretSource::Credential(credential) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                SecretError::NoCredentials {
                    name: name.to_owned(),
                    credential: credential.clone(),
                }
            })?;
            read_private_file(name, &Path::new(&dir).join(credential))?
        }
    };
    let value = strip_line_end(&bytes);
    if value.is_empty() {
        return Err(SecretError::Empty {
            name: name.to_owned(),
            from: source.clone(),
        });
    }
    // What http::HeaderValue refuses, refused here, where the operator reads the error.
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(SecretError::Unsendable {
            name: name.to_owned(),
            from: source.clone(),
        });
    }
    Ok(Secret::new(value.to_vec()))
}

/// `bytes` without one trailing `\n` or `\r\n`.
fn strip_line_end(bytes: &[u8]) -> &[u8] {
    let b = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if b.len() < bytes.len() {
        b.strip_suffix(b"\r").unwrap_or(b)
    } else {
        b
    }
}

fn read_private_file(name: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let read_err = |source| SecretError::Read {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(SecretError::Readable {
            name: name.to_owned(),
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    // SAFETY: geteuid has no preconditions.
    let daemon = unsafe { libc::geteuid() };
    if meta.uid() != daemon {
        return Err(SecretError::Owner {
            name: name.to_owned(),
            path: path.to_owned(),
            uid: meta.uid(),
            daemon,
        });
    }
    // Read into a buffer that is zeroed however this returns.
    let mut bytes = Zeroizing::new(Vec::with_capacity(64));
    (&mut file)
        .take(MAX_SECRET + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_SECRET {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {MAX_SECRET} bytes: not an API key"
        ))));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn file_with(mode: u32, content: &[u8]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("key");
        std::fs::write(&path, content).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    /// A folder of its own under the temp dir, removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "agentwatch-secrets-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).expect("mkdir");
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_private_file_is_read_without_its_line_end() {
        let (_d, path) = file_with(0o600, b"sk-test-123\n");
        let s = load("k", &SecretSource::File(path)).expect("load");
        assert_eq!(s.expose(), b"sk-test-123");
        let (_d, path) = file_with(0o400, b"sk-test-123\r\n");
        assert_eq!(
            load("k", &SecretSource::File(path)).expect("load").expose(),
            b"sk-test-123"
        );
    }

    #[test]
    fn a_file_others_may_read_is_refused_with_its_path_and_mode_never_its_content() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let (_d, path) = file_with(mode, b"sk-live-secret");
            let e = load("mailgun", &SecretSource::File(path.clone())).expect_err("refused");
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(!text.contains("sk-live"), "{text}");
            assert!(!format!("{e:?}").contains("sk-live"));
        }
    }

    #[test]
    fn empty_and_unsendable_values_are_refused() {
        let (_d, path) = file_with(0o600, b"\n");
        assert!(matches!(
            load("k", &SecretSource::File(path)),
            Err(SecretError::Empty { .. })
        ));
        let (_d, path) = file_with(0o600, b"abc\ndef\n");
        let e = load("k", &SecretSource::File(path)).expect_err("refused");
        assert!(matches!(e, SecretError::Unsendable { .. }), "{e}");
        assert!(!e.to_string().contains("abc"));
    }

    #[test]
    fn a_folder_or_a_missing_file_is_refused() {
        let d = tempdir::Dir::new();
        std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert!(matches!(
            load("k", &SecretSource::File(d.0.clone())),
            Err(SecretError::NotAFile { .. })
        ));
        assert!(matches!(
            load("k", &SecretSource::File(d.0.join("nope"))),
            Err(SecretError::Read { .. })
        ));
    }

    #[test]
    fn debug_shows_nothing_of_the_value() {
        let s = Secret::new(b"sk-live-secret".to_vec());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
    }

    #[test]
    fn a_missing_variable_is_named() {
        let e = load(
            "k",
            &SecretSource::Env("AGENTWATCH_TEST_SURELY_UNSET".into()),
        )
        .expect_err("refused");
        assert!(
            e.to_string().contains("AGENTWATCH_TEST_SURELY_UNSET"),
            "{e}"
        );
    }
}
