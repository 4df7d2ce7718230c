//! Package authenticity: detached minisign (Ed25519, prehashed) signatures checked against every
//! public key in the keys directory. With no key there, packages are not authenticated and
//! behaviour is as before; with at least one, an unsigned or badly signed package is refused.

use crate::error::{ErrorCode, OtaError};
use minisign_verify::{PublicKey, Signature};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// A trusted key and the file it came from.
pub struct Key {
    pub name: String,
    key: PublicKey,
}

fn invalid(detail: impl Into<String>) -> OtaError {
    OtaError::new(ErrorCode::SignatureInvalid, detail)
}

/// The `*.pub` keys in `dir`; none when the dir does not exist (ENOENT) or holds no `*.pub`.
/// Trust fails closed: any other error opening or listing the dir (a file in its place,
/// EACCES, EIO, an entry that cannot be read mid-listing, a link to nowhere) and a key file
/// that does not parse refuse with `SIGNATURE_INVALID` naming the path: the operator meant to
/// require signatures, and an unreadable dir is not "no keys".
pub fn load_keys(dir: &Path) -> Result<Vec<Key>, OtaError> {
    let unreadable = |e: std::io::Error| {
        invalid(format!(
            "the trusted keys directory {} cannot be read ({e}); refusing every package until it can",
            dir.display()
        ))
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // Missing means no keys, unless the path itself is there (a dangling symlink).
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::symlink_metadata(dir).is_err() =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(unreadable(e)),
    };
    let mut paths = Vec::new();
    for entry in rd {
        let p = entry.map_err(unreadable)?.path();
        if p.extension().is_some_and(|x| x == "pub") {
            paths.push(p);
        }
    }
    paths.sort();
    let mut keys = Vec::new();
    for p in paths {
        let key = PublicKey::from_file(&p)
            .map_err(|e| invalid(format!("trusted key {} does not parse: {e}", p.display())))?;
        keys.push(Key {
            name: p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            key,
        });
    }
    Ok(keys)
}

/// Fetch a detached signature (at most 8 KiB).
pub fn fetch_signature(url: &str) -> Result<String, OtaError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| OtaError::new(ErrorCode::DownloadFailed, format!("signature {url}: {e}")))?;
    if resp.status().as_u16() != 200 {
        return Err(invalid(format!(
            "no signature at {url} (HTTP {})",
            resp.status()
        )));
    }
    let mut text = String::new();
    resp.into_body()
        .into_reader()
        .take(8192)
        .read_to_string(&mut text)
        .map_err(|e| invalid(format!("signature {url}: {e}")))?;
    Ok(text)
}

/// Verify `file` against `sig_text` with any of `keys`; the name of the key that signed it.
pub fn verify_file(file: &Path, sig_text: &str, keys: &[Key]) -> Result<String, OtaError> {
    let sig = Signature::decode(sig_text)
        .map_err(|e| invalid(format!("the signature does not parse: {e}")))?;
    let mut tried_matching = false;
    for k in keys {
        let mut v = match k.key.verify_stream(&sig) {
            Ok(v) => v,
            Err(minisign_verify::Error::UnexpectedKeyId) => continue,
            Err(e) => {
                return Err(invalid(format!(
                    "signature: {e} (only prehashed signatures, minisign's default, are accepted)"
                )))
            }
        };
        tried_matching = true;
        let mut f = std::fs::File::open(file).map_err(|e| {
            OtaError::new(ErrorCode::Internal, format!("open {}: {e}", file.display()))
        })?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|e| {
                OtaError::new(ErrorCode::Internal, format!("read {}: {e}", file.display()))
            })?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n]);
        }
        if v.finalize().is_ok() {
            return Ok(k.name.clone());
        }
    }
    Err(invalid(if tried_matching {
        "the signature does not match the package".to_string()
    } else {
        format!(
            "the package is not signed by any of the {} trusted key(s)",
            keys.len()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn refused(dir: &Path) -> String {
        match load_keys(dir) {
            Ok(k) => panic!("{}: {} key(s), expected a refusal", dir.display(), k.len()),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::SignatureInvalid, "{}", e.message());
                assert!(
                    e.message().contains(&dir.display().to_string()),
                    "{}",
                    e.message()
                );
                e.message()
            }
        }
    }

    #[test]
    fn only_a_missing_dir_means_no_keys() {
        let tmp = std::env::temp_dir().join(format!("tope-ota-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        // Missing, also under a missing parent: no keys.
        assert!(load_keys(&tmp.join("none")).unwrap().is_empty());
        assert!(load_keys(&tmp.join("none/keys.d")).unwrap().is_empty());
        // Empty, or no *.pub: no keys.
        std::fs::create_dir(tmp.join("empty")).unwrap();
        assert!(load_keys(&tmp.join("empty")).unwrap().is_empty());
        // A file where the dir should be (ENOTDIR), and a path through a file.
        std::fs::write(tmp.join("file"), b"x").unwrap();
        refused(&tmp.join("file"));
        refused(&tmp.join("file/keys.d"));
        // A symlink to nowhere, and a symlink loop (ELOOP).
        std::os::unix::fs::symlink(tmp.join("nowhere"), tmp.join("dangling")).unwrap();
        refused(&tmp.join("dangling"));
        std::os::unix::fs::symlink(tmp.join("loop"), tmp.join("loop")).unwrap();
        refused(&tmp.join("loop"));
        // A *.pub that does not parse.
        std::fs::create_dir(tmp.join("bad")).unwrap();
        std::fs::write(tmp.join("bad/k.pub"), b"nonsense").unwrap();
        let msg = refused(&tmp.join("bad"));
        assert!(msg.contains("does not parse"), "{msg}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
