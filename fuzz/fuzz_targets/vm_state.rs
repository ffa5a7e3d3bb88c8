//! Saved state as a snapshot file or a migration's State message carries it: the versioned
//! header on arbitrary bytes (read as a whole and as a stream, which must agree), the JSON
//! payload on arbitrary bytes, and each device's own state built into its device. An error
//! naming the problem, never a panic.
#![no_main]

use devices::virtio::rng::Rng;
use devices::virtio::DeviceState;
use libfuzzer_sys::fuzz_target;
use vmm::vm::VmState;

fuzz_target!(|data: &[u8]| {
    // The whole file: magic, version, length and CRC come first. Both readers, from bytes
    // and from a stream, agree on whether it is good.
    let decoded = migration::snapshot::decode::<VmState>(data);
    let read = migration::snapshot::read_from::<VmState, _>(data);
    assert_eq!(
        decoded.is_ok(),
        read.is_ok(),
        "{:?} {:?}",
        decoded.as_ref().err(),
        read.as_ref().err()
    );
    // The payload past the CRC, which the fuzzer could not forge.
    if let Ok(state) = serde_json::from_slice::<VmState>(data) {
        for (_, transport) in &state.devices {
            if let DeviceState::Rng(s) = &transport.device {
                let _ = Rng::restore(s.clone());
            }
        }
        let _ = devices::legacy::Cmos::from_state(&state.cmos);
    }
    if let Ok(DeviceState::Rng(s)) = serde_json::from_slice::<DeviceState>(data) {
        let _ = Rng::restore(s);
    }
});
