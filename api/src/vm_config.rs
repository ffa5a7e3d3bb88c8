//! The VM configuration: plain data, shared by the command line and the REST API.
//!
//! Field names follow Cloud Hypervisor's `VmConfig` so existing clients can send it. Each
//! section can be built from its command-line option string (`from_option_string`) and the
//! whole is checked by [`VmConfig::validate`] before anything is built from it. Checks that need
//! the host (does the kernel file exist, is there enough memory) belong to the VMM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device_config::{self, DeviceError, DiskConfig, NetConfig, RngConfig};
use crate::option_parser::{
    parse_int, parse_list, parse_size, parse_toggle, OptionError, OptionParser,
};

/// Most vCPUs a VM may have: xAPIC ids are 8 bits and 0xff is the broadcast id.
pub const MAX_VCPUS: u8 = 254;
/// Smallest guest memory baton accepts: room for the boot structures below 1 MiB, a kernel
/// and an initramfs.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An option string did not parse.
    #[error("Invalid --{option} option")]
    Option {
        /// The command-line option (`cpus`, `memory` ...).
        option: &'static str,
        /// What was wrong with it.
        #[source]
        source: OptionError,
    },
    /// The VM has no kernel to boot.
    #[error("No kernel given: use --kernel PATH (payload.kernel in the API)")]
    NoKernel,
    /// The vCPU count is out of range.
    #[error("Number of vCPUs must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    /// max_vcpus differs from boot_vcpus.
    #[error("max_vcpus ({max}) must equal boot_vcpus ({boot}): CPU hotplug is not supported")]
    MaxVcpus {
        /// boot_vcpus as given.
        boot: u8,
        /// max_vcpus as given.
        max: u8,
    },
    /// Memory too small.
    #[error("Memory size {0} bytes is too small: at least {MIN_MEMORY} bytes (16M) are needed")]
    MemoryTooSmall(u64),
    /// Memory not page aligned.
    #[error("Memory size {0} bytes is not a multiple of 4 KiB")]
    MemoryAlignment(u64),
    /// Unknown CPUID feature name in the mask.
    #[error("Unknown CPU feature '{0}' in cpus mask (known: {1})")]
    UnknownFeature(String, String),
    /// A console mode needs a path that is missing.
    #[error("--{0} mode {1} needs a path: use {1}=PATH")]
    ConsolePath(&'static str, &'static str),
    /// A console mode baton does not implement.
    #[error("--console supports only 'off' (virtio-console is not implemented yet)")]
    ConsoleUnsupported,
    /// The command line holds a NUL byte.
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A device section is wrong.
    #[error("Invalid device configuration")]
    Device(#[source] DeviceError),
    /// The command line is longer than baton passes to a guest.
    #[error("Kernel command line is {0} bytes long; at most {max} are supported", max = PayloadConfig::MAX_CMDLINE)]
    CmdlineTooLong(usize),
}

/// Named CPU templates: CPUID masks for hosts that need them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// For nested, PVM-based KVM hosts that interpret guest kernel code: hides the features
    /// whose instructions the interpreter cannot execute (CMPXCHG16B, AVX family, BMI, FMA,
    /// F16C, 1 GiB pages ...) and KVM's paravirtual features that are hypercalls (PV IPIs,
    /// unhalt, sched yield), which never return there, so Linux takes its fallback paths.
    Pvm,
}

impl CpuTemplate {
    /// Parses a template name.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "pvm" => Ok(CpuTemplate::Pvm),
            _ => Err("known templates: pvm".to_string()),
        }
    }
}

/// vCPU configuration (`--cpus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot_vcpus: u8,
    /// Most vCPUs the VM may have; must equal `boot_vcpus` (no hotplug).
    pub max_vcpus: u8,
    /// A named CPUID template applied on top of what KVM supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<CpuTemplate>,
    /// Further CPUID feature names to hide from the guest (`avx`, `cx16` ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            template: None,
            mask: Vec::new(),
        }
    }
}

impl CpusConfig {
    /// Help text for `--cpus`.
    pub const SYNTAX: &'static str =
        "vCPUs: \"boot=<n>,max=<n>,template=pvm,mask=[<feature>,...]\" \
        (boot: 1-254 vCPUs, default 1; template=pvm hides CPUID features that nested PVM hosts \
        cannot interpret and KVM hypercalls they never complete; mask: extra CPUID features to hide, e.g. mask=[avx,cx16])";

    /// Parses a `--cpus` option string.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["boot", "max", "template", "mask"], None)?;
        let boot = p.convert("boot", parse_int::<u8>)?.unwrap_or(1);
        Ok(CpusConfig {
            boot_vcpus: boot,
            max_vcpus: p.convert("max", parse_int::<u8>)?.unwrap_or(boot),
            template: p.convert("template", CpuTemplate::from_name)?,
            mask: p.convert("mask", parse_list)?.unwrap_or_default(),
        })
    }
}

/// Guest memory configuration (`--memory`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Back guest RAM with shared memory (memfd) instead of private anonymous memory, so its
    /// descriptors can be handed to another process (local migration).
    #[serde(default)]
    pub shared: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            shared: false,
        }
    }
}

impl MemoryConfig {
    /// Help text for `--memory`.
    pub const SYNTAX: &'static str = "Guest memory: \"size=<bytes>,shared=on|off\" \
        (size with K/M/G/T suffix, default 512M; shared=on backs RAM with a memfd)";

    /// Parses a `--memory` option string.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["size", "shared"], None)?;
        let defaults = MemoryConfig::default();
        Ok(MemoryConfig {
            size: p.convert("size", parse_size)?.unwrap_or(defaults.size),
            shared: p
                .convert("shared", parse_toggle)?
                .unwrap_or(defaults.shared),
        })
    }
}

/// What the VM boots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// The kernel: an ELF with a PVH note, an ELF vmlinux, or a bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// An initramfs loaded next to the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl PayloadConfig {
    /// Longest command line passed to a guest, including the terminating NUL.
    pub const MAX_CMDLINE: usize = 4096;
}

/// Where a console's output goes and its input comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// No device output or input.
    #[default]
    Off,
    /// baton's standard input and output.
    Tty,
    /// Output appended to a file; no input.
    File,
    /// A UNIX socket baton listens on: output goes to the connected client (with the
    /// output so far replayed on connect), input comes from it.
    Socket,
}

/// A console device's configuration (`--serial`, `--console`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where output goes.
    pub mode: ConsoleMode,
    /// The file for `File` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The socket path for `Socket` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    /// Help text for `--serial`.
    pub const SERIAL_SYNTAX: &'static str =
        "Serial port (ttyS0): \"tty|off|file=<path>|socket=<path>\" \
        (socket: a UNIX socket to read the console from and type into; default tty)";

    /// Parses `tty`, `off`, `file=PATH` or `socket=PATH`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(s, &["mode", "file", "socket"], Some("mode"))?;
        let file = p.get("file").map(PathBuf::from);
        let socket = p.get("socket").map(PathBuf::from);
        let mode = match (p.get("mode"), &file, &socket) {
            (Some(m), None, None) => match m {
                "off" => ConsoleMode::Off,
                "tty" => ConsoleMode::Tty,
                "file" => ConsoleMode::File,
                "socket" => ConsoleMode::Socket,
                _ => {
                    return Err(OptionError::InvalidValue {
                        key: "mode".into(),
                        value: m.into(),
                        reason: "expected tty, off, file=PATH or socket=PATH".into(),
                    })
                }
            },
            (None, Some(_), None) => ConsoleMode::File,
            (None, None, Some(_)) => ConsoleMode::Socket,
            (None, None, None) => ConsoleMode::Off,
            _ => {
                return Err(OptionError::InvalidValue {
                    key: "mode".into(),
                    value: s.into(),
                    reason: "give exactly one of tty, off, file=PATH, socket=PATH".into(),
                })
            }
        };
        Ok(ConsoleConfig { mode, file, socket })
    }

    fn validate(&self, name: &'static str) -> Result<(), ConfigError> {
        match self.mode {
            ConsoleMode::File if self.file.is_none() => Err(ConfigError::ConsolePath(name, "file")),
            ConsoleMode::Socket if self.socket.is_none() => {
                Err(ConfigError::ConsolePath(name, "socket"))
            }
            _ => Ok(()),
        }
    }
}

/// A whole VM's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest memory.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot.
    pub payload: PayloadConfig,
    /// The 8250 serial port at 0x3f8 (ttyS0).
    #[serde(default)]
    pub serial: ConsoleConfig,
    /// The virtio console; only `Off` for now.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Network cards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// Disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
}

/// The CPUID feature names `mask=` accepts (checked against the VMM's table at validation).
pub type FeatureNames<'a> = &'a [&'a str];

impl VmConfig {
    /// Checks everything that can be checked without the host. `features` lists the CPUID
    /// feature names the VMM can mask.
    pub fn validate(&self, features: FeatureNames) -> Result<(), ConfigError> {
        if self.payload.kernel.is_none() {
            return Err(ConfigError::NoKernel);
        }
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(cpus.boot_vcpus));
        }
        if cpus.max_vcpus != cpus.boot_vcpus {
            return Err(ConfigError::MaxVcpus {
                boot: cpus.boot_vcpus,
                max: cpus.max_vcpus,
            });
        }
        if let Some(unknown) = cpus.mask.iter().find(|f| !features.contains(&f.as_str())) {
            return Err(ConfigError::UnknownFeature(
                unknown.clone(),
                features.join(", "),
            ));
        }
        if self.memory.size < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory.size));
        }
        if self.memory.size % 4096 != 0 {
            return Err(ConfigError::MemoryAlignment(self.memory.size));
        }
        if let Some(cmdline) = &self.payload.cmdline {
            if cmdline.contains('\0') {
                return Err(ConfigError::CmdlineNul);
            }
            if cmdline.len() >= PayloadConfig::MAX_CMDLINE {
                return Err(ConfigError::CmdlineTooLong(cmdline.len()));
            }
        }
        self.serial.validate("serial")?;
        self.console.validate("console")?;
        if self.console.mode != ConsoleMode::Off {
            return Err(ConfigError::ConsoleUnsupported);
        }
        for n in &self.net {
            n.validate().map_err(ConfigError::Device)?;
        }
        for d in &self.disks {
            d.validate().map_err(ConfigError::Device)?;
        }
        // Ids must be unique; assigning them on a copy checks that without changing `self`.
        let mut copy = self.clone();
        copy.assign_device_ids()?;
        Ok(())
    }

    /// Names every device that has no id yet (`net0`, `disk0`, `rng0` ...).
    pub fn assign_device_ids(&mut self) -> Result<(), ConfigError> {
        device_config::assign_ids(&mut self.net, &mut self.disks, self.rng.as_mut())
            .map_err(ConfigError::Device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: FeatureNames = &["avx", "cx16"];

    fn valid() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("/k".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn cpus_option() {
        let c = CpusConfig::from_option_string("boot=4,template=pvm,mask=[avx,cx16]").unwrap();
        assert_eq!(c.boot_vcpus, 4);
        assert_eq!(c.max_vcpus, 4);
        assert_eq!(c.template, Some(CpuTemplate::Pvm));
        assert_eq!(c.mask, vec!["avx", "cx16"]);
        assert!(CpusConfig::from_option_string("boot=4,template=fast").is_err());
        assert!(CpusConfig::from_option_string("boot=300").is_err());
        assert!(CpusConfig::from_option_string("bot=3").is_err());
    }

    #[test]
    fn memory_option() {
        let m = MemoryConfig::from_option_string("size=5G,shared=on").unwrap();
        assert_eq!(m.size, 5 << 30);
        assert!(m.shared);
        assert_eq!(
            MemoryConfig::from_option_string("shared=off").unwrap().size,
            512 << 20
        );
        assert!(MemoryConfig::from_option_string("size=lots").is_err());
    }

    #[test]
    fn serial_option() {
        let s = ConsoleConfig::from_option_string("tty").unwrap();
        assert_eq!(s.mode, ConsoleMode::Tty);
        let s = ConsoleConfig::from_option_string("socket=/tmp/s").unwrap();
        assert_eq!(s.mode, ConsoleMode::Socket);
        assert_eq!(s.socket.as_deref(), Some(std::path::Path::new("/tmp/s")));
        let s = ConsoleConfig::from_option_string("file=/tmp/f").unwrap();
        assert_eq!(s.mode, ConsoleMode::File);
        assert!(ConsoleConfig::from_option_string("pty").is_err());
        assert!(ConsoleConfig::from_option_string("file=/a,socket=/b").is_err());
        assert!(ConsoleConfig::from_option_string("speed=9600").is_err());
    }

    #[test]
    fn validate_accepts_defaults_with_kernel() {
        valid().validate(FEATURES).unwrap();
    }

    #[test]
    fn validate_rejects() {
        let mut c = valid();
        c.payload.kernel = None;
        assert!(matches!(c.validate(FEATURES), Err(ConfigError::NoKernel)));

        let mut c = valid();
        c.cpus.boot_vcpus = 0;
        c.cpus.max_vcpus = 0;
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::VcpuCount(0))
        ));

        let mut c = valid();
        c.cpus.max_vcpus = 2;
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::MaxVcpus { .. })
        ));

        let mut c = valid();
        c.cpus.mask = vec!["warp-drive".into()];
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::UnknownFeature(..))
        ));

        let mut c = valid();
        c.memory.size = 1 << 20;
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::MemoryTooSmall(_))
        ));

        let mut c = valid();
        c.memory.size = (64 << 20) + 1;
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::MemoryAlignment(_))
        ));

        let mut c = valid();
        c.payload.cmdline = Some("x".repeat(5000));
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::CmdlineTooLong(5000))
        ));

        let mut c = valid();
        c.serial.mode = ConsoleMode::Socket;
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::ConsolePath(..))
        ));
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let c = valid();
        let json = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let bad = r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":1,"turbo":1}}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
    }
}
