//! The command line's `key=value` option parsers (and baton-remote's) on arbitrary text:
//! the first byte picks the option, the rest is its value. A configuration or an error that
//! names the problem, never a panic; a migration URL that parses prints back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match pick % 11 {
        0 => drop(api::CpusConfig::from_option_string(s)),
        1 => drop(api::MemoryConfig::from_option_string(s)),
        2 => drop(api::ConsoleConfig::from_option_string(s)),
        3 => drop(api::NetConfig::from_option_string(s)),
        4 => drop(api::DiskConfig::from_option_string(s)),
        5 => drop(api::RngConfig::from_option_string(s)),
        6 => drop(api::SnapshotConfig::from_option_string(s)),
        7 => drop(api::RestoreConfig::from_option_string(s)),
        8 => drop(api::SendMigrationConfig::from_option_string(s)),
        9 => drop(api::ReceiveMigrationConfig::from_option_string(s)),
        _ => match s.parse::<migration::MigrationUrl>() {
            // A URL that parses prints back as one that parses the same.
            Ok(url) => assert_eq!(url.to_string().parse().as_ref(), Ok(&url), "{s}"),
            // An error names what it refused.
            Err(e) => assert!(e.to_string().contains(s), "{s}: {e}"),
        },
    }
});
