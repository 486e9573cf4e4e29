//! Who could change the daemon's own files: its config, audit trail, control socket, pins and
//! the agents' homes. The daemon refuses to start (and a reload is rejected) when anyone but
//! root could write, replace or unlink one of them, so an agent, which never runs as root
//! unless the config says so, cannot.
//!
//! A path is safe when it and every folder above it is root's and writable by no one else:
//! not by its group (unless that group is root's), not by others. A folder writable by others
//! with the sticky bit (`/tmp`) is safe above a path too: there only an entry's owner may
//! rename or unlink it, and everything below it here is root's. The path itself must not be
//! a symbolic link: whoever owns the folder it is in chose its target.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Why a path is not the daemon's alone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Exposed {
    #[error("{what} {path}: {why}; only root may be able to change it (an agent could otherwise)")]
    Writable {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{what} {path}: {reason}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Checks `path` (which may not exist yet: then its nearest existing folder above it counts)
/// and every folder above it. `what` names it in the error (e.g. "the config").
pub fn check(what: &'static str, path: &Path) -> Result<(), Exposed> {
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| Exposed::Unreadable {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            })?
            .join(path)
    };
    // Whether something below `p` exists: a sticky folder protects what is already in it, not
    // a name that anyone could still create there.
    let mut below_exists = false;
    for p in path.ancestors() {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Exposed::Unreadable {
                    what,
                    path: p.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        let writable = |why: String| Exposed::Writable {
            what,
            path: p.to_owned(),
            why,
        };
        if meta.file_type().is_symlink() {
            // Folders above may be links of root's (/var/run -> /run): the folder a link is in
            // is judged all the same, and only root could have made the link there.
            if p == path {
                return Err(writable("it is a symbolic link".to_owned()));
            }
            below_exists = true;
            continue;
        }
        let mode = meta.mode();
        if meta.uid() != 0 {
            return Err(writable(format!("it is owned by uid {}", meta.uid())));
        }
        let sticky = meta.is_dir() && mode & 0o1000 != 0 && below_exists;
        if mode & 0o020 != 0 && meta.gid() != 0 && !sticky {
            return Err(writable(format!(
                "its group (gid {}) may write it (mode {:04o})",
                meta.gid(),
                mode & 0o7777
            )));
        }
        if mode & 0o002 != 0 && !sticky {
            return Err(writable(format!(
                "everyone may write it (mode {:04o})",
                mode & 0o7777
            )));
        }
        below_exists = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn root_only_paths_pass_and_each_exposure_is_named() {
        if !root() {
            // Files made by a non-root test are not root's: nothing here would pass.
            return;
        }
        let dir = std::env::temp_dir().join(format!("agentwatch-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("agentwatch.toml");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Below /tmp (sticky, everyone may write it): fine.
        assert_eq!(check("the config", &file), Ok(()));
        assert_eq!(check("the trail", &dir.join("not-yet")), Ok(()));
        // Not yet in /tmp itself: anyone could make it first.
        let early = std::env::temp_dir().join(format!("agentwatch-own-{}-x", std::process::id()));
        assert!(check("the trail", &early).is_err());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            check("the config", &file).unwrap_err().to_string(),
            format!(
                "the config {}: everyone may write it (mode 0666); only root may be able to \
                 change it (an agent could otherwise)",
                file.display()
            )
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&file, Some(1_879_048_400), None).unwrap();
        assert!(
            check("the config", &file)
                .unwrap_err()
                .to_string()
                .contains("it is owned by uid 1879048400"),
        );
        std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        // A folder an agent could write: everything in it could be replaced.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check("the config", &file),
            Err(Exposed::Writable { path, .. }) if path == dir
        ));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            check("the config", &link)
                .unwrap_err()
                .to_string()
                .contains("it is a symbolic link")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
