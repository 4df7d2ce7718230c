//! The old device-api's contract suite: `tests/contract/old_api.py` (Python, standard library
//! only), written from the old API's description rather than from tope-ota's code, run against
//! the real binary (download, /progress polling, update, the error cases, a receiver that
//! answers each callback in 300 ms).

use crate::support::BIN;

#[test]
fn the_old_device_api_contract_suite_passes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/contract/old_api.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(BIN)
        .env_remove("TOPE_OTA_REPORT_URL")
        .output()
        .expect("python3 is needed (bash tests/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
}
