//! The state of a paused VM that KVM holds: each vCPU's registers, FPU/XSAVE, MSRs, local
//! APIC and pending events, and the VM's in-kernel PIC, IOAPIC, PIT and kvmclock.
//!
//! Saving follows the order KVM needs: a vCPU's MP state first (reading it makes the local
//! APIC accept pending INIT/SIPI), its events last. Restoring sets CPUID before anything that
//! depends on it, MSRs after the local APIC (the TSC deadline lives in both), and events last.
//! A vCPU must not be inside KVM_RUN while either runs: [`crate::vcpu`] saves and restores on
//! the vCPU's own thread while it is parked, after completing any I/O exit it was in.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM: cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM refused one MSR of the list.
    #[error("KVM refused to restore MSR {0:#x}")]
    Msr(u32),
    /// A list does not fit KVM's structure.
    #[error("Too many {0} in the state")]
    TooMany(&'static str, #[source] vmm_sys_util::fam::Error),
    /// The state has more interrupt controllers than the PICs and the IOAPIC.
    #[error("The state has {0} interrupt controllers; a VM has 3 (two PICs, one IOAPIC)")]
    Irqchips(usize),
    /// The XSAVE area has another size than this host uses.
    #[error("The XSAVE area in the state has {saved} bytes; this host uses {host}")]
    XsaveSize {
        /// Bytes in the state.
        saved: usize,
        /// Bytes KVM uses here.
        host: usize,
    },
}

/// One vCPU's whole architectural state as KVM exposes it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// CPUID as the guest sees it.
    #[serde(with = "hex::list")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI ...
    #[serde(with = "hex")]
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    #[serde(with = "hex")]
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base.
    #[serde(with = "hex")]
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state (the XSAVE area, as u32 words).
    #[serde(with = "hex::list")]
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    #[serde(with = "hex")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "hex")]
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    #[serde(with = "hex")]
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable (the TSC among them).
    #[serde(with = "hex::list")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    #[serde(with = "hex")]
    pub events: kvm_vcpu_events,
    /// TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    /// The two 8259 PICs and the IOAPIC.
    #[serde(with = "hex::list")]
    pub irqchips: Vec<kvm_irqchip>,
    /// The 8254 PIT.
    #[serde(with = "hex")]
    pub pit: kvm_pit_state2,
    /// kvmclock.
    #[serde(with = "hex")]
    pub clock: kvm_clock_data,
}

/// KVM's structures in the saved state, each as one string of hex digits (a list of them
/// as one string of all their bytes), not as kvm-bindings writes them, one JSON number per
/// byte: decoding those thousands of numbers took a fifth of a millisecond of a
/// migration's pause, and the hex digits a tenth of that.
mod hex {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    /// Not a lower-case hex digit, in [`NIBBLES`].
    const BAD: u8 = 0x10;
    /// The value of each ASCII character as a hex digit, or [`BAD`].
    const NIBBLES: [u8; 256] = {
        let mut table = [BAD; 256];
        let mut i = 0;
        while i < 16 {
            table[DIGITS[i] as usize] = i as u8;
            i += 1;
        }
        table
    };

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut text = Vec::with_capacity(bytes.len() * 2);
        for b in bytes {
            text.push(DIGITS[usize::from(b >> 4)]);
            text.push(DIGITS[usize::from(b & 0xf)]);
        }
        String::from_utf8(text).expect("hex digits are ASCII")
    }

    pub(super) fn decode(text: &str) -> Result<Vec<u8>, String> {
        if text.len() % 2 != 0 {
            return Err(format!("{} hex digits, not whole bytes", text.len()));
        }
        let mut bytes = Vec::with_capacity(text.len() / 2);
        for pair in text.as_bytes().chunks_exact(2) {
            let (high, low) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
            if high | low >= BAD {
                return Err(format!(
                    "{:?} is not a byte in lower-case hex",
                    String::from_utf8_lossy(pair)
                ));
            }
            bytes.push(high << 4 | low);
        }
        Ok(bytes)
    }

    /// The hex digits of a string in the input, decoded.
    fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        decode(&text).map_err(D::Error::custom)
    }

    fn wrong_size<E: serde::de::Error, T>(got: usize) -> E {
        E::custom(format!(
            "{got} bytes for {} of {} bytes",
            std::any::type_name::<T>(),
            std::mem::size_of::<T>()
        ))
    }

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        value: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(value.as_bytes()))
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let bytes = bytes(d)?;
        T::read_from_bytes(&bytes).map_err(|_| wrong_size::<D::Error, T>(bytes.len()))
    }

    /// A list of KVM's structures, as one string of all their bytes.
    pub mod list {
        use super::*;

        pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
            values: &[T],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_str(&encode(values.as_bytes()))
        }

        pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<T>, D::Error> {
            let bytes = bytes(d)?;
            let size = std::mem::size_of::<T>();
            if size == 0 || bytes.len() % size != 0 {
                return Err(wrong_size::<D::Error, T>(bytes.len()));
            }
            Ok(bytes
                .chunks_exact(size)
                .map(|one| T::read_from_bytes(one).expect("a whole element"))
                .collect())
        }
    }
}

/// The MSRs KVM can save and restore, as indices. Some listed MSRs cannot be read on a given
/// host (features the CPU lacks): those are found with one trial read and left out.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("list saveable MSRs", e))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    let mut start = 0;
    // KVM_GET_MSRS stops at the first MSR it cannot read and says how many it read.
    while start < indices.len() {
        let entries: Vec<kvm_msr_entry> = indices[start..]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::TooMany("MSRs", e))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("read MSRs", e))?;
        if read == entries.len() {
            break;
        }
        log::debug!(
            "MSR {:#x} cannot be read here; not saved",
            indices[start + read]
        );
        indices.remove(start + read);
        start += read;
    }
    Ok(indices)
}

/// Bytes of the XSAVE area KVM uses on this host (4096 unless KVM_CAP_XSAVE2 says more).
pub fn xsave_size(vm: &VmFd) -> usize {
    let size = vm.check_extension_int(Cap::Xsave2);
    (size as usize).max(std::mem::size_of::<kvm_xsave>())
}

fn get_xsave(vcpu: &VcpuFd, size: usize) -> Result<Vec<u32>, Error> {
    if size <= std::mem::size_of::<kvm_xsave>() {
        let x = vcpu
            .get_xsave()
            .map_err(|e| Error::Kvm("read the XSAVE area", e))?;
        return Ok(x.region.to_vec());
    }
    let extra = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|e| Error::TooMany("XSAVE words", e))?;
    // SAFETY: `x` was sized from KVM_CAP_XSAVE2, the size KVM writes, and no XSTATE feature
    // is enabled dynamically in this process afterwards.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(|e| Error::Kvm("read the XSAVE area", e))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

fn set_xsave(vcpu: &VcpuFd, size: usize, words: &[u32]) -> Result<(), Error> {
    let wanted = size.div_ceil(4);
    if words.len() != wanted {
        return Err(Error::XsaveSize {
            saved: words.len() * 4,
            host: size,
        });
    }
    if size <= std::mem::size_of::<kvm_xsave>() {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(words);
        // SAFETY: the area is the legacy 4 KiB one, which is what KVM reads for this size.
        return unsafe { vcpu.set_xsave(&x) }.map_err(|e| Error::Kvm("set the XSAVE area", e));
    }
    let (head, tail) = words.split_at(1024);
    let mut x = Xsave::from_entries(tail).map_err(|e| Error::TooMany("XSAVE words", e))?;
    // SAFETY: only the fixed-size header is written; the FAM was sized by `from_entries`.
    unsafe { x.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(head);
    // SAFETY: `x` holds exactly the KVM_CAP_XSAVE2 size KVM reads.
    unsafe { vcpu.set_xsave2(&x) }.map_err(|e| Error::Kvm("set the XSAVE area", e))
}

/// Reads `vcpu`'s state; `msrs` from [`saveable_msrs`], `xsave` from [`xsave_size`].
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32], xsave: usize) -> Result<VcpuState, Error> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(|e| Error::Kvm("read the MP state", e))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("read CPUID", e))?;
    let regs = vcpu
        .get_regs()
        .map_err(|e| Error::Kvm("read registers", e))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("read special registers", e))?;
    let xsave = get_xsave(vcpu, xsave)?;
    let xcrs = vcpu.get_xcrs().map_err(|e| Error::Kvm("read XCRs", e))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(|e| Error::Kvm("read debug registers", e))?;
    let lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("read the local APIC", e))?;
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut list = Msrs::from_entries(&entries).map_err(|e| Error::TooMany("MSRs", e))?;
    let read = vcpu
        .get_msrs(&mut list)
        .map_err(|e| Error::Kvm("read MSRs", e))?;
    if read != entries.len() {
        return Err(Error::Msr(msrs[read]));
    }
    let events = vcpu
        .get_vcpu_events()
        .map_err(|e| Error::Kvm("read pending events", e))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs: list.as_slice().to_vec(),
        events,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Puts `state` into a new `vcpu` that has not run.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, xsave: usize) -> Result<(), Error> {
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|e| Error::TooMany("CPUID entries", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("set CPUID", e))?;
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz)
                .map_err(|e| Error::Kvm("set the TSC frequency", e))?;
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(|e| Error::Kvm("set the MP state", e))?;
    vcpu.set_regs(&state.regs)
        .map_err(|e| Error::Kvm("set registers", e))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(|e| Error::Kvm("set special registers", e))?;
    set_xsave(vcpu, xsave, &state.xsave)?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(|e| Error::Kvm("set XCRs", e))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(|e| Error::Kvm("set debug registers", e))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(|e| Error::Kvm("set the local APIC", e))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|e| Error::TooMany("MSRs", e))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("set MSRs", e))?;
    if written != state.msrs.len() {
        return Err(Error::Msr(state.msrs[written].index));
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(|e| Error::Kvm("set pending events", e))?;
    Ok(())
}

/// Reads the VM's in-kernel PICs, IOAPIC, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, Error> {
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| Error::Kvm("read the interrupt controllers", e))?;
        irqchips.push(chip);
    }
    let pit = vm.get_pit2().map_err(|e| Error::Kvm("read the PIT", e))?;
    let clock = vm.get_clock().map_err(|e| Error::Kvm("read kvmclock", e))?;
    Ok(KvmVmState {
        irqchips,
        pit,
        clock,
    })
}

/// Puts `state` into a new VM with an in-kernel irqchip and PIT.
pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), Error> {
    if state.irqchips.len() > 3 {
        return Err(Error::Irqchips(state.irqchips.len()));
    }
    for chip in &state.irqchips {
        vm.set_irqchip(chip)
            .map_err(|e| Error::Kvm("set the interrupt controllers", e))?;
    }
    vm.set_pit2(&state.pit)
        .map_err(|e| Error::Kvm("set the PIT", e))?;
    // The guest's clock continues from where it stopped: no REALTIME adjustment, which would
    // make it jump by however long the VM was stopped.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| Error::Kvm("set kvmclock", e))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvm_bindings::kvm_msr_entry;

    /// A vCPU state with a distinctive value in every part.
    pub(crate) fn vcpu_state() -> VcpuState {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1;
        let sregs = kvm_sregs {
            cr0: 0x8005_0033,
            efer: 0xd01,
            ..Default::default()
        };
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f0,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0x10_0000,
                rsp: 0x8000,
                rflags: 0x202,
                ..Default::default()
            },
            sregs,
            xsave: (0..1024).collect(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic,
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 123_456_789,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn vcpu_state_round_trips_through_the_state_format() {
        let state = vcpu_state();
        let bytes = ::migration::snapshot::encode(&state).expect("encodes");
        let back: VcpuState = ::migration::snapshot::decode(&bytes).expect("decodes");
        assert_eq!(
            serde_json::to_value(&back).expect("serialises"),
            serde_json::to_value(&state).expect("serialises")
        );
        assert_eq!(
            (back.regs.rip, back.sregs.efer, back.msrs[0].data),
            (0x10_0000, 0xd01, 123_456_789)
        );
        assert_eq!(back.xsave.len(), 1024);
        assert_eq!(back.lapic.regs[0x20], 1);
    }

    #[test]
    fn a_vcpu_state_with_a_field_this_baton_does_not_know_is_refused() {
        let mut v = serde_json::to_value(vcpu_state()).expect("serialises");
        v["pkru"] = serde_json::json!(0);
        let e = serde_json::from_value::<VcpuState>(v)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("unknown field `pkru`"), "{e}");
    }

    #[test]
    fn kvm_structures_are_hex_strings_and_bad_ones_are_refused_by_name() {
        let v = serde_json::to_value(vcpu_state()).expect("serialises");
        // One string each: a lapic is 1024 bytes.
        assert_eq!(v["lapic"].as_str().map(str::len), Some(2048), "{v}");
        assert_eq!(v["lapic"].as_str().unwrap()[0x40..0x42], *"01");
        assert!(v["cpuid"].is_string() && v["xsave"].is_string(), "{v}");
        for (field, text, says) in [
            ("regs", "0", "1 hex digits"),
            ("regs", "zz", "\"zz\" is not a byte"),
            ("regs", "00", "1 bytes for kvm_bindings"),
            ("msrs", "000000", "3 bytes for kvm_bindings"),
        ] {
            let mut bad = v.clone();
            bad[field] = serde_json::json!(text);
            let e = serde_json::from_value::<VcpuState>(bad)
                .err()
                .expect("refused");
            assert!(e.to_string().contains(says), "{field}={text}: {e}");
        }
        // An empty list is no bytes at all.
        let mut empty = v;
        empty["msrs"] = serde_json::json!("");
        let back = serde_json::from_value::<VcpuState>(empty).expect("decodes");
        assert!(back.msrs.is_empty());
    }

    #[test]
    fn the_fuzz_seeds_of_saved_state_are_in_this_format() {
        // Seeds that no longer decode would leave the fuzzer starting from refusals.
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let bin = std::fs::read(seeds.join("vm_state/state.bin")).expect("seed");
        let state: crate::vm::VmState = ::migration::snapshot::decode(&bin).expect("decodes");
        assert!(!state.vcpus.is_empty() && !state.vcpus[0].cpuid.is_empty());
        let json = std::fs::read(seeds.join("vm_state/payload.json")).expect("seed");
        serde_json::from_slice::<crate::vm::VmState>(&json).expect("decodes");
    }

    #[test]
    fn hex_digits_round_trip_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let text = hex::encode(&all);
        assert_eq!(&text[..6], "000102");
        assert_eq!(hex::decode(&text), Ok(all));
        assert!(
            hex::decode("0A").is_err(),
            "upper case is not what baton writes"
        );
    }
}
