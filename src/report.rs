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
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
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
/// The last stage device-api received, in the state dir.
pub const DELIVERED_FILE: &str = "callback.json";

/// What identifies a stage change: the stage, the error and the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageKey {
    pub stage: Stage,
    pub error: Option<ErrorCode>,
    pub version: Option<String>,
}

impl StageKey {
    pub fn of(s: &State) -> StageKey {
        StageKey {
            stage: s.stage,
            error: s.error,
            version: s.version.clone(),
        }
    }
}

fn delivered_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DELIVERED_FILE)
}

/// The last stage device-api received, as recorded; `None` when never recorded (or unreadable).
pub fn read_delivered(state_dir: &Path) -> Option<StageKey> {
    let bytes = std::fs::read(delivered_path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_delivered(path: &Path, key: &StageKey) {
    let result = serde_json::to_vec(key)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::fsutil::replace_small_file(path, &b));
    if let Err(e) = result {
        log::warn!(
            "recording the delivered callback in {}: {e:#}",
            path.display()
        );
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
            },
        }
    }
}

struct Event {
    payload: Payload,
    stage_change: bool,
    queued: Instant,
}

impl Event {
    fn key(&self) -> StageKey {
        StageKey {
            stage: self.payload.data.stage,
            error: self.payload.data.error,
            version: self.payload.data.version.clone(),
        }
    }
}

/// Decides which state changes are reported and hands them to the sender thread.
pub struct Reporter {
    tx: Option<Sender<Event>>,
    worker: Option<JoinHandle<()>>,
    last: Option<(Stage, u8, Option<ErrorCode>)>,
}

impl Reporter {
    /// A reporter posting to `url`; an empty URL disables callbacks. `state` is state.json as
    /// the writer found it under the lock: when device-api did not receive its stage (a
    /// process ended before it could deliver it), it is sent first. With no record yet, the
    /// record starts at `state` (nothing is sent: an older tope-ota delivered or not).
    pub fn new(url: &str, state_dir: &Path, state: &State) -> Reporter {
        if url.is_empty() {
            return Reporter {
                tx: None,
                worker: None,
                last: None,
            };
        }
        let (tx, rx) = mpsc::channel();
        let current = StageKey::of(state);
        let (bootstrap, pending) = match read_delivered(state_dir) {
            None => (Some(current), false),
            Some(k) => (None, k != current),
        };
        if pending {
            log::info!(
                "device-api did not receive stage {} of {}: sending it",
                state.stage,
                state.version.as_deref().unwrap_or("-")
            );
            let _ = tx.send(Event {
                payload: Payload::from_state(state),
                stage_change: true,
                queued: Instant::now(),
            });
        }
        let url = url.to_string();
        let record = delivered_path(state_dir);
        let worker = std::thread::Builder::new()
            .name("report".into())
            .spawn(move || sender(url, rx, record, bootstrap))
            .ok();
        Reporter {
            tx: worker.as_ref().map(|_| tx),
            worker,
            last: None,
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
                stage_change,
                queued: Instant::now(),
            });
        }
    }

    /// Wait up to [`FLUSH_DEADLINE`] for queued callbacks, then give up on them.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            let deadline = Instant::now() + FLUSH_DEADLINE;
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if worker.is_finished() {
                let _ = worker.join();
            } else {
                log::warn!("device-api callbacks still queued at exit were dropped");
            }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn sender(url: String, rx: Receiver<Event>, record: PathBuf, bootstrap: Option<StageKey>) {
    let mut recorded = bootstrap.clone();
    if let Some(k) = &bootstrap {
        write_delivered(&record, k);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(CALLBACK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut queue: VecDeque<Event> = VecDeque::new();
    let mut down = false;
    let mut open = true;
    while open || !queue.is_empty() {
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
            if post(&agent, &url, &ev.payload) {
                delivered = true;
                break;
            }
        }
        if delivered {
            down = false;
            let key = ev.key();
            if recorded.as_ref() != Some(&key) {
                write_delivered(&record, &key);
                recorded = Some(key);
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
