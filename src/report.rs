//! Progress callbacks to device-api (SPEC section 5).
//!
//! The operation never waits on device-api: events go through a queue to one sender thread,
//! in order. Stage changes (a new stage or error) are each tried up to [`STAGE_ATTEMPTS`] times,
//! every attempt bounded at [`CALLBACK_TIMEOUT`]; an intermediate progress value that has waited
//! longer than [`STALE_PROGRESS`] with a newer event behind it is skipped (the latest is sent).
//! At exit a command waits at most [`FLUSH_DEADLINE`] for the queue.
//!
//! What is not delivered is not lost: `callback.json` in the state dir records the last stage
//! (stage, error, version) device-api received, and the next writer (heal, the timer, download,
//! install…) and serve at its start send state.json's state first when it differs.

use crate::error::ErrorCode;
use crate::state::{Stage, State};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound of one callback POST.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_millis(500);
/// Attempts for one stage change while device-api answers; one while it is down (its last
/// stage change failed every attempt), until it answers again.
pub const STAGE_ATTEMPTS: u32 = 3;
/// Pause between two attempts of one stage change.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// A progress value queued longer than this with a newer event behind it is skipped.
pub const STALE_PROGRESS: Duration = Duration::from_millis(200);
/// How long a finishing command waits for queued callbacks before it exits anyway: the most
/// time a process spends at exit on callbacks.
pub const FLUSH_DEADLINE: Duration = Duration::from_millis(2000);
/// The most time [`Reporter::finish`] takes: the flush deadline, then a POST in flight ending
/// (a stopped sender starts none).
pub const FINISH_BOUND: Duration =
    Duration::from_millis(FLUSH_DEADLINE.as_secs() * 1000 + 500 + 200);
/// The last stage device-api received, in the state dir.
pub const DELIVERED_FILE: &str = "callback.json";
/// The schema of `callback.json` this build reads and writes; frozen at 1 as state.json's is
/// (see [`crate::state::SCHEMA`]). A record of a newer schema is not read: nothing is known to
/// be delivered, so the state is sent again (device-api may get a stage twice, never none).
pub const DELIVERED_SCHEMA: u64 = 1;
/// The lock of whoever posts callbacks, in the state dir (see [`callback_lock`]).
pub const CALLBACK_LOCK: &str = "callback.lock";

/// What identifies a stage change: the stage, the error, the version and the state's
/// `stage_seq`, so the same outcome of a later operation (the same failure again, a reinstall's
/// success) is a change of its own. A record without `seq` (an older build) reads as 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageKey {
    pub stage: Stage,
    pub error: Option<ErrorCode>,
    pub version: Option<String>,
    #[serde(default)]
    pub seq: u64,
}

impl StageKey {
    pub fn of(s: &State) -> StageKey {
        StageKey {
            stage: s.stage,
            error: s.error,
            version: s.version.clone(),
            seq: s.stage_seq,
        }
    }
}

/// What `callback.json` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// No record yet.
    Missing,
    /// A record that does not parse (torn, or garbage): nothing is known to be delivered.
    Unreadable,
    Key(StageKey),
}

fn delivered_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DELIVERED_FILE)
}

/// The last stage device-api received, as recorded.
pub fn read_delivered(state_dir: &Path) -> Delivered {
    match std::fs::read(delivered_path(state_dir)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Delivered::Missing,
        Err(_) => Delivered::Unreadable,
        Ok(bytes) => {
            if let Some(n) = crate::state::declared_schema(&bytes).newer_than(DELIVERED_SCHEMA) {
                log::warn!(
                    "{DELIVERED_FILE} has schema {n}, newer than this tope-ota reads ({DELIVERED_SCHEMA}): taken as nothing delivered"
                );
                return Delivered::Unreadable;
            }
            match serde_json::from_slice(&bytes) {
                Ok(k) => Delivered::Key(k),
                Err(_) => Delivered::Unreadable,
            }
        }
    }
}

/// Record `key` as delivered; false (logged) when the record could not be written durably, so
/// the caller does not take it as written.
fn write_delivered(path: &Path, key: &StageKey) -> bool {
    let result = serde_json::to_value(key)
        .map(|mut v| {
            v["schema"] = DELIVERED_SCHEMA.into();
            v
        })
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::fsutil::replace_small_file(path, &b));
    match result {
        Ok(()) => true,
        Err(e) => {
            log::warn!(
                "recording the delivered callback in {}: {e:#}",
                path.display()
            );
            false
        }
    }
}

/// The callback body: the API envelope with the progress data and the version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Payload {
    pub code: u16,
    pub msg: String,
    /// On a failure (code 500) only: the stage beside `code` and `msg`, as the old service's
    /// failure callbacks had it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub data: PayloadData,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayloadData {
    pub stage: Stage,
    pub progress: u8,
    pub message: String,
    pub error: Option<ErrorCode>,
    pub version: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub speed_bps: u64,
    pub eta_s: Option<u64>,
    pub step: Option<String>,
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
}

impl Payload {
    /// Code 500 only with stage `failed`, the end of an operation: a client that takes 500 as
    /// final must not act while an automatic rollback still runs (stage `installing`, its
    /// `step` and the original `error` in `data`), which reports 200.
    pub fn from_state(s: &State) -> Payload {
        let (code, msg, stage) = if s.stage == Stage::Failed {
            let code = s.error.unwrap_or(ErrorCode::Internal);
            (500, format!("{}: {}", code, s.message), Some(s.stage))
        } else {
            (200, "success".to_string(), None)
        };
        Payload {
            code,
            msg,
            stage,
            data: PayloadData {
                stage: s.stage,
                progress: s.progress,
                message: s.message.clone(),
                error: s.error,
                version: s.version.clone(),
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                speed_bps: s.speed_bps,
                eta_s: s.eta_s,
                step: s.step.clone(),
                bytes_fetched: s.bytes_fetched,
                bytes_reused: s.bytes_reused,
            },
        }
    }
}

struct Event {
    payload: Payload,
    key: StageKey,
    stage_change: bool,
    queued: Instant,
}

/// Decides which state changes are reported and hands them to the sender thread.
pub struct Reporter {
    tx: Option<Sender<Event>>,
    worker: Option<JoinHandle<()>>,
    /// Set when [`Reporter::finish`] gives up: the sender posts nothing more.
    stop: Arc<AtomicBool>,
    /// Set by the sender once it holds the callback lock.
    holding: Arc<AtomicBool>,
    last: Option<(Stage, u8, Option<ErrorCode>)>,
}

impl Reporter {
    /// A reporter posting to `url`; an empty URL disables callbacks. `state` is state.json as
    /// the writer found it under the lock: when device-api did not receive its stage (a
    /// process ended before it could deliver it), it is sent first. With no record yet, the
    /// record starts at `state` (nothing is sent: an older tope-ota delivered or not).
    pub fn new(url: &str, state_dir: &Path, state: &State) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicBool::new(false));
        if url.is_empty() {
            return Reporter {
                tx: None,
                worker: None,
                stop,
                holding,
                last: None,
            };
        }
        let (tx, rx) = mpsc::channel();
        let first = Event {
            payload: Payload::from_state(state),
            key: StageKey::of(state),
            stage_change: true,
            queued: Instant::now(),
        };
        let url = url.to_string();
        let dir = state_dir.to_path_buf();
        let (stop2, holding2) = (stop.clone(), holding.clone());
        let worker = std::thread::Builder::new()
            .name("report".into())
            .spawn(move || sender(url, rx, dir, first, stop2, holding2))
            .ok();
        Reporter {
            tx: worker.as_ref().map(|_| tx),
            worker,
            stop,
            holding,
            last: None,
        }
    }

    /// Wait, at most `bound`, until the sender holds the callback lock (or has ended): from
    /// then on no later process's callbacks can overtake this one's, so the writer's lock may
    /// go before the callbacks are delivered. A sender that could not take it in time is
    /// stopped before it posted anything: what it had stays pending in `callback.json` for the
    /// next writer.
    pub fn hand_over(&mut self, bound: Duration) {
        let Some(worker) = &self.worker else {
            return;
        };
        let deadline = Instant::now() + bound;
        while !self.holding.load(Ordering::SeqCst)
            && !worker.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !self.holding.load(Ordering::SeqCst) && !worker.is_finished() {
            log::warn!(
                "another tope-ota is still sending callbacks; this run's are left for the next one"
            );
            self.stop.store(true, Ordering::SeqCst);
            self.finish();
        }
    }

    /// Report `state` if its stage or error changed or its progress crossed a 5-point step.
    pub fn observe(&mut self, state: &State) {
        let key = (state.stage, state.progress / 5, state.error);
        let stage_change = match self.last {
            None => true,
            Some((stage, _, error)) => stage != state.stage || error != state.error,
        };
        if self.last == Some(key) {
            return;
        }
        self.last = Some(key);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Event {
                payload: Payload::from_state(state),
                key: StageKey::of(state),
                stage_change,
                queued: Instant::now(),
            });
        }
    }

    /// Wait up to [`FLUSH_DEADLINE`] for queued callbacks, then give up on them: the sender is
    /// told to stop and joined (it posts nothing more once told; a POST in flight ends within
    /// [`CALLBACK_TIMEOUT`]), so nothing is sent after this returns, in all at most
    /// [`FINISH_BOUND`]. What was not delivered stays pending in `callback.json`.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            let deadline = Instant::now() + FLUSH_DEADLINE;
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !worker.is_finished() {
                self.stop.store(true, Ordering::SeqCst);
                log::warn!("device-api callbacks still queued at exit were dropped");
                let deadline = Instant::now() + (FINISH_BOUND - FLUSH_DEADLINE);
                while !worker.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if worker.is_finished() {
                let _ = worker.join();
            } else {
                log::warn!("the device-api callback sender did not stop in time");
            }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn sender(
    url: String,
    rx: Receiver<Event>,
    dir: PathBuf,
    first: Event,
    stop: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
) {
    let Ok(_lock) = callback_lock(&dir, &stop) else {
        return;
    };
    holding.store(true, Ordering::SeqCst);
    let record = delivered_path(&dir);
    let mut queue: VecDeque<Event> = VecDeque::new();
    // Read under the callback lock: a sender of the process before this one may have
    // delivered the stage since this writer's operation began.
    let mut recorded = None;
    match read_delivered(&dir) {
        // No record yet: the record starts at the state as found (an older tope-ota
        // delivered it or not).
        Delivered::Missing => {
            if write_delivered(&record, &first.key) {
                recorded = Some(first.key.clone());
            }
        }
        Delivered::Key(k) if k == first.key => recorded = Some(k),
        _ => {
            log::info!(
                "device-api did not receive stage {} of {}: sending it",
                first.payload.data.stage,
                first.payload.data.version.as_deref().unwrap_or("-")
            );
            queue.push_back(first);
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(CALLBACK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut down = false;
    let mut open = true;
    while open || !queue.is_empty() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if queue.is_empty() {
            match rx.recv_timeout(Duration::from_secs(3600)) {
                Ok(ev) => queue.push_back(ev),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(ev) => queue.push_back(ev),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let Some(ev) = queue.pop_front() else {
            continue;
        };
        // A progress value that waited while device-api was slow or failing, with a newer
        // event behind it, is stale: skipping it keeps the stage changes and the latest figure
        // on time. Stage changes are never skipped.
        if !ev.stage_change && !queue.is_empty() && ev.queued.elapsed() > STALE_PROGRESS {
            continue;
        }
        let attempts = if ev.stage_change && !down {
            STAGE_ATTEMPTS
        } else {
            1
        };
        let mut delivered = false;
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(RETRY_PAUSE);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if post(&agent, &url, &ev.payload) {
                delivered = true;
                break;
            }
        }
        if delivered {
            down = false;
            // A record that failed to write is not taken as written: the next delivery (or
            // the next run) writes it again.
            if recorded.as_ref() != Some(&ev.key) && write_delivered(&record, &ev.key) {
                recorded = Some(ev.key);
            }
        } else if ev.stage_change {
            down = true;
            log::warn!(
                "device-api did not receive stage {} after {attempts} attempt(s); the next tope-ota run sends the latest stage",
                ev.payload.data.stage
            );
        }
    }
}

/// The callback lock, `callback.lock` in the state dir: whoever posts callbacks holds it, so
/// the callbacks of consecutive processes reach device-api in the order of their operations
/// even though a writer releases the state lock before its last callbacks are delivered. The
/// state lock is held while it is taken, so the next writer's sender queues behind this one.
/// `Err` when told to stop first; a lock file that cannot be opened (a read-only state dir)
/// is logged and callbacks go on unordered.
fn callback_lock(dir: &Path, stop: &AtomicBool) -> Result<Option<std::fs::File>, ()> {
    let path = dir.join(CALLBACK_LOCK);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "open {}: {e}; callbacks are sent without it",
                path.display()
            );
            return Ok(None);
        }
    };
    loop {
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => return Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => {
                log::warn!(
                    "lock {}: {e}; callbacks are sent without it",
                    path.display()
                );
                return Ok(None);
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn post(agent: &ureq::Agent, url: &str, payload: &Payload) -> bool {
    let body = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(_) => return false,
    };
    match agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(&body[..])
    {
        Ok(resp) if resp.status().is_success() => true,
        Ok(resp) => {
            log::warn!("callback to {url} answered {}", resp.status());
            false
        }
        Err(e) => {
            log::warn!("callback to {url} failed: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn nothing_is_posted_after_finish_returns() {
        // A device-api that accepts and never answers: every attempt runs into the timeout.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/r", listener.local_addr().unwrap());
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        std::thread::spawn(move || {
            let mut keep = vec![];
            for s in listener.incoming() {
                c.fetch_add(1, Ordering::SeqCst);
                keep.push(s);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::default();
        let mut r = Reporter::new(&url, dir.path(), &st);
        // More stage changes than the flush deadline can try (one attempt each once down).
        for stage in [Stage::Downloading, Stage::Verifying].repeat(5) {
            st.stage = stage;
            st.stage_seq += 1;
            r.observe(&st);
        }
        let t = Instant::now();
        r.finish();
        assert!(t.elapsed() <= FINISH_BOUND + Duration::from_millis(300));
        let at_finish = conns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            conns.load(Ordering::SeqCst),
            at_finish,
            "a callback was posted after finish returned"
        );
    }

    #[test]
    fn a_record_of_a_newer_schema_is_not_a_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DELIVERED_FILE);
        write_delivered(&path, &StageKey::of(&State::default()));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["schema"], 1, "{v}");
        // Parses as a key of this build, but its schema says it may mean something else.
        std::fs::write(
            &path,
            br#"{"schema":2,"stage":"idle","error":null,"version":null,"seq":0}"#,
        )
        .unwrap();
        assert_eq!(read_delivered(dir.path()), Delivered::Unreadable);
    }

    #[test]
    fn an_unparsable_record_is_not_a_delivery() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_delivered(dir.path()), Delivered::Missing);
        std::fs::write(dir.path().join(DELIVERED_FILE), b"{\"stage\":\"idl").unwrap();
        assert_eq!(read_delivered(dir.path()), Delivered::Unreadable);
        let st = State::default();
        write_delivered(&dir.path().join(DELIVERED_FILE), &StageKey::of(&st));
        assert_eq!(
            read_delivered(dir.path()),
            Delivered::Key(StageKey::of(&st))
        );
        // A record of an older build (no seq) reads as seq 0.
        std::fs::write(
            dir.path().join(DELIVERED_FILE),
            br#"{"stage":"idle","error":null,"version":null}"#,
        )
        .unwrap();
        assert_eq!(
            read_delivered(dir.path()),
            Delivered::Key(StageKey::of(&st))
        );
    }
}
