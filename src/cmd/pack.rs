//! `pack`: build an update package from a directory, for release engineers, tests and the demo.

use crate::cli::{Global, PackArgs};
use crate::error::{fail, ErrorCode};
use crate::manifest::{Manifest, Module, MANIFEST};
use crate::output::Output;
use crate::{fsutil, validate};
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io;
use std::path::Path;

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
        let w = crate::packer::write_package(io::BufWriter::new(f), &manifest_bytes, &args.dir)?;
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
