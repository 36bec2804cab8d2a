//! Decision request bodies, parsed with simd-json and validated field by field, so
//! every error names the field it is about. Strings borrow from the request buffer
//! where JSON escapes allow.

use std::borrow::Cow;

use simd_json::BorrowedValue as Value;
use simd_json::prelude::*;

use super::error::ApiError;
use super::json_text;
use crate::engine::Op;
use crate::time::Timestamp;
use crate::usage::MAX_RESERVATION_TTL_US;

/// The largest `amount` accepted: beyond it a number is a bug, not usage.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// Longest customer id, feature name, holder, context key or value.
pub const MAX_STRING: usize = 1024;
/// Most context pairs.
pub const MAX_CONTEXT: usize = 32;
/// Most items in a batch.
pub const MAX_BATCH: usize = 1000;

/// A parsed decision request.
#[derive(Debug, Clone)]
pub struct Parsed<'a> {
    pub op: Op,
    pub customer: Cow<'a, str>,
    pub feature: Cow<'a, str>,
    pub amount: u64,
    pub context: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub at: Option<Timestamp>,
    pub holder: Option<Cow<'a, str>>,
    pub idempotency_key: Option<Cow<'a, str>>,
    /// A reserve's time to live (microseconds).
    pub ttl_us: Option<i64>,
}

impl Parsed<'_> {
    /// What a retry with the same idempotency key must repeat: everything that
    /// decides what is counted.
    pub fn fingerprint(&self) -> u64 {
        let mut h = blake3::Hasher::new();
        for part in [
            self.op.as_str(),
            &self.customer,
            &self.feature,
            self.holder.as_deref().unwrap_or(""),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&self.amount.to_le_bytes());
        let mut out = [0; 8];
        out.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(out)
    }
}

/// Which fields an endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Check,
    Consume,
    Seat(Op),
    Reserve,
    /// A batch item: `op` picks check or consume.
    BatchItem,
}

impl Shape {
    fn allowed(self) -> &'static [&'static str] {
        match self {
            Shape::Check => &["customer", "feature", "amount", "context", "at"],
            Shape::Consume => &[
                "customer",
                "feature",
                "amount",
                "context",
                "idempotency_key",
            ],
            Shape::Seat(_) => &[
                "customer",
                "feature",
                "holder",
                "context",
                "idempotency_key",
            ],
            Shape::Reserve => &[
                "customer",
                "feature",
                "amount",
                "context",
                "ttl",
                "idempotency_key",
            ],
            Shape::BatchItem => &[
                "op",
                "customer",
                "feature",
                "amount",
                "context",
                "at",
                "idempotency_key",
            ],
        }
    }
}

/// Why a body is not a request: an [`ApiError`] already, or a text simd-json refused,
/// which [`refused`] puts in words from the text as sent.
#[derive(Debug)]
pub enum BodyError {
    Api(ApiError),
    /// simd-json's byte position, and the text as sent when parsing may have changed
    /// it (simd-json unescapes strings in place, even in a text it then refuses).
    Malformed {
        at: usize,
        sent: Option<Vec<u8>>,
    },
}

/// The error to answer for a body [`parse_body`] refused, given its result's `err()`
/// and the body: taking the result whole ends its borrow of the body, which a match on
/// it does not (the borrow checker counts the result's drop as a use of the borrow).
///
/// ```ignore
/// let parsed = request::parse_body(body);
/// let v = match parsed {
///     Ok(v) => v,
///     Err(_) => return Err(request::refused(parsed.err(), body)),
/// };
/// ```
pub fn refused(e: Option<BodyError>, buf: &[u8]) -> ApiError {
    match e {
        Some(BodyError::Api(e)) => e,
        Some(BodyError::Malformed { at, sent }) => ApiError::BadRequest {
            field: None,
            message: json_text::describe(sent.as_deref().unwrap_or(buf), at),
        },
        None => ApiError::BadRequest {
            field: None,
            message: "malformed JSON".into(),
        },
    }
}

/// Parses a whole body (mutated in place by simd-json). Refuses, naming the field,
/// a string with a `\u` escape that is no character (a lone surrogate). A body that is
/// not JSON comes back as [`BodyError::Malformed`]: the caller, which holds the body
/// again once the parse is over, has it described (the borrow checker does not let
/// this function read `buf` again on the error path of a parse that borrows it).
pub fn parse_body(buf: &mut [u8]) -> Result<Value<'_>, BodyError> {
    let scan = check_text(buf).map_err(BodyError::Api)?;
    // Only a body with escapes can be changed by a failed parse: only it is copied.
    let sent = scan.escapes.then(|| buf.to_vec());
    simd_json::to_borrowed_value(buf).map_err(|e| BodyError::Malformed {
        at: e.index(),
        sent,
    })
}

/// What is refused before parsing: an empty body, nesting past [`MAX_DEPTH`], a string
/// with a lone surrogate escape.
fn check_text(buf: &[u8]) -> Result<json_text::Scan, ApiError> {
    if buf.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::BadRequest {
            field: None,
            message: "expected a JSON object, found an empty body".into(),
        });
    }
    let scan = json_text::scan(buf);
    if scan.depth > MAX_DEPTH {
        return Err(ApiError::BadRequest {
            field: None,
            message: format!("JSON nested deeper than {MAX_DEPTH} levels"),
        });
    }
    if scan.unicode_escapes
        && let Some(bad) = json_text::bad_unicode_escape(buf)
    {
        let message = match &bad.field {
            Some(f) => format!("`{f}` contains {}", bad.problem),
            None => format!("the body contains {}", bad.problem),
        };
        return Err(ApiError::BadRequest {
            field: bad.field,
            message,
        });
    }
    Ok(scan)
}

/// Takes the optional `min_revision` out of a request object (a decision is answered
/// only once that customer write is applied).
pub fn take_min_revision(v: &mut Value<'_>) -> Result<Option<u64>, ApiError> {
    let Some(obj) = v.as_object_mut() else {
        return Ok(None);
    };
    match obj.remove("min_revision") {
        None => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| {
            ApiError::field(
                "min_revision",
                "`min_revision` must be a non-negative integer (the `revision` a write answered)",
            )
        }),
    }
}

/// Deepest nesting a request body may have (a batch needs 4). simd-json's value
/// builder recurses; a few kilobytes of `[[[[...` would otherwise overflow the stack.
pub const MAX_DEPTH: usize = 32;

fn string<'a>(v: &Value<'a>, field: &str) -> Result<Cow<'a, str>, ApiError> {
    match v {
        Value::String(s) if s.is_empty() => Err(ApiError::field(
            field,
            format!("`{field}` must not be empty"),
        )),
        Value::String(s) if s.len() > MAX_STRING => Err(ApiError::field(
            field,
            format!("`{field}` is longer than {MAX_STRING} bytes"),
        )),
        Value::String(s) => Ok(s.clone()),
        other => Err(ApiError::field(
            field,
            format!("`{field}` must be a string, found {}", type_name(other)),
        )),
    }
}

/// How an error message names the JSON type of `v`.
pub(super) fn type_name(v: &Value<'_>) -> &'static str {
    match v.value_type() {
        ValueType::Null => "null",
        ValueType::Bool => "a boolean",
        ValueType::I64 | ValueType::U64 | ValueType::I128 | ValueType::U128 => "an integer",
        ValueType::F64 => "a fractional number",
        ValueType::String => "a string",
        ValueType::Array => "an array",
        ValueType::Object => "an object",
        _ => "an unsupported value",
    }
}

/// Validates one decision request object.
pub fn parse_request<'a>(v: &Value<'a>, shape: Shape) -> Result<Parsed<'a>, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::BadRequest {
            field: None,
            message: format!("expected a JSON object, found {}", type_name(v)),
        });
    };
    let mut seen: Vec<&str> = Vec::with_capacity(8);
    for key in obj.keys() {
        // Gateways and most JSON parsers keep the last of duplicated keys; refusing
        // them means a proxy and the sidecar can never disagree about the customer.
        if seen.contains(&key.as_ref()) {
            return Err(ApiError::field(key, format!("field `{key}` appears twice")));
        }
        seen.push(key.as_ref());
        if !shape.allowed().contains(&key.as_ref()) {
            let hint = match (key.as_ref(), shape) {
                ("at", Shape::Consume) => " (`at` is only allowed on checks)",
                ("idempotency_key", Shape::Check) => {
                    " (checks count nothing; idempotency keys apply to consume, reserve and seats)"
                }
                _ => "",
            };
            return Err(ApiError::field(
                key,
                format!(
                    "unknown field `{key}`{hint}; expected one of {}",
                    shape.allowed().join(", ")
                ),
            ));
        }
    }
    let required = |name: &str| {
        obj.get(name)
            .ok_or_else(|| ApiError::field(name, format!("missing field `{name}`")))
    };
    let op = match shape {
        Shape::Check => Op::Check,
        Shape::Consume => Op::Consume,
        Shape::Seat(op) => op,
        Shape::Reserve => Op::Reserve,
        Shape::BatchItem => match required("op")?.as_str() {
            Some("check") => Op::Check,
            Some("consume") => Op::Consume,
            _ => {
                return Err(ApiError::field(
                    "op",
                    "`op` must be \"check\" or \"consume\"",
                ));
            }
        },
    };
    let customer = string(required("customer")?, "customer")?;
    let feature = string(required("feature")?, "feature")?;
    let amount = match obj.get("amount") {
        None => 1,
        Some(a) => amount(a)?,
    };
    let context = match obj.get("context") {
        None => Vec::new(),
        Some(c) => context(c)?,
    };
    let at = match obj.get("at") {
        None => None,
        Some(a) => {
            let s = a.as_str().ok_or_else(|| {
                ApiError::field("at", "`at` must be an RFC 3339 timestamp string")
            })?;
            Some(Timestamp::parse(s).map_err(|e| ApiError::field("at", format!("`at`: {e}")))?)
        }
    };
    let idempotency_key = idempotency_key(obj.get("idempotency_key"))?;
    if idempotency_key.is_some() && op == Op::Check {
        return Err(ApiError::field(
            "idempotency_key",
            "checks count nothing; idempotency keys apply to consume, reserve and seats",
        ));
    }
    let ttl_us = match obj.get("ttl") {
        None => None,
        Some(t) => Some(ttl(t)?),
    };
    let holder = match (shape, obj.get("holder")) {
        (Shape::Seat(_), Some(h)) => Some(string(h, "holder")?),
        (Shape::Seat(_), None) => return Err(ApiError::field("holder", "missing field `holder`")),
        _ => None,
    };
    Ok(Parsed {
        op,
        customer,
        feature,
        amount,
        context,
        at,
        holder,
        idempotency_key,
        ttl_us,
    })
}

/// A request's `amount`: a whole number from 1 to [`MAX_AMOUNT`].
fn amount(a: &Value<'_>) -> Result<u64, ApiError> {
    match a.as_u64() {
        Some(n) if (1..=MAX_AMOUNT).contains(&n) => Ok(n),
        _ if a.is_f64() || a.is_i64() || a.is_u64() => Err(ApiError::field(
            "amount",
            format!("`amount` must be a whole number from 1 to {MAX_AMOUNT}"),
        )),
        _ => Err(ApiError::field(
            "amount",
            format!("`amount` must be a number, found {}", type_name(a)),
        )),
    }
}

/// A request's `context`: an object of at most [`MAX_CONTEXT`] strings.
#[expect(clippy::type_complexity, reason = "the pairs as `Parsed` holds them")]
fn context<'a>(c: &Value<'a>) -> Result<Vec<(Cow<'a, str>, Cow<'a, str>)>, ApiError> {
    let Some(map) = c.as_object() else {
        return Err(ApiError::field(
            "context",
            format!(
                "`context` must be an object of strings, found {}",
                type_name(c)
            ),
        ));
    };
    if map.len() > MAX_CONTEXT {
        return Err(ApiError::field(
            "context",
            format!("`context` has more than {MAX_CONTEXT} keys"),
        ));
    }
    let mut context = Vec::new();
    for (k, val) in map.iter() {
        let field = format!("context.{k}");
        context.push((k.clone(), string(val, &field)?));
    }
    Ok(context)
}

/// Longest idempotency key (Stripe allows 255).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// An optional `idempotency_key` field.
pub fn idempotency_key<'a>(v: Option<&Value<'a>>) -> Result<Option<Cow<'a, str>>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let k = string(v, "idempotency_key")?;
    if k.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::field(
            "idempotency_key",
            format!("`idempotency_key` is longer than {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    Ok(Some(k))
}

/// A `ttl`: a duration string (`"30s"`, `"5m"`) or whole seconds, at most
/// [`MAX_RESERVATION_TTL_US`] (a longer one is refused, not shortened unseen).
fn ttl(v: &Value<'_>) -> Result<i64, ApiError> {
    let us = match (v.as_u64(), v.as_str()) {
        // Seconds past i64 are as much "too long" as any other.
        (Some(secs), _) => Some(
            i64::try_from(secs)
                .ok()
                .and_then(|s| s.checked_mul(crate::time::SECOND))
                .unwrap_or(i64::MAX),
        ),
        (_, Some(s)) => crate::policy::units::parse_duration(s).ok(),
        _ => None,
    };
    match us {
        Some(us) if us > MAX_RESERVATION_TTL_US => Err(ApiError::field(
            "ttl",
            format!(
                "`ttl` is longer than the longest reservation, {}h ({} seconds)",
                MAX_RESERVATION_TTL_US / crate::time::HOUR,
                MAX_RESERVATION_TTL_US / crate::time::SECOND
            ),
        )),
        Some(us) if us > 0 => Ok(us),
        _ => Err(ApiError::field(
            "ttl",
            "`ttl` must be a positive duration (\"30s\", \"5m\") or whole seconds",
        )),
    }
}

/// A commit or release body: `{amount}` (commit) and an optional `idempotency_key`.
#[derive(Debug, Clone)]
pub struct SettleBody<'a> {
    pub amount: Option<u64>,
    pub idempotency_key: Option<Cow<'a, str>>,
}

pub fn parse_settle<'a>(v: &Value<'a>, commit: bool) -> Result<SettleBody<'a>, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::BadRequest {
            field: None,
            message: format!("expected a JSON object, found {}", type_name(v)),
        });
    };
    let allowed: &[&str] = if commit {
        &["amount", "idempotency_key"]
    } else {
        &["idempotency_key"]
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_ref())) {
        return Err(ApiError::field(
            k,
            format!(
                "unknown field `{k}`; expected one of {}",
                allowed.join(", ")
            ),
        ));
    }
    let amount = match (commit, obj.get("amount")) {
        (false, _) => None,
        (true, None) => return Err(ApiError::field("amount", "missing field `amount`")),
        (true, Some(a)) => match a.as_u64() {
            Some(n) if n <= MAX_AMOUNT => Some(n),
            _ => {
                return Err(ApiError::field(
                    "amount",
                    format!("`amount` must be a whole number from 0 to {MAX_AMOUNT}"),
                ));
            }
        },
    };
    Ok(SettleBody {
        amount,
        idempotency_key: idempotency_key(obj.get("idempotency_key"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, shape: Shape) -> Result<(String, u64), ApiError> {
        let mut buf = body.as_bytes().to_vec();
        let parsed = parse_body(&mut buf);
        let v = match parsed {
            Ok(v) => v,
            Err(_) => return Err(refused(parsed.err(), body.as_bytes())),
        };
        parse_request(&v, shape).map(|p| (p.customer.to_string(), p.amount))
    }

    fn field_of(e: ApiError) -> Option<String> {
        match e {
            ApiError::BadRequest { field, .. } => field,
            _ => None,
        }
    }

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(
            parse(
                r#"{"customer":"a","feature":"f","amount":3}"#,
                Shape::Consume
            ),
            Ok(("a".into(), 3))
        );
        let bad = [
            (r#"{"feature":"f"}"#, Some("customer")),
            (r#"{"customer":7,"feature":"f"}"#, Some("customer")),
            (
                r#"{"customer":"a","feature":"f","amount":0}"#,
                Some("amount"),
            ),
            (
                r#"{"customer":"a","feature":"f","amount":-1}"#,
                Some("amount"),
            ),
            (
                r#"{"customer":"a","feature":"f","amount":1.5}"#,
                Some("amount"),
            ),
            (
                r#"{"customer":"a","feature":"f","amount":1e30}"#,
                Some("amount"),
            ),
            (
                r#"{"customer":"a","feature":"f","amount":"1"}"#,
                Some("amount"),
            ),
            (r#"{"customer":"a","feature":"f","amout":1}"#, Some("amout")),
            (
                r#"{"customer":"a","feature":"f","context":{"asset":1}}"#,
                Some("context.asset"),
            ),
            (
                r#"{"customer":"a","feature":"f","at":"yesterday"}"#,
                Some("at"),
            ),
            (r#"{"customer":"a","feature":"f"#, None),
            (r#"[1,2]"#, None),
            (
                r#"{"customer":"nobody","feature":"f","customer":"a"}"#,
                Some("customer"),
            ),
            ("", None),
        ];
        let deep = format!(
            r#"{{"customer":"a","feature":"f","context":{}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(
            field_of(parse(&deep, Shape::Check).expect_err("deep")),
            None
        );
        for (body, field) in bad {
            let shape = if body.contains("\"at\"") {
                Shape::Check
            } else {
                Shape::Consume
            };
            let e = parse(body, shape).expect_err(body);
            assert_eq!(field_of(e), field.map(String::from), "{body}");
        }
    }
}
