//! CPUID as the guest sees it: what KVM supports, adjusted per vCPU (APIC ids, topology,
//! hypervisor leaves) and with features masked by a template or by name.
//!
//! Everything here is pure logic on `kvm_cpuid_entry2` lists, so it is unit-tested without KVM.

use api::CpuTemplate;
use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX
    Eax,
    /// EBX
    Ebx,
    /// ECX
    Ecx,
    /// EDX
    Edx,
}

/// A feature bit that can be masked: name, leaf, subleaf, register, bit.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// Name as given to `--cpus mask=[...]` (Linux's /proc/cpuinfo spelling).
    pub name: &'static str,
    leaf: u32,
    index: u32,
    reg: Reg,
    bit: u32,
}

const fn f(name: &'static str, leaf: u32, index: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        index,
        reg,
        bit,
    }
}

/// Every feature `mask=` knows.
pub const FEATURES: &[Feature] = &[
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("avx512dq", 7, 0, Reg::Ebx, 17),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("avx512ifma", 7, 0, Reg::Ebx, 21),
    f("avx512cd", 7, 0, Reg::Ebx, 28),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("avx512bw", 7, 0, Reg::Ebx, 30),
    f("avx512vl", 7, 0, Reg::Ebx, 31),
    f("avx512vbmi", 7, 0, Reg::Ecx, 1),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("waitpkg", 7, 0, Reg::Ecx, 5),
    f("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    f("gfni", 7, 0, Reg::Ecx, 8),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    f("avx512_vnni", 7, 0, Reg::Ecx, 11),
    f("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("fsrm", 7, 0, Reg::Edx, 4),
    f("avx512_vp2intersect", 7, 0, Reg::Edx, 8),
    f("amx_bf16", 7, 0, Reg::Edx, 22),
    f("avx512_fp16", 7, 0, Reg::Edx, 23),
    f("amx_tile", 7, 0, Reg::Edx, 24),
    f("amx_int8", 7, 0, Reg::Edx, 25),
    f("avx_vnni", 7, 1, Reg::Eax, 4),
    f("avx512_bf16", 7, 1, Reg::Eax, 5),
    f("xsaveopt", 0xd, 1, Reg::Eax, 0),
    f("xsavec", 0xd, 1, Reg::Eax, 1),
    f("xsaves", 0xd, 1, Reg::Eax, 3),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("xop", 0x8000_0001, 0, Reg::Ecx, 11),
    f("fma4", 0x8000_0001, 0, Reg::Ecx, 16),
    f("tbm", 0x8000_0001, 0, Reg::Ecx, 21),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    // KVM's paravirtual features (leaf 0x4000_0001), named as Linux's kvm_para.h does.
    f("kvm_pv_unhalt", KVM_FEATURES_LEAF, 0, Reg::Eax, 7),
    f("kvm_pv_send_ipi", KVM_FEATURES_LEAF, 0, Reg::Eax, 11),
    f("kvm_pv_sched_yield", KVM_FEATURES_LEAF, 0, Reg::Eax, 13),
];

/// CPUID leaf of KVM's paravirtual feature bits.
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Names of every maskable feature, for validation messages.
pub fn feature_names() -> Vec<&'static str> {
    FEATURES.iter().map(|f| f.name).collect()
}

/// What the `pvm` template hides. A nested PVM host interprets guest kernel code with KVM's
/// instruction emulator, which cannot execute CMPXCHG16B, XRSTOR (Linux restores its initial
/// FPU state with it at boot), POPCNT, MOVBE, LZCNT, CLAC/STAC (SMAP) or VEX-encoded
/// instructions (the AVX family, BMI, FMA, F16C ...), and the guest's own EOI writes fail
/// through 1 GiB mappings, so 1 GiB pages go too. Its VMCALL never completes either: the
/// vCPU stays on the instruction for good, so KVM's paravirtual features that are hypercalls
/// go (Linux sends its IPIs with KVM_HC_SEND_IPI as soon as it has a second CPU, and hangs
/// bringing that CPU up).
const PVM_MASK: &[&str] = &[
    "cx16",
    "smap",
    "popcnt",
    "movbe",
    "abm",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "fma",
    "avx",
    "f16c",
    "bmi1",
    "avx2",
    "bmi2",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_vp2intersect",
    "amx_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "avx_vnni",
    "avx512_bf16",
    "xop",
    "fma4",
    "tbm",
    "pdpe1gb",
    "kvm_pv_unhalt",
    "kvm_pv_send_ipi",
    "kvm_pv_sched_yield",
];

/// The feature names a template masks.
pub fn template_mask(template: CpuTemplate) -> &'static [&'static str] {
    match template {
        CpuTemplate::Pvm => PVM_MASK,
    }
}

/// Per-vCPU inputs to the adjustment.
#[derive(Clone, Debug)]
pub struct VcpuCpuid<'a> {
    /// This vCPU's APIC id.
    pub apic_id: u8,
    /// vCPUs in the VM (one package, one thread per core).
    pub cpu_count: u8,
    /// TSC frequency for the hypervisor timing leaf, if known.
    pub tsc_khz: Option<u32>,
    /// Whether KVM emulates the TSC deadline timer.
    pub tsc_deadline: bool,
    /// Feature names to hide.
    pub masked: &'a [&'a str],
}

/// CPUID leaf of the hypervisor signature (KVM's).
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// CPUID leaf giving the TSC and local APIC timer frequencies in kHz (EAX, EBX), which
/// lets guests skip calibration.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn entry(function: u32, index: u32, regs: [u32; 4], indexed: bool) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if indexed {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Bits needed to number `n` items (ceil(log2 n)).
fn bits_for(n: u8) -> u32 {
    u32::from(n).next_power_of_two().trailing_zeros()
}

/// Extended topology leaf (0xB or 0x1F) entries for this vCPU: one thread per core, all
/// cores in one package.
fn topology_entries(leaf: u32, p: &VcpuCpuid) -> Vec<kvm_cpuid_entry2> {
    let id = u32::from(p.apic_id);
    vec![
        // Level 0: SMT, one thread per core.
        entry(leaf, 0, [0, 1, 1 << 8, id], true),
        // Level 1: cores in the package.
        entry(
            leaf,
            1,
            [
                bits_for(p.cpu_count),
                u32::from(p.cpu_count),
                (2 << 8) | 1,
                id,
            ],
            true,
        ),
        // Level 2: invalid, ends the enumeration.
        entry(leaf, 2, [0, 0, 2, id], true),
    ]
}

/// Adjusts KVM's supported CPUID for one vCPU.
pub fn adjust(entries: &mut Vec<kvm_cpuid_entry2>, p: &VcpuCpuid) {
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let count = u32::from(p.cpu_count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(p.apic_id) << 24) | (count << 16);
                e.ecx |= 1 << 31;
                if p.tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                let cores = (count - 1).min(63);
                e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | (cores << 26);
            }
            HYPERVISOR_LEAF if p.tsc_khz.is_some() => e.eax = e.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    for leaf in [0xb, 0x1f] {
        if entries.iter().any(|e| e.function == leaf) || (leaf == 0xb && max_basic >= 0xb) {
            entries.retain(|e| e.function != leaf);
            entries.extend(topology_entries(leaf, p));
        }
    }
    if let Some(khz) = p.tsc_khz {
        if entries.iter().any(|e| e.function == HYPERVISOR_LEAF) {
            entries.retain(|e| e.function != TIMING_LEAF);
            entries.push(entry(TIMING_LEAF, 0, [khz, APIC_BUS_KHZ, 0, 0], false));
        }
    }
    for name in p.masked {
        let Some(feature) = FEATURES.iter().find(|f| f.name == *name) else {
            continue;
        };
        for e in entries
            .iter_mut()
            .filter(|e| e.function == feature.leaf && e.index == feature.index)
        {
            *reg_mut(e, feature.reg) &= !(1 << feature.bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x1f, 0, 0, 0], false),
            entry(
                1,
                0,
                [0x806c1, 0x0000_0800, 0x7ffa_3203, 0x1789_fbff],
                false,
            ),
            entry(4, 0, [0x0000_0121, 0, 0, 0], true),
            entry(4, 3, [0x0000_0163, 0, 0, 0], true),
            entry(7, 0, [0, 0xf2bf_27ab, 0x0040_0f4e, 0], true),
            entry(0xb, 0, [1, 2, 0x100, 0], true),
            entry(0x1f, 0, [1, 2, 0x100, 0], true),
            entry(
                HYPERVISOR_LEAF,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
                false,
            ),
            entry(KVM_FEATURES_LEAF, 0, [0x0100_7eff, 0, 0, 0], false),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800], false),
        ]
    }

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn params<'a>(masked: &'a [&'a str]) -> VcpuCpuid<'a> {
        VcpuCpuid {
            apic_id: 3,
            cpu_count: 4,
            tsc_khz: Some(2_000_000),
            tsc_deadline: true,
            masked,
        }
    }

    #[test]
    fn apic_id_topology_and_hypervisor_bit() {
        let mut e = host();
        adjust(&mut e, &params(&[]));
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with several CPUs");

        let core = get(&e, 0xb, 1);
        assert_eq!(core.eax, 2, "4 cores need 2 id bits");
        assert_eq!(core.ebx, 4);
        assert_eq!(core.edx, 3);
        assert_eq!((core.ecx >> 8) & 0xff, 2);
        assert_eq!(get(&e, 0xb, 0).ebx, 1);
        assert_eq!(get(&e, 0x1f, 2).ecx >> 8, 0);

        assert_eq!(get(&e, 4, 0).eax >> 26, 3);
        assert_eq!((get(&e, 4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((get(&e, 4, 3).eax >> 14) & 0xfff, 3, "L3 is shared");
    }

    #[test]
    fn timing_leaf() {
        let mut e = host();
        adjust(&mut e, &params(&[]));
        assert_eq!(get(&e, HYPERVISOR_LEAF, 0).eax, TIMING_LEAF);
        let t = get(&e, TIMING_LEAF, 0);
        assert_eq!(t.eax, 2_000_000);
        assert_eq!(t.ebx, APIC_BUS_KHZ);
        // Adjusting twice (a reboot) does not duplicate it.
        adjust(&mut e, &params(&[]));
        assert_eq!(e.iter().filter(|x| x.function == TIMING_LEAF).count(), 1);
    }

    #[test]
    fn one_cpu_has_no_htt() {
        let mut e = host();
        let p = VcpuCpuid {
            apic_id: 0,
            cpu_count: 1,
            ..params(&[])
        };
        adjust(&mut e, &p);
        assert_eq!(get(&e, 1, 0).edx & (1 << 28), 0);
        assert_eq!(get(&e, 0xb, 1).eax, 0);
    }

    #[test]
    fn pvm_template_masks_features() {
        let mut e = host();
        adjust(&mut e, &params(template_mask(CpuTemplate::Pvm)));
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(l1.ecx & (1 << 28), 0, "avx");
        assert_eq!(l1.ecx & (1 << 23), 0, "popcnt");
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_ne!(l1.ecx & (1 << 20), 0, "sse4.2 untouched");
        let l7 = get(&e, 7, 0);
        assert_eq!(l7.ebx & (1 << 5), 0, "avx2");
        assert_eq!(l7.ebx & (1 << 8), 0, "bmi2");
        assert_ne!(l7.ebx & (1 << 9), 0, "erms untouched");
        assert_eq!(l7.ebx & (1 << 20), 0, "smap");
        assert_eq!(get(&e, 0x8000_0001, 0).edx & (1 << 26), 0, "pdpe1gb");
        // Hypercalls never return on such hosts; the other KVM features stay.
        let kvm = get(&e, KVM_FEATURES_LEAF, 0).eax;
        assert_eq!(kvm & (1 << 11), 0, "PV send IPI");
        assert_eq!(kvm & (1 << 7), 0, "PV unhalt");
        assert_eq!(kvm & (1 << 13), 0, "PV sched yield");
        assert_ne!(kvm & (1 << 3), 0, "kvmclock untouched");
        assert_ne!(kvm & (1 << 6), 0, "PV EOI untouched");
    }

    #[test]
    fn named_mask() {
        let mut e = host();
        adjust(&mut e, &params(&["erms", "x2apic"]));
        assert_eq!(get(&e, 7, 0).ebx & (1 << 9), 0);
        assert_eq!(get(&e, 1, 0).ecx & (1 << 21), 0);
    }

    #[test]
    fn template_names_are_known_features() {
        let names = feature_names();
        for n in PVM_MASK {
            assert!(names.contains(n), "{n}");
        }
    }
}
