//! A client that speaks to an API socket exactly as Cloud Hypervisor v53's `ch-remote` does
//! (its `api_client` crate, read for facts): the request line, `Host` and `Accept` in one
//! `sendmsg` that carries any descriptors, then `Content-Length`, the blank line and the body
//! in separate writes, no `Content-Type`; the answer's status is the text after `HTTP/1.1 `
//! up to the line end, trimmed, as an integer; the body is read by the literal
//! `Content-Length: ` header; only 100, 200 and 204 count as success. The bodies in
//! [`bodies`] are what ch-remote v53 serialises, every default field included.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// What ch-remote would report.
#[derive(Debug)]
pub enum ChError {
    /// The socket failed.
    Socket(std::io::Error),
    /// No `HTTP/1.1` in the answer.
    MissingProtocol(String),
    /// The status is not a number.
    StatusCodeParsing(String),
    /// A status other than 100, 200 or 204, with the body.
    ServerResponse(u16, Option<String>),
}

/// A ch-remote-like client of one API socket.
pub struct ChClient {
    socket: PathBuf,
}

impl ChClient {
    /// A client of the API socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        ChClient {
            socket: socket.to_owned(),
        }
    }

    /// `METHOD /api/v1/COMMAND` with `body` and `fds`; the body of a successful answer.
    pub fn call(
        &self,
        method: &str,
        command: &str,
        body: Option<&str>,
        fds: &[RawFd],
    ) -> Result<Option<String>, ChError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(ChError::Socket)?;
        let head =
            format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        api::fds::send_with_fds(&stream, head.as_bytes(), fds).map_err(ChError::Socket)?;
        if let Some(body) = body {
            stream
                .write_all(format!("Content-Length: {}\r\n", body.len()).as_bytes())
                .map_err(ChError::Socket)?;
        }
        stream.write_all(b"\r\n").map_err(ChError::Socket)?;
        if let Some(body) = body {
            stream.write_all(body.as_bytes()).map_err(ChError::Socket)?;
        }
        stream.flush().map_err(ChError::Socket)?;
        parse_response(&mut stream)
    }
}

/// Reads an answer the way api_client does.
fn parse_response(stream: &mut UnixStream) -> Result<Option<String>, ChError> {
    let mut res = String::new();
    let mut body_offset = None;
    let mut content_length: Option<usize> = None;
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).map_err(ChError::Socket)?;
        if n == 0 {
            break;
        }
        res.push_str(&String::from_utf8_lossy(&buf[..n]));
        if body_offset.is_none() {
            if let Some(o) = res.find("\r\n\r\n") {
                body_offset = Some(o + 4);
                // Only the literal, case-sensitive header, as api_client looks for it.
                if let Some(h) = res[..o].find("Content-Length: ") {
                    let rest = &res[h + "Content-Length: ".len()..];
                    let end = rest.find("\r\n").unwrap_or(rest.len());
                    content_length = Some(
                        rest[..end]
                            .trim()
                            .parse()
                            .map_err(|_| ChError::StatusCodeParsing(rest[..end].into()))?,
                    );
                } else {
                    break;
                }
            }
        }
        if let (Some(o), Some(len)) = (body_offset, content_length) {
            if res.len() >= o + len {
                break;
            }
        }
    }
    let proto = res
        .find("HTTP/1.1")
        .ok_or_else(|| ChError::MissingProtocol(res.clone()))?;
    let line = &res[proto + "HTTP/1.1 ".len()..];
    let line = &line[..line.find('\r').unwrap_or(line.len())];
    let status: u16 = line
        .trim()
        .parse()
        .map_err(|_| ChError::StatusCodeParsing(line.to_string()))?;
    let body = match (body_offset, content_length) {
        (Some(o), Some(len)) if len > 0 => Some(res[o..(o + len).min(res.len())].to_string()),
        _ => None,
    };
    match status {
        100 | 200 | 204 => Ok(body),
        _ => Err(ChError::ServerResponse(status, body)),
    }
}

/// Request bodies as ch-remote v53 serialises them (the option string it was given, every
/// other field at Cloud Hypervisor's default; unset optional fields left out).
pub mod bodies {
    use serde_json::{json, Value};

    /// `add-net` for a card on passed descriptors (`fd=[..]` goes with SCM_RIGHTS).
    pub fn add_net(id: &str, mac: &str, num_queues: usize) -> Value {
        json!({
            "pci_segment": 0, "id": id, "mac": mac, "num_queues": num_queues,
            "queue_size": 256, "vhost_user": false, "vhost_mode": "Client",
            "offload_tso": true, "offload_ufo": true, "offload_csum": true,
        })
    }

    /// `add-disk path=PATH,id=ID`.
    pub fn add_disk(id: &str, path: &str) -> Value {
        json!({
            "pci_segment": 0, "id": id, "path": path, "readonly": false, "direct": false,
            "num_queues": 1, "queue_size": 128, "vhost_user": false,
            "disable_io_uring": false, "disable_aio": false, "backing_files": false,
            "sparse": true, "image_type": "Unknown", "lock_granularity": "ByteRange",
        })
    }

    /// `remove-device ID`.
    pub fn remove_device(id: &str) -> Value {
        json!({ "id": id })
    }

    /// `snapshot URL`.
    pub fn snapshot(url: &str) -> Value {
        json!({ "destination_url": url })
    }

    /// `restore source_url=URL,net_fds=[id@[fds]]` (the descriptors go with SCM_RIGHTS).
    pub fn restore(url: &str, net_id: &str, num_fds: usize) -> Value {
        json!({
            "source_url": url, "prefault": false, "memory_restore_mode": "Copy",
            "net_fds": [{"id": net_id, "num_fds": num_fds, "fds": null}], "resume": false,
        })
    }

    /// `send-migration destination_url=URL,local=on`.
    pub fn send_migration(url: &str, local: bool) -> Value {
        json!({
            "destination_url": url, "local": local, "downtime_ms": 300, "timeout_s": 3600,
            "timeout_strategy": "Cancel", "connections": 1, "tls_dir": null,
            "memory_mode": "Precopy",
        })
    }

    /// `receive-migration receiver_url=URL`.
    pub fn receive_migration(url: &str) -> Value {
        json!({ "receiver_url": url, "tls_dir": null, "memory_mode": "Precopy" })
    }

    /// A VmConfig with the fields Cloud Hypervisor fills in by default, as a generated
    /// client or `ch-remote info` shows them, for a guest with `kernel`, `cmdline` and its
    /// serial port on the UNIX socket `serial`.
    pub fn vm_config(kernel: &str, cmdline: &str, serial: &str, memory: u64) -> Value {
        json!({
            "cpus": {
                "boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46,
                "features": {"amx": false}, "nested": true, "core_scheduling": "Vm",
            },
            "memory": {
                "size": memory, "mergeable": false, "hotplug_method": "Acpi", "shared": true,
                "hugepages": false, "prefault": false, "reserve": false, "thp": true,
            },
            "payload": {"kernel": kernel, "cmdline": cmdline},
            "rng": {"src": "/dev/urandom", "pci_segment": 0},
            "serial": {"mode": "Socket", "socket": serial},
            "console": {"mode": "Off", "pci_segment": 0},
            "debug_console": {"mode": "Off", "iobase": 233},
            "pvpanic": false, "iommu": false, "watchdog": false, "landlock_enable": false,
            "platform": {
                "num_pci_segments": 1, "iommu_address_width_bits": 64, "iommufd": false,
                "vfio_p2p_dma": true,
            },
        })
    }
}
