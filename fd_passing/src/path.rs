//! UNIX socket paths: bound owner-only from their first moment, never over or through
//! anything that is not a socket of ours.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

/// Serialises the umask changes of [`bind_owner_only`] within this process.
static UMASK: Mutex<()> = Mutex::new(());

/// Binds a listening socket at `path`, readable and writable by its owner only from the
/// moment it exists: the process's umask is narrowed around bind(2), so there is no window
/// in which the socket has wider permissions. (The umask is the process's: a file another
/// thread creates in that instant gets narrower permissions, never wider.) bind(2) never
/// replaces anything: a file, a directory or a symlink (dangling or not) at `path` makes it
/// fail with "address in use"; remove a stale socket first with [`remove_stale_socket`].
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let _serial = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask only swaps the process's file mode mask; the old one is put back below.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Removes `path` if it is a socket file (left by a process that is gone: callers check
/// that first). Anything else there (a typo naming a disk image, a symlink) is left alone,
/// and binding then fails with "address in use".
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fd-passing-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).expect("a directory");
        d
    }

    #[test]
    fn a_socket_is_owner_only_and_nothing_else_is_replaced_or_followed() {
        let d = dir("bind");
        let sock = d.join("s.sock");
        let listener = bind_owner_only(&sock).expect("binds");
        let mode = std::fs::metadata(&sock)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);

        // A stale socket goes; a file, a symlink and its target stay.
        remove_stale_socket(&sock).expect("removes");
        assert!(!sock.exists());
        let file = d.join("disk.img");
        std::fs::write(&file, b"data").expect("a file");
        remove_stale_socket(&file).expect("leaves it");
        assert_eq!(std::fs::read(&file).expect("still there"), b"data");
        let e = bind_owner_only(&file).expect_err("never over a file");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        let link = d.join("link.sock");
        let target = d.join("target.sock");
        std::os::unix::fs::symlink(&target, &link).expect("a dangling symlink");
        remove_stale_socket(&link).expect("leaves it");
        let e = bind_owner_only(&link).expect_err("never through a symlink");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(
            !target.exists(),
            "nothing was created at the symlink's target"
        );
        remove_stale_socket(&d.join("missing")).expect("nothing to do");
        std::fs::remove_dir_all(&d).expect("clean up");
    }
}
