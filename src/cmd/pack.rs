//! `pack`: build an update package from a directory, for release engineers, tests and the demo.

use super::Output;
use crate::cli::{Global, PackArgs};
use crate::error::{fail, ErrorCode};
use crate::manifest::{Manifest, Module, MANIFEST};
use crate::{fsutil, validate};
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime};

/// The options of every entry `pack` writes, fixed so that the same directory always gives the
/// same bytes and each entry's deflated bytes can be regenerated from its file alone
/// ([`crate::delta::regenerate_entry`]): deflate at [`crate::delta::PACK_DEFLATE_LEVEL`] by
/// flate2's zlib-rs backend, the DOS timestamp 1980-01-01 00:00, no extra fields (ZIP64 only
/// for files of 4 GiB and more), the file's permission bits as its only attribute, and the
/// contents fed to the compressor in writes of [`crate::delta::PACK_CHUNK`] bytes.
fn entry_options(mode: u32, large: bool) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .compression_level(Some(i64::from(crate::delta::PACK_DEFLATE_LEVEL)))
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
            crate::delta::copy_chunked(&mut f, zip)
                .with_context(|| format!("pack {}", path.display()))?;
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
    crate::delta::copy_chunked(&mut &manifest[..], &mut zip)?;
    add_tree(&mut zip, dir, "")?;
    Ok(zip.finish()?)
}

fn default_manifest(dir: &Path, version: &str) -> Result<Manifest> {
    let mut modules = Vec::new();
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST)
        .collect();
    names.sort();
    for n in names {
        modules.push(Module {
            name: n.clone(),
            src: n.clone(),
            dst: n,
            process_name: None,
            restart_order: None,
            md5: None,
            health: None,
            updater: false,
        });
    }
    Ok(Manifest {
        version: version.to_string(),
        modules,
        reboot: false,
        mutable: None,
        migrate: None,
    })
}

pub fn run(_g: &Global, args: &PackArgs) -> Result<Output> {
    validate::version(&args.version)?;
    if !args.dir.is_dir() {
        return fail(
            ErrorCode::InvalidRequest,
            format!("{} is not a directory", args.dir.display()),
        );
    }
    let from_file = args
        .manifest
        .clone()
        .or_else(|| Some(args.dir.join(MANIFEST)).filter(|p| p.is_file()));
    let manifest_bytes = match &from_file {
        Some(p) => {
            let bytes = fs::read(p).with_context(|| format!("read {}", p.display()))?;
            let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                crate::error::OtaError::new(
                    ErrorCode::ManifestInvalid,
                    format!("{}: {e}", p.display()),
                )
            })?;
            if m.version != args.version {
                return fail(
                    ErrorCode::ManifestInvalid,
                    format!(
                        "{} says version {}, --version is {}",
                        p.display(),
                        m.version,
                        args.version
                    ),
                );
            }
            bytes
        }
        None => serde_json::to_vec_pretty(&default_manifest(&args.dir, &args.version)?)?,
    };
    let out_dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = fsutil::temp_path(&out_dir, "pack");
    let written = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let w = write_package(io::BufWriter::new(f), &manifest_bytes, &args.dir)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        fsutil::sync_file(&f, &tmp)?;
        fsutil::rename_durable(&tmp, &args.out)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    let size = fs::metadata(&args.out)?.len();
    let md5 = crate::fetch::md5_file(&args.out)?;
    Ok(Output::success(
        format!(
            "wrote {} version {}: --size {size} --md5 {md5}\n",
            args.out.display(),
            args.version
        ),
        serde_json::json!({"path": args.out, "version": args.version, "size": size, "md5": md5}),
    ))
}
