//! A snapshot directory as `vm.restore` reads it before anything is built: `config.json`
//! (parsed, then checked and named as a restore does) and `state.bin` (versioned header,
//! CRC and state), both from the fuzzer. An error naming the file, never a panic.
//!
//! Input: two bytes (little-endian) giving the length of `config.json`, its bytes, then
//! `state.bin`'s.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{CONFIG_FILE, STATE_FILE};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("baton-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (config, state) = rest.split_at(split);
    let dir = dir();
    std::fs::write(dir.join(CONFIG_FILE), config).expect("write config.json");
    std::fs::write(dir.join(STATE_FILE), state).expect("write state.bin");
    if let Ok((mut config, _state)) = vmm::snapshot::load(dir) {
        let _ = vmm::config::check_and_name(&mut config);
    }
});
