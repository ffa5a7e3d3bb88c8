//! The HTTP server thread: accepts connections on the API socket, parses and routes each
//! request, hands it to the control loop through the internal API and writes the answer.
//!
//! The socket is owner-only. A lock file next to it (`PATH.lock`, held with `flock` for the
//! life of the process) keeps two VMMs off one path, while a socket file left by a process
//! that died is simply replaced.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::fds::{FdReader, Fds};
use crate::http::{self, HttpError};
use crate::request::{ApiAction, ApiError, ApiReply, ApiResponse, ApiSender};
use crate::routes::{self, Endpoint, RouteError};
use crate::{NetConfig, VmConfig};

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process holds the socket's lock.
    #[error("API socket {0} is in use by another baton")]
    InUse(PathBuf),
    /// The lock file could not be opened.
    #[error("Cannot open lock file {0}")]
    Lock(PathBuf, #[source] std::io::Error),
    /// bind/listen failed.
    #[error("Cannot listen on API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The inherited descriptor is not a listening UNIX socket.
    #[error("File descriptor {0} is not a listening UNIX socket")]
    BadFd(RawFd),
    /// The server thread could not start.
    #[error("Cannot start the API server thread")]
    Thread(#[source] std::io::Error),
}

/// The integer socket option `opt` of `fd`, if `fd` is a socket.
fn socket_option(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Removes a leftover socket file at `path`. Anything else there (a typo naming a disk image)
/// is left alone, and binding then fails with "address in use".
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A bound API socket; the lock stays held while this lives.
pub struct ApiSocket {
    listener: UnixListener,
    _lock: Option<File>,
}

impl ApiSocket {
    /// Binds `path` owner-only, refusing if another live baton serves it.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ServerError::Lock(lock_path.clone(), e))?;
        // SAFETY: flock on a descriptor we own, with valid flags.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ServerError::InUse(path.to_owned()));
        }
        // We hold the lock, so a socket file there belongs to a baton that is gone.
        remove_stale_socket(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
        let listener =
            UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServerError::Bind(path.to_owned(), e))?;
        Ok(ApiSocket {
            listener,
            _lock: Some(lock),
        })
    }

    /// Takes over an inherited, already listening socket.
    pub fn from_fd(fd: RawFd) -> Result<Self, ServerError> {
        // The API is unauthenticated: it may only ever listen on a UNIX socket.
        let listening = socket_option(fd, libc::SO_ACCEPTCONN).is_some_and(|v| v != 0);
        let unix = socket_option(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX);
        if !listening || !unix {
            return Err(ServerError::BadFd(fd));
        }
        // SAFETY: fcntl on a descriptor we checked; the accept loop needs blocking accepts,
        // and children baton starts must not inherit the API.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller hands us `fd`, a listening socket nobody else owns.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(ApiSocket {
            listener,
            _lock: None,
        })
    }

    /// Serves the socket on its own thread, sending requests through `sender`.
    pub fn serve(self, sender: ApiSender) -> Result<Server, ServerError> {
        let server = Server::default();
        let in_flight = server.in_flight.clone();
        std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                let _lock = self._lock;
                for stream in self.listener.incoming() {
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            // Out of descriptors, say: wait rather than spin.
                            log::warn!("API: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let Ok(sender) = sender.try_clone() else {
                        continue;
                    };
                    let in_flight = in_flight.clone();
                    // One thread per connection: a client that holds its connection open
                    // must not block the others.
                    let spawned = std::thread::Builder::new()
                        .name("http-client".into())
                        .spawn(move || serve_connection(stream, &sender, &in_flight));
                    if let Err(e) = spawned {
                        log::warn!("API: cannot serve a connection: {e}");
                    }
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(server)
    }
}

/// Requests being handled: read, but their answers not yet written.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn start(&self) {
        *self.count.lock().expect("API lock poisoned") += 1;
    }

    fn finish(&self) {
        let mut n = self.count.lock().expect("API lock poisoned");
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }
}

/// A running API server.
#[derive(Default)]
pub struct Server {
    in_flight: Arc<InFlight>,
}

impl Server {
    /// Waits (up to `timeout`) until every answer has been written, so that a VMM ending on
    /// `vmm.shutdown` still answers it.
    pub fn drain(&self, timeout: Duration) {
        let n = self.in_flight.count.lock().expect("API lock poisoned");
        let _ = self
            .in_flight
            .idle
            .wait_timeout_while(n, timeout, |n| *n > 0);
    }
}

fn error_body(chain: &[String]) -> Vec<u8> {
    serde_json::to_vec(chain).expect("strings serialise")
}

/// `body` as the JSON of a `what` request.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        chain: vec![
            format!("Invalid {what} configuration in request body"),
            e.to_string(),
        ],
    })
}

/// The action for `endpoint` with `body` and the descriptors that came with it, or the error
/// to answer.
pub fn action_for(endpoint: Endpoint, body: &[u8], fds: Fds) -> Result<ApiAction, ApiError> {
    let takes_fds = matches!(
        endpoint,
        Endpoint::VmCreate
            | Endpoint::VmAddNet
            | Endpoint::VmRestore
            | Endpoint::VmReceiveMigration
    );
    if !takes_fds && !fds.is_empty() {
        return Err(ApiError::message(
            400,
            format!(
                "{} file descriptor(s) came with a request that takes none",
                fds.len()
            ),
        ));
    }
    Ok(match endpoint {
        Endpoint::VmmPing => ApiAction::VmmPing,
        Endpoint::VmmShutdown => ApiAction::VmmShutdown,
        Endpoint::VmmBackendTransferSupport => ApiAction::VmmBackendTransferSupport,
        Endpoint::VmCreate => {
            let config: VmConfig = serde_json::from_slice(body).map_err(|e| ApiError {
                status: 400,
                chain: vec![
                    "Invalid VM configuration in request body".to_string(),
                    e.to_string(),
                ],
            })?;
            ApiAction::VmCreate(Box::new(config), fds)
        }
        Endpoint::VmAddNet => {
            let net: NetConfig = serde_json::from_slice(body).map_err(|e| ApiError {
                status: 400,
                chain: vec![
                    "Invalid network configuration in request body".to_string(),
                    e.to_string(),
                ],
            })?;
            ApiAction::VmAddNet(Box::new(net), fds)
        }
        Endpoint::VmSnapshot => ApiAction::VmSnapshot(parse_body(body, "snapshot")?),
        Endpoint::VmRestore => ApiAction::VmRestore(parse_body(body, "restore")?, fds),
        Endpoint::VmSendMigration => {
            ApiAction::VmSendMigration(parse_body(body, "send-migration")?)
        }
        Endpoint::VmReceiveMigration => {
            ApiAction::VmReceiveMigration(parse_body(body, "receive-migration")?, fds)
        }
        Endpoint::VmBoot => ApiAction::VmBoot,
        Endpoint::VmInfo => ApiAction::VmInfo,
        Endpoint::VmCounters => ApiAction::VmCounters,
        Endpoint::VmPause => ApiAction::VmPause,
        Endpoint::VmResume => ApiAction::VmResume,
        Endpoint::VmShutdown => ApiAction::VmShutdown,
        Endpoint::VmReboot => ApiAction::VmReboot,
        Endpoint::VmPowerButton => ApiAction::VmPowerButton,
        Endpoint::VmDelete => ApiAction::VmDelete,
    })
}

/// Handles one parsed request end to end; also returns the method a 405 should allow.
fn handle(
    sender: &ApiSender,
    request: &http::Request,
    fds: Fds,
) -> (ApiResponse, Option<&'static str>) {
    let endpoint = match routes::route(&request.method, &request.path) {
        Ok(e) => e,
        Err(e) => {
            let allow = match &e {
                RouteError::MethodNotAllowed { allowed, .. } => Some(*allowed),
                RouteError::NotFound(_) => None,
            };
            return (Err(ApiError::new(e.status(), &e)), allow);
        }
    };
    (
        action_for(endpoint, &request.body, fds).and_then(|a| sender.call(a)),
        None,
    )
}

fn serve_connection(stream: UnixStream, sender: &ApiSender, in_flight: &InFlight) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(FdReader::new(stream));
    let mut writer = BufWriter::new(write_half);
    loop {
        let request = match http::read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) | Err(HttpError::Io(_)) => return,
            Err(e) => {
                // The stream is out of step after a bad request: answer, then close.
                let body = error_body(&ApiError::new(e.status(), &e).chain);
                let _ = http::write_response(&mut writer, e.status(), Some(&body), true, None);
                return;
            }
        };
        in_flight.start();
        // Descriptors sent with this request arrived with its first bytes.
        let fds = reader.get_mut().take_fds();
        let (response, allow) = handle(sender, &request, fds);
        let (status, body) = match response {
            Ok(ApiReply::Empty) => (204, None),
            Ok(ApiReply::Json(v)) => (
                200,
                Some(serde_json::to_vec(&v).expect("JSON values serialise")),
            ),
            Err(e) => (e.status, Some(error_body(&e.chain))),
        };
        let written =
            http::write_response(&mut writer, status, body.as_deref(), request.close, allow);
        in_flight.finish();
        if written.is_err() || request.close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_errors_are_400_with_the_cause() {
        let e = action_for(Endpoint::VmCreate, b"{not json", Vec::new()).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.chain.len(), 2);
        let e = action_for(
            Endpoint::VmCreate,
            br#"{"payload":{},"bogus":1}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert!(e.chain[1].contains("bogus"), "{:?}", e.chain);
        let e = action_for(
            Endpoint::VmCreate,
            br#"{"payload":{},"cpus":{"boot_vcpus":"x","max_vcpus":1}}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(matches!(
            action_for(
                Endpoint::VmCreate,
                br#"{"payload":{"kernel":"/k"}}"#,
                Vec::new()
            ),
            Ok(ApiAction::VmCreate(..))
        ));
    }

    #[test]
    fn socket_lock_refuses_a_second_server_and_replaces_stale_files() {
        let dir = std::env::temp_dir().join(format!("baton-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A regular file at the path (a typo naming a disk image) is never removed.
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::Bind(..))));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A socket file nobody serves, as a killed VMM leaves behind, is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let first = ApiSocket::bind(&path).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::InUse(_))));
        drop(first);
        ApiSocket::bind(&path).expect("lock released with its holder");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
