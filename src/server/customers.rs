//! The customer write API: `PUT` and `DELETE /v1/customers/{id}`,
//! `POST /v1/customers/{id}/overrides`, `GET /v1/customers/{id}/record`, and
//! `DELETE /v1/customers/{id}/record` (drop the API record: the files' record, if any,
//! serves again).
//!
//! A write is authorized (a bearer admin token), read and checked (a bad record is
//! a 400 naming each field, and changes nothing), then applied by the publisher on a
//! blocking thread: it returns once the write is synced to the state directory and
//! served, with its `revision`. Each write is recorded in the audit log.

use std::borrow::Cow;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use super::App;
use super::api::{Resp, json_value, read_body};
use super::error::ApiError;
use crate::live::record::{self, Problem};
use crate::live::replica::AppendError;
use crate::live::{AuthError, Base, Found, Live, Write, WriteError, Writes, Written};

/// Whether `method path` is one of this module's routes.
pub fn is_route(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/customers/") else {
        return false;
    };
    rest.ends_with("/record")
        || rest.ends_with("/overrides")
        || method == Method::PUT
        || method == Method::DELETE
}

pub async fn route<S>(
    app: &App<S>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let rest = &path["/v1/customers/".len()..];
    let allow = |allow: &'static str| ApiError::MethodNotAllowed {
        method: method.to_string(),
        allow,
    };
    if let Some(raw) = rest.strip_suffix("/record") {
        if method == Method::DELETE {
            let id = decode(raw)?;
            let by = authorize(&app.live, &req)?;
            return apply(app, Write::Forget { id }, None, "forget", &by).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(allow("GET, HEAD, DELETE"));
        }
        return read_record(app, &decode(raw)?).await;
    }
    if let Some(raw) = rest.strip_suffix("/overrides") {
        if method != Method::POST {
            return Err(allow("POST"));
        }
        let id = decode(raw)?;
        let by = authorize(&app.live, &req)?;
        let body = read_body(app, req).await?;
        return add_override(app, id, by, &body).await;
    }
    let id = decode(rest)?;
    let by = authorize(&app.live, &req)?;
    if method == Method::DELETE {
        return delete(app, id, by).await;
    }
    let body = read_body(app, req).await?;
    put(app, id, by, &body).await
}

fn decode(raw: &str) -> Result<String, ApiError> {
    let id: Cow<str> = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::field("id", "the customer id in the path is not UTF-8"))?;
    if id.is_empty() || id.len() > super::request::MAX_STRING {
        return Err(ApiError::field(
            "id",
            format!("a customer id is 1 to {} bytes", super::request::MAX_STRING),
        ));
    }
    Ok(id.into_owned())
}

/// The admin token's name, or why the request may not write.
fn authorize(live: &Live, req: &Request<Incoming>) -> Result<String, ApiError> {
    let tokens = match &live.writes {
        Writes::Disabled(why) => return Err(ApiError::WritesDisabled(why.clone())),
        Writes::Enabled(tokens) => tokens,
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    tokens.check(header).map_err(|e| match e {
        AuthError::Missing | AuthError::Wrong => ApiError::Unauthorized(e.to_string()),
        AuthError::Unreadable(why) => {
            tracing::error!("customer write refused: admin token file {why}");
            ApiError::Unavailable(format!("the admin token file cannot be read ({why})"))
        }
    })
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("malformed JSON: {e}"),
    })
}

async fn put<S>(app: &App<S>, id: String, by: String, body: &[u8]) -> Result<Resp, ApiError> {
    let v = record::with_id(parse_json(body)?, &id).map_err(ApiError::InvalidRecord)?;
    let record = record::parse(&v).map_err(ApiError::InvalidRecord)?;
    let w = Write::Put { record, json: v };
    apply(app, w, None, "put", &by).await
}

async fn delete<S>(app: &App<S>, id: String, by: String) -> Result<Resp, ApiError> {
    let base = match app.live.publisher.find(&id) {
        // Deleted already: the same answer again (a retried delete).
        Found::Api(w) if w.record.is_none() => {
            return Ok(written(&id, "delete", w.revision, None));
        }
        Found::Api(w) => Base::Api(w.revision),
        Found::Files(files) => {
            if files.is_none_or(|f| f.customers.get(&id).is_none()) {
                return Err(ApiError::UnknownCustomer(id));
            }
            Base::Files
        }
    };
    apply(app, Write::Delete { id }, Some(base), "delete", &by).await
}

/// Tries a read-modify-write this many times while concurrent writes to the same
/// customer change its record.
const OVERRIDE_TRIES: usize = 5;

async fn add_override<S>(
    app: &App<S>,
    id: String,
    by: String,
    body: &[u8],
) -> Result<Resp, ApiError> {
    let o = parse_json(body)?;
    check_override(&o)?;
    for _ in 0..OVERRIDE_TRIES {
        let (base, mut current) = current_record(app, &id).await?;
        match current.get_mut("overrides") {
            Some(Value::Array(list)) => list.push(o.clone()),
            _ => {
                current["overrides"] = Value::Array(vec![o.clone()]);
            }
        }
        let record = record::parse(&current).map_err(ApiError::InvalidRecord)?;
        let w = Write::Put {
            record,
            json: current,
        };
        match apply(app, w, Some(base), "override", &by).await {
            Err(ApiError::Conflict(_)) => continue,
            other => return other,
        }
    }
    Err(ApiError::Conflict(format!(
        "customer `{id}` kept changing while the override was added; try again"
    )))
}

/// An override's required fields, said up front by name.
fn check_override(o: &Value) -> Result<(), ApiError> {
    let Value::Object(obj) = o else {
        return Err(ApiError::BadRequest {
            field: None,
            message: "expected a JSON object: one override".into(),
        });
    };
    let problems: Vec<Problem> = ["feature", "grant", "expires", "approved_by", "reason"]
        .iter()
        .filter(|f| {
            obj.get(**f)
                .is_none_or(|v| v.is_null() || v.as_str().is_some_and(|s| s.trim().is_empty()))
        })
        .map(|f| {
            Problem::new(
                *f,
                format!("an override needs `{f}` (what, until when, who approved and why)"),
            )
        })
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::InvalidRecord(problems));
    }
    // Its own problems, placed as `overrides[0].<field>` would be confusing here.
    serde_json::from_value::<crate::policy::raw::Override>(o.clone())
        .map(|_| ())
        .map_err(|e| ApiError::InvalidRecord(vec![Problem::new("", e.to_string())]))
}

/// The customer's current record (API or file) and what it was read from.
async fn current_record<S>(app: &App<S>, id: &str) -> Result<(Base, Value), ApiError> {
    match app.live.publisher.find(id) {
        Found::Api(Written {
            json: Some(json),
            revision,
            ..
        }) => Ok((Base::Api(revision), (*json).clone())),
        Found::Api(_) => Err(ApiError::UnknownCustomer(id.to_string())),
        Found::Files(files) => {
            let files = files.ok_or(ApiError::NotReady)?;
            let (live, id2) = (app.live.clone(), id.to_string());
            let found =
                blocking(move || crate::live::file_record(&live.policies, &files, &id2)).await?;
            match found {
                Some((_, v)) => Ok((Base::Files, v)),
                None => Err(ApiError::UnknownCustomer(id.to_string())),
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the write did not finish: {e}")))
}

/// Applies a write on a blocking thread (it waits for the sync), audits it, answers.
async fn apply<S>(
    app: &App<S>,
    w: Write,
    base: Option<Base>,
    op: &'static str,
    by: &str,
) -> Result<Resp, ApiError> {
    let id = w.id().to_string();
    let at = app.decider.clock.now();
    let publisher = app.live.publisher.clone();
    let who = by.to_string();
    let revision = match &app.live.replica {
        None => {
            let result = blocking(move || publisher.write(w, base, &who, at)).await?;
            result.map_err(|e| write_error(e, &id))?
        }
        // Checked here, ordered and kept by the shared stream, applied from it.
        Some(replica) => {
            // A forget needs an API record, and that record must still be the one
            // the stream holds when it is appended.
            let base = match (&w, base) {
                (Write::Forget { .. }, None) => match publisher.find(&id) {
                    Found::Api(found) => Some(Base::Api(found.revision)),
                    Found::Files(_) => return Err(ApiError::NoApiRecord(id)),
                },
                (_, base) => base,
            };
            let entry = publisher
                .prepare(w, &who, at)
                .map_err(|e| write_error(e, &id))?;
            replica.append(&entry, base).await.map_err(|e| match e {
                AppendError::Changed => ApiError::Conflict(format!(
                    "customer `{id}` changed while this write was prepared; try again"
                )),
                AppendError::Unavailable(why) => {
                    tracing::error!("customer write refused: {why}");
                    ApiError::Unavailable(why)
                }
            })?
        }
    };
    let snapshot = app
        .decider
        .snapshot
        .load_full()
        .map(|s| s.version.to_string())
        .unwrap_or_default();
    if let Some(audit) = &app.decider.observer.audit {
        audit.customer_written(crate::audit::CustomerWrite {
            time: at,
            revision,
            op,
            customer: id.clone(),
            by: by.to_string(),
            snapshot: snapshot.clone(),
        });
    }
    tracing::info!(customer = %id, revision, op, by, "customer record written");
    Ok(written(&id, op, revision, Some(&snapshot)))
}

fn written(id: &str, op: &str, revision: u64, snapshot: Option<&str>) -> Resp {
    let mut v = json!({ "id": id, "op": op, "revision": revision });
    if let Some(s) = snapshot {
        v["snapshot"] = s.into();
    }
    json_value(StatusCode::OK, &v)
}

fn write_error(e: WriteError, id: &str) -> ApiError {
    match e {
        WriteError::NotReady => ApiError::NotReady,
        WriteError::Invalid(p) => ApiError::InvalidRecord(p),
        WriteError::Disabled(why) => ApiError::WritesDisabled(why),
        WriteError::Changed => ApiError::Conflict(format!(
            "customer `{id}` changed while this write was prepared; try again"
        )),
        WriteError::NoApiRecord => ApiError::NoApiRecord(id.to_string()),
        WriteError::Journal(j) => {
            tracing::error!("customer write refused: {j}");
            ApiError::Unavailable(j.to_string())
        }
    }
}

/// `GET /v1/customers/{id}/record`: the stored record and where it came from.
async fn read_record<S>(app: &App<S>, id: &str) -> Result<Resp, ApiError> {
    match app.live.publisher.find(id) {
        Found::Api(w) => {
            let files = app.live.publisher.files();
            let shadows = files.is_some_and(|f| f.customers.get(id).is_some());
            Ok(json_value(
                StatusCode::OK,
                &json!({
                    "id": id,
                    "source": "api",
                    "deleted": w.record.is_none(),
                    "revision": w.revision,
                    "by": &*w.by,
                    "at": w.at,
                    "shadows_file_record": shadows,
                    "record": w.json.as_deref(),
                }),
            ))
        }
        Found::Files(files) => {
            let files = files.ok_or(ApiError::NotReady)?;
            let (live, id2) = (app.live.clone(), id.to_string());
            let found: Option<(std::path::PathBuf, Value)> =
                blocking(move || crate::live::file_record(&live.policies, &files, &id2)).await?;
            let (file, record) = found.ok_or_else(|| ApiError::UnknownCustomer(id.to_string()))?;
            Ok(json_value(
                StatusCode::OK,
                &json!({ "id": id, "source": "file", "file": file, "record": record }),
            ))
        }
    }
}

/// What `/v1/status` says about written records.
pub fn status(live: &Arc<Live>) -> Value {
    let counts = live.publisher.counts();
    let mut v = serde_json::to_value(counts).unwrap_or_default();
    v["writes"] = match &live.writes {
        Writes::Enabled(_) => "enabled".into(),
        Writes::Disabled(why) => format!("disabled: {why}").into(),
    };
    if let Some(r) = &live.replica {
        v["replication"] = serde_json::to_value(r.progress()).unwrap_or_default();
    }
    v
}

/// Waits (up to `--revision-wait`) for this replica to apply `wanted`; the applied
/// revision only grows, so a decision made after this sees it.
pub async fn wait_for(live: &Live, wanted: u64) {
    let mut rx = live.publisher.watch_revision();
    let _ = tokio::time::timeout(live.revision_wait, rx.wait_for(|r| *r >= wanted)).await;
}

/// The applied revision is at least `wanted`, or the request is answered `stale`.
pub fn fresh(revision: Option<u64>, wanted: Option<u64>) -> Result<(), ApiError> {
    match (wanted, revision) {
        (Some(w), Some(applied)) if applied < w => Err(ApiError::Stale { wanted: w, applied }),
        (Some(w), None) if w > 0 => Err(ApiError::Stale {
            wanted: w,
            applied: 0,
        }),
        _ => Ok(()),
    }
}
