//! The updater a package can carry (issue #23): a tope-ota binary at
//! [`crate::manifest::UPDATER_DST`] in the snapshot, from the one module that says
//! `"updater": true`. This module checks that such a file is one this device can run before
//! anything of the install changes the device; nothing runs it yet.

use crate::error::{fail, ErrorCode};
use anyhow::{Context, Result};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What identifies the machine code of an ELF file: its class (32 or 64 bits), byte order and
/// `e_machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfTarget {
    pub class: u8,
    pub data: u8,
    pub machine: u16,
}

impl ElfTarget {
    /// Debian's name for the target where it is one of the boards'.
    pub fn name(self) -> String {
        match (self.class, self.machine) {
            (2, 62) => "amd64".into(),
            (2, 183) => "arm64".into(),
            (1, 40) => "armhf (32-bit ARM)".into(),
            (1, 3) => "i386".into(),
            (c, m) => format!("ELF machine {m} ({}-bit)", if c == 2 { 64 } else { 32 }),
        }
    }
}

/// The ELF target of the file at `path`; None when it is not an ELF file.
pub fn elf_target(path: &Path) -> Result<Option<ElfTarget>> {
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(&mut head[got..])
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    if &head[..4] != b"\x7fELF" || !matches!(head[4], 1 | 2) || !matches!(head[5], 1 | 2) {
        return Ok(None);
    }
    let m = [head[18], head[19]];
    Ok(Some(ElfTarget {
        class: head[4],
        data: head[5],
        machine: if head[5] == 1 {
            u16::from_le_bytes(m)
        } else {
            u16::from_be_bytes(m)
        },
    }))
}

/// The target of the running tope-ota: what a carried updater must be built for.
pub fn own_target() -> Result<ElfTarget> {
    elf_target(Path::new("/proc/self/exe"))?.context("/proc/self/exe is not an ELF file")
}

/// Refuse (`PACKAGE_INVALID`) an updater at `path`, from module `module`, that this device
/// could not run: not a regular file, not executable, not ELF, or built for another target.
pub fn check_binary(path: &Path, module: &str) -> Result<()> {
    let who = format!("module {module:?} (the updater)");
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !meta.file_type().is_file() {
        return fail(
            ErrorCode::PackageInvalid,
            format!("{who}: {} is not a regular file", path.display()),
        );
    }
    if meta.permissions().mode() & 0o111 != 0o111 {
        return fail(
            ErrorCode::PackageInvalid,
            format!(
                "{who}: {} is not executable (mode {:o})",
                path.display(),
                meta.permissions().mode() & 0o7777
            ),
        );
    }
    let Some(target) = elf_target(path)? else {
        return fail(
            ErrorCode::PackageInvalid,
            format!("{who}: {} is not an ELF program", path.display()),
        );
    };
    let own = own_target()?;
    if target != own {
        return fail(
            ErrorCode::PackageInvalid,
            format!(
                "{who}: {} is built for {}, this device runs {}",
                path.display(),
                target.name(),
                own.name()
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_real_and_false_elf_files() {
        let own = own_target().unwrap();
        assert_eq!(elf_target(Path::new("/proc/self/exe")).unwrap(), Some(own));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert_eq!(elf_target(&p).unwrap(), None);
        // An arm64 header on this machine (or an amd64 one on an ARM build).
        let mut h = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
        let other: u16 = if own.machine == 183 { 62 } else { 183 };
        h.extend(other.to_le_bytes());
        h.extend([0u8; 44]);
        std::fs::write(&p, &h).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = elf_target(&p).unwrap().unwrap();
        assert_eq!((t.class, t.machine), (2, other));
        let e = check_binary(&p, "u").unwrap_err();
        let e = crate::error::classify(&e);
        assert_eq!(e.code, ErrorCode::PackageInvalid);
        assert!(e.detail.contains("is built for"), "{}", e.detail);
    }
}
