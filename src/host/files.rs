//! Reading files an attacker may have written: only regular files, sizes
//! checked before anything is allocated, names that cannot leave their
//! checkpoint, and allocations that fail with an error instead of aborting.
//!
//! The bounds (bytes):
//!
//! | what | at most |
//! |---|---|
//! | `config.json`, `model.safetensors.index.json`, JSON inputs | [`MAX_JSON`] (64 MiB) |
//! | one safetensors file, a `.moe` file | [`max_alloc`] (default 4 GiB) |
//! | any one buffer sized by a number read from a file | [`max_alloc`] |
//!
//! `MICROMOE_MAX_ALLOC` (bytes) raises or lowers [`max_alloc`].

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::checkpoint::HostError;
use crate::format::write::AlignedBytes;

/// The largest JSON file read (`config.json`, an index, inputs).
pub const MAX_JSON: u64 = 64 << 20;

/// The largest buffer the host side allocates for one file or one number
/// read from a file: `MICROMOE_MAX_ALLOC` if set, else 4 GiB.
pub fn max_alloc() -> u64 {
    std::env::var("MICROMOE_MAX_ALLOC").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(4 << 30)
}

fn io(path: &Path, e: std::io::Error) -> HostError {
    HostError::Io(path.to_path_buf(), e)
}

fn refuse(path: &Path, why: String) -> HostError {
    HostError::Io(path.to_path_buf(), std::io::Error::other(why))
}

/// `n` zeroed values, or [`HostError::Memory`] naming `what` when `n`
/// elements are more than [`max_alloc`] bytes or cannot be allocated.
pub fn zeroed<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>, HostError> {
    let bytes = (n as u128) * size_of::<T>() as u128;
    let limit = max_alloc();
    if bytes > limit as u128 {
        return Err(HostError::Memory { what: what.to_string(), bytes, limit });
    }
    // Asked for fallibly first: `vec!` would abort where it fails. Then
    // made by `vec!`, which takes zeroed pages from the system for zero
    // values (calloc): a large KV cache costs memory only where it is used.
    let mut probe: Vec<T> = Vec::new();
    probe.try_reserve_exact(n).map_err(|_| HostError::Memory { what: what.to_string(), bytes, limit })?;
    drop(probe);
    Ok(vec![T::default(); n])
}

/// Opens `path` if it is a regular file of at most `limit` bytes (symbolic
/// links are followed; FIFOs, devices and directories are refused before
/// they are opened, so a FIFO cannot block the process).
fn open_regular(path: &Path, limit: u64) -> Result<(File, u64), HostError> {
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(path, "not a regular file".into()));
    }
    let file = File::open(path).map_err(|e| io(path, e))?;
    // The file could have been swapped between the two looks.
    let meta = file.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(path, "not a regular file".into()));
    }
    if meta.len() > limit {
        return Err(refuse(path, format!("{} bytes, more than the limit of {limit}", meta.len())));
    }
    Ok((file, meta.len()))
}

/// Reads exactly `len` bytes into `buf`, failing if the file is shorter or
/// longer than it was when its size was taken.
fn read_exact_len(path: &Path, file: File, buf: &mut [u8]) -> Result<(), HostError> {
    let mut r = file.take(buf.len() as u64 + 1);
    r.read_exact(buf).map_err(|e| io(path, e))?;
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(refuse(path, "the file grew while it was read".into())),
        Err(e) => Err(io(path, e)),
    }
}

/// The whole of a regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, HostError> {
    let (file, len) = open_regular(path, limit)?;
    let mut buf = zeroed::<u8>(len as usize, &path.display().to_string())?;
    read_exact_len(path, file, &mut buf)?;
    Ok(buf)
}

/// A `.moe` file, read straight into an aligned buffer once its header has
/// been checked: the magic, the version and a total length equal to the
/// file's size ([`Model::parse`](crate::Model::parse) then checks
/// everything else).
pub fn read_moe(path: &Path) -> Result<AlignedBytes, HostError> {
    use crate::format::layout::{HEADER_LEN, MAGIC, header, trailer_len, u16_at, u32_at};
    let (mut file, len) = open_regular(path, max_alloc())?;
    let mut head = [0u8; HEADER_LEN];
    let have = (len as usize).min(HEADER_LEN);
    file.read_exact(&mut head[..have]).map_err(|e| io(path, e))?;
    let refused = |e: crate::Error| HostError::Model(e);
    if have < HEADER_LEN {
        return Err(refused(crate::Error::Truncated { needed: HEADER_LEN, actual: have }));
    }
    if head[header::MAGIC..header::MAGIC + MAGIC.len()] != MAGIC {
        return Err(refused(crate::Error::BadMagic));
    }
    let version = u16_at(&head, header::VERSION).unwrap_or(0);
    if trailer_len(version).is_none() {
        return Err(refused(crate::Error::Version { found: version }));
    }
    let total = u64::from(u32_at(&head, header::TOTAL_LEN).unwrap_or(0));
    if total != len {
        return Err(refused(crate::Error::Truncated { needed: total as usize, actual: len as usize }));
    }
    let mut bytes = AlignedBytes::try_zeroed(len as usize).ok_or_else(|| HostError::Memory {
        what: path.display().to_string(),
        bytes: len as u128,
        limit: max_alloc(),
    })?;
    bytes[..HEADER_LEN].copy_from_slice(&head);
    read_exact_len(path, file, &mut bytes[HEADER_LEN..])?;
    Ok(bytes)
}

/// `dir/name` for a file name taken from a checkpoint (an index's shard
/// list): refused unless `name` is relative, has no `..` or root, and the
/// resolved path (symbolic links followed) lies inside `dir`.
pub fn inside(dir: &Path, name: &str) -> Result<PathBuf, HostError> {
    let rel = Path::new(name);
    let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    let path = dir.join(rel);
    if !plain {
        return Err(refuse(&path, format!("{name:?} is not a file name inside the checkpoint")));
    }
    let root = dir.canonicalize().map_err(|e| io(dir, e))?;
    let real = path.canonicalize().map_err(|e| io(&path, e))?;
    if !real.starts_with(&root) {
        return Err(refuse(&path, format!("{name:?} leads outside the checkpoint directory")));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let dir = std::env::temp_dir().join(format!("micromoe-inside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"x").unwrap();
        assert!(inside(&dir, "a.safetensors").is_ok());
        for bad in ["../a.safetensors", "/etc/passwd", "", "./../x", "sub/../../a"] {
            assert!(inside(&dir, bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oversized_allocations_are_errors() {
        assert!(matches!(zeroed::<u8>(usize::MAX, "x"), Err(HostError::Memory { .. })));
        assert!(matches!(zeroed::<f32>(usize::MAX / 2, "x"), Err(HostError::Memory { .. })));
        assert_eq!(zeroed::<u8>(3, "x").unwrap(), vec![0; 3]);
    }

    #[test]
    fn special_files_are_refused_unopened() {
        for p in ["/dev/zero", "/dev/null", "/"] {
            assert!(read_regular(Path::new(p), 1 << 20).is_err(), "{p}");
        }
    }
}
