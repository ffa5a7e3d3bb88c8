//! Snapshots on disk: a directory with the configuration (`config.json`), the VM's state in
//! baton's versioned format (`state.bin`: magic, format version, length and checksum ahead
//! of the payload) and guest RAM (`memory.bin`, the RAM ranges one after the other; pages
//! that are all zero are holes, so an idle 4 GiB guest takes little disk and restores fast).
//!
//! Files are written under temporary names and renamed last, so a directory either holds a
//! whole snapshot or none.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use api::VmConfig;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::vm::VmState;

/// The configuration file of a snapshot.
pub const CONFIG_FILE: &str = "config.json";
/// The state file of a snapshot.
pub const STATE_FILE: &str = "state.bin";
/// The memory file of a snapshot.
pub const MEMORY_FILE: &str = "memory.bin";
/// Zero runs shorter than this are written out rather than left as holes.
const CHUNK: usize = 1 << 20;

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a file:// URL with an absolute path.
    #[error("'{0}' is not a file:///absolute/directory URL")]
    Url(String),
    /// The directory already holds a snapshot.
    #[error("{0} already holds a snapshot; choose a new or empty directory")]
    Exists(PathBuf),
    /// A file could not be written or read.
    #[error("Cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// The state file is not a snapshot of this version.
    #[error("{0} is not a usable baton snapshot")]
    Format(PathBuf, #[source] migration::snapshot::SnapshotError),
    /// The configuration file does not parse.
    #[error("{0} is not a usable VM configuration")]
    Config(PathBuf, #[source] serde_json::Error),
    /// The memory file does not match the configured RAM.
    #[error("{0} holds {1} bytes; the configuration has {2} bytes of RAM")]
    MemorySize(PathBuf, u64, u64),
}

/// The directory of a `file:///dir` URL.
pub fn dir_of(url: &str) -> Result<PathBuf, Error> {
    url.strip_prefix("file://")
        .filter(|p| p.starts_with('/') && p.len() > 1)
        .map(PathBuf::from)
        .ok_or_else(|| Error::Url(url.to_string()))
}

/// Each RAM region's host address and length, in guest address order.
pub fn host_ranges(mem: &GuestMemory) -> Vec<(*mut u8, usize)> {
    mem.iter()
        .map(|r| {
            let host = mem
                .get_host_address(r.start_addr())
                .expect("region start is inside guest memory");
            (host, r.len() as usize)
        })
        .collect()
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Io(what, path.to_path_buf(), e)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, Error> {
    let tmp = dir.join(format!(".{name}.partial"));
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("write", &tmp))?;
    Ok(tmp)
}

fn write_memory(dir: &Path, mem: &GuestMemory) -> Result<PathBuf, Error> {
    let tmp = dir.join(format!(".{MEMORY_FILE}.partial"));
    let f = File::create(&tmp).map_err(io("create", &tmp))?;
    let mut offset = 0u64;
    for (host, len) in host_ranges(mem) {
        // SAFETY: the VM is paused (no vCPU or device writes guest memory) and the mapping
        // stays alive while `mem` is borrowed; it is `len` bytes long.
        let ram = unsafe { std::slice::from_raw_parts(host, len) };
        for (i, chunk) in ram.chunks(CHUNK).enumerate() {
            if chunk.iter().all(|b| *b == 0) {
                continue;
            }
            f.write_all_at(chunk, offset + (i * CHUNK) as u64)
                .map_err(io("write", &tmp))?;
        }
        offset += len as u64;
    }
    f.set_len(offset).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("write", &tmp))?;
    Ok(tmp)
}

/// Writes a snapshot of a paused VM into `dir` (created if missing).
pub fn save(
    dir: &Path,
    config: &VmConfig,
    state: &VmState,
    mem: &GuestMemory,
) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let final_state = dir.join(STATE_FILE);
    if final_state.exists() {
        return Err(Error::Exists(dir.to_path_buf()));
    }
    let config_json = serde_json::to_vec_pretty(config).expect("configurations serialise");
    let state_bytes =
        migration::snapshot::encode(state).map_err(|e| Error::Format(final_state.clone(), e))?;
    let written = [
        (write_file(dir, CONFIG_FILE, &config_json)?, CONFIG_FILE),
        (write_memory(dir, mem)?, MEMORY_FILE),
        // The state goes last: its presence marks a whole snapshot.
        (write_file(dir, STATE_FILE, &state_bytes)?, STATE_FILE),
    ];
    for (tmp, name) in written {
        let to = dir.join(name);
        std::fs::rename(&tmp, &to).map_err(io("rename", &to))?;
    }
    Ok(())
}

/// Reads the configuration and state of the snapshot in `dir`.
pub fn load(dir: &Path) -> Result<(VmConfig, VmState), Error> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let config = serde_json::from_slice(&bytes).map_err(|e| Error::Config(path, e))?;
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let state = migration::snapshot::decode(&bytes).map_err(|e| Error::Format(path, e))?;
    Ok((config, state))
}

/// Fills `mem`, fresh and not yet running, from the snapshot's memory file: only the parts
/// that hold data are read (holes are zero already).
pub fn load_memory(dir: &Path, mem: &GuestMemory) -> Result<(), Error> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io("open", &path))?;
    let size = f.metadata().map_err(io("read", &path))?.len();
    let ranges = host_ranges(mem);
    let total: u64 = ranges.iter().map(|(_, l)| *l as u64).sum();
    if size != total {
        return Err(Error::MemorySize(path, size, total));
    }
    let extents = data_extents(&f, total).map_err(io("read", &path))?;
    let mut base = 0u64;
    for (host, len) in ranges {
        // SAFETY: nothing runs on this memory yet; the mapping is `len` bytes and stays
        // alive while `mem` is borrowed.
        let ram = unsafe { std::slice::from_raw_parts_mut(host, len) };
        let end = base + len as u64;
        for &(start, n) in &extents {
            // The part of this extent that falls in this RAM range.
            let (from, to) = (start.max(base), (start + n).min(end));
            if from < to {
                f.read_exact_at(&mut ram[(from - base) as usize..(to - base) as usize], from)
                    .map_err(io("read", &path))?;
            }
        }
        base = end;
    }
    Ok(())
}

/// The extents of `f`'s first `len` bytes that hold data (the rest are holes, reading zero),
/// page-aligned, as (offset, length).
pub fn data_extents(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(data) = seek(f, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let start = data & !4095;
        let end = hole.div_ceil(4096) * 4096;
        extents.push((start, end.min(len) - start));
        at = hole;
    }
    Ok(extents)
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE; None past the last data.
fn seek(f: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(dir_of("file:///tmp/s").unwrap(), PathBuf::from("/tmp/s"));
        for bad in ["/tmp/s", "file://tmp", "file:///", "unix:/x", "file://"] {
            assert!(dir_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_round_trip_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("baton-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let (host, len) = host_ranges(&mem)[0];
        // SAFETY: test memory nobody else uses, `len` bytes.
        let ram = unsafe { std::slice::from_raw_parts_mut(host, len) };
        ram[5] = 1;
        ram[(3 << 20) + 17] = 2;
        ram[len - 1] = 3;
        let tmp = write_memory(&dir, &mem).unwrap();
        std::fs::rename(tmp, dir.join(MEMORY_FILE)).unwrap();
        let back = crate::memory::create(64 << 20, true).unwrap();
        load_memory(&dir, &back).unwrap();
        let (h2, l2) = host_ranges(&back)[0];
        // SAFETY: as above.
        let ram2 = unsafe { std::slice::from_raw_parts(h2, l2) };
        assert!(ram == ram2);
        // A file of another size is refused.
        let small = crate::memory::create(32 << 20, false).unwrap();
        assert!(matches!(
            load_memory(&dir, &small),
            Err(Error::MemorySize(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
