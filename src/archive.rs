//! Safe unpacking of a package ZIP into a staging dir, by our own loop over the entries (never
//! the zip crate's `extract()`): names must stay inside the dir, symlinks may not leave it or
//! carry other entries, special files are refused, modes lose setuid/setgid/sticky, and every
//! byte written is counted against the header's size and hard caps.

use crate::error::{fail, ErrorCode};
use crate::fsutil;
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path};

/// Caps on what a package may unpack to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: usize,
    pub max_total: u64,
    /// Uncompressed / compressed above this, for an entry over `ratio_floor` bytes, is a bomb.
    pub max_ratio: u64,
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 50_000,
            max_total: 8 << 30,
            max_ratio: 200,
            ratio_floor: 1 << 20,
        }
    }
}

impl Limits {
    /// Defaults, overridable by `TOPE_OTA_MAX_ENTRIES`, `TOPE_OTA_MAX_UNPACKED` (bytes) and
    /// `TOPE_OTA_MAX_RATIO`.
    pub fn from_env() -> Limits {
        let d = Limits::default();
        let get = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Limits {
            max_entries: get("TOPE_OTA_MAX_ENTRIES")
                .map_or(d.max_entries, |v| usize::try_from(v).unwrap_or(usize::MAX)),
            max_total: get("TOPE_OTA_MAX_UNPACKED").unwrap_or(d.max_total),
            max_ratio: get("TOPE_OTA_MAX_RATIO").unwrap_or(d.max_ratio),
            ratio_floor: d.ratio_floor,
        }
    }
}

/// Free space kept beyond the unpacked size, plus 1 % of it.
pub const SPACE_MARGIN: u64 = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

/// What was unpacked, by clean relative path.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub files: HashSet<String>,
    pub dirs: HashSet<String>,
    pub symlinks: HashMap<String, String>,
    pub bytes: u64,
}

impl Unpacked {
    /// True when `p` is an entry, or a directory holding entries.
    pub fn contains(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        self.files.contains(p)
            || self.dirs.contains(p)
            || self.symlinks.contains_key(p)
            || self.files.iter().any(|f| f.starts_with(&prefix))
    }
}

fn invalid<T>(detail: String) -> Result<T> {
    fail(ErrorCode::PackageInvalid, detail)
}

/// A package symlink may only point down: relative, with no `..` anywhere. Its place in the
/// snapshot is the module's `dst`, not its place in the ZIP, and links can chain (`x -> .`,
/// `y -> x/..`), so any upward step could be made to leave the snapshot; downward links stay
/// inside whatever directory they are moved to.
fn symlink_is_downward(target: &str) -> bool {
    !target.is_empty()
        && !target.starts_with('/')
        && !target.contains('\0')
        && Path::new(target)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The entry count the end-of-central-directory record declares (zip64 aware). The zip crate
/// indexes entries by name, so duplicates collapse there: comparing its count with this one is
/// how they are found.
fn declared_entries(file: &mut File) -> io::Result<Option<u64>> {
    use std::io::{Seek, SeekFrom};
    let len = file.metadata()?.len();
    let tail_len = len.min(22 + 65_535);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len))?;
    file.read_exact(&mut tail)?;
    let Some(pos) = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
    else {
        return Ok(None);
    };
    let total = u16::from_le_bytes([tail[pos + 10], tail[pos + 11]]) as u64;
    if total != 0xFFFF {
        return Ok(Some(total));
    }
    // zip64: the locator sits just before the EOCD and points at the zip64 EOCD record.
    let abs = len - tail_len + pos as u64;
    if abs < 20 {
        return Ok(None);
    }
    let mut loc = [0u8; 20];
    file.seek(SeekFrom::Start(abs - 20))?;
    file.read_exact(&mut loc)?;
    if loc[..4] != [0x50, 0x4b, 0x06, 0x07] {
        return Ok(None);
    }
    let off = u64::from_le_bytes(loc[8..16].try_into().unwrap_or_default());
    let mut rec = [0u8; 40];
    file.seek(SeekFrom::Start(off))?;
    file.read_exact(&mut rec)?;
    if rec[..4] != [0x50, 0x4b, 0x06, 0x06] {
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(
        rec[32..40].try_into().unwrap_or_default(),
    )))
}

/// Unpack `zip` into the existing empty dir `dest`. `free` is the space available there.
pub fn unpack(zip: &Path, dest: &Path, limits: &Limits, free: u64) -> Result<Unpacked> {
    let mut file = File::open(zip).with_context(|| format!("open {}", zip.display()))?;
    let declared =
        declared_entries(&mut file).with_context(|| format!("read {}", zip.display()))?;
    // Before the zip crate reads the central directory into memory.
    if let Some(n) = declared.filter(|&n| n > limits.max_entries as u64) {
        return invalid(format!("{n} entries, the limit is {}", limits.max_entries));
    }
    let mut ar = match zip::ZipArchive::new(io::BufReader::new(file)) {
        Ok(a) => a,
        Err(e) => return invalid(format!("{} is not a readable ZIP: {e}", zip.display())),
    };
    if let Some(n) = declared.filter(|&n| n != ar.len() as u64) {
        return invalid(format!(
            "the central directory lists {n} entries but {} distinct names: duplicate entries",
            ar.len()
        ));
    }
    if ar.len() > limits.max_entries {
        return invalid(format!(
            "{} entries, the limit is {}",
            ar.len(),
            limits.max_entries
        ));
    }

    // Pass 1: names, kinds and sizes from the central directory, before writing anything.
    let mut plan: Vec<(String, Kind, u64, u32)> = Vec::with_capacity(ar.len());
    let mut seen = HashSet::new();
    let mut total: u64 = 0;
    // Every directory the entries imply, made or not by an entry of its own.
    let mut dirs: HashSet<std::path::PathBuf> = HashSet::new();
    for i in 0..ar.len() {
        let e = match ar.by_index_raw(i) {
            Ok(e) => e,
            Err(err) => return invalid(format!("entry {i}: {err}")),
        };
        let raw = e.name().to_string();
        let Some(path) = e.enclosed_name() else {
            return invalid(format!(
                "entry {raw:?} is absolute or leaves the package with .."
            ));
        };
        if raw.contains('\\') || raw.starts_with('/') || path.as_os_str().is_empty() {
            return invalid(format!("entry {raw:?} has an unsafe name"));
        }
        let name = path.to_string_lossy().trim_end_matches('/').to_string();
        let mode = e.unix_mode().unwrap_or(0);
        let kind = match mode & 0o170000 {
            0o120000 => Kind::Symlink,
            0o040000 => Kind::Dir,
            0o100000 | 0 => {
                if e.is_dir() {
                    Kind::Dir
                } else {
                    Kind::File
                }
            }
            _ => return invalid(format!("entry {raw:?} is a device, FIFO or socket")),
        };
        if !seen.insert(name.clone()) {
            return invalid(format!("entry {name:?} appears twice"));
        }
        let size = e.size();
        let packed = e.compressed_size().max(1);
        if size > limits.ratio_floor && size / packed > limits.max_ratio {
            return invalid(format!(
                "entry {name:?} expands {}x ({packed} to {size} bytes): refused as a zip bomb",
                size / packed
            ));
        }
        if name.len() > 1024 || name.matches('/').count() >= 32 {
            return invalid(format!("entry {raw:?} is too long or too deep"));
        }
        let mut anc = Path::new(&name).parent();
        while let Some(a) = anc.filter(|a| !a.as_os_str().is_empty()) {
            if !dirs.insert(a.to_path_buf()) {
                break;
            }
            anc = a.parent();
        }
        total = total.saturating_add(size);
        plan.push((name, kind, size, mode));
    }
    if total > limits.max_total {
        return invalid(format!(
            "the package unpacks to {total} bytes, the limit is {}",
            limits.max_total
        ));
    }
    if dirs.len() > limits.max_entries {
        return invalid(format!(
            "the entries imply {} directories, the limit is {}",
            dirs.len(),
            limits.max_entries
        ));
    }
    // A directory costs a block at least.
    total = total.saturating_add(dirs.len() as u64 * 4096);
    // The snapshot's other files are hard links and cost nothing; the unpacked bytes, the
    // directories and the state writes need room, and a full disk must not stop the services.
    let margin = SPACE_MARGIN + total / 100;
    if total.saturating_add(margin) > free {
        return fail(
            ErrorCode::DiskFull,
            format!(
                "the package unpacks to {total} bytes (+{margin} margin), {free} are free in {}",
                dest.display()
            ),
        );
    }
    let links: HashSet<&str> = plan
        .iter()
        .filter(|p| p.1 == Kind::Symlink)
        .map(|p| p.0.as_str())
        .collect();
    for (name, _, _, _) in &plan {
        let mut anc = Path::new(name.as_str()).parent();
        while let Some(a) = anc.filter(|a| !a.as_os_str().is_empty()) {
            if links.contains(a.to_string_lossy().as_ref()) {
                return invalid(format!(
                    "entry {name:?} lies under the symlink entry {:?}",
                    a
                ));
            }
            anc = a.parent();
        }
    }

    // Pass 2: write, counting bytes.
    let mut out = Unpacked::default();
    let mut buf = vec![0u8; 256 * 1024];
    for (i, (name, kind, size, mode)) in plan.into_iter().enumerate() {
        let to = dest.join(&name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| fsutil::io_error(e, "create dir", parent))?;
        }
        let mut entry = match ar.by_index(i) {
            Ok(e) => e,
            Err(err) => return invalid(format!("entry {name:?}: {err}")),
        };
        match kind {
            Kind::Dir => {
                fs::create_dir_all(&to).map_err(|e| fsutil::io_error(e, "create dir", &to))?;
                let m = if mode & 0o777 != 0 {
                    mode & 0o777
                } else {
                    0o755
                };
                fs::set_permissions(&to, fs::Permissions::from_mode(m | 0o700))
                    .map_err(|e| fsutil::io_error(e, "chmod", &to))?;
                out.dirs.insert(name);
            }
            Kind::Symlink => {
                let mut target = String::new();
                if let Err(err) = (&mut entry).take(4096).read_to_string(&mut target) {
                    return invalid(format!("symlink entry {name:?}: {err}"));
                }
                if !symlink_is_downward(&target) {
                    return invalid(format!(
                        "symlink entry {name:?} -> {target:?} may point outside: only relative links without .. are allowed"
                    ));
                }
                std::os::unix::fs::symlink(&target, &to)
                    .map_err(|e| fsutil::io_error(e, "symlink", &to))?;
                out.symlinks.insert(name, target);
            }
            Kind::File => {
                // setuid, setgid and sticky bits are dropped; the rest (exec bits) kept.
                let m = if mode & 0o777 != 0 {
                    mode & 0o777
                } else {
                    0o644
                };
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(m)
                    .open(&to)
                    .map_err(|e| fsutil::io_error(e, "create", &to))?;
                let mut written: u64 = 0;
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return invalid(format!("entry {name:?} is corrupt: {e}")),
                    };
                    written += n as u64;
                    if written > size {
                        return invalid(format!(
                            "entry {name:?} holds more than the {size} bytes its header says"
                        ));
                    }
                    f.write_all(&buf[..n])
                        .map_err(|e| fsutil::io_error(e, "write", &to))?;
                }
                if written != size {
                    return invalid(format!(
                        "entry {name:?} holds {written} bytes, its header says {size}"
                    ));
                }
                fs::set_permissions(&to, fs::Permissions::from_mode(m))
                    .map_err(|e| fsutil::io_error(e, "chmod", &to))?;
                out.bytes += written;
                out.files.insert(name);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets() {
        for ok in ["c", "lib/libx.so.1", "./x", "a/./b"] {
            assert!(symlink_is_downward(ok), "{ok}");
        }
        for bad in ["", "../c", "a/../../c", "x/..", "/etc/passwd", ".."] {
            assert!(!symlink_is_downward(bad), "{bad}");
        }
    }
}
