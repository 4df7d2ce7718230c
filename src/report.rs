//! Progress callbacks to device-api (SPEC section 5).
//!
//! The operation never waits on device-api: events go through a queue to one sender thread, each
//! POST is bounded at 500 ms, and a failure is logged and forgotten. Events are sent in order;
//! while device-api is failing, intermediate progress steps are coalesced so a slow receiver
//! cannot build up a backlog, but stage changes are always sent.

use crate::error::ErrorCode;
use crate::state::{Stage, State};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound of one callback POST.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a finishing command waits for queued callbacks before it exits anyway.
pub const FLUSH_DEADLINE: Duration = Duration::from_millis(1000);

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
}

/// Decides which state changes are reported and hands them to the sender thread.
pub struct Reporter {
    tx: Option<Sender<Event>>,
    worker: Option<JoinHandle<()>>,
    last: Option<(Stage, u8, Option<ErrorCode>)>,
}

impl Reporter {
    /// A reporter posting to `url`; an empty URL disables callbacks.
    pub fn new(url: &str) -> Reporter {
        if url.is_empty() {
            return Reporter {
                tx: None,
                worker: None,
                last: None,
            };
        }
        let (tx, rx) = mpsc::channel();
        let url = url.to_string();
        let worker = std::thread::Builder::new()
            .name("report".into())
            .spawn(move || sender(url, rx))
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

fn sender(url: String, rx: Receiver<Event>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(CALLBACK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut queue: VecDeque<Event> = VecDeque::new();
    let mut healthy = true;
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
        // A progress step with a newer event behind it is stale once device-api has fallen
        // behind; skipping it keeps the stage changes and the latest figure on time.
        if !healthy && !ev.stage_change && !queue.is_empty() {
            continue;
        }
        healthy = post(&agent, &url, &ev.payload);
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
