//! Delta downloads (issue #15): the parts that need no network. A package is a ZIP; an entry
//! whose file already sits in `current` with the same size and CRC-32 need not be fetched when
//! its stored or deflated bytes can be regenerated from that file. This module regenerates
//! entries ([`regenerate_entry`], [`Regenerator`]) and plans which byte ranges of a package are
//! fetched and which are regenerated ([`plan`]), from the package's central directory
//! ([`crate::zipdir`]). Every function here is pure over bytes or values; the fetching and the
//! assembly of the `.part` live with the download.

use std::io::{self, Write};

use crate::packer::{PACK_CHUNK, PACK_DEFLATE_LEVEL};

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
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use crate::packer::copy_chunked;
    use crate::packer::tests::{pack_dir, sample_bytes, sample_tree};
    use std::io::Read;

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

// ---- The plan ----------------------------------------------------------------------------

use crate::manifest::{Manifest, MANIFEST};
use crate::zipdir::{Directory, Entry, ZipDirError, LOCAL_HEADER_LEN, LOCAL_SIG};
use std::collections::HashMap;

/// An entry that may be regenerated from a file of `current`: the entry's place in the
/// directory and the file's path relative to `current`, through the manifest's `src` → `dst`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    pub entry: usize,
    pub local: String,
}

/// What the device has at a path of `current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalFile {
    pub size: u64,
    pub crc32: u32,
}

/// Where an entry lands in a snapshot: the last module whose `src` is the entry or a directory
/// above it (install places the modules in order, a later one over an earlier one).
fn snapshot_path(manifest: &Manifest, name: &str) -> Option<String> {
    manifest.modules.iter().rev().find_map(|m| {
        let src = m.src.trim_end_matches('/');
        if name == src {
            Some(m.dst.clone())
        } else {
            name.strip_prefix(src)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|rest| format!("{}/{rest}", m.dst.trim_end_matches('/')))
        }
    })
}

fn clean_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The entries worth looking for on the device: regular, non-empty, unencrypted, stored or
/// deflated files with a clean name that the manifest installs somewhere, without a data descriptor (whose
/// length would make the entry's layout a guess), and not the manifest itself (read anyway).
/// Sorted by entry. A file of `current` that two entries claim (modules of one `dst`, which a
/// valid manifest never has) is no candidate: a hostile directory must not make the device read
/// or recompress one file once per entry. The caller looks each `local` up in `current` (size
/// first; the CRC-32 only when the size matches the entry's) to build the view [`plan`] takes.
pub fn candidates(dir: &Directory, manifest: &Manifest) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = dir
        .entries
        .iter()
        .filter(|e| {
            e.is_file()
                && !e.is_encrypted()
                && !e.has_data_descriptor()
                && Method::from_zip(e.method).is_some()
                && e.compressed_size > 0
                && e.uncompressed_size > 0
        })
        .filter_map(|e| {
            let name = e.name_str().filter(|n| clean_name(n) && *n != MANIFEST)?;
            let local = snapshot_path(manifest, name).filter(|l| clean_name(l))?;
            Some(Candidate {
                entry: e.index,
                local,
            })
        })
        .collect();
    let mut claims: HashMap<&str, usize> = HashMap::new();
    for c in &out {
        *claims.entry(c.local.as_str()).or_default() += 1;
    }
    let shared: std::collections::HashSet<String> = claims
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(l, _)| l.to_string())
        .collect();
    out.retain(|c| !shared.contains(&c.local));
    out.sort();
    out
}

/// What the planner may assume, each proven by the caller before (see [`calibration_entry`]).
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Deflated entries regenerate: the package's compressor is ours (one entry compared).
    pub deflate_proven: bool,
    /// Local headers regenerate from the directory ([`regenerate_local_header`], one compared).
    pub headers_proven: bool,
    /// Regenerated bytes between two fetched ranges are fetched too when they are this short:
    /// one range fewer is worth more than a few bytes.
    pub merge_gap: u64,
}

impl Default for PlanOptions {
    fn default() -> PlanOptions {
        PlanOptions {
            deflate_proven: false,
            headers_proven: false,
            merge_gap: 16 * 1024,
        }
    }
}

/// One piece of the package, `[start, end)`; the pieces of a plan cover it in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Fetched by Range.
    Fetch { start: u64, end: u64 },
    /// Entry `entry`'s local header, regenerated from the central directory.
    Header { entry: usize, start: u64, end: u64 },
    /// Entry `entry`'s data, regenerated from `current/<local>`; the data ends at `end`, and
    /// the bytes of it before `start` (a prefix fetched, or assembled before a crash) are
    /// regenerated but not written.
    Reuse {
        entry: usize,
        local: String,
        start: u64,
        end: u64,
    },
}

impl Piece {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Piece::Fetch { start, end }
            | Piece::Header { start, end, .. }
            | Piece::Reuse { start, end, .. } => (start, end),
        }
    }

    fn len(&self) -> u64 {
        let (s, e) = self.range();
        e - s
    }
}

/// The ordered pieces of a package and what they add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub pieces: Vec<Piece>,
    /// Bytes fetched, and in how many ranges.
    pub fetch_bytes: u64,
    pub fetch_ranges: usize,
    /// Bytes regenerated (headers and data).
    pub reuse_bytes: u64,
}

/// Entry `i`'s extent: `[local header offset, next entry's offset or the directory)`, in
/// offset order. Entries that overlap, share an offset or leave no room for their header and
/// data make the directory a liar.
fn extents(dir: &Directory) -> Result<Vec<(usize, u64, u64)>, ZipDirError> {
    let mut by_off: Vec<&Entry> = dir.entries.iter().collect();
    by_off.sort_by_key(|e| (e.local_header_offset, e.index));
    let mut out = Vec::with_capacity(by_off.len());
    for (k, e) in by_off.iter().enumerate() {
        let next = by_off
            .get(k + 1)
            .map_or(dir.end.cd_start, |n| n.local_header_offset);
        let need = e.min_local_header() + e.compressed_size;
        if next < e.local_header_offset || next - e.local_header_offset < need {
            return Err(ZipDirError::Invalid(format!(
                "entry {} ({:?}) at {} needs {need} bytes, the next record starts at {next}",
                e.index,
                String::from_utf8_lossy(&e.name),
                e.local_header_offset
            )));
        }
        out.push((e.index, e.local_header_offset, next));
    }
    Ok(out)
}

/// The local header `pack` writes for `e`: the directory's fields, name and extra field (their
/// lengths come from the directory's 16-bit fields, so they fit).
#[allow(clippy::cast_possible_truncation)]
pub fn regenerate_local_header(e: &Entry) -> Vec<u8> {
    let mut h = Vec::with_capacity(LOCAL_HEADER_LEN as usize + e.name.len() + e.extra.len());
    h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
    h.extend_from_slice(&e.version_needed.to_le_bytes());
    h.extend_from_slice(&e.flags.to_le_bytes());
    h.extend_from_slice(&e.method.to_le_bytes());
    h.extend_from_slice(&e.mod_time.to_le_bytes());
    h.extend_from_slice(&e.mod_date.to_le_bytes());
    h.extend_from_slice(&e.crc32.to_le_bytes());
    // A size past 32 bits is 0xFFFFFFFF here (its value is in the ZIP64 extra field), as the
    // zip crate writes it; `as u32` would keep its low bits.
    let low = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    h.extend_from_slice(&low(e.compressed_size).to_le_bytes());
    h.extend_from_slice(&low(e.uncompressed_size).to_le_bytes());
    h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(e.extra.len() as u16).to_le_bytes());
    h.extend_from_slice(&e.name);
    h.extend_from_slice(&e.extra);
    h
}

/// A reusable entry's `(header start, data start, data end)`. With no data descriptor the data
/// ends where the next record starts, so it starts `compressed_size` earlier, and whatever is
/// left before it is the local header, whatever its extra field holds.
fn layout(e: &Entry, start: u64, next: u64) -> (u64, u64, u64) {
    (start, next - e.compressed_size, next)
}

/// The largest file the calibration reads (it, its entry and the regeneration are held in
/// memory).
pub const MAX_CALIBRATION: u64 = 1 << 20;

/// The entry `plan` can be proven on: the smallest deflated entry of at least 1 KiB that
/// deflate really shrank (to 90 % or less: incompressible data comes out as stored blocks,
/// which any compressor reproduces, and would prove nothing), else the smallest deflated one,
/// whose file the device has with the entry's size and CRC-32. Fetch its local header and
/// data, compare them with [`regenerate_local_header`] and [`regenerate_entry`] of the file,
/// and set [`PlanOptions`] from the answers. `None`: no deflated entry can be reused.
pub fn calibration_entry(
    dir: &Directory,
    candidates: &[Candidate],
    current: &HashMap<String, LocalFile>,
) -> Option<usize> {
    let matching = candidates.iter().filter_map(|c| {
        let e = &dir.entries[c.entry];
        let f = current.get(&c.local)?;
        (e.method == 8
            && f.size == e.uncompressed_size
            && f.crc32 == e.crc32
            && e.uncompressed_size <= MAX_CALIBRATION)
            .then_some(e)
    });
    matching
        .min_by_key(|e| {
            let shrunk = e.compressed_size * 10 <= e.uncompressed_size * 9;
            (
                !shrunk,
                e.compressed_size < 1024,
                e.compressed_size,
                e.index,
            )
        })
        .map(|e| e.index)
}

/// Plan the assembly of the package `dir` describes: each candidate whose file the device has
/// (`current`: size and CRC-32 by path) is regenerated when its method is stored (and its sizes
/// agree) or deflated with `deflate_proven`; its local header is regenerated with
/// `headers_proven` when the header's place is exactly as long as a regenerated one and the
/// entry has no ZIP64 field; everything else (other entries, headers, gaps, the directory, the
/// end records) is fetched, and regenerated runs of at most `merge_gap` bytes between two fetched
/// ranges are fetched with them. A pure function: the same directory, candidates and view give
/// the same plan, which is how an assembly interrupted by a crash continues.
pub fn plan(
    dir: &Directory,
    candidates: &[Candidate],
    current: &HashMap<String, LocalFile>,
    opts: &PlanOptions,
) -> Result<Plan, ZipDirError> {
    let reusable: HashMap<usize, &str> = candidates
        .iter()
        .filter(|c| {
            let Some(e) = dir.entries.get(c.entry) else {
                return false;
            };
            let Some(f) = current.get(&c.local) else {
                return false;
            };
            let same = f.size == e.uncompressed_size && f.crc32 == e.crc32;
            let method_ok = match Method::from_zip(e.method) {
                Some(Method::Stored) => e.compressed_size == e.uncompressed_size,
                Some(Method::Deflated) => opts.deflate_proven,
                None => false,
            };
            same && method_ok && !e.has_data_descriptor() && !e.is_encrypted()
        })
        .map(|c| (c.entry, c.local.as_str()))
        .collect();

    let mut raw: Vec<Piece> = Vec::new();
    let push_fetch = |v: &mut Vec<Piece>, start: u64, end: u64| {
        if start < end {
            if let Some(Piece::Fetch { end: e, .. }) = v.last_mut() {
                if *e == start {
                    *e = end;
                    return;
                }
            }
            v.push(Piece::Fetch { start, end });
        }
    };
    let ext = extents(dir)?;
    let first = ext.first().map_or(dir.end.cd_start, |x| x.1);
    push_fetch(&mut raw, 0, first);
    for (i, start, next) in ext {
        let e = &dir.entries[i];
        match reusable.get(&i) {
            Some(local) => {
                let (h, d, end) = layout(e, start, next);
                let exact = d - h == LOCAL_HEADER_LEN + e.name.len() as u64 + e.extra.len() as u64;
                if opts.headers_proven && exact && !e.zip64 {
                    raw.push(Piece::Header {
                        entry: i,
                        start: h,
                        end: d,
                    });
                } else {
                    push_fetch(&mut raw, h, d);
                }
                if d < end {
                    raw.push(Piece::Reuse {
                        entry: i,
                        local: local.to_string(),
                        start: d,
                        end,
                    });
                }
            }
            None => push_fetch(&mut raw, start, next),
        }
    }
    push_fetch(&mut raw, dir.end.cd_start, dir.end.len);

    // Merge: a run of regenerated pieces between two fetched ones, short enough, is fetched.
    let mut pieces: Vec<Piece> = Vec::with_capacity(raw.len());
    let mut k = 0;
    while k < raw.len() {
        if matches!(raw[k], Piece::Fetch { .. }) {
            let (s, e) = raw[k].range();
            push_fetch(&mut pieces, s, e);
            k += 1;
            continue;
        }
        let run_end = (k..raw.len())
            .find(|&j| matches!(raw[j], Piece::Fetch { .. }))
            .unwrap_or(raw.len());
        let run_len: u64 = raw[k..run_end].iter().map(Piece::len).sum();
        let between = k > 0 && run_end < raw.len();
        if between && run_len <= opts.merge_gap {
            let (s, _) = raw[k].range();
            let (_, e) = raw[run_end - 1].range();
            push_fetch(&mut pieces, s, e);
        } else {
            pieces.extend(raw[k..run_end].iter().cloned());
        }
        k = run_end;
    }

    let mut fetch_bytes = 0;
    let mut fetch_ranges = 0;
    let mut reuse_bytes = 0;
    for p in &pieces {
        match p {
            Piece::Fetch { .. } => {
                fetch_bytes += p.len();
                fetch_ranges += 1;
            }
            _ => reuse_bytes += p.len(),
        }
    }
    Ok(Plan {
        pieces,
        fetch_bytes,
        fetch_ranges,
        reuse_bytes,
    })
}

/// What the delta's decision knows of the device and the link, in seconds and bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Time a request costs before its first byte.
    pub rtt: f64,
    /// Bytes per second the link delivers.
    pub link: f64,
    /// File bytes per second recompressed into deflated entries, and copied into stored ones.
    pub deflate: f64,
    pub stored: f64,
}

/// Expected seconds to finish the package from byte `pos` of `pieces` as a delta, and as a full
/// download (one request for the rest). Fetched ranges cost a request each, or one per
/// `per_request` where the server answers multi-range requests; regeneration costs the file's
/// bytes at the device's rate (a deflated entry's file is about `uncompressed_size` bytes).
pub fn remaining_cost(
    dir: &Directory,
    pieces: &[Piece],
    pos: u64,
    size: u64,
    rates: &Rates,
    per_request: usize,
) -> (f64, f64) {
    let mut fetch = 0u64;
    let mut ranges = 0usize;
    let mut regen = 0.0;
    for p in pieces {
        let (start, end) = p.range();
        if end <= pos {
            continue;
        }
        let start = start.max(pos);
        match p {
            Piece::Fetch { .. } => {
                fetch += end - start;
                ranges += 1;
            }
            Piece::Header { .. } => {}
            Piece::Reuse { entry, .. } => {
                let e = &dir.entries[*entry];
                regen += if e.method == 8 {
                    e.uncompressed_size as f64 / rates.deflate.max(1.0)
                } else {
                    (end - start) as f64 / rates.stored.max(1.0)
                };
            }
        }
    }
    let link = rates.link.max(1.0);
    let requests = ranges.div_ceil(per_request.max(1));
    let delta = fetch as f64 / link + requests as f64 * rates.rtt + regen;
    let full = size.saturating_sub(pos) as f64 / link + rates.rtt;
    (delta, full)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod plan_tests {
    use super::*;
    use crate::packer::tests::{sample_bytes, sample_tree};
    use crate::zipdir::tests::read_all;
    use crate::zipdir::Limits;
    use std::path::Path;

    const MANIFEST_JSON: &[u8] = br#"{"version":"2.0.0","modules":[
        {"name":"bin","src":"bin","dst":"bin"},
        {"name":"docs","src":"share","dst":"usr/share"}]}"#;

    fn manifest() -> Manifest {
        serde_json::from_slice(MANIFEST_JSON).unwrap()
    }

    fn pack(dir: &Path) -> Vec<u8> {
        crate::packer::write_package(io::Cursor::new(Vec::new()), MANIFEST_JSON, dir)
            .unwrap()
            .into_inner()
    }

    /// `current` as installed from a tree packed with MANIFEST_JSON: share/ lands in usr/share/.
    fn install(tree: &Path, current: &Path) {
        for (from, to) in [("bin", "bin"), ("share", "usr/share")] {
            let o = std::process::Command::new("cp")
                .arg("-a")
                .arg(tree.join(from))
                .arg(current.join(to))
                .status()
                .unwrap();
            assert!(o.success());
        }
    }

    /// The view of `current` the caller builds: size, and CRC-32 when the size matches.
    fn view(dir: &Directory, cands: &[Candidate], current: &Path) -> HashMap<String, LocalFile> {
        let mut v = HashMap::new();
        for c in cands {
            let p = current.join(&c.local);
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_file() && m.len() == dir.entries[c.entry].uncompressed_size {
                let bytes = std::fs::read(&p).unwrap();
                v.insert(
                    c.local.clone(),
                    LocalFile {
                        size: m.len(),
                        crc32: crc32fast::hash(&bytes),
                    },
                );
            }
        }
        v
    }

    /// Carry a plan out locally: fetched bytes from `pkg`, regenerated ones from `current`.
    fn assemble(plan: &Plan, dir: &Directory, pkg: &[u8], current: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &plan.pieces {
            let (s, e) = p.range();
            assert_eq!(out.len() as u64, s, "pieces in order, without gaps");
            match p {
                Piece::Fetch { .. } => out.extend_from_slice(&pkg[s as usize..e as usize]),
                Piece::Header { entry, .. } => {
                    out.extend(regenerate_local_header(&dir.entries[*entry]))
                }
                Piece::Reuse { entry, local, .. } => {
                    let m = Method::from_zip(dir.entries[*entry].method).unwrap();
                    let f = std::fs::read(current.join(local)).unwrap();
                    let data = regenerate_entry(&f, m);
                    let skip = data.len() - (e - s) as usize;
                    out.extend(&data[skip..])
                }
            }
            assert_eq!(out.len() as u64, e, "{p:?}");
        }
        assert_eq!(out.len(), pkg.len());
        out
    }

    struct Setup {
        _t: tempfile::TempDir,
        current: std::path::PathBuf,
        pkg: Vec<u8>,
        dir: Directory,
        cands: Vec<Candidate>,
        view: HashMap<String, LocalFile>,
    }

    /// v1 installed in `current`; v2 = v1 with `change` applied, packed.
    fn setup(change: impl FnOnce(&Path)) -> Setup {
        let t = tempfile::tempdir().unwrap();
        let v1 = t.path().join("v1");
        sample_tree(&v1);
        for i in 0..6 {
            std::fs::write(
                v1.join(format!("bin/lib{i}.so")),
                sample_bytes(10 + i, 50_000, i % 2 == 0),
            )
            .unwrap();
        }
        std::fs::write(v1.join("bin/small.cfg"), b"speed=10\n").unwrap();
        let current = t.path().join("current");
        std::fs::create_dir_all(current.join("usr")).unwrap();
        install(&v1, &current);
        let v2 = t.path().join("v2");
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&v1)
            .arg(&v2)
            .status()
            .unwrap();
        change(&v2);
        let pkg = pack(&v2);
        let dir = read_all(&pkg, &Limits::default()).unwrap();
        let cands = candidates(&dir, &manifest());
        let view = view(&dir, &cands, &current);
        Setup {
            _t: t,
            current,
            pkg,
            dir,
            cands,
            view,
        }
    }

    fn proven() -> PlanOptions {
        PlanOptions {
            deflate_proven: true,
            headers_proven: true,
            merge_gap: 0,
        }
    }

    fn reused(plan: &Plan, dir: &Directory) -> Vec<String> {
        plan.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Reuse { entry, .. } => Some(dir.entries[*entry].name_str()?.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn candidates_follow_the_manifest() {
        let s = setup(|_| {});
        let names: Vec<(&str, &str)> = s
            .cands
            .iter()
            .map(|c| (s.dir.entries[c.entry].name_str().unwrap(), c.local.as_str()))
            .collect();
        // No manifest, directory, symlink or empty file; share/ → usr/share/.
        assert!(names.contains(&("share/doc/readme.txt", "usr/share/doc/readme.txt")));
        assert!(names.contains(&("bin/app", "bin/app")));
        assert!(!names.iter().any(|n| n.0 == MANIFEST
            || n.0.ends_with('/')
            || n.0 == "bin/app-link"
            || n.0 == "share/empty"));
        assert_eq!(snapshot_path(&manifest(), "bin"), Some("bin".into()));
        assert_eq!(snapshot_path(&manifest(), "binx/a"), None);
    }

    #[test]
    fn identical_files_are_reused_and_the_package_reassembles() {
        let s = setup(|_| {});
        let plan = plan(&s.dir, &s.cands, &s.view, &proven()).unwrap();
        let mut r = reused(&plan, &s.dir);
        r.sort();
        let mut all: Vec<String> = s
            .cands
            .iter()
            .map(|c| s.dir.entries[c.entry].name_str().unwrap().to_string())
            .collect();
        all.sort();
        assert_eq!(r, all, "every candidate is on the device");
        assert!(plan
            .pieces
            .iter()
            .any(|p| matches!(p, Piece::Header { .. })));
        assert_eq!(plan.fetch_bytes + plan.reuse_bytes, s.pkg.len() as u64);
        assert!(plan.fetch_bytes < s.pkg.len() as u64 / 10, "{plan:?}");
        let out = assemble(&plan, &s.dir, &s.pkg, &s.current);
        assert!(out == s.pkg, "the assembled package is the package");
        // The calibration entry is a deflated candidate on the device.
        let c = calibration_entry(&s.dir, &s.cands, &s.view).unwrap();
        assert_eq!(s.dir.entries[c].method, 8);
        assert!(s.dir.entries[c].compressed_size >= 1024);
    }

    #[test]
    fn the_decision_weighs_link_time_against_regeneration() {
        let s = setup(|v2| {
            std::fs::write(v2.join("bin/lib0.so"), sample_bytes(99, 50_000, true)).unwrap()
        });
        let plan = plan(&s.dir, &s.cands, &s.view, &proven()).unwrap();
        let size = s.pkg.len() as u64;
        let slow = Rates {
            rtt: 0.05,
            link: 2e6,
            // Text deflates 10:1 here: regenerating costs its 10 bytes per byte saved.
            deflate: 60e6,
            stored: 200e6,
        };
        let (delta, full) = remaining_cost(&s.dir, &plan.pieces, 0, size, &slow, 1);
        assert!(
            delta < full,
            "2 MB/s: delta {delta} s, full {full} s, {} of {size} bytes fetched, {} requests",
            plan.fetch_bytes,
            plan.fetch_ranges
        );
        let fast = Rates {
            rtt: 0.0002,
            link: 1e9,
            ..slow
        };
        let (delta, full) = remaining_cost(&s.dir, &plan.pieces, 0, size, &fast, 1);
        assert!(delta > full, "1 GB/s: delta {delta} s, full {full} s");
        // Many ranges on a long round trip: one request each loses, 64 per request wins back.
        let far = Rates { rtt: 2.0, ..slow };
        let (one, _) = remaining_cost(&s.dir, &plan.pieces, 0, size, &far, 1);
        let (many, _) = remaining_cost(&s.dir, &plan.pieces, 0, size, &far, 64);
        assert!(many < one, "{many} < {one}");
        // Nothing is left at the end.
        let (d, f) = remaining_cost(&s.dir, &plan.pieces, size, size, &slow, 1);
        assert_eq!(d, 0.0);
        assert!(f <= slow.rtt);
    }

    #[test]
    fn changed_files_are_fetched() {
        let s = setup(|v2| {
            // Another size, and the same size with other bytes (a CRC-32 mismatch).
            std::fs::write(v2.join("bin/lib1.so"), sample_bytes(99, 60_000, false)).unwrap();
            let mut b = std::fs::read(v2.join("bin/lib2.so")).unwrap();
            b[1000] ^= 0x55;
            std::fs::write(v2.join("bin/lib2.so"), b).unwrap();
        });
        let plan = plan(&s.dir, &s.cands, &s.view, &proven()).unwrap();
        let r = reused(&plan, &s.dir);
        assert!(!r.contains(&"bin/lib1.so".to_string()));
        assert!(!r.contains(&"bin/lib2.so".to_string()));
        assert!(r.contains(&"bin/lib3.so".to_string()));
        assert!(assemble(&plan, &s.dir, &s.pkg, &s.current) == s.pkg);
        // A file of current modified in place with the same size: its CRC-32 differs.
        let p = s.current.join("bin/lib3.so");
        let mut b = std::fs::read(&p).unwrap();
        b[0] ^= 1;
        std::fs::write(&p, b).unwrap();
        let v = view(&s.dir, &s.cands, &s.current);
        let plan2 = super::plan(&s.dir, &s.cands, &v, &proven()).unwrap();
        assert!(!reused(&plan2, &s.dir).contains(&"bin/lib3.so".to_string()));
        assert!(assemble(&plan2, &s.dir, &s.pkg, &s.current) == s.pkg);
    }

    #[test]
    fn unproven_deflate_and_headers_are_fetched() {
        let s = setup(|_| {});
        let plan = plan(&s.dir, &s.cands, &s.view, &PlanOptions::default()).unwrap();
        // pack deflates everything: nothing is reused before the calibration.
        assert_eq!(plan.reuse_bytes, 0);
        assert_eq!(plan.pieces.len(), 1);
        let opts = PlanOptions {
            headers_proven: false,
            ..proven()
        };
        let plan = super::plan(&s.dir, &s.cands, &s.view, &opts).unwrap();
        assert!(!plan
            .pieces
            .iter()
            .any(|p| matches!(p, Piece::Header { .. })));
        assert!(assemble(&plan, &s.dir, &s.pkg, &s.current) == s.pkg);
    }

    #[test]
    fn short_runs_between_fetches_are_merged() {
        let s = setup(|v2| {
            // lib0 and lib2 change around lib1 (50 KB) and small.cfg comes after lib5.
            for i in [0, 2, 4] {
                std::fs::write(
                    v2.join(format!("bin/lib{i}.so")),
                    sample_bytes(50 + i, 50_000, false),
                )
                .unwrap();
            }
        });
        let none = plan(&s.dir, &s.cands, &s.view, &proven()).unwrap();
        let lots = PlanOptions {
            merge_gap: 1 << 20,
            ..proven()
        };
        let merged = plan(&s.dir, &s.cands, &s.view, &lots).unwrap();
        assert!(
            merged.fetch_ranges < none.fetch_ranges,
            "{} vs {}",
            merged.fetch_ranges,
            none.fetch_ranges
        );
        assert!(merged.fetch_bytes > none.fetch_bytes);
        assert!(!reused(&merged, &s.dir).contains(&"bin/lib1.so".to_string()));
        assert!(reused(&none, &s.dir).contains(&"bin/lib1.so".to_string()));
        for p in [&none, &merged] {
            // Never two fetched ranges side by side.
            for w in p.pieces.windows(2) {
                assert!(
                    !(matches!(w[0], Piece::Fetch { .. }) && matches!(w[1], Piece::Fetch { .. }))
                );
            }
            assert!(assemble(p, &s.dir, &s.pkg, &s.current) == s.pkg);
        }
        // All-merging leaves regenerated runs only where they are not between two fetches, or
        // longer than the gap.
        let all = PlanOptions {
            merge_gap: u64::MAX,
            ..proven()
        };
        let p = plan(&s.dir, &s.cands, &s.view, &all).unwrap();
        assert!(p.fetch_ranges <= 2, "{p:?}");
    }

    #[test]
    fn the_plan_is_deterministic() {
        let s = setup(|v2| {
            std::fs::write(v2.join("bin/lib3.so"), b"new").unwrap();
        });
        let opts = PlanOptions {
            merge_gap: 4096,
            ..proven()
        };
        let a = plan(&s.dir, &s.cands, &s.view, &opts).unwrap();
        let mut rev = s.cands.clone();
        rev.reverse();
        // The view rebuilt (another HashMap order) and the candidates in another order.
        let v2: HashMap<String, LocalFile> = s.view.clone().into_iter().collect();
        let b = plan(&s.dir, &rev, &v2, &opts).unwrap();
        assert_eq!(a, b);
        assert_eq!(candidates(&s.dir, &manifest()), s.cands);
    }

    /// Calibrate as the download will: fetch the calibration entry's header and data, compare.
    fn calibrate(
        dir: &Directory,
        c: usize,
        pkg: &[u8],
        current: &Path,
        local: &str,
    ) -> PlanOptions {
        let e = &dir.entries[c];
        let ext = extents(dir).unwrap();
        let &(_, start, next) = ext.iter().find(|x| x.0 == c).unwrap();
        let (h, d, end) = layout(e, start, next);
        let file = std::fs::read(current.join(local)).unwrap();
        PlanOptions {
            deflate_proven: regenerate_entry(&file, Method::Deflated)
                == pkg[d as usize..end as usize],
            headers_proven: regenerate_local_header(e) == pkg[h as usize..d as usize],
            merge_gap: 4096,
        }
    }

    #[test]
    fn python_zipfile_packages_calibrate() {
        // The same tree packed by Python's zipfile (deflate, its default level 6, 8 KiB writes
        // through its own zlib): whatever the calibration finds, the plan assembles the package.
        let s = setup(|_| {});
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("v2");
        std::process::Command::new("cp")
            .arg("-a")
            .arg(s.current.parent().unwrap().join("v2"))
            .arg(&tree)
            .status()
            .unwrap();
        let pkg_path = t.path().join("py.zip");
        let script = "import sys, zipfile, os\n\
            root, out = sys.argv[1], sys.argv[2]\n\
            with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:\n\
            \x20   z.writestr('manifest.json', sys.argv[3])\n\
            \x20   for d, dirs, files in sorted(os.walk(root)):\n\
            \x20       dirs.sort()\n\
            \x20       for f in sorted(files):\n\
            \x20           p = os.path.join(d, f)\n\
            \x20           if not os.path.islink(p):\n\
            \x20               z.write(p, os.path.relpath(p, root))\n";
        let o = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&tree)
            .arg(&pkg_path)
            .arg(std::str::from_utf8(MANIFEST_JSON).unwrap())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let pkg = std::fs::read(&pkg_path).unwrap();
        let dir = read_all(&pkg, &Limits::default()).unwrap();
        let cands = candidates(&dir, &manifest());
        let v = view(&dir, &cands, &s.current);
        assert_eq!(
            v.len(),
            cands.len(),
            "every candidate's file is on the device"
        );
        let c = calibration_entry(&dir, &cands, &v).unwrap();
        let local = &cands.iter().find(|x| x.entry == c).unwrap().local;
        let opts = calibrate(&dir, c, &pkg, &s.current, local);
        let reproduced = cands
            .iter()
            .filter(|x| {
                let e = &dir.entries[x.entry];
                let (_, d, end) = {
                    let ext = extents(&dir).unwrap();
                    let &(_, a, b) = ext.iter().find(|y| y.0 == x.entry).unwrap();
                    layout(e, a, b)
                };
                let f = std::fs::read(s.current.join(&x.local)).unwrap();
                regenerate_entry(&f, Method::from_zip(e.method).unwrap())
                    == pkg[d as usize..end as usize]
            })
            .count();
        eprintln!(
            "python zipfile package: calibration {opts:?}, {reproduced} of {} candidates reproduce",
            cands.len()
        );
        let p = plan(&dir, &cands, &v, &opts).unwrap();
        if !opts.deflate_proven {
            assert!(p.pieces.iter().all(|x| match x {
                Piece::Reuse { entry, .. } => dir.entries[*entry].method == 0,
                _ => true,
            }));
        }
        // An entry that did not reproduce while the calibration passed would be caught by the
        // package's hashes (a full download); here every one must, or the assembly differs.
        if reproduced == cands.len() || !opts.deflate_proven {
            assert!(assemble(&p, &dir, &pkg, &s.current) == pkg);
        }
    }

    #[test]
    fn overlapping_entries_are_refused() {
        let s = setup(|_| {});
        let mut d = s.dir.clone();
        let (a, b) = (
            d.entries[3].local_header_offset,
            d.entries[4].local_header_offset,
        );
        d.entries[4].local_header_offset = a + (b - a) / 2;
        assert!(matches!(
            plan(&d, &s.cands, &s.view, &proven()),
            Err(ZipDirError::Invalid(_))
        ));
        let mut d = s.dir.clone();
        d.entries[4].local_header_offset = a;
        assert!(plan(&d, &s.cands, &s.view, &proven()).is_err());
    }

    /// The central directory and end records of a ZIP64 package of stored entries
    /// `(name, size, crc)` laid out one after the other from offset 0, each behind a local header
    /// with a 20-byte ZIP64 extra field: the package's length, the directory's offset, and the
    /// tail (the bytes from the directory on). The entries' data is never read.
    fn zip64_tail(entries: &[(&str, u64, u32)]) -> (u64, u64, Vec<u8>) {
        let mut at = 0u64;
        let mut cd = Vec::new();
        for (name, size, crc) in entries {
            cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            cd.extend_from_slice(&[45, 3, 45, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
            cd.extend_from_slice(&crc.to_le_bytes());
            cd.extend_from_slice(&[0xFF; 8]);
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&28u16.to_le_bytes());
            cd.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xa4, 0x81]);
            cd.extend_from_slice(&[0xFF; 4]);
            cd.extend_from_slice(name.as_bytes());
            cd.extend_from_slice(&[1, 0, 24, 0]);
            cd.extend_from_slice(&size.to_le_bytes());
            cd.extend_from_slice(&size.to_le_bytes());
            cd.extend_from_slice(&at.to_le_bytes());
            at += 30 + name.len() as u64 + 20 + size;
        }
        let cd_start = at;
        let mut tail = cd.clone();
        let n = entries.len() as u64;
        let rec_at = cd_start + cd.len() as u64;
        tail.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        tail.extend_from_slice(&44u64.to_le_bytes());
        tail.extend_from_slice(&[45, 3, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        tail.extend_from_slice(&n.to_le_bytes());
        tail.extend_from_slice(&n.to_le_bytes());
        tail.extend_from_slice(&(cd.len() as u64).to_le_bytes());
        tail.extend_from_slice(&cd_start.to_le_bytes());
        tail.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.extend_from_slice(&rec_at.to_le_bytes());
        tail.extend_from_slice(&1u32.to_le_bytes());
        tail.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        tail.extend_from_slice(&[0, 0, 0, 0]);
        tail.extend_from_slice(&[0xFF; 12]);
        tail.extend_from_slice(&0u16.to_le_bytes());
        (cd_start + tail.len() as u64, cd_start, tail)
    }

    /// A package past 4 GiB as a 32-bit device meets it (this test runs on the armhf build too,
    /// tests/integration/arm32.rs): its directory read by ranges that start past 4 GiB, and a
    /// plan whose every piece keeps its 64-bit offsets, with a reused entry longer than 4 GiB.
    #[test]
    fn a_package_past_4_gib_is_read_and_planned_in_64_bits() {
        const GIB: u64 = 1 << 30;
        let (a, b, c) = (4 * GIB + 10, 100, 2 * GIB + 3);
        let entries = [
            ("bin/a", a, 0xaaaa_0001),
            ("bin/b", b, 0xbbbb_0002),
            ("share/c", c, 0xcccc_0003),
        ];
        let (len, cd_start, tail) = zip64_tail(&entries);
        let tail_start = len - tail.len() as u64;
        assert!(cd_start > 6 * GIB);
        let mut reads = Vec::new();
        // The entries' data (never read for the directory, but inside a short tail's span)
        // is zeros.
        let dir = crate::zipdir::read_directory(len, &Limits::default(), |s, e| {
            reads.push((s, e));
            assert!(e <= len, "read {s}-{e} of {len}");
            Ok((s..e)
                .map(|i| i.checked_sub(tail_start).map_or(0, |k| tail[k as usize]))
                .collect())
        })
        .unwrap();
        // One read: the end records' 98 bytes and 8 KiB before them, which hold the directory.
        assert_eq!(reads, [(len - 8290, len)]);
        assert!(len - 8290 > 4 * GIB);
        // Local headers: 30 bytes, the name, a 20-byte ZIP64 field.
        let (b_at, c_at) = (55 + a, 55 + a + 55 + b);
        let offsets: Vec<u64> = dir.entries.iter().map(|e| e.local_header_offset).collect();
        assert_eq!(offsets, [0, b_at, c_at]);
        let cands = candidates(&dir, &manifest());
        let current: HashMap<String, LocalFile> = [
            (
                "bin/a",
                LocalFile {
                    size: a,
                    crc32: 0xaaaa_0001,
                },
            ),
            (
                "usr/share/c",
                LocalFile {
                    size: c,
                    crc32: 0xcccc_0003,
                },
            ),
        ]
        .into_iter()
        .map(|(p, f)| (p.to_string(), f))
        .collect();
        let opts = PlanOptions {
            deflate_proven: false,
            headers_proven: true,
            merge_gap: 0,
        };
        let p = plan(&dir, &cands, &current, &opts).unwrap();
        assert_eq!(
            p.pieces,
            vec![
                // ZIP64 headers are fetched, never regenerated.
                Piece::Fetch { start: 0, end: 55 },
                Piece::Reuse {
                    entry: 0,
                    local: "bin/a".into(),
                    start: 55,
                    end: b_at
                },
                Piece::Fetch {
                    start: b_at,
                    end: c_at + 57
                },
                Piece::Reuse {
                    entry: 2,
                    local: "usr/share/c".into(),
                    start: c_at + 57,
                    end: cd_start
                },
                Piece::Fetch {
                    start: cd_start,
                    end: len
                },
            ]
        );
        assert_eq!(p.reuse_bytes, a + c);
        assert_eq!(p.fetch_bytes, 55 + 55 + b + 57 + (len - cd_start));
        assert_eq!(p.fetch_ranges, 3);
    }
}
