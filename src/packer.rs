//! The package format `pack` writes: a ZIP whose every entry is fixed by the file alone (one
//! deflate level and backend, fixed-size writes, no timestamps or extra fields), so that the
//! same directory always packs to the same bytes and a delta download can regenerate an
//! entry from the file in `current` ([`crate::delta::regenerate_entry`]).

use crate::manifest::MANIFEST;
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime};

/// The deflate level `pack` writes with (zlib's default, also Python zipfile's): with flate2's
/// zlib-rs backend, fixed by this crate's dependencies, a file's deflated bytes are a function of
/// the file alone.
pub const PACK_DEFLATE_LEVEL: u32 = 6;

/// The deflate implementation's output depends on how its input is cut into writes (zlib-rs
/// compresses 200 KB of text to 15,620 bytes fed at once or in 64 KiB writes, 15,651 in 8 KiB
/// writes): `pack` and the regeneration both feed it whole writes of this many bytes, the last
/// one shorter.
pub const PACK_CHUNK: usize = 64 * 1024;

/// Copy `from` into `to` in writes of exactly [`PACK_CHUNK`] bytes (the last one shorter,
/// none for an empty input), whatever sizes `from`'s reads return. Returns the bytes copied.
pub fn copy_chunked<R: io::Read + ?Sized, W: Write + ?Sized>(
    from: &mut R,
    to: &mut W,
) -> io::Result<u64> {
    let mut buf = vec![0u8; PACK_CHUNK];
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match from.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n])?;
        total += n as u64;
        if n < buf.len() {
            return Ok(total);
        }
    }
}

/// The options of every entry `pack` writes, fixed so that the same directory always gives the
/// same bytes and each entry's deflated bytes can be regenerated from its file alone
/// ([`crate::delta::regenerate_entry`]): deflate at [`PACK_DEFLATE_LEVEL`] by
/// flate2's zlib-rs backend, the DOS timestamp 1980-01-01 00:00, no extra fields (ZIP64 only
/// for files of 4 GiB and more), the file's permission bits as its only attribute, and the
/// contents fed to the compressor in writes of [`PACK_CHUNK`] bytes.
fn entry_options(mode: u32, large: bool) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .compression_level(Some(i64::from(PACK_DEFLATE_LEVEL)))
        .last_modified_time(DateTime::default())
        .unix_permissions(mode)
        .large_file(large)
}

fn add_tree<W: Write + io::Seek>(
    zip: &mut zip::ZipWriter<W>,
    dir: &Path,
    prefix: &str,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("read dir {}", dir.display()))?
        .collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if prefix.is_empty() && name == MANIFEST {
            continue;
        }
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o777;
        let opts = entry_options(mode, meta.len() >= 1 << 32);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            zip.add_symlink(rel, target.to_string_lossy(), opts)?;
        } else if meta.is_dir() {
            zip.add_directory(format!("{rel}/"), opts)?;
            add_tree(zip, &path, &rel)?;
        } else if meta.is_file() {
            zip.start_file(rel, opts)?;
            let mut f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            copy_chunked(&mut f, zip).with_context(|| format!("pack {}", path.display()))?;
        }
    }
    Ok(())
}

/// Write the package of `dir` with `manifest` as its `manifest.json` (first entry, then the
/// directory's entries in byte order of their names, depth first). Reproducible: the output
/// depends only on the manifest and the directory's names, contents, modes and link targets.
pub fn write_package<W: Write + io::Seek>(out: W, manifest: &[u8], dir: &Path) -> Result<W> {
    let mut zip = zip::ZipWriter::new(out);
    zip.start_file(MANIFEST, entry_options(0o644, false))?;
    copy_chunked(&mut &manifest[..], &mut zip)?;
    add_tree(&mut zip, dir, "")?;
    Ok(zip.finish()?)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;

    /// Text that deflates well, and bytes that do not, deterministically.
    pub(crate) fn sample_bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if text {
                let words = [
                    "printer ",
                    "nozzle ",
                    "bed ",
                    "extruder ",
                    "G1 X10 Y20\n",
                    "temp=210 ",
                ];
                out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
            } else {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.truncate(len);
        out
    }

    pub(crate) fn sample_tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("share/doc")).unwrap();
        std::fs::write(dir.join("bin/app"), sample_bytes(1, 300_000, false)).unwrap();
        std::fs::write(
            dir.join("share/doc/readme.txt"),
            sample_bytes(2, 200_000, true),
        )
        .unwrap();
        std::fs::write(dir.join("share/empty"), b"").unwrap();
        std::fs::write(dir.join("share/tiny"), b"x").unwrap();
        std::os::unix::fs::symlink("app", dir.join("bin/app-link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("bin/app"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }

    pub(crate) fn pack_dir(dir: &Path) -> Vec<u8> {
        let manifest = br#"{"version":"1.0.0","modules":[{"name":"all","src":"bin","dst":"bin"}]}"#;
        write_package(io::Cursor::new(Vec::new()), manifest, dir)
            .unwrap()
            .into_inner()
    }

    #[test]
    fn pack_is_reproducible() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("tree");
        sample_tree(&d);
        let a = pack_dir(&d);
        // Other mtimes, and files rewritten (new inodes, other directory order on disk).
        let f = d.join("share/doc/readme.txt");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&f, &bytes).unwrap();
        std::fs::write(d.join("share/tiny"), b"x").unwrap();
        let b = pack_dir(&d);
        assert!(a == b, "two packs of the same directory differ");
        // A copy of the tree made in another order packs the same.
        let d2 = t.path().join("tree2");
        std::fs::create_dir_all(d2.join("share/doc")).unwrap();
        std::fs::copy(d.join("share/tiny"), d2.join("share/tiny")).unwrap();
        std::fs::copy(d.join("share/empty"), d2.join("share/empty")).unwrap();
        std::fs::copy(&f, d2.join("share/doc/readme.txt")).unwrap();
        std::fs::create_dir_all(d2.join("bin")).unwrap();
        std::fs::copy(d.join("bin/app"), d2.join("bin/app")).unwrap();
        std::os::unix::fs::symlink("app", d2.join("bin/app-link")).unwrap();
        assert!(pack_dir(&d2) == a, "a copy of the tree packs differently");
    }
}
