//! A small OpenAPI 3.0 response checker for the contract test: `$ref`, `type`, `nullable`,
//! `enum`, `required`, `properties`, `additionalProperties: false`, `minimum`/`maximum` and
//! `pattern` — what deploy/openapi.json uses.

use serde_json::Value;
use std::sync::OnceLock;

pub fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.json"))
                .expect("deploy/openapi.json");
        serde_json::from_str(&text).expect("openapi.json parses")
    })
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(doc, cur)
        }
        None => v,
    }
}

fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if v.is_null() {
        return if schema["nullable"] == Value::Bool(true) || schema.get("type").is_none() {
            Ok(())
        } else {
            Err(format!("{at}: null where {schema} is not nullable"))
        };
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            _ => false,
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    // oneOf: exactly one branch; a value two branches accept is the schema's error.
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let ok: Vec<usize> = (0..branches.len())
            .filter(|&i| validate(doc, &branches[i], v, at).is_ok())
            .collect();
        if ok.len() != 1 {
            return Err(format!(
                "{at}: {v} matches {} oneOf branches {ok:?}, not exactly one",
                ok.len()
            ));
        }
    }
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
        if !branches.iter().any(|b| validate(doc, b, v, at).is_ok()) {
            return Err(format!("{at}: {v} matches no anyOf branch"));
        }
    }
    if let (Some(m), Some(n)) = (schema.get("multipleOf").and_then(Value::as_f64), v.as_f64()) {
        if (n / m).fract() != 0.0 {
            return Err(format!("{at}: {n} is not a multiple of {m}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} < {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if n > max {
            return Err(format!("{at}: {n} > {max}"));
        }
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str()) {
        if !regex::Regex::new(p).unwrap().is_match(s) {
            return Err(format!("{at}: {s:?} does not match {p}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing {r}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(doc, ps, val, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Err(format!("{at}: unexpected property {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Check one response against the document: the path and method exist, the status is
/// documented, and the JSON body matches its schema (a 431 from the HTTP layer has no body).
pub fn check(method: &str, path: &str, status: u16, body: &str) -> Result<(), String> {
    let doc = doc();
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    if op.is_null() {
        // Unknown routes answer 404 with the error envelope, which any path may, as are the
        // browser rules' 403 and 415 and a wrong method's 405.
        if matches!(status, 403 | 404 | 405 | 415) {
            let v: Value = serde_json::from_str(body).map_err(|e| format!("{body}: {e}"))?;
            return validate(
                doc,
                &doc["components"]["schemas"]["ErrorEnvelope"],
                &v,
                "body",
            );
        }
        return Err(format!("{method} {path} is not in the document"));
    }
    if status == 431 {
        return Ok(());
    }
    let resp = op["responses"][status.to_string()].clone();
    if resp.is_null() {
        return Err(format!(
            "{method} {path}: status {status} is not documented"
        ));
    }
    let resp = resolve(doc, &resp);
    let schema = &resp["content"]["application/json"]["schema"];
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("{method} {path} {status}: {body}: {e}"))?;
    if v["code"] != status {
        return Err(format!(
            "{method} {path}: status {status} but code {}",
            v["code"]
        ));
    }
    validate(doc, schema, &v, "body").map_err(|e| format!("{method} {path} {status}: {e}"))
}

#[test]
fn the_published_error_codes_are_the_binarys() {
    let doc = doc();
    let published: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("components.schemas.ErrorCode.enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ours: Vec<&str> = tope_ota::error::ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(
        published, ours,
        "deploy/openapi.json's ErrorCode enum is stale"
    );
}

/// The download request's `package_size` takes what the server takes: an integer, a number with
/// no fraction and a decimal string, each by exactly one `oneOf` branch.
#[test]
fn the_download_request_schema_takes_every_package_size_form() {
    let doc = doc();
    let schema = &doc["components"]["schemas"]["DownloadRequest"];
    let body = |size: Value| {
        serde_json::json!({"version": "1.0.0", "package_url": "http://h/p.zip",
            "package_name": "p.zip", "package_size": size,
            "package_md5": "0123456789abcdef0123456789abcdef"})
    };
    for good in [
        serde_json::json!(104857600),
        serde_json::json!(104857600.0),
        serde_json::json!("104857600"),
    ] {
        validate(doc, schema, &body(good.clone()), "body")
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        serde_json::json!(0),
        serde_json::json!(1.5),
        serde_json::json!("12a"),
        serde_json::json!(true),
    ] {
        assert!(
            validate(doc, schema, &body(bad.clone()), "body").is_err(),
            "{bad} accepted"
        );
    }
}
