//! Request bodies of the snapshot, restore and migration endpoints, as JSON and as option
//! strings (`baton-remote snapshot file:///dir`, `baton --restore source_url=...`).
//!
//! URLs are checked for their form here (which scheme each endpoint takes); whether the path
//! or peer is usable is the VMM's business when it acts.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::compat::{
    only, MemoryRestoreMode, MigrationMemoryMode, Supported, TimeoutStrategy, Unsupported,
};

use crate::option_parser::{parse_fds_by_id, parse_int, parse_toggle, OptionError, OptionParser};

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
    #[serde(default)]
    pub num_fds: usize,
    /// Descriptor numbers as the client knows them: ignored, as descriptors only ever
    /// arrive with SCM_RIGHTS.
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
}

/// `vm.restore` and `--restore`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///path/to/dir` written by `vm.snapshot`.
    pub source_url: String,
    /// Network cards that take new TAP descriptors instead of opening their TAP by name.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub net_fds: Vec<NetFds>,
    /// Resume the guest once restored (otherwise it waits, paused, for vm.resume).
    #[serde(default)]
    pub resume: bool,
    /// Cloud Hypervisor's prefault switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    /// Cloud Hypervisor's memory restore mode; only `Copy` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<MemoryRestoreMode>,
}

fn parse_memory_mode(v: &str) -> Result<MigrationMemoryMode, String> {
    match v {
        "precopy" => Ok(MigrationMemoryMode::Precopy),
        "postcopy" => Ok(MigrationMemoryMode::Postcopy),
        _ => Err("expected precopy or postcopy".to_string()),
    }
}

/// `net_fds=[net0@[3,4],net1@[5]]`: the descriptors stay with the caller, who passes them
/// with SCM_RIGHTS; the body carries the counts.
fn parse_net_fds(v: &str) -> Result<Vec<NetFds>, String> {
    Ok(parse_fds_by_id(v)?
        .into_iter()
        .map(|(id, fds)| NetFds {
            id,
            num_fds: fds.len(),
            fds: Some(fds),
        })
        .collect())
}

impl RestoreConfig {
    /// The descriptor numbers named in `net_fds`, in order, taken out of the configuration.
    pub fn take_fds(&mut self) -> Vec<i32> {
        take_net_fds(&mut self.net_fds)
    }
}

impl ReceiveMigrationConfig {
    /// The descriptor numbers named in `net_fds`, in order, taken out of the configuration.
    pub fn take_fds(&mut self) -> Vec<i32> {
        take_net_fds(&mut self.net_fds)
    }
}

fn take_net_fds(net_fds: &mut [NetFds]) -> Vec<i32> {
    net_fds
        .iter_mut()
        .flat_map(|n| n.fds.take().unwrap_or_default())
        .collect()
}

/// `null` (as Cloud Hypervisor's clients send for "none") as an empty list.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl Supported for RestoreConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        only(
            "prefault",
            &self.prefault,
            &[false],
            "baton does not prefault guest memory",
        )?;
        only(
            "memory_restore_mode",
            &self.memory_restore_mode,
            &[MemoryRestoreMode::Copy],
            "baton reads the whole snapshot before the guest runs",
        )
    }
}

fn default_downtime() -> u64 {
    300
}

fn default_timeout() -> u64 {
    3600
}

/// How long, by default, either side of a migration waits for its peer to send or take a
/// byte before giving up.
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 60;

fn default_step_timeout() -> u64 {
    DEFAULT_STEP_TIMEOUT_S
}

/// The longest `step_timeout_s` taken: a day.
pub const MAX_STEP_TIMEOUT_S: u64 = 86_400;

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
    /// left can be sent in that time (`downtime_limit_ms` is the same).
    #[serde(default = "default_downtime", alias = "downtime_limit_ms")]
    pub downtime_ms: u64,
    /// Give up (and keep running here) after this many seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// (+) Hand device backends (TAP descriptors) to the destination.
    #[serde(default)]
    pub backend_transfer: bool,
    /// (+) When pre-copy does not converge, slow the guest's vCPUs down, more with each
    /// pass, until what is left fits `downtime_ms`.
    #[serde(default)]
    pub auto_converge: bool,
    /// (+) Give up (and keep running here) when the destination has sent nothing, or taken
    /// no byte, for this many seconds at any step.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_s: u64,
    /// Cloud Hypervisor's timeout strategy; only `Cancel` (its default, and what baton does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_strategy: Option<TimeoutStrategy>,
    /// Cloud Hypervisor's parallel connections; only 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Cloud Hypervisor's TLS directory; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Cloud Hypervisor's memory mode; only `Precopy` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<MigrationMemoryMode>,
}

/// An empty URL with every other field as a JSON body that leaves it out gets it.
impl Default for SendMigrationConfig {
    fn default() -> Self {
        SendMigrationConfig {
            destination_url: String::new(),
            local: false,
            downtime_ms: default_downtime(),
            timeout_s: default_timeout(),
            backend_transfer: false,
            auto_converge: false,
            step_timeout_s: default_step_timeout(),
            timeout_strategy: None,
            connections: None,
            tls_dir: None,
            memory_mode: None,
        }
    }
}

fn check_tls_and_mode(
    tls_dir: &Option<PathBuf>,
    memory_mode: &Option<MigrationMemoryMode>,
) -> Result<(), Unsupported> {
    only(
        "tls_dir",
        tls_dir,
        &[],
        "baton migrates over UNIX sockets or plain TCP, without TLS",
    )?;
    only(
        "memory_mode",
        memory_mode,
        &[MigrationMemoryMode::Precopy],
        "baton migrates memory by pre-copy",
    )
}

impl Supported for SendMigrationConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        only(
            "timeout_strategy",
            &self.timeout_strategy,
            &[TimeoutStrategy::Cancel],
            "baton always gives up and keeps the VM running here when the timeout passes",
        )?;
        only(
            "connections",
            &self.connections,
            &[1],
            "baton migrates over one connection",
        )?;
        check_tls_and_mode(&self.tls_dir, &self.memory_mode)
    }
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
    #[serde(default, deserialize_with = "null_as_empty")]
    pub net_fds: Vec<NetFds>,
    /// (+) Drop what arrived (and be ready to receive again) when the source, once
    /// connected, has sent nothing, or taken no byte, for this many seconds at any step.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_s: u64,
    /// Cloud Hypervisor's TLS directory; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Cloud Hypervisor's memory mode; only `Precopy` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<MigrationMemoryMode>,
}

/// An empty URL with every other field as a JSON body that leaves it out gets it.
impl Default for ReceiveMigrationConfig {
    fn default() -> Self {
        ReceiveMigrationConfig {
            receiver_url: String::new(),
            backend_transfer: false,
            net_fds: Vec::new(),
            step_timeout_s: default_step_timeout(),
            tls_dir: None,
            memory_mode: None,
        }
    }
}

impl Supported for ReceiveMigrationConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        check_tls_and_mode(&self.tls_dir, &self.memory_mode)
    }
}

/// (+) `vmm.live-upgrade`: the baton binary that takes the VM over from this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveUpgradeConfig {
    /// The new baton binary, as an absolute path.
    #[serde(alias = "binary_path")]
    pub binary: PathBuf,
    /// Give up (and keep the VM running here) when the new baton has sent nothing, or taken
    /// no byte, for this many seconds at any step.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_s: u64,
}

impl Supported for LiveUpgradeConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        Ok(())
    }
}

impl LiveUpgradeConfig {
    /// Parses `binary=PATH[,step_timeout_s=N]` or just the path.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["binary", "step_timeout_s"], Some("binary"))?;
        Ok(LiveUpgradeConfig {
            binary: PathBuf::from(p.required("binary")?),
            step_timeout_s: p
                .convert("step_timeout_s", parse_int::<u64>)?
                .unwrap_or_else(default_step_timeout),
        })
    }

    /// Checks that the binary is named by an absolute path (baton does not guess what a
    /// relative one was relative to), and the step timeout.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.binary.is_absolute() {
            return Err(FieldError {
                field: "binary",
                value: self.binary.display().to_string(),
                expected: "an absolute path",
            });
        }
        check_step_timeout(self.step_timeout_s)
    }
}

impl Supported for SnapshotConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        Ok(())
    }
}

/// A field whose value the endpoint does not take: a URL of another scheme, a timeout out
/// of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} '{value}' is not {expected}")]
pub struct FieldError {
    /// The field.
    pub field: &'static str,
    /// The value.
    pub value: String,
    /// The values accepted.
    pub expected: &'static str,
}

fn check_url(
    field: &'static str,
    url: &str,
    schemes: &[&str],
    expected: &'static str,
) -> Result<(), FieldError> {
    let ok = schemes
        .iter()
        .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(FieldError {
            field,
            value: url.to_string(),
            expected,
        })
    }
}

fn check_step_timeout(seconds: u64) -> Result<(), FieldError> {
    if (1..=MAX_STEP_TIMEOUT_S).contains(&seconds) {
        Ok(())
    } else {
        Err(FieldError {
            field: "step_timeout_s",
            value: seconds.to_string(),
            expected: "a number of seconds from 1 to 86400",
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
    pub fn validate(&self) -> Result<(), FieldError> {
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

    /// Parses `source_url=...,resume=on,net_fds=[net0@[3,4]]`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(
            s,
            &[
                "source_url",
                "resume",
                "net_fds",
                "prefault",
                "memory_restore_mode",
            ],
            Some("source_url"),
        )?;
        Ok(RestoreConfig {
            source_url: p.required("source_url")?.to_string(),
            net_fds: p.convert("net_fds", parse_net_fds)?.unwrap_or_default(),
            prefault: p.convert("prefault", parse_toggle)?,
            memory_restore_mode: p.convert("memory_restore_mode", |v| match v {
                "copy" => Ok(MemoryRestoreMode::Copy),
                "ondemand" => Ok(MemoryRestoreMode::OnDemand),
                _ => Err("expected copy or ondemand".to_string()),
            })?,
            resume: p.convert("resume", parse_toggle)?.unwrap_or(false),
        })
    }

    /// Checks the URL's form.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_url("source_url", &self.source_url, &["file://"], FILE_URL)
    }
}

impl SendMigrationConfig {
    /// Parses `destination_url=...,local=on,downtime_ms=N,timeout_s=N,backend_transfer=on,
    /// auto_converge=on,step_timeout_s=N` (`downtime_limit_ms` for `downtime_ms` too), and
    /// Cloud Hypervisor's `timeout_strategy`, `connections`, `tls_dir` and `memory_mode`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let keys = [
            "destination_url",
            "local",
            "downtime_ms",
            "downtime_limit_ms",
            "timeout_s",
            "backend_transfer",
            "auto_converge",
            "step_timeout_s",
            "timeout_strategy",
            "connections",
            "tls_dir",
            "memory_mode",
        ];
        let p = OptionParser::parse(s, &keys, Some("destination_url"))?;
        Ok(SendMigrationConfig {
            destination_url: p.required("destination_url")?.to_string(),
            local: p.convert("local", parse_toggle)?.unwrap_or(false),
            downtime_ms: match (
                p.convert("downtime_ms", parse_int::<u64>)?,
                p.convert("downtime_limit_ms", parse_int::<u64>)?,
            ) {
                (Some(_), Some(_)) => {
                    return Err(OptionError::InvalidValue {
                        key: "downtime_limit_ms".into(),
                        value: p.get("downtime_limit_ms").unwrap_or_default().into(),
                        reason: "downtime_ms is given too, and they are one setting".into(),
                    })
                }
                (Some(ms), None) | (None, Some(ms)) => ms,
                (None, None) => default_downtime(),
            },
            timeout_s: p
                .convert("timeout_s", parse_int::<u64>)?
                .unwrap_or_else(default_timeout),
            backend_transfer: p
                .convert("backend_transfer", parse_toggle)?
                .unwrap_or(false),
            auto_converge: p.convert("auto_converge", parse_toggle)?.unwrap_or(false),
            step_timeout_s: p
                .convert("step_timeout_s", parse_int::<u64>)?
                .unwrap_or_else(default_step_timeout),
            timeout_strategy: p.convert("timeout_strategy", |v| match v {
                "cancel" => Ok(TimeoutStrategy::Cancel),
                "ignore" => Ok(TimeoutStrategy::Ignore),
                _ => Err("expected cancel or ignore".to_string()),
            })?,
            connections: p.convert("connections", parse_int::<u32>)?,
            tls_dir: p.get("tls_dir").map(PathBuf::from),
            memory_mode: p.convert("memory_mode", parse_memory_mode)?,
        })
    }

    /// Checks the URL's form and the step timeout.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_url(
            "destination_url",
            &self.destination_url,
            &["unix:", "tcp:"],
            STREAM_URL,
        )?;
        check_step_timeout(self.step_timeout_s)
    }
}

impl ReceiveMigrationConfig {
    /// Parses `receiver_url=...,backend_transfer=on,net_fds=[net0@[3,4]],step_timeout_s=N`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(
            s,
            &[
                "receiver_url",
                "backend_transfer",
                "net_fds",
                "step_timeout_s",
                "tls_dir",
                "memory_mode",
            ],
            Some("receiver_url"),
        )?;
        Ok(ReceiveMigrationConfig {
            receiver_url: p.required("receiver_url")?.to_string(),
            backend_transfer: p
                .convert("backend_transfer", parse_toggle)?
                .unwrap_or(false),
            net_fds: p.convert("net_fds", parse_net_fds)?.unwrap_or_default(),
            step_timeout_s: p
                .convert("step_timeout_s", parse_int::<u64>)?
                .unwrap_or_else(default_step_timeout),
            tls_dir: p.get("tls_dir").map(PathBuf::from),
            memory_mode: p.convert("memory_mode", parse_memory_mode)?,
        })
    }

    /// Checks the URL's form and the step timeout.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_url(
            "receiver_url",
            &self.receiver_url,
            &["unix:", "tcp:"],
            STREAM_URL,
        )?;
        check_step_timeout(self.step_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_upgrade_names_an_absolute_binary() {
        let c = LiveUpgradeConfig::from_option_string("/usr/bin/baton").unwrap();
        assert_eq!(c.binary, PathBuf::from("/usr/bin/baton"));
        assert_eq!(c.step_timeout_s, DEFAULT_STEP_TIMEOUT_S);
        c.validate().unwrap();
        let json: LiveUpgradeConfig =
            serde_json::from_str(r#"{"binary_path":"/b","step_timeout_s":5}"#).unwrap();
        assert_eq!(json.step_timeout_s, 5);
        let relative = LiveUpgradeConfig::from_option_string("binary=baton").unwrap();
        assert_eq!(
            relative.validate().unwrap_err().to_string(),
            "binary 'baton' is not an absolute path"
        );
        let slow = LiveUpgradeConfig::from_option_string("/b,step_timeout_s=0").unwrap();
        assert!(slow.validate().is_err());
        assert!(LiveUpgradeConfig::from_option_string("step_timeout_s=3").is_err());
    }

    #[test]
    fn cloud_hypervisor_option_strings() {
        let mut r =
            RestoreConfig::from_option_string("source_url=file:///s,net_fds=[net0@[3,4],net1@[5]]")
                .unwrap();
        assert_eq!(r.take_fds(), vec![3, 4, 5]);
        assert_eq!(r.net_fds.len(), 2);
        assert_eq!((r.net_fds[0].num_fds, r.net_fds[1].num_fds), (2, 1));
        // The body carries the counts, never the numbers.
        let body = serde_json::to_string(&r).unwrap();
        assert!(!body.contains("\"fds\""), "{body}");
        let s = SendMigrationConfig::from_option_string(
            "destination_url=unix:/m,local=on,timeout_strategy=cancel,connections=1,\
             memory_mode=precopy",
        )
        .unwrap();
        assert!(s.local);
        assert!(s.check_supported().is_ok());
        let s = SendMigrationConfig::from_option_string("destination_url=unix:/m,connections=2")
            .unwrap();
        assert!(s.check_supported().is_err());
        let r =
            ReceiveMigrationConfig::from_option_string("receiver_url=unix:/m,net_fds=[net0@[7]]")
                .unwrap();
        assert_eq!(r.net_fds[0].fds, Some(vec![7]));
        assert!(RestoreConfig::from_option_string("source_url=file:///s,net_fds=[net0]").is_err());
    }

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
        assert!(m.local && !m.backend_transfer && !m.auto_converge);
        assert_eq!((m.downtime_ms, m.timeout_s), (50, 3600));
        m.validate().unwrap();
        // downtime_limit_ms names the same setting, in a body and in an option string.
        let m = SendMigrationConfig::from_option_string(
            "tcp:127.0.0.1:6000,downtime_limit_ms=20,auto_converge=on",
        )
        .unwrap();
        assert_eq!(m.downtime_ms, 20);
        assert!(m.auto_converge);
        let e = SendMigrationConfig::from_option_string(
            "tcp:127.0.0.1:6000,downtime_limit_ms=20,downtime_ms=30",
        )
        .unwrap_err();
        assert!(e.to_string().contains("downtime_ms is given too"), "{e}");
        let m: SendMigrationConfig = serde_json::from_str(
            r#"{"destination_url":"tcp:127.0.0.1:6000","downtime_limit_ms":7,"auto_converge":true}"#,
        )
        .unwrap();
        assert_eq!((m.downtime_ms, m.auto_converge), (7, true));
        let both = r#"{"destination_url":"tcp:h:1","downtime_limit_ms":7,"downtime_ms":7}"#;
        assert!(serde_json::from_str::<SendMigrationConfig>(both).is_err());
        let r = ReceiveMigrationConfig::from_option_string("tcp:127.0.0.1:6000").unwrap();
        r.validate().unwrap();
        assert_eq!(r.step_timeout_s, DEFAULT_STEP_TIMEOUT_S);
        let r = ReceiveMigrationConfig::from_option_string("unix:/m,step_timeout_s=5").unwrap();
        assert_eq!(r.step_timeout_s, 5);
        let m = SendMigrationConfig::from_option_string("unix:/m,step_timeout_s=7").unwrap();
        assert_eq!(m.step_timeout_s, 7);
        // A body that leaves the fields out gets what Default gives.
        let j: SendMigrationConfig = serde_json::from_str(r#"{"destination_url":""}"#).unwrap();
        assert_eq!(j, SendMigrationConfig::default());
        let j: ReceiveMigrationConfig = serde_json::from_str(r#"{"receiver_url":""}"#).unwrap();
        assert_eq!(j, ReceiveMigrationConfig::default());
    }

    #[test]
    fn step_timeouts_out_of_range_are_refused() {
        for bad in [0, MAX_STEP_TIMEOUT_S + 1] {
            let s = SendMigrationConfig {
                destination_url: "unix:/m".into(),
                step_timeout_s: bad,
                ..Default::default()
            };
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, "step_timeout_s", "{e}");
            assert!(e.to_string().contains("from 1 to 86400"), "{e}");
            let r = ReceiveMigrationConfig {
                receiver_url: "unix:/m".into(),
                step_timeout_s: bad,
                ..Default::default()
            };
            assert_eq!(r.validate().unwrap_err(), e);
        }
        assert!(ReceiveMigrationConfig::from_option_string("unix:/m,step_timeout_s=-1").is_err());
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
