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

/// The `*.pub` keys in `dir`; none when the dir is missing or empty. A key file that does not
/// parse fails closed: the operator meant to require signatures.
pub fn load_keys(dir: &Path) -> Result<Vec<Key>, OtaError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<_> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
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
