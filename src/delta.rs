//! Delta downloads (issue #15): the parts that need no network. A package is a ZIP; an entry
//! whose file already sits in `current` with the same size and CRC-32 need not be fetched when
//! its stored or deflated bytes can be regenerated from that file. This module regenerates
//! entries ([`regenerate_entry`], [`Regenerator`]) and plans which byte ranges of a package are
//! fetched and which are regenerated ([`plan`]), from the package's central directory
//! ([`crate::zipdir`]). Every function here is pure over bytes or values; the fetching and the
//! assembly of the `.part` live with the download.

use std::io::{self, Write};

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

/// The compression methods an entry can be regenerated from (ZIP method numbers 0 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Stored,
    Deflated,
}

impl Method {
    /// The method of a ZIP method number, `None` for any other (never regenerated).
    pub fn from_zip(n: u16) -> Option<Method> {
        match n {
            0 => Some(Method::Stored),
            8 => Some(Method::Deflated),
            _ => None,
        }
    }
}

/// A writer that turns a file's bytes into an entry's bytes, written to `out` as they come
/// (memory stays flat whatever the file size): stored passes them through, deflated compresses
/// them exactly as `pack` does, re-cut into [`PACK_CHUNK`] writes whatever sizes it is given.
pub struct Regenerator<W: Write> {
    inner: Inner<W>,
    chunk: Vec<u8>,
}

enum Inner<W: Write> {
    Stored(W),
    Deflated(flate2::write::DeflateEncoder<W>),
}

impl<W: Write> Regenerator<W> {
    pub fn new(method: Method, out: W) -> Regenerator<W> {
        let inner = match method {
            Method::Stored => Inner::Stored(out),
            Method::Deflated => Inner::Deflated(flate2::write::DeflateEncoder::new(
                out,
                flate2::Compression::new(PACK_DEFLATE_LEVEL),
            )),
        };
        Regenerator {
            inner,
            chunk: Vec::new(),
        }
    }

    /// Compress the last chunk, flush the last block and give the output back.
    pub fn finish(mut self) -> io::Result<W> {
        match self.inner {
            Inner::Stored(w) => Ok(w),
            Inner::Deflated(mut e) => {
                if !self.chunk.is_empty() {
                    e.write_all(&self.chunk)?;
                    self.chunk.clear();
                }
                e.finish()
            }
        }
    }
}

impl<W: Write> Write for Regenerator<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Stored(w) => w.write(buf),
            Inner::Deflated(e) => {
                if self.chunk.capacity() < PACK_CHUNK {
                    self.chunk.reserve_exact(PACK_CHUNK);
                }
                let n = buf.len().min(PACK_CHUNK - self.chunk.len());
                self.chunk.extend_from_slice(&buf[..n]);
                if self.chunk.len() == PACK_CHUNK {
                    e.write_all(&self.chunk)?;
                    self.chunk.clear();
                }
                Ok(n)
            }
        }
    }

    /// Passes a flush of the output on, never one of the compressor (which would change the
    /// compressed bytes): a partial chunk stays buffered until `finish`.
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Stored(w) => w.flush(),
            Inner::Deflated(e) => e.get_mut().flush(),
        }
    }
}

/// The bytes an entry of `method` holding `file` has in a package `pack` made.
pub fn regenerate_entry(file: &[u8], method: Method) -> Vec<u8> {
    let mut r = Regenerator::new(method, Vec::with_capacity(file.len() / 2 + 64));
    // Writing to a Vec cannot fail.
    r.write_all(file).expect("write to a Vec");
    r.finish().expect("finish into a Vec")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::path::Path;

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
        crate::cmd::pack::write_package(io::Cursor::new(Vec::new()), manifest, dir)
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

    /// Every entry's raw bytes in a package, by name, with its method.
    pub(crate) fn raw_entries(zip: &[u8]) -> Vec<(String, u16, Vec<u8>)> {
        let mut ar = zip::ZipArchive::new(io::Cursor::new(zip)).unwrap();
        let mut out = Vec::new();
        for i in 0..ar.len() {
            let mut e = ar.by_index_raw(i).unwrap();
            let name = e.name().to_string();
            let method = match e.compression() {
                zip::CompressionMethod::Stored => 0,
                zip::CompressionMethod::Deflated => 8,
                _ => 99,
            };
            let mut raw = Vec::new();
            e.read_to_end(&mut raw).unwrap();
            out.push((name, method, raw));
        }
        out
    }

    #[test]
    fn pack_entries_regenerate_from_their_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("tree");
        sample_tree(&d);
        let zip = pack_dir(&d);
        let mut checked = 0;
        for (name, method, raw) in raw_entries(&zip) {
            let p = d.join(&name);
            match std::fs::symlink_metadata(&p) {
                Ok(meta) if meta.is_file() => {}
                _ => continue,
            }
            let file = std::fs::read(&p).unwrap();
            let m = Method::from_zip(method).unwrap();
            assert_eq!(regenerate_entry(&file, m), raw, "{name}");
            // The streaming form, fed in odd pieces, gives the same bytes.
            let mut r = Regenerator::new(m, Vec::new());
            for c in file.chunks(7919) {
                r.write_all(c).unwrap();
            }
            assert_eq!(r.finish().unwrap(), raw, "{name} streamed");
            // So does a copy by odd reads.
            let mut r = Regenerator::new(m, Vec::new());
            copy_chunked(&mut OddReader(&file[..], 0), &mut r).unwrap();
            assert_eq!(r.finish().unwrap(), raw, "{name} copied");
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    /// Returns reads of 1, 2, … 4096 bytes in turn.
    struct OddReader<'a>(&'a [u8], usize);

    impl Read for OddReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1 % 4096 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn deflate_depends_on_the_writes_so_they_are_fixed() {
        let f = sample_bytes(2, 200_000, true);
        let chunked = |n: usize| {
            let mut e = flate2::write::DeflateEncoder::new(
                Vec::new(),
                flate2::Compression::new(PACK_DEFLATE_LEVEL),
            );
            for c in f.chunks(n) {
                e.write_all(c).unwrap();
            }
            e.finish().unwrap()
        };
        // Why PACK_CHUNK exists: if this ever holds, the implementation became independent of
        // the writes, and the chunking is merely harmless.
        let differs = chunked(8192) != chunked(PACK_CHUNK);
        eprintln!("8 KiB writes and 64 KiB writes give different bytes: {differs}");
        assert_eq!(regenerate_entry(&f, Method::Deflated), chunked(PACK_CHUNK));
        let mut v = Vec::new();
        assert_eq!(copy_chunked(&mut &b""[..], &mut v).unwrap(), 0);
        assert_eq!(copy_chunked(&mut &f[..], &mut v).unwrap(), f.len() as u64);
        assert!(v == f);
    }

    #[test]
    fn stored_is_the_file() {
        assert_eq!(regenerate_entry(b"abc", Method::Stored), b"abc");
        assert_eq!(Method::from_zip(12), None);
    }
}
