//! What a command prints when it ends without an error: its human text, its `--json` object and
//! its exit code.

use serde_json::Value;

/// What a command prints when it ends without an error.
#[derive(Debug)]
pub struct Output {
    /// Human text for stdout (may be empty).
    pub human: String,
    /// The one JSON object printed with `--json`.
    pub json: Value,
    /// Process exit code (0, or 130/143 when stopped by a signal).
    pub exit: i32,
}

impl Output {
    /// A command that did its work: `--json` prints the success envelope around `data`.
    pub fn success(human: String, data: impl serde::Serialize) -> Output {
        Output {
            human,
            json: serde_json::json!({"code": 200, "msg": "success", "error": null, "data": data}),
            exit: 0,
        }
    }

    /// A command stopped by a signal at a safe point: its state says how far it got.
    pub fn interrupted(message: &str, data: impl serde::Serialize, exit: i32) -> Output {
        Output {
            human: format!("{message}\n"),
            json: serde_json::json!({"code": 503, "msg": message, "error": null, "data": data}),
            exit,
        }
    }
}
