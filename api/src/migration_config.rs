//! Request bodies of the snapshot, restore and migration endpoints, as JSON and as option
//! strings (`baton-remote snapshot file:///dir`, `baton --restore source_url=...`).
//!
//! URLs are checked for their form here (which scheme each endpoint takes); whether the path
//! or peer is usable is the VMM's business when it acts.

use serde::{Deserialize, Serialize};

use crate::option_parser::{parse_int, parse_toggle, OptionError, OptionParser};

/// `vm.snapshot`: where to write the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `file:///path/to/dir`: a new or empty directory.
    pub destination_url: String,
}

/// Descriptors for one network card, passed with SCM_RIGHTS in the order of the list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetFds {
    /// The card's id.
    pub id: String,
    /// How many descriptors are its (one per queue pair).
    pub num_fds: usize,
}

/// `vm.restore` and `--restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///path/to/dir` written by `vm.snapshot`.
    pub source_url: String,
    /// Network cards that take new TAP descriptors instead of opening their TAP by name.
    #[serde(default)]
    pub net_fds: Vec<NetFds>,
    /// (+) Resume the guest once restored (otherwise it waits, paused, for vm.resume).
    #[serde(default)]
    pub resume: bool,
}

fn default_downtime() -> u64 {
    300
}

fn default_timeout() -> u64 {
    3600
}

/// `vm.send-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationConfig {
    /// `unix:/path` or `tcp:host:port` of a baton waiting in vm.receive-migration.
    pub destination_url: String,
    /// Hand guest memory over as file descriptors (shared memory, UNIX socket) instead of
    /// copying it.
    #[serde(default)]
    pub local: bool,
    /// Longest pause the guest should see, in milliseconds: pre-copy iterates until what is
    /// left can be sent in that time.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Give up (and keep running here) after this many seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// (+) Hand device backends (TAP descriptors) to the destination.
    #[serde(default)]
    pub backend_transfer: bool,
}

/// `vm.receive-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationConfig {
    /// `unix:/path` or `tcp:host:port` to listen on.
    pub receiver_url: String,
    /// (+) Accept device backends (TAP descriptors) from the source.
    #[serde(default)]
    pub backend_transfer: bool,
    /// Network cards that take new TAP descriptors instead of opening their TAP by name.
    #[serde(default)]
    pub net_fds: Vec<NetFds>,
}

/// A URL whose scheme the endpoint does not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} '{url}' is not {expected}")]
pub struct UrlError {
    /// The field.
    pub field: &'static str,
    /// The value.
    pub url: String,
    /// The forms accepted.
    pub expected: &'static str,
}

fn check_url(
    field: &'static str,
    url: &str,
    schemes: &[&str],
    expected: &'static str,
) -> Result<(), UrlError> {
    let ok = schemes
        .iter()
        .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(UrlError {
            field,
            url: url.to_string(),
            expected,
        })
    }
}

const FILE_URL: &str = "a file:///directory URL";
const STREAM_URL: &str = "a unix:/path or tcp:host:port URL";

impl SnapshotConfig {
    /// Parses `destination_url=...` or just the URL.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["destination_url"], Some("destination_url"))?;
        Ok(SnapshotConfig {
            destination_url: p.required("destination_url")?.to_string(),
        })
    }

    /// Checks the URL's form.
    pub fn validate(&self) -> Result<(), UrlError> {
        check_url(
            "destination_url",
            &self.destination_url,
            &["file://"],
            FILE_URL,
        )
    }
}

impl RestoreConfig {
    /// Help text for `--restore`.
    pub const SYNTAX: &'static str = "Restore a snapshot instead of booting: \
        \"source_url=file:///dir,resume=on|off\" (resume: run the guest at once; otherwise it \
        waits, paused, for vm.resume)";

    /// Parses `source_url=...,resume=on` (net_fds only come through the API).
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["source_url", "resume"], Some("source_url"))?;
        Ok(RestoreConfig {
            source_url: p.required("source_url")?.to_string(),
            net_fds: Vec::new(),
            resume: p.convert("resume", parse_toggle)?.unwrap_or(false),
        })
    }

    /// Checks the URL's form.
    pub fn validate(&self) -> Result<(), UrlError> {
        check_url("source_url", &self.source_url, &["file://"], FILE_URL)
    }
}

impl SendMigrationConfig {
    /// Parses `destination_url=...,local=on,downtime_ms=N,timeout_s=N,backend_transfer=on`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let keys = [
            "destination_url",
            "local",
            "downtime_ms",
            "timeout_s",
            "backend_transfer",
        ];
        let p = OptionParser::parse(s, &keys, Some("destination_url"))?;
        Ok(SendMigrationConfig {
            destination_url: p.required("destination_url")?.to_string(),
            local: p.convert("local", parse_toggle)?.unwrap_or(false),
            downtime_ms: p
                .convert("downtime_ms", parse_int::<u64>)?
                .unwrap_or_else(default_downtime),
            timeout_s: p
                .convert("timeout_s", parse_int::<u64>)?
                .unwrap_or_else(default_timeout),
            backend_transfer: p
                .convert("backend_transfer", parse_toggle)?
                .unwrap_or(false),
        })
    }

    /// Checks the URL's form.
    pub fn validate(&self) -> Result<(), UrlError> {
        check_url(
            "destination_url",
            &self.destination_url,
            &["unix:", "tcp:"],
            STREAM_URL,
        )
    }
}

impl ReceiveMigrationConfig {
    /// Parses `receiver_url=...,backend_transfer=on` (net_fds only come through the API).
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(
            s,
            &["receiver_url", "backend_transfer"],
            Some("receiver_url"),
        )?;
        Ok(ReceiveMigrationConfig {
            receiver_url: p.required("receiver_url")?.to_string(),
            backend_transfer: p
                .convert("backend_transfer", parse_toggle)?
                .unwrap_or(false),
            net_fds: Vec::new(),
        })
    }

    /// Checks the URL's form.
    pub fn validate(&self) -> Result<(), UrlError> {
        check_url(
            "receiver_url",
            &self.receiver_url,
            &["unix:", "tcp:"],
            STREAM_URL,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings() {
        let s = SnapshotConfig::from_option_string("file:///tmp/snap").unwrap();
        assert_eq!(s.destination_url, "file:///tmp/snap");
        s.validate().unwrap();
        let r = RestoreConfig::from_option_string("source_url=file:///x,resume=on").unwrap();
        assert!(r.resume);
        let m = SendMigrationConfig::from_option_string(
            "destination_url=unix:/run/m.sock,local=on,downtime_ms=50",
        )
        .unwrap();
        assert!(m.local && !m.backend_transfer);
        assert_eq!((m.downtime_ms, m.timeout_s), (50, 3600));
        m.validate().unwrap();
        let r = ReceiveMigrationConfig::from_option_string("tcp:127.0.0.1:6000").unwrap();
        r.validate().unwrap();
    }

    #[test]
    fn bad_urls_and_keys_are_refused() {
        let bad = SnapshotConfig {
            destination_url: "/tmp/snap".into(),
        };
        let e = bad.validate().unwrap_err();
        assert!(e.to_string().contains("file:///"), "{e}");
        let bad = SendMigrationConfig::from_option_string("destination_url=file:///x").unwrap();
        assert!(bad.validate().is_err());
        assert!(SendMigrationConfig::from_option_string("unix:/x,speed=9").is_err());
        assert!(SendMigrationConfig::from_option_string("unix:/x,local=maybe").is_err());
        let e = ReceiveMigrationConfig::from_option_string("receiver_url=unix:")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("unix:/path"), "{e}");
        // JSON bodies reject unknown fields.
        let j = r#"{"destination_url":"unix:/x","speed":1}"#;
        assert!(serde_json::from_str::<SendMigrationConfig>(j).is_err());
    }
}
