//! Named crash points for the crash-injection tests. Compiled in only with the `failpoints`
//! feature (the device binary has none): when `TOPE_OTA_FAILPOINT` names a point, the process
//! SIGKILLs itself there, on the `TOPE_OTA_FAILPOINT_HIT`-th pass (default the first).

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PASSES: AtomicU32 = AtomicU32::new(0);
    if std::env::var("TOPE_OTA_FAILPOINT").ok().as_deref() != Some(name) {
        return;
    }
    let want: u32 = std::env::var("TOPE_OTA_FAILPOINT_HIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if PASSES.fetch_add(1, Ordering::SeqCst) + 1 == want {
        // SAFETY: raising a signal at ourselves.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
