//! The updater a package can carry (issue #23): a tope-ota binary at
//! [`crate::manifest::UPDATER_DST`] in the snapshot, from the one module that says
//! `"updater": true`. This module checks that such a file is a program this device runs,
//! before anything of the install changes the device, and records what it checked in the
//! snapshot (`.tope-ota/updater.json`); nothing runs it yet.

use crate::error::{fail, ErrorCode};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The record of a checked updater inside its snapshot's `.tope-ota/`.
pub const RECORD: &str = "updater.json";

/// What identifies the machine code of an ELF program: its class (32 or 64 bits), byte order,
/// `e_machine`, the float ABI of 32-bit ARM (`e_flags`), and the program interpreter (None for a
/// static program).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElfTarget {
    pub class: u8,
    pub data: u8,
    pub machine: u16,
    pub arm_float: u32,
    pub interp: Option<String>,
}

impl ElfTarget {
    /// Debian's name for the target where it is one of the boards'.
    pub fn name(&self) -> String {
        match (self.class, self.machine) {
            (2, 62) => "amd64".into(),
            (2, 183) => "arm64".into(),
            (1, 40) if self.arm_float == EF_ARM_ABI_FLOAT_HARD => "armhf (32-bit ARM)".into(),
            (1, 40) => "armel (32-bit ARM, soft float)".into(),
            (1, 3) => "i386".into(),
            (c, m) => format!("ELF machine {m} ({}-bit)", if c == 2 { 64 } else { 32 }),
        }
    }

    /// Whether a program of this target runs where `own` does: the same machine code and ABI,
    /// and a static program or the same interpreter.
    pub fn runs_on(&self, own: &ElfTarget) -> bool {
        (self.class, self.data, self.machine, self.arm_float)
            == (own.class, own.data, own.machine, own.arm_float)
            && (self.interp.is_none() || self.interp == own.interp)
    }
}

const EF_ARM_ABI_FLOAT_HARD: u32 = 0x400;
const EF_ARM_ABI_FLOAT_SOFT: u32 = 0x200;

/// Why a file is not an ELF program, for the refusal.
fn not_program(why: &str) -> Result<std::result::Result<ElfTarget, String>> {
    Ok(Err(why.to_string()))
}

/// The target of the ELF program at `path`, or why it is none: not ELF, not an executable or a
/// position-independent executable, a header or program headers past the end of the file.
pub fn elf_target(path: &Path) -> Result<std::result::Result<ElfTarget, String>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = [0u8; 64];
    let got = read_up_to(&mut f, &mut h)?;
    if got < 16 || &h[..4] != b"\x7fELF" {
        return not_program("not an ELF file");
    }
    let (class, data) = (h[4], h[5]);
    if !matches!(class, 1 | 2) || !matches!(data, 1 | 2) {
        return not_program("an ELF file of unknown class or byte order");
    }
    let wide = class == 2;
    if got < if wide { 64 } else { 52 } {
        return not_program("a truncated ELF header");
    }
    let u16_at = |o: usize| {
        let b = [h[o], h[o + 1]];
        u64::from(if data == 1 {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |b: &[u8], o: usize| {
        let b = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        u64::from(if data == 1 {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        if data == 1 {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    };
    // ET_EXEC, or ET_DYN with an interpreter (a PIE); checked below.
    let e_type = u16_at(16);
    let machine = u16::try_from(u16_at(18)).unwrap_or(0);
    let (phoff, flags, phentsize, phnum) = if wide {
        (u64_at(&h, 32), u32_at(&h, 48), u16_at(54), u16_at(56))
    } else {
        (u32_at(&h, 28), u32_at(&h, 36), u16_at(42), u16_at(44))
    };
    if !matches!(e_type, 2 | 3) {
        return not_program("an ELF file that is not a program (a core dump or an object file)");
    }
    let min_ph = if wide { 56 } else { 32 };
    if phnum == 0
        || phentsize < min_ph
        || phoff
            .checked_add(phentsize * phnum)
            .is_none_or(|end| end > len)
    {
        return not_program("an ELF program whose program headers lie past its end");
    }
    let mut interp = None;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        let n = usize::try_from(min_ph).unwrap_or(56);
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph[..n])?;
        if u32_at(&ph, 0) != 3 {
            continue; // not PT_INTERP
        }
        let (off, size) = if wide {
            (u64_at(&ph, 8), u64_at(&ph, 32))
        } else {
            (u32_at(&ph, 4), u32_at(&ph, 16))
        };
        if size == 0 || size > 4096 || off.checked_add(size).is_none_or(|e| e > len) {
            return not_program("an ELF program whose interpreter lies past its end");
        }
        let mut s = vec![0u8; usize::try_from(size).unwrap_or(0)];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut s)?;
        let s = String::from_utf8_lossy(&s)
            .trim_end_matches('\0')
            .to_string();
        interp = Some(s);
    }
    if e_type == 3 && interp.is_none() {
        return not_program("a shared library, not a program");
    }
    let arm_float = if machine == 40 {
        u32::try_from(flags).unwrap_or(0) & (EF_ARM_ABI_FLOAT_HARD | EF_ARM_ABI_FLOAT_SOFT)
    } else {
        0
    };
    Ok(Ok(ElfTarget {
        class,
        data,
        machine,
        arm_float,
        interp,
    }))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// The target of the running tope-ota: what a carried updater must be built for.
pub fn own_target() -> Result<ElfTarget> {
    elf_target(Path::new("/proc/self/exe"))?.map_err(|why| anyhow::anyhow!("/proc/self/exe: {why}"))
}

/// What the install checked of a snapshot's updater.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    #[serde(default)]
    pub schema: crate::state::Schema,
    pub module: String,
    pub sha256: String,
    pub target: ElfTarget,
}

/// Refuse (`PACKAGE_INVALID`) an updater at `path` (placed by `module` from `src`) that this
/// device could not run: not a regular file, not executable by its owner, not an ELF program,
/// or built for another target. What was checked, when it passes.
pub fn check_binary(path: &Path, module: &str, src: &str) -> Result<Checked> {
    let who = format!("module {module:?} (the updater, {src:?} in the package)");
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !meta.file_type().is_file() {
        return fail(
            ErrorCode::PackageInvalid,
            format!("{who}: not a regular file"),
        );
    }
    if meta.permissions().mode() & 0o100 == 0 {
        return fail(
            ErrorCode::PackageInvalid,
            format!(
                "{who}: not executable by its owner (mode {:o})",
                meta.permissions().mode() & 0o7777
            ),
        );
    }
    let target = match elf_target(path)? {
        Ok(t) => t,
        Err(why) => return fail(ErrorCode::PackageInvalid, format!("{who}: {why}")),
    };
    let own = own_target()?;
    if !target.runs_on(&own) {
        return fail(
            ErrorCode::PackageInvalid,
            format!(
                "{who}: built for {} (interpreter {}), this device runs {} (interpreter {})",
                target.name(),
                target.interp.as_deref().unwrap_or("none"),
                own.name(),
                own.interp.as_deref().unwrap_or("none"),
            ),
        );
    }
    Ok(Checked {
        schema: crate::state::Schema::default(),
        module: module.to_string(),
        sha256: crate::integrity::sha256_file(path)?,
        target,
    })
}

/// Write what was checked into the snapshot at `dir`.
pub fn write_record(dir: &Path, checked: &Checked) -> Result<()> {
    let meta = crate::snapshot::meta_dir(dir)?;
    let bytes = serde_json::to_vec_pretty(checked).context("encode the updater record")?;
    crate::fsutil::write_atomic(&meta.join(RECORD), &bytes)
}

/// What the install checked of the updater of the snapshot at `dir`; None when it has none.
pub fn read_record(dir: &Path) -> Option<Checked> {
    let bytes = std::fs::read(dir.join(crate::snapshot::META_DIR).join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, e_type: u16, machine: u16, phnum: u16) -> Vec<u8> {
        let mut h = vec![
            0x7f, b'E', b'L', b'F', class, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h.extend(e_type.to_le_bytes());
        h.extend(machine.to_le_bytes());
        h.extend([1, 0, 0, 0]); // e_version
        h.extend([0u8; 8]); // e_entry
        h.extend(64u64.to_le_bytes()); // e_phoff
        h.extend([0u8; 8]); // e_shoff
        h.extend([0u8; 4]); // e_flags
        h.extend(64u16.to_le_bytes()); // e_ehsize
        h.extend(56u16.to_le_bytes()); // e_phentsize
        h.extend(phnum.to_le_bytes());
        h.extend([0u8; 6]);
        // One PT_LOAD program header.
        for _ in 0..phnum {
            let mut ph = vec![0u8; 56];
            ph[0] = 1;
            h.extend(ph);
        }
        h
    }

    #[test]
    fn programs_and_what_is_not_one() {
        let own = own_target().unwrap();
        assert_eq!(
            elf_target(Path::new("/proc/self/exe")).unwrap(),
            Ok(own.clone())
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let other: u16 = if own.machine == 183 { 62 } else { 183 };
        for (bytes, why) in [
            (b"#!/bin/sh\n".to_vec(), "not an ELF file"),
            (header(2, 4, other, 1), "not a program"),
            (header(2, 3, other, 1), "a shared library"),
            (header(2, 2, other, 0), "program headers lie past its end"),
            (
                header(2, 2, other, 1)[..40].to_vec(),
                "a truncated ELF header",
            ),
        ] {
            std::fs::write(&p, &bytes).unwrap();
            let got = elf_target(&p).unwrap().unwrap_err();
            assert!(got.contains(why), "{why}: {got}");
        }
        // A static program of the other 64-bit board.
        std::fs::write(&p, header(2, 2, other, 1)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let t = elf_target(&p).unwrap().unwrap();
        assert_eq!((t.class, t.machine, t.interp.clone()), (2, other, None));
        let e = check_binary(&p, "u", "tope-ota").unwrap_err();
        let e = crate::error::classify(&e);
        assert_eq!(e.code, ErrorCode::PackageInvalid);
        assert!(e.detail.contains("built for"), "{}", e.detail);
        // The same, for this machine: a static program runs here; mode 0700 is executable.
        if own.class == 2 {
            std::fs::write(&p, header(2, 2, own.machine, 1)).unwrap();
            let c = check_binary(&p, "u", "tope-ota").unwrap();
            assert_eq!(c.target.machine, own.machine);
        }
    }

    #[test]
    fn arm_float_abis_differ() {
        let hard = ElfTarget {
            class: 1,
            data: 1,
            machine: 40,
            arm_float: EF_ARM_ABI_FLOAT_HARD,
            interp: Some("/lib/ld-linux-armhf.so.3".into()),
        };
        let soft = ElfTarget {
            arm_float: EF_ARM_ABI_FLOAT_SOFT,
            interp: Some("/lib/ld-linux.so.3".into()),
            ..hard.clone()
        };
        assert!(!soft.runs_on(&hard));
        assert!(hard.runs_on(&hard));
        let musl = ElfTarget {
            interp: Some("/lib/ld-musl-armhf.so.1".into()),
            ..hard.clone()
        };
        assert!(!musl.runs_on(&hard));
        let stat = ElfTarget {
            interp: None,
            ..hard.clone()
        };
        assert!(stat.runs_on(&hard));
    }
}
