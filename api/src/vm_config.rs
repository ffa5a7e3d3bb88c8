//! The VM configuration: plain data, shared by the command line and the REST API.
//!
//! Field names follow Cloud Hypervisor's `VmConfig` so existing clients can send it. Each
//! section can be built from its command-line option string (`from_option_string`) and the
//! whole is checked by [`VmConfig::validate`] before anything is built from it. Checks that need
//! the host (does the kernel file exist, is there enough memory) belong to the VMM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::compat::{
    absent, only, CoreScheduling, CpuFeatures, CpuTopology, DebugConsoleConfig, HotplugMethod,
    PlatformConfig, Supported, Unsupported,
};
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
    /// A path that is given but empty.
    #[error("{0} is an empty path")]
    EmptyPath(&'static str),
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
    /// Cloud Hypervisor's pseudo-terminal mode.
    #[error("--{0} mode Pty is not supported by baton: use socket=PATH to read and type")]
    Pty(&'static str),
    /// A console mode baton does not implement.
    #[error("--console supports only 'off' (console mode Off or Null in the API): virtio-console is not implemented yet")]
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
    /// Cloud Hypervisor's guest topology; only one package of single-thread cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// Cloud Hypervisor's Hyper-V enlightenments; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_hyperv: Option<bool>,
    /// Cloud Hypervisor's physical address width; only its default, 46.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u8>,
    /// Cloud Hypervisor's vCPU pinning; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
    /// Cloud Hypervisor's optional CPU features; only `amx: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<CpuFeatures>,
    /// Cloud Hypervisor's nested virtualisation switch; only `true` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<bool>,
    /// Cloud Hypervisor's core scheduling; `Vm` (its default) or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_scheduling: Option<CoreScheduling>,
    /// Cloud Hypervisor's CPU profile; only `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            template: None,
            mask: Vec::new(),
            topology: None,
            kvm_hyperv: None,
            max_phys_bits: None,
            affinity: None,
            features: None,
            nested: None,
            core_scheduling: None,
            profile: None,
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
            ..Default::default()
        })
    }
}

impl Supported for CpusConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        let flat = CpuTopology {
            threads_per_core: 1,
            cores_per_die: u16::from(self.boot_vcpus),
            dies_per_package: 1,
            packages: 1,
        };
        only(
            "cpus.topology",
            &self.topology,
            &[flat],
            "baton presents one package of single-thread cores, one per vCPU",
        )?;
        only(
            "cpus.kvm_hyperv",
            &self.kvm_hyperv,
            &[false],
            "baton offers no Hyper-V enlightenments",
        )?;
        only(
            "cpus.max_phys_bits",
            &self.max_phys_bits,
            &[46],
            "baton shows the guest the host's physical address width",
        )?;
        absent(
            "cpus.affinity",
            &self.affinity,
            "baton does not pin vCPU threads",
        )?;
        only(
            "cpus.features",
            &self.features,
            &[CpuFeatures::default(), CpuFeatures { amx: Some(false) }],
            "baton does not enable AMX",
        )?;
        only(
            "cpus.nested",
            &self.nested,
            &[true],
            "baton passes on the virtualisation extensions KVM offers",
        )?;
        only(
            "cpus.core_scheduling",
            &self.core_scheduling,
            &[CoreScheduling::Vm, CoreScheduling::Off],
            "baton sets no per-vCPU core scheduling cookies",
        )?;
        only(
            "cpus.profile",
            &self.profile,
            &["Host".to_string()],
            "baton has CPU templates instead (cpus.template)",
        )
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
    /// Cloud Hypervisor's KSM switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mergeable: Option<bool>,
    /// Cloud Hypervisor's memory hot-plug method; only `Acpi` (with no hot-plug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<HotplugMethod>,
    /// Cloud Hypervisor's hot-pluggable memory; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// Cloud Hypervisor's hot-plugged memory; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    /// Cloud Hypervisor's huge pages switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    /// Cloud Hypervisor's huge page size; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    /// Cloud Hypervisor's prefault switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    /// Cloud Hypervisor's reserve switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve: Option<bool>,
    /// Cloud Hypervisor's memory zones; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<serde_json::Value>,
    /// Cloud Hypervisor's transparent huge pages switch; either value (baton leaves THP to
    /// the host's policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp: Option<bool>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            shared: false,
            mergeable: None,
            hotplug_method: None,
            hotplug_size: None,
            hotplugged_size: None,
            hugepages: None,
            hugepage_size: None,
            prefault: None,
            reserve: None,
            zones: None,
            thp: None,
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
            ..defaults
        })
    }
}

impl Supported for MemoryConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        only(
            "memory.mergeable",
            &self.mergeable,
            &[false],
            "baton does not enable KSM",
        )?;
        let no_hotplug = "baton has no memory hot-plug";
        only(
            "memory.hotplug_method",
            &self.hotplug_method,
            &[HotplugMethod::Acpi],
            no_hotplug,
        )?;
        only("memory.hotplug_size", &self.hotplug_size, &[0], no_hotplug)?;
        only(
            "memory.hotplugged_size",
            &self.hotplugged_size,
            &[0],
            no_hotplug,
        )?;
        let no_huge = "baton backs guest memory with normal pages";
        only("memory.hugepages", &self.hugepages, &[false], no_huge)?;
        only("memory.hugepage_size", &self.hugepage_size, &[], no_huge)?;
        only(
            "memory.prefault",
            &self.prefault,
            &[false],
            "baton does not prefault guest memory",
        )?;
        only(
            "memory.reserve",
            &self.reserve,
            &[false],
            "baton does not reserve swap for guest memory",
        )?;
        absent("memory.zones", &self.zones, "baton has no memory zones")
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
    /// Cloud Hypervisor's firmware; baton boots kernels directly, so only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Cloud Hypervisor's IGVM file; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub igvm: Option<PathBuf>,
    /// Cloud Hypervisor's SEV-SNP host data; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<String>,
    /// Cloud Hypervisor's fw_cfg device; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw_cfg_config: Option<serde_json::Value>,
}

impl PayloadConfig {
    /// Longest command line passed to a guest, including the terminating NUL.
    pub const MAX_CMDLINE: usize = 4096;
}

impl Supported for PayloadConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        let direct = "baton boots a kernel directly (payload.kernel)";
        only("payload.firmware", &self.firmware, &[], direct)?;
        only("payload.igvm", &self.igvm, &[], direct)?;
        only(
            "payload.host_data",
            &self.host_data,
            &[],
            "baton runs no confidential guests",
        )?;
        absent(
            "payload.fw_cfg_config",
            &self.fw_cfg_config,
            "baton has no fw_cfg device",
        )
    }
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
    /// Cloud Hypervisor's name for a device whose output is dropped: the same as `Off`.
    Null,
    /// Cloud Hypervisor's pseudo-terminal mode; not supported (use `Socket`).
    Pty,
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
    /// Cloud Hypervisor's virtio-console id; accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Cloud Hypervisor's PCI segment of the virtio console; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
    /// Cloud Hypervisor's IOMMU switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    /// Cloud Hypervisor's PCI slot of the virtio console; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// (+) A `Socket` serial console hands its listening socket, its client and its
    /// backlog to the destination of a migration with backend transfer (absent: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_transfer: Option<bool>,
}

impl ConsoleConfig {
    /// Help text for `--serial`.
    pub const SERIAL_SYNTAX: &'static str =
        "Serial port (ttyS0): \"tty|off|file=<path>|socket=<path>\" \
        (socket: a UNIX socket to read the console from and type into; default tty), and \
        \"backend_transfer=on|off\" (a socket console hands its socket and client to the \
        destination of a migration with backend transfer; default on)";

    /// Whether a socket console hands its socket over in a migration with backend transfer.
    pub fn hands_over(&self) -> bool {
        self.mode == ConsoleMode::Socket && self.backend_transfer != Some(false)
    }

    /// Parses `tty`, `off`, `file=PATH` or `socket=PATH`, and `backend_transfer=on|off`.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(
            s,
            &["mode", "file", "socket", "backend_transfer"],
            Some("mode"),
        )?;
        let backend_transfer = p.convert("backend_transfer", crate::option_parser::parse_toggle)?;
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
        Ok(ConsoleConfig {
            mode,
            file,
            socket,
            backend_transfer,
            ..Default::default()
        })
    }

    /// Checks Cloud Hypervisor's fields of the `name` console.
    fn check(&self, name: &str) -> Result<(), Unsupported> {
        only(
            &format!("{name}.mode"),
            &Some(self.mode),
            &[
                ConsoleMode::Off,
                ConsoleMode::Null,
                ConsoleMode::Tty,
                ConsoleMode::File,
                ConsoleMode::Socket,
            ],
            "baton has no pseudo-terminal consoles; use Socket to read and type",
        )?;
        crate::compat::pci_fields(name, &self.pci_segment, &self.iommu, &self.pci_device_id)
    }

    fn validate(&self, name: &'static str) -> Result<(), ConfigError> {
        match self.mode {
            ConsoleMode::File if self.file.is_none() => Err(ConfigError::ConsolePath(name, "file")),
            ConsoleMode::Pty => Err(ConfigError::Pty(name)),
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
    /// Cloud Hypervisor's platform settings; only their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    /// Cloud Hypervisor's debug port console; only `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_console: Option<DebugConsoleConfig>,
    /// Cloud Hypervisor's `rate_limit_groups`: baton has no rate limiters, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<serde_json::Value>,
    /// Cloud Hypervisor's `balloon`: baton has no virtio-balloon, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    /// Cloud Hypervisor's `generic_vhost_user`: baton has no vhost-user devices, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic_vhost_user: Option<serde_json::Value>,
    /// Cloud Hypervisor's `fs`: baton has no virtio-fs, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<serde_json::Value>,
    /// Cloud Hypervisor's `pmem`: baton has no virtio-pmem, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<serde_json::Value>,
    /// Cloud Hypervisor's `devices`: baton has no VFIO devices, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<serde_json::Value>,
    /// Cloud Hypervisor's `user_devices`: baton has no vfio-user devices, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<serde_json::Value>,
    /// Cloud Hypervisor's `vdpa`: baton has no vDPA devices, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<serde_json::Value>,
    /// Cloud Hypervisor's `vsock`: baton has no virtio-vsock, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<serde_json::Value>,
    /// Cloud Hypervisor's `pvmemcontrol`: baton has no pvmemcontrol device, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvmemcontrol: Option<serde_json::Value>,
    /// Cloud Hypervisor's `pvpanic`: baton has no pvpanic device, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvpanic: Option<serde_json::Value>,
    /// Cloud Hypervisor's `iommu`: baton has no virtual IOMMU, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<serde_json::Value>,
    /// Cloud Hypervisor's `numa`: baton presents no NUMA topology, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<serde_json::Value>,
    /// Cloud Hypervisor's `watchdog`: baton has no watchdog device, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<serde_json::Value>,
    /// Cloud Hypervisor's `rtc`: baton has no extra RTC device, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<serde_json::Value>,
    /// Cloud Hypervisor's `gdb`: baton has no GDB stub, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb: Option<serde_json::Value>,
    /// Cloud Hypervisor's `pci_segments`: baton has one PCI segment, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<serde_json::Value>,
    /// Cloud Hypervisor's `tpm`: baton has no TPM, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<serde_json::Value>,
    /// Cloud Hypervisor's `landlock_enable`: baton does not apply Landlock, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_enable: Option<serde_json::Value>,
    /// Cloud Hypervisor's `landlock_rules`: baton does not apply Landlock, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<serde_json::Value>,
    /// Cloud Hypervisor's `ivshmem`: baton has no ivshmem device, so only absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ivshmem: Option<serde_json::Value>,
}

impl Supported for VmConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        self.cpus.check_supported()?;
        self.memory.check_supported()?;
        self.payload.check_supported()?;
        self.serial.check("serial")?;
        self.console.check("console")?;
        for (i, n) in self.net.iter().enumerate() {
            n.check_at(&format!("net[{i}]"))?;
        }
        for (i, d) in self.disks.iter().enumerate() {
            d.check_at(&format!("disks[{i}]"))?;
        }
        if let Some(rng) = &self.rng {
            rng.check_supported()?;
        }
        if let Some(platform) = &self.platform {
            platform.check_supported()?;
        }
        if let Some(debug) = &self.debug_console {
            only(
                "debug_console.mode",
                &Some(debug.mode),
                &[ConsoleMode::Off],
                "baton has no debug port console",
            )?;
        }
        absent(
            "rate_limit_groups",
            &self.rate_limit_groups,
            "baton has no rate limiters",
        )?;
        absent("balloon", &self.balloon, "baton has no virtio-balloon")?;
        absent(
            "generic_vhost_user",
            &self.generic_vhost_user,
            "baton has no vhost-user devices",
        )?;
        absent("fs", &self.fs, "baton has no virtio-fs")?;
        absent("pmem", &self.pmem, "baton has no virtio-pmem")?;
        absent("devices", &self.devices, "baton has no VFIO devices")?;
        absent(
            "user_devices",
            &self.user_devices,
            "baton has no vfio-user devices",
        )?;
        absent("vdpa", &self.vdpa, "baton has no vDPA devices")?;
        absent("vsock", &self.vsock, "baton has no virtio-vsock")?;
        absent(
            "pvmemcontrol",
            &self.pvmemcontrol,
            "baton has no pvmemcontrol device",
        )?;
        absent("pvpanic", &self.pvpanic, "baton has no pvpanic device")?;
        absent("iommu", &self.iommu, "baton has no virtual IOMMU")?;
        absent("numa", &self.numa, "baton presents no NUMA topology")?;
        absent("watchdog", &self.watchdog, "baton has no watchdog device")?;
        absent("rtc", &self.rtc, "baton has no extra RTC device")?;
        absent("gdb", &self.gdb, "baton has no GDB stub")?;
        absent(
            "pci_segments",
            &self.pci_segments,
            "baton has one PCI segment",
        )?;
        absent("tpm", &self.tpm, "baton has no TPM")?;
        absent(
            "landlock_enable",
            &self.landlock_enable,
            "baton does not apply Landlock",
        )?;
        absent(
            "landlock_rules",
            &self.landlock_rules,
            "baton does not apply Landlock",
        )?;
        absent("ivshmem", &self.ivshmem, "baton has no ivshmem device")?;
        Ok(())
    }
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
        for (name, path) in [
            ("payload.kernel", &self.payload.kernel),
            ("payload.initramfs", &self.payload.initramfs),
            ("serial.file", &self.serial.file),
            ("serial.socket", &self.serial.socket),
            ("console.file", &self.console.file),
            ("console.socket", &self.console.socket),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::EmptyPath(name));
            }
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
        if !matches!(self.console.mode, ConsoleMode::Off | ConsoleMode::Null) {
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
        c.payload.kernel = Some(PathBuf::new());
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::EmptyPath("payload.kernel"))
        ));
        let mut c = valid();
        c.serial.socket = Some(PathBuf::new());
        assert!(matches!(
            c.validate(FEATURES),
            Err(ConfigError::EmptyPath("serial.socket"))
        ));

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
