//! Cloud Hypervisor's request fields that baton has no use for, or supports only at one value.
//!
//! Clients written for Cloud Hypervisor (`ch-remote`, clients generated from its OpenAPI
//! document) serialise whole structures, every field at its default. baton accepts each such
//! field at Cloud Hypervisor's default (or at a value it honours anyway) and refuses any other
//! value with a 400 that names the field, the value and why; a field neither baton nor Cloud
//! Hypervisor knows is still refused by serde. [`Supported::check_supported`] runs on every
//! request body before the VMM sees it.

use serde::{Deserialize, Serialize};

/// A field set to a value baton cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}={value} is not supported by baton: {reason}")]
pub struct Unsupported {
    /// The field, with its path (`net[0].vhost_user`).
    pub field: String,
    /// The value sent, as JSON.
    pub value: String,
    /// Why baton cannot honour it.
    pub reason: &'static str,
}

/// A request body whose Cloud Hypervisor-only fields can be checked.
pub trait Supported {
    /// `Err` for the first field set to a value baton cannot honour.
    fn check_supported(&self) -> Result<(), Unsupported>;
}

/// Checks that `value`, if given, is one of `accepted`.
pub(crate) fn only<T: Serialize + PartialEq>(
    field: &str,
    value: &Option<T>,
    accepted: &[T],
    reason: &'static str,
) -> Result<(), Unsupported> {
    match value {
        Some(v) if !accepted.contains(v) => Err(Unsupported {
            field: field.to_string(),
            value: serde_json::to_string(v).unwrap_or_default(),
            reason,
        }),
        _ => Ok(()),
    }
}

/// Checks that a section baton does not implement is absent: missing, `null`, `false`, an
/// empty list or an empty object.
pub(crate) fn absent(
    field: &str,
    value: &Option<serde_json::Value>,
    reason: &'static str,
) -> Result<(), Unsupported> {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(v) => Err(Unsupported {
            field: field.to_string(),
            value: v.to_string(),
            reason,
        }),
    }
}

/// The PCI placement fields Cloud Hypervisor puts on every PCI device. Each device config
/// declares them itself: serde cannot flatten a shared struct into one that denies unknown
/// fields, and unknown fields must stay refused.
pub(crate) fn pci_fields(
    prefix: &str,
    pci_segment: &Option<u16>,
    iommu: &Option<bool>,
    pci_device_id: &Option<u8>,
) -> Result<(), Unsupported> {
    only(
        &format!("{prefix}.pci_segment"),
        pci_segment,
        &[0],
        "baton has one PCI segment",
    )?;
    only(
        &format!("{prefix}.iommu"),
        iommu,
        &[false],
        "baton has no virtual IOMMU",
    )?;
    only(
        &format!("{prefix}.pci_device_id"),
        pci_device_id,
        &[],
        "baton places devices in PCI slots itself",
    )
}

/// How a vhost-user backend connects (Cloud Hypervisor's `vhost_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    /// The VMM connects to the backend's socket.
    Client,
    /// The VMM listens.
    Server,
}

/// A disk image's format (Cloud Hypervisor's `image_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    /// Fixed-size VHD.
    FixedVhd,
    /// QCOW2.
    Qcow2,
    /// Raw.
    Raw,
    /// VHDX.
    Vhdx,
    /// Detect from the file.
    Unknown,
}

/// How a disk image is locked (Cloud Hypervisor's `lock_granularity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockGranularity {
    /// Byte-range locks.
    ByteRange,
    /// One lock on the whole file.
    Full,
}

/// Memory hot-plug mechanism (Cloud Hypervisor's `hotplug_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    /// ACPI memory devices.
    Acpi,
    /// virtio-mem.
    VirtioMem,
}

/// Core scheduling of vCPU threads (Cloud Hypervisor's `core_scheduling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreScheduling {
    /// One cookie for the whole VM.
    Vm,
    /// One cookie per vCPU.
    Vcpu,
    /// None.
    Off,
}

/// How restored memory is filled (Cloud Hypervisor's `memory_restore_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// Read the whole snapshot before the guest runs.
    Copy,
    /// Fault pages in on first touch.
    OnDemand,
}

/// What a migration does when its timeout passes (Cloud Hypervisor's `timeout_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Give up and keep running on the source.
    Cancel,
    /// Carry on.
    Ignore,
}

/// How memory moves in a migration (Cloud Hypervisor's `memory_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMemoryMode {
    /// Copied before the switch.
    Precopy,
    /// Fetched by the destination after it.
    Postcopy,
}

/// The guest CPU topology (Cloud Hypervisor's `cpus.topology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    /// Threads per core.
    pub threads_per_core: u16,
    /// Cores per die.
    pub cores_per_die: u16,
    /// Dies per package.
    pub dies_per_package: u16,
    /// Packages (sockets).
    pub packages: u16,
}

/// Optional CPU features (Cloud Hypervisor's `cpus.features`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatures {
    /// Intel AMX.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amx: Option<bool>,
}

/// Platform settings (Cloud Hypervisor's `platform`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// PCI segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_pci_segments: Option<u16>,
    /// Segments behind the IOMMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    /// IOMMU address width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_address_width_bits: Option<u8>,
    /// SMBIOS serial number.
    #[serde(
        default,
        alias = "serial_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_serial_number: Option<String>,
    /// SMBIOS UUID.
    #[serde(default, alias = "uuid", skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    /// SMBIOS OEM strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    /// SMBIOS manufacturer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_manufacturer: Option<String>,
    /// SMBIOS product name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_product_name: Option<String>,
    /// SMBIOS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_version: Option<String>,
    /// SMBIOS family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_family: Option<String>,
    /// SMBIOS SKU number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_sku_number: Option<String>,
    /// SMBIOS chassis asset tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_asset_tag: Option<String>,
    /// Intel TDX.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<bool>,
    /// AMD SEV-SNP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev_snp: Option<bool>,
    /// VFIO through iommufd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd: Option<bool>,
    /// VFIO peer-to-peer DMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_p2p_dma: Option<bool>,
}

impl Supported for PlatformConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        let no_smbios = "baton writes no SMBIOS tables";
        only(
            "platform.num_pci_segments",
            &self.num_pci_segments,
            &[1],
            "baton has one PCI segment",
        )?;
        only(
            "platform.iommu_segments",
            &self.iommu_segments,
            &[Vec::new()],
            "baton has no virtual IOMMU",
        )?;
        for (field, value) in [
            ("platform.system_serial_number", &self.system_serial_number),
            ("platform.system_uuid", &self.system_uuid),
            ("platform.system_manufacturer", &self.system_manufacturer),
            ("platform.system_product_name", &self.system_product_name),
            ("platform.system_version", &self.system_version),
            ("platform.system_family", &self.system_family),
            ("platform.system_sku_number", &self.system_sku_number),
            ("platform.chassis_asset_tag", &self.chassis_asset_tag),
        ] {
            only(field, value, &[], no_smbios)?;
        }
        only(
            "platform.oem_strings",
            &self.oem_strings,
            &[Vec::new()],
            no_smbios,
        )?;
        only(
            "platform.tdx",
            &self.tdx,
            &[false],
            "baton runs no confidential guests",
        )?;
        only(
            "platform.sev_snp",
            &self.sev_snp,
            &[false],
            "baton runs no confidential guests",
        )?;
        only(
            "platform.iommufd",
            &self.iommufd,
            &[false],
            "baton has no VFIO devices",
        )
        // iommu_address_width_bits and vfio_p2p_dma only matter with an IOMMU or VFIO
        // devices, which baton refuses above and elsewhere: any value is honoured.
    }
}

/// The x86 debug port console (Cloud Hypervisor's `debug_console`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConsoleConfig {
    /// Output mode; only `Off` is supported.
    pub mode: crate::ConsoleMode,
    /// Output file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<std::path::PathBuf>,
    /// I/O port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_the_field_the_value_and_why() {
        assert!(only("a.b", &None::<u16>, &[0], "why").is_ok());
        assert!(only("a.b", &Some(0u16), &[0], "why").is_ok());
        let e = only("net[0].pci_segment", &Some(3u16), &[0], "one segment").unwrap_err();
        assert_eq!(
            e.to_string(),
            "net[0].pci_segment=3 is not supported by baton: one segment"
        );
        let e = only(
            "m",
            &Some(MigrationMemoryMode::Postcopy),
            &[MigrationMemoryMode::Precopy],
            "r",
        )
        .unwrap_err();
        assert_eq!(e.value, "\"Postcopy\"");
    }

    #[test]
    fn absent_sections() {
        for ok in ["null", "false", "[]", "{}"] {
            assert!(absent("fs", &Some(serde_json::from_str(ok).unwrap()), "r").is_ok());
        }
        assert!(absent("fs", &None, "r").is_ok());
        let e = absent(
            "fs",
            &Some(serde_json::json!([{"tag": "x"}])),
            "no virtio-fs",
        )
        .unwrap_err();
        assert!(e.to_string().contains("fs=[{\"tag\":\"x\"}]"), "{e}");
    }
}
