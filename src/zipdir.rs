//! The central directory of a ZIP read from byte slices: the end records (EOCD, and the ZIP64
//! locator and record), then the directory's entries. Pure functions over bytes with hard caps,
//! so that a package's directory can be read by Range requests before it is downloaded (delta
//! downloads) and fuzzed. Nothing here trusts a field: every offset and size is checked against
//! the others and against the file's length, and a directory that disagrees with itself is an
//! error, never a guess.
//!
//! The layout accepted is the one every ZIP writer of a single file produces: the entries' local
//! records, then the central directory, then (ZIP64) the end record and its locator, then the
//! EOCD and its comment, each starting where the previous one ends. Data before the first
//! entry, multi-disk archives and a directory that does not end where the end records begin are
//! refused: for a delta download they mean "fetch it whole".

use std::fmt;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const LOCATOR_SIG: u32 = 0x0706_4b50;
const LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_EOCD_LEN: usize = 56;
const CDH_SIG: u32 = 0x0201_4b50;
const CDH_LEN: usize = 46;
/// Fixed part of a local file header.
pub const LOCAL_HEADER_LEN: u64 = 30;
/// Local file header signature.
pub const LOCAL_SIG: u32 = 0x0403_4b50;
/// The most bytes after which the EOCD can start, from the end: its record and the longest
/// comment.
pub const MAX_TAIL: u64 = (EOCD_LEN + 0xFFFF) as u64;

/// Hard caps on what a directory may declare, checked before anything is allocated for it.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: u64,
    pub max_name: usize,
    pub max_cd_size: u64,
}

impl Default for Limits {
    /// The unpacker's entry and name caps; 8 MiB of directory (50,000 entries of ~160 bytes).
    fn default() -> Limits {
        Limits {
            max_entries: 50_000,
            max_name: 1024,
            max_cd_size: 8 << 20,
        }
    }
}

/// Why a directory cannot be read. Every one means: no delta from this package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZipDirError {
    /// No end of central directory record: not a ZIP (or cut short at its end).
    NotZip(String),
    /// The bytes given end before a record does.
    Truncated(String),
    /// Records disagree with each other or with the file's length.
    Invalid(String),
    /// Beyond a cap of [`Limits`].
    TooLarge(String),
    /// A ZIP this reader does not handle (multi-disk, data before the first entry).
    Unsupported(String),
}

impl fmt::Display for ZipDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, d) = match self {
            ZipDirError::NotZip(d) => ("not a ZIP", d),
            ZipDirError::Truncated(d) => ("truncated ZIP", d),
            ZipDirError::Invalid(d) => ("invalid ZIP directory", d),
            ZipDirError::TooLarge(d) => ("ZIP directory over a limit", d),
            ZipDirError::Unsupported(d) => ("unsupported ZIP layout", d),
        };
        write!(f, "{what}: {d}")
    }
}

impl std::error::Error for ZipDirError {}

type R<T> = Result<T, ZipDirError>;

/// `n` as an index or count in memory: on a 32-bit device a number past `usize` cannot be one,
/// and `as usize` would keep its low bits (another place in the bytes read).
fn index(n: u64, what: &str) -> R<usize> {
    usize::try_from(n).map_err(|_| {
        ZipDirError::TooLarge(format!("{what} {n} is past what this device can address"))
    })
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// Where the central directory is, from the end records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The package's length.
    pub len: u64,
    /// The central directory is `[cd_start, cd_start + cd_size)`.
    pub cd_start: u64,
    pub cd_size: u64,
    /// Where the end records begin (the ZIP64 record, else the EOCD): `cd_start + cd_size`.
    pub end_start: u64,
    pub entries: u64,
    pub zip64: bool,
    pub comment_len: u16,
}

/// What the tail of a package tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    End(End),
    /// A ZIP64 package whose ZIP64 record, at `at`, was not in the tail: read its 56 bytes and
    /// pass them to [`parse_zip64_record`] with `comment_len`.
    Zip64At {
        at: u64,
        comment_len: u16,
    },
}

/// How many bytes of a ZIP64 end record [`parse_zip64_record`] needs.
pub const ZIP64_RECORD_LEN: u64 = ZIP64_EOCD_LEN as u64;

/// The first step: the EOCD in `tail`, the last bytes of a package of `len` bytes (at least
/// [`MAX_TAIL`] + 76 of them, or the whole file, find any EOCD, its locator and ZIP64 record).
pub fn parse_tail(tail: &[u8], len: u64, limits: &Limits) -> R<Tail> {
    let tail_start = len
        .checked_sub(tail.len() as u64)
        .ok_or_else(|| ZipDirError::Invalid("more tail bytes than the file has".into()))?;
    if tail.len() < EOCD_LEN {
        return Err(ZipDirError::NotZip(format!(
            "{len} bytes, shorter than an end record"
        )));
    }
    // The EOCD whose comment ends exactly at the end of the file, the last such one.
    let pos = (0..=tail.len() - EOCD_LEN)
        .rev()
        .find(|&i| {
            u32_at(tail, i) == EOCD_SIG
                && i + EOCD_LEN + u16_at(tail, i + 20) as usize == tail.len()
        })
        .ok_or_else(|| {
            ZipDirError::NotZip(format!(
                "no end of central directory record in the last {} bytes",
                tail.len()
            ))
        })?;
    let e = &tail[pos..];
    let (disk, cd_disk) = (u16_at(e, 4), u16_at(e, 6));
    let (n_disk, n) = (u16_at(e, 8), u16_at(e, 10));
    let (size, off) = (u32_at(e, 12), u32_at(e, 16));
    let comment_len = u16_at(e, 20);
    let eocd_at = tail_start + pos as u64;
    let has_locator = pos >= LOCATOR_LEN && u32_at(tail, pos - LOCATOR_LEN) == LOCATOR_SIG;
    if !has_locator {
        if n == 0xFFFF || size == 0xFFFF_FFFF || off == 0xFFFF_FFFF {
            return Err(ZipDirError::Invalid(
                "the end record defers to a ZIP64 record, but there is no ZIP64 locator".into(),
            ));
        }
        if disk != 0 || cd_disk != 0 || n_disk != n {
            return Err(ZipDirError::Unsupported("a multi-disk archive".into()));
        }
        let end = End {
            len,
            cd_start: off as u64,
            cd_size: size as u64,
            end_start: eocd_at,
            entries: n as u64,
            zip64: false,
            comment_len,
        };
        return check_end(end, limits).map(Tail::End);
    }
    let loc = &tail[pos - LOCATOR_LEN..pos];
    let (rec_disk, rec_at, disks) = (u32_at(loc, 4), u64_at(loc, 8), u32_at(loc, 16));
    if rec_disk != 0 || disks > 1 {
        return Err(ZipDirError::Unsupported(
            "a multi-disk ZIP64 archive".into(),
        ));
    }
    let locator_at = eocd_at - LOCATOR_LEN as u64;
    if rec_at.checked_add(ZIP64_EOCD_LEN as u64) != Some(locator_at) {
        // Extensible data in the record is legal but no writer of single files makes it.
        return Err(ZipDirError::Invalid(format!(
            "the ZIP64 locator points at {rec_at}, the record must end at {locator_at}"
        )));
    }
    if rec_at < tail_start {
        return Ok(Tail::Zip64At {
            at: rec_at,
            comment_len,
        });
    }
    let rec = &tail[index(rec_at - tail_start, "the ZIP64 record's offset")?..pos - LOCATOR_LEN];
    parse_zip64_record(rec, rec_at, len, comment_len, limits).map(Tail::End)
}

/// The second step for ZIP64: the 56-byte record at `at` (from [`parse_tail`]'s `Err(at)`).
pub fn parse_zip64_record(
    rec: &[u8],
    at: u64,
    len: u64,
    comment_len: u16,
    limits: &Limits,
) -> R<End> {
    if rec.len() < ZIP64_EOCD_LEN {
        return Err(ZipDirError::Truncated(format!(
            "{} bytes of the 56-byte ZIP64 end record",
            rec.len()
        )));
    }
    if u32_at(rec, 0) != ZIP64_EOCD_SIG {
        return Err(ZipDirError::Invalid(format!("no ZIP64 end record at {at}")));
    }
    if u64_at(rec, 4) != (ZIP64_EOCD_LEN - 12) as u64 {
        return Err(ZipDirError::Unsupported(
            "a ZIP64 end record with extensible data".into(),
        ));
    }
    let (disk, cd_disk) = (u32_at(rec, 16), u32_at(rec, 20));
    let (n_disk, n) = (u64_at(rec, 24), u64_at(rec, 32));
    if disk != 0 || cd_disk != 0 || n_disk != n {
        return Err(ZipDirError::Unsupported("a multi-disk archive".into()));
    }
    let end = End {
        len,
        cd_start: u64_at(rec, 48),
        cd_size: u64_at(rec, 40),
        end_start: at,
        entries: n,
        zip64: true,
        comment_len,
    };
    check_end(end, limits)
}

fn check_end(end: End, limits: &Limits) -> R<End> {
    if end.entries > limits.max_entries {
        return Err(ZipDirError::TooLarge(format!(
            "{} entries, the limit is {}",
            end.entries, limits.max_entries
        )));
    }
    if end.cd_size > limits.max_cd_size {
        return Err(ZipDirError::TooLarge(format!(
            "a central directory of {} bytes, the limit is {}",
            end.cd_size, limits.max_cd_size
        )));
    }
    if end.cd_start.checked_add(end.cd_size) != Some(end.end_start) {
        return Err(ZipDirError::Invalid(format!(
            "the central directory at {} of {} bytes does not end where the end records begin ({})",
            end.cd_start, end.cd_size, end.end_start
        )));
    }
    if end.entries.saturating_mul(CDH_LEN as u64) > end.cd_size {
        return Err(ZipDirError::Invalid(format!(
            "{} entries cannot fit in {} bytes of directory",
            end.entries, end.cd_size
        )));
    }
    Ok(end)
}

/// One entry of the central directory, its 32-bit fields resolved through its ZIP64 extra field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the directory.
    pub index: usize,
    /// The name's bytes as stored.
    pub name: Vec<u8>,
    pub version_made_by: u16,
    pub version_needed: u16,
    pub flags: u16,
    pub method: u16,
    pub mod_time: u16,
    pub mod_date: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub local_header_offset: u64,
    pub internal_attrs: u16,
    pub external_attrs: u32,
    /// The directory's extra field, raw (the local header's may differ).
    pub extra: Vec<u8>,
    pub comment_len: u16,
    /// Some size or the offset came from a ZIP64 extra field.
    pub zip64: bool,
}

impl Entry {
    /// The name, when it is UTF-8.
    pub fn name_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.name).ok()
    }

    /// Bit 3: sizes and CRC follow the data in a data descriptor.
    pub fn has_data_descriptor(&self) -> bool {
        self.flags & 0x0008 != 0
    }

    /// Bit 0: encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.flags & 0x0001 != 0
    }

    /// The Unix mode, when made on Unix (version made by's high byte 3).
    pub fn unix_mode(&self) -> Option<u32> {
        (self.version_made_by >> 8 == 3).then_some(self.external_attrs >> 16)
    }

    /// A regular file: a Unix mode of type file (or none), and a name not ending in `/`.
    pub fn is_file(&self) -> bool {
        !self.name.ends_with(b"/")
            && self
                .unix_mode()
                .is_none_or(|m| m & 0o170000 == 0o100000 || m & 0o170000 == 0)
    }

    /// The least a local header of this entry takes: its fixed part and the name.
    pub fn min_local_header(&self) -> u64 {
        LOCAL_HEADER_LEN + self.name.len() as u64
    }
}

/// The whole directory of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub end: End,
    /// In directory order.
    pub entries: Vec<Entry>,
}

impl Directory {
    /// Entry `i`'s bytes from its local header to the next record (the next local header, or
    /// the central directory).
    pub fn extent(&self, i: usize) -> (u64, u64) {
        let e = &self.entries[i];
        let next = self
            .entries
            .iter()
            .map(|x| x.local_header_offset)
            .filter(|&o| o > e.local_header_offset)
            .min()
            .unwrap_or(self.end.cd_start);
        (e.local_header_offset, next)
    }
}

/// The second (or third) step: the directory's bytes `cd` (exactly `end.cd_size` of them, from
/// `end.cd_start`) into entries.
pub fn parse_directory(cd: &[u8], end: &End, limits: &Limits) -> R<Directory> {
    if (cd.len() as u64) < end.cd_size {
        return Err(ZipDirError::Truncated(format!(
            "{} bytes of a {}-byte central directory",
            cd.len(),
            end.cd_size
        )));
    }
    let cd = &cd[..index(end.cd_size, "the central directory's size")?];
    let count = index(end.entries, "the number of entries")?;
    let mut entries = Vec::with_capacity(count);
    let mut p = 0usize;
    for index in 0..count {
        if cd.len() - p < CDH_LEN {
            return Err(ZipDirError::Truncated(format!(
                "the central directory ends inside entry {index} of {}",
                end.entries
            )));
        }
        let h = &cd[p..];
        if u32_at(h, 0) != CDH_SIG {
            return Err(ZipDirError::Invalid(format!(
                "entry {index} of the central directory has no signature"
            )));
        }
        let name_len = u16_at(h, 28) as usize;
        let extra_len = u16_at(h, 30) as usize;
        let comment_len = u16_at(h, 32);
        if name_len > limits.max_name {
            return Err(ZipDirError::TooLarge(format!(
                "entry {index}'s name is {name_len} bytes, the limit is {}",
                limits.max_name
            )));
        }
        let total = CDH_LEN + name_len + extra_len + comment_len as usize;
        if h.len() < total {
            return Err(ZipDirError::Truncated(format!(
                "entry {index}'s name, extra field or comment runs past the central directory"
            )));
        }
        if u16_at(h, 34) != 0 {
            return Err(ZipDirError::Unsupported(format!(
                "entry {index} starts on another disk"
            )));
        }
        let name = h[CDH_LEN..CDH_LEN + name_len].to_vec();
        let extra = h[CDH_LEN + name_len..CDH_LEN + name_len + extra_len].to_vec();
        let mut e = Entry {
            index,
            name,
            version_made_by: u16_at(h, 4),
            version_needed: u16_at(h, 6),
            flags: u16_at(h, 8),
            method: u16_at(h, 10),
            mod_time: u16_at(h, 12),
            mod_date: u16_at(h, 14),
            crc32: u32_at(h, 16),
            compressed_size: u32_at(h, 20) as u64,
            uncompressed_size: u32_at(h, 24) as u64,
            local_header_offset: u32_at(h, 42) as u64,
            internal_attrs: u16_at(h, 36),
            external_attrs: u32_at(h, 38),
            extra,
            comment_len,
            zip64: false,
        };
        resolve_zip64(&mut e)?;
        let data_end = e
            .local_header_offset
            .checked_add(e.min_local_header())
            .and_then(|x| x.checked_add(e.compressed_size));
        if data_end.is_none_or(|x| x > end.cd_start) {
            return Err(ZipDirError::Invalid(format!(
                "entry {index} ({:?}) at {} with {} bytes runs past the central directory at {}",
                String::from_utf8_lossy(&e.name),
                e.local_header_offset,
                e.compressed_size,
                end.cd_start
            )));
        }
        entries.push(e);
        p += total;
    }
    if p != cd.len() {
        return Err(ZipDirError::Invalid(format!(
            "the central directory holds {} bytes after its {} entries",
            cd.len() - p,
            end.entries
        )));
    }
    Ok(Directory {
        end: end.clone(),
        entries,
    })
}

/// Replace the 32-bit fields set to all ones by the ZIP64 extra field's values, which come in
/// the fixed order uncompressed size, compressed size, offset, disk, each only when needed.
fn resolve_zip64(e: &mut Entry) -> R<()> {
    let need_u = e.uncompressed_size == 0xFFFF_FFFF;
    let need_c = e.compressed_size == 0xFFFF_FFFF;
    let need_o = e.local_header_offset == 0xFFFF_FFFF;
    if !(need_u || need_c || need_o) {
        return Ok(());
    }
    let mut x = &e.extra[..];
    let field = loop {
        if x.len() < 4 {
            return Err(ZipDirError::Invalid(format!(
                "entry {} defers to a ZIP64 extra field it does not have",
                e.index
            )));
        }
        let (id, n) = (u16_at(x, 0), u16_at(x, 2) as usize);
        if x.len() < 4 + n {
            return Err(ZipDirError::Invalid(format!(
                "entry {}'s extra field runs past its end",
                e.index
            )));
        }
        if id == 0x0001 {
            break &x[4..4 + n];
        }
        x = &x[4 + n..];
    };
    let mut f = field;
    let mut take = |what: &str| -> R<u64> {
        if f.len() < 8 {
            return Err(ZipDirError::Invalid(format!(
                "entry {}'s ZIP64 extra field lacks the {what}",
                e.index
            )));
        }
        let v = u64_at(f, 0);
        f = &f[8..];
        Ok(v)
    };
    let u = if need_u {
        Some(take("uncompressed size")?)
    } else {
        None
    };
    let c = if need_c {
        Some(take("compressed size")?)
    } else {
        None
    };
    let o = if need_o { Some(take("offset")?) } else { None };
    if let Some(u) = u {
        e.uncompressed_size = u;
    }
    if let Some(c) = c {
        e.compressed_size = c;
    }
    if let Some(o) = o {
        e.local_header_offset = o;
    }
    e.zip64 = true;
    Ok(())
}

/// Read a package's directory by ranges: `read(start, end)` returns bytes `[start, end)` of the
/// package of `len` bytes (a local file, or Range requests). Up to four reads: the last 8 KiB
/// (and, when its EOCD is not there, the last 64 KiB), the ZIP64 record when it is not in the
/// tail, the directory when it is not in the tail.
/// Format errors come back as a [`ZipDirError`] inside the `anyhow::Error`; a `read` that
/// returns fewer bytes than asked is a truncated package.
pub fn read_directory<F>(len: u64, limits: &Limits, mut read: F) -> anyhow::Result<Directory>
where
    F: FnMut(u64, u64) -> anyhow::Result<Vec<u8>>,
{
    let mut read = |a: u64, b: u64| -> anyhow::Result<Vec<u8>> {
        let v = read(a, b)?;
        if v.len() as u64 != b - a {
            return Err(ZipDirError::Truncated(format!(
                "asked for bytes {a}-{b}, got {}",
                v.len()
            ))
            .into());
        }
        Ok(v)
    };
    // A short tail first (a package's comment is short or absent), the longest one after.
    let extra = (LOCATOR_LEN + ZIP64_EOCD_LEN) as u64;
    let short = (EOCD_LEN as u64 + extra + 8192).min(len);
    let short_tail = read(len - short, len)?;
    let (tail_start, tail) = match parse_tail(&short_tail, len, limits) {
        Err(ZipDirError::NotZip(_)) if short < len => {
            let start = len.saturating_sub(MAX_TAIL + extra);
            (start, read(start, len)?)
        }
        _ => (len - short, short_tail),
    };
    let end = match parse_tail(&tail, len, limits)? {
        Tail::End(end) => end,
        Tail::Zip64At { at, comment_len } => {
            let rec = read(at, at + ZIP64_RECORD_LEN)?;
            parse_zip64_record(&rec, at, len, comment_len, limits)?
        }
    };
    let cd = if end.cd_start >= tail_start {
        let from = index(end.cd_start - tail_start, "the central directory's offset")?;
        tail[from..from + index(end.cd_size, "the central directory's size")?].to_vec()
    } else {
        read(end.cd_start, end.end_start)?
    };
    Ok(parse_directory(&cd, &end, limits)?)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// The directory of a whole package in memory.
    pub(crate) fn read_all(zip: &[u8], limits: &Limits) -> anyhow::Result<Directory> {
        read_directory(zip.len() as u64, limits, |a, b| {
            Ok(zip[a as usize..(b as usize).min(zip.len())].to_vec())
        })
    }

    fn zip_err(r: anyhow::Result<Directory>) -> ZipDirError {
        r.unwrap_err()
            .downcast::<ZipDirError>()
            .expect("a ZipDirError")
    }

    /// What the zip crate sees: name, crc, sizes, header offset, method.
    fn zip_crate_view(zip: &[u8]) -> Vec<(String, u32, u64, u64, u64, u16)> {
        let mut ar = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
        (0..ar.len())
            .map(|i| {
                let e = ar.by_index_raw(i).unwrap();
                let m = match e.compression() {
                    zip::CompressionMethod::Stored => 0,
                    zip::CompressionMethod::Deflated => 8,
                    _ => 99,
                };
                (
                    e.name().to_string(),
                    e.crc32(),
                    e.compressed_size(),
                    e.size(),
                    e.header_start(),
                    m,
                )
            })
            .collect()
    }

    fn view(d: &Directory) -> Vec<(String, u32, u64, u64, u64, u16)> {
        d.entries
            .iter()
            .map(|e| {
                (
                    e.name_str().unwrap().to_string(),
                    e.crc32,
                    e.compressed_size,
                    e.uncompressed_size,
                    e.local_header_offset,
                    e.method,
                )
            })
            .collect()
    }

    pub(crate) fn packed() -> Vec<u8> {
        let t = tempfile::tempdir().unwrap();
        crate::packer::tests::sample_tree(t.path());
        crate::packer::tests::pack_dir(t.path())
    }

    #[test]
    fn reads_a_pack_package() {
        let zip = packed();
        let d = read_all(&zip, &Limits::default()).unwrap();
        assert_eq!(view(&d), zip_crate_view(&zip));
        assert_eq!(d.entries.len(), 9);
        assert!(!d.end.zip64);
        assert_eq!(d.end.end_start + 22, zip.len() as u64);
        let app = d.entries.iter().find(|e| e.name == b"bin/app").unwrap();
        assert_eq!(app.unix_mode().unwrap() & 0o7777, 0o755);
        assert!(app.is_file() && !app.has_data_descriptor() && !app.is_encrypted());
        assert!(app.extra.is_empty());
        let link = d
            .entries
            .iter()
            .find(|e| e.name == b"bin/app-link")
            .unwrap();
        assert!(!link.is_file());
        assert!(!d
            .entries
            .iter()
            .find(|e| e.name == b"bin/")
            .unwrap()
            .is_file());
    }

    fn python(script: &str, out: &std::path::Path) -> String {
        let o = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(out)
            .output()
            .expect("python3");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// Python's zipfile writes, then says what it wrote: one line per entry.
    const PY_DUMP: &str = r#"
def dump(path):
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            print(i.filename, i.CRC, i.compress_size, i.file_size, i.header_offset, i.compress_type, i.flag_bits)
"#;

    fn py_view(d: &Directory) -> String {
        d.entries
            .iter()
            .map(|e| {
                format!(
                    "{} {} {} {} {} {} {}\n",
                    e.name_str().unwrap(),
                    e.crc32,
                    e.compressed_size,
                    e.uncompressed_size,
                    e.local_header_offset,
                    e.method,
                    e.flags
                )
            })
            .collect()
    }

    #[test]
    fn reads_a_python_zipfile_package_with_a_comment() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("py.zip");
        let script = format!(
            "import sys, zipfile, os\n{PY_DUMP}\n\
             with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
             \x20   z.writestr('manifest.json', '{{\"version\":\"1\"}}')\n\
             \x20   z.writestr('a/text.txt', 'hello printer ' * 5000)\n\
             \x20   z.writestr(zipfile.ZipInfo('a/stored.bin'), os.urandom(3000), zipfile.ZIP_STORED)\n\
             \x20   z.writestr('dir/', '')\n\
             \x20   z.comment = b'a package comment'\n\
             dump(sys.argv[1])\n"
        );
        let expected = python(&script, &p);
        let zip = std::fs::read(&p).unwrap();
        let d = read_all(&zip, &Limits::default()).unwrap();
        assert_eq!(py_view(&d), expected);
        assert_eq!(d.end.comment_len, 17);
        assert_eq!(view(&d), zip_crate_view(&zip));
        // A comment holding an end record's signature (Python's own reader takes it for the
        // record and fails): the record is the one whose comment ends the file.
        let mut z = zip[..zip.len() - 17].to_vec();
        let comment = b"PK\x05\x06 a comment that looks like an end record";
        let n = z.len();
        z[n - 2..].copy_from_slice(&(comment.len() as u16).to_le_bytes());
        z.extend_from_slice(comment);
        let d2 = read_all(&z, &Limits::default()).unwrap();
        assert_eq!(d2.entries, d.entries);
        assert_eq!(d2.end.comment_len as usize, comment.len());
    }

    #[test]
    fn reads_a_python_zip64_package() {
        // Python writes the ZIP64 end records for more than 65,535 entries.
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("py64.zip");
        let script = format!(
            "import sys, zipfile\n{PY_DUMP}\n\
             with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_STORED) as z:\n\
             \x20   for i in range(65540):\n\
             \x20       z.writestr('f%d' % i, b'')\n\
             \x20   with z.open('big', 'w', force_zip64=True) as f:\n\
             \x20       f.write(b'x' * 1000)\n\
             dump(sys.argv[1])\n"
        );
        let expected = python(&script, &p);
        let zip = std::fs::read(&p).unwrap();
        let limits = Limits {
            max_entries: 70_000,
            ..Limits::default()
        };
        let d = read_all(&zip, &limits).unwrap();
        assert!(d.end.zip64);
        assert_eq!(d.entries.len(), 65_541);
        assert_eq!(py_view(&d), expected);
        // Over the default cap, refused before the directory is read.
        assert!(matches!(
            zip_err(read_all(&zip, &Limits::default())),
            ZipDirError::TooLarge(_)
        ));
        // The record outside the tail given: asked for, then read.
        let len = zip.len() as u64;
        let tail = &zip[zip.len() - 22 - 20..];
        let Tail::Zip64At { at, comment_len } = parse_tail(tail, len, &limits).unwrap() else {
            panic!("expected the record's offset");
        };
        let rec = &zip[at as usize..at as usize + 56];
        assert_eq!(
            parse_zip64_record(rec, at, len, comment_len, &limits).unwrap(),
            d.end
        );
    }

    /// A minimal ZIP writer for what no tool writes on demand: stored entries, a ZIP64 extra
    /// field in the central directory (sizes and offset all ones), ZIP64 end records.
    fn raw_zip(files: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data) in files {
            let off = out.len() as u64;
            let crc = crc32fast::hash(data);
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            cd.extend_from_slice(&CDH_SIG.to_le_bytes());
            cd.extend_from_slice(&[45, 3, 45, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
            cd.extend_from_slice(&crc.to_le_bytes());
            let extra: Vec<u8> = if zip64 {
                let mut x = vec![1, 0, 24, 0];
                x.extend_from_slice(&(data.len() as u64).to_le_bytes());
                x.extend_from_slice(&(data.len() as u64).to_le_bytes());
                x.extend_from_slice(&off.to_le_bytes());
                x
            } else {
                Vec::new()
            };
            let (s, o) = if zip64 {
                (0xFFFF_FFFFu32, 0xFFFF_FFFFu32)
            } else {
                (data.len() as u32, off as u32)
            };
            cd.extend_from_slice(&s.to_le_bytes());
            cd.extend_from_slice(&s.to_le_bytes());
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xa4, 0x81]);
            cd.extend_from_slice(&o.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_start = out.len() as u64;
        out.extend_from_slice(&cd);
        let n = files.len() as u64;
        if zip64 {
            let rec_at = out.len() as u64;
            out.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 3, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(cd.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_start.to_le_bytes());
            out.extend_from_slice(&LOCATOR_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&rec_at.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        if zip64 {
            out.extend_from_slice(&[0xFF; 12]);
        } else {
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
            out.extend_from_slice(&(cd_start as u32).to_le_bytes());
        }
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn zip64_extra_fields_and_end_records() {
        let files: &[(&str, &[u8])] = &[("a", b"hello"), ("b/c", b""), ("d", b"world!")];
        let plain = read_all(&raw_zip(files, false), &Limits::default()).unwrap();
        let zip = raw_zip(files, true);
        let d = read_all(&zip, &Limits::default()).unwrap();
        assert!(d.end.zip64 && d.entries.iter().all(|e| e.zip64));
        assert_eq!(view(&d), view(&plain));
        assert_eq!(view(&d), zip_crate_view(&zip));
        // A ZIP64 extra field without the offset the entry defers to.
        let mut bad = zip.clone();
        let first = d.end.cd_start as usize;
        let xlen = first + 30;
        assert_eq!(bad[xlen], 28);
        bad[first + 46 + 1 + 2] = 16; // the field's own length: sizes only
        assert!(matches!(
            zip_err(read_all(&bad, &Limits::default())),
            ZipDirError::Invalid(_)
        ));
        // An end record that defers to ZIP64 without a locator.
        let mut bad = zip.clone();
        let loc = zip.len() - 22 - 20;
        bad[loc] = b'X';
        assert!(matches!(
            zip_err(read_all(&bad, &Limits::default())),
            ZipDirError::Invalid(_)
        ));
        // A locator pointing elsewhere.
        let mut bad = zip.clone();
        bad[loc + 8] ^= 1;
        assert!(matches!(
            zip_err(read_all(&bad, &Limits::default())),
            ZipDirError::Invalid(_)
        ));
    }

    fn eocd_at(zip: &[u8]) -> usize {
        zip.len() - 22
    }

    #[test]
    fn truncated_and_lying_directories() {
        let zip = packed();
        let lim = Limits::default();
        let e = eocd_at(&zip);
        let kind = |z: &[u8]| zip_err(read_all(z, &lim));
        // Cut at the end: no end record.
        assert!(matches!(
            kind(&zip[..zip.len() - 1]),
            ZipDirError::NotZip(_)
        ));
        assert!(matches!(kind(b"PK"), ZipDirError::NotZip(_)));
        assert!(matches!(kind(&[]), ZipDirError::NotZip(_)));
        // Bytes after the end record (a comment length that lies).
        let mut z = zip.clone();
        z.push(0);
        assert!(matches!(kind(&z), ZipDirError::NotZip(_)));
        // A directory size that does not reach the end records.
        let mut z = zip.clone();
        z[e + 12] = z[e + 12].wrapping_sub(1);
        assert!(matches!(kind(&z), ZipDirError::Invalid(_)));
        // A directory offset and size moved together: the bytes there are no entry.
        let mut z = zip.clone();
        z[e + 16] = z[e + 16].wrapping_add(1);
        z[e + 12] = z[e + 12].wrapping_sub(1);
        assert!(matches!(kind(&z), ZipDirError::Invalid(_)));
        // One entry more than the directory holds, and one fewer.
        let mut z = zip.clone();
        z[e + 8] += 1;
        z[e + 10] += 1;
        assert!(matches!(
            kind(&z),
            ZipDirError::Truncated(_) | ZipDirError::Invalid(_)
        ));
        let mut z = zip.clone();
        z[e + 8] -= 1;
        z[e + 10] -= 1;
        assert!(matches!(kind(&z), ZipDirError::Invalid(_)));
        // Multi-disk.
        let mut z = zip.clone();
        z[e + 4] = 1;
        assert!(matches!(kind(&z), ZipDirError::Unsupported(_)));
        // An entry whose data would run into the directory.
        let d = read_all(&zip, &lim).unwrap();
        let mut z = zip.clone();
        let last_cd = d.end.cd_start as usize
            + d.entries[..8]
                .iter()
                .map(|e| 46 + e.name.len() + e.extra.len() + e.comment_len as usize)
                .sum::<usize>();
        z[last_cd + 20..last_cd + 24].copy_from_slice(&u32::MAX.to_le_bytes()[..]);
        z[last_cd + 20] = 0xFE;
        assert!(matches!(kind(&z), ZipDirError::Invalid(_)));
        // The directory given short.
        assert!(matches!(
            parse_directory(&[0; 10], &d.end, &lim),
            Err(ZipDirError::Truncated(_))
        ));
        // A read that returns fewer bytes than asked.
        let short = read_directory(zip.len() as u64, &lim, |a, b| {
            Ok(zip[a as usize..(b as usize - 1).max(a as usize)].to_vec())
        });
        assert!(matches!(zip_err(short), ZipDirError::Truncated(_)));
    }

    #[test]
    fn a_long_comment_costs_a_second_read() {
        let zip = packed();
        let plain = read_all(&zip, &Limits::default()).unwrap();
        let mut z = zip.clone();
        let n = z.len();
        z[n - 2..].copy_from_slice(&20_000u16.to_le_bytes());
        z.extend(std::iter::repeat_n(b'c', 20_000));
        let mut reads = Vec::new();
        let d = read_directory(z.len() as u64, &Limits::default(), |a, b| {
            reads.push((a, b));
            Ok(z[a as usize..b as usize].to_vec())
        })
        .unwrap();
        assert_eq!(d.entries, plain.entries);
        assert_eq!(
            reads.len(),
            2,
            "short tail, long tail (holding the directory): {reads:?}"
        );
        assert_eq!(reads[0].1 - reads[0].0, 22 + 76 + 8192);
    }

    #[test]
    fn caps() {
        let zip = packed();
        let d = read_all(&zip, &Limits::default()).unwrap();
        let longest = d.entries.iter().map(|e| e.name.len()).max().unwrap();
        for (limits, what) in [
            (
                Limits {
                    max_entries: 8,
                    ..Limits::default()
                },
                "entries",
            ),
            (
                Limits {
                    max_name: longest - 1,
                    ..Limits::default()
                },
                "name",
            ),
            (
                Limits {
                    max_cd_size: d.end.cd_size - 1,
                    ..Limits::default()
                },
                "directory",
            ),
        ] {
            let e = zip_err(read_all(&zip, &limits));
            assert!(matches!(e, ZipDirError::TooLarge(_)), "{what}: {e}");
            assert!(e.to_string().contains("limit"), "{e}");
        }
    }

    #[test]
    fn no_prefix_or_flipped_byte_panics() {
        // A fuzzer's first cut: every truncation of a package, and every byte of its directory
        // and end records flipped, read as a whole file, errors or reads; it never panics.
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/a"), b"hello hello hello").unwrap();
        std::fs::write(t.path().join("b"), b"").unwrap();
        let zip = crate::packer::tests::pack_dir(t.path());
        let lim = Limits::default();
        let d = read_all(&zip, &lim).unwrap();
        for k in 0..zip.len() {
            assert!(read_all(&zip[..k], &lim).is_err(), "prefix {k}");
        }
        for i in d.end.cd_start as usize..zip.len() {
            for x in [0x01, 0x80, 0xFF] {
                let mut z = zip.clone();
                z[i] ^= x;
                let _ = read_all(&z, &lim);
            }
        }
        let z64 = raw_zip(&[("a", b"x"), ("b", b"yy")], true);
        for k in 0..z64.len() {
            assert!(read_all(&z64[..k], &lim).is_err());
        }
        for i in 0..z64.len() {
            let mut z = z64.clone();
            z[i] ^= 0xFF;
            let _ = read_all(&z, &lim);
        }
    }
}
