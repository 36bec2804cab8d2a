//! What a gateway request says: the path it is for, normalized as the upstream would
//! read it, and the customer it names.

use std::borrow::Cow;

use base64::Engine as _;

use super::Headers;
use crate::policy::CustomerFrom;

/// Removes the query and fragment, merges repeated slashes and resolves `.` and `..`
/// segments, so `/api/public/../reports` and `/api//reports` meet the route written
/// for `/api/reports` (the upstream would serve them as that path).
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if path.contains('%') {
        let decoded = decode_unreserved(path);
        return Cow::Owned(resolve(&decoded).into_owned());
    }
    resolve(path)
}

/// Merges repeated slashes and resolves dot segments.
fn resolve(path: &str) -> Cow<'_, str> {
    let clean = path.starts_with('/')
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..");
    if clean {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..") {
        s.push('/');
    }
    Cow::Owned(s)
}

/// Decodes percent-escapes of unreserved characters (RFC 3986 §6.2.2.2: letters,
/// digits, `-._~`), which name the same path as the characters themselves:
/// `/api/%72eports` is `/api/reports` to the application. Other escapes (`%2F`, `%20`)
/// are kept, with upper-case hex.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            )
        {
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push_str(&format!("{c:02X}"));
            }
            i += 3;
            continue;
        }
        // A char boundary: only ASCII bytes are compared above.
        match path.get(i..).and_then(|rest| rest.chars().next()) {
            Some(ch) => {
                out.push(ch);
                i += ch.len_utf8();
            }
            None => break,
        }
    }
    out
}

/// The customer id a route names: a header, or a claim of the JWT payload the gateway
/// verified and forwarded (base64url JSON; a whole `header.payload.signature` token is
/// accepted too, and only its payload read — the signature is the gateway's job).
///
/// An ambiguous id is refused, never picked from: the header sent twice, or a payload
/// naming a claim twice (gateways and JSON parsers disagree on which one wins, so the
/// upstream could act for another customer than the one admitted).
pub fn customer_id(from: &CustomerFrom, headers: &impl Headers) -> Result<String, String> {
    match from {
        CustomerFrom::Header(h) => match single(headers, h)? {
            Some(v) => Ok(v.to_string()),
            None => Err(format!("no customer id in header `{h}`")),
        },
        CustomerFrom::JwtClaim { header, claim } => {
            let raw = single(headers, header)?
                .ok_or_else(|| format!("no JWT payload in header `{header}`"))?;
            let raw = raw.strip_prefix("Bearer ").unwrap_or(raw);
            let payload = match raw.split('.').collect::<Vec<_>>()[..] {
                [_, p, _] => p,
                _ => raw,
            };
            let bytes = base64::engine::GeneralPurpose::new(
                &base64::alphabet::URL_SAFE,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            )
            .decode(payload)
            .map_err(|e| format!("header `{header}` is not base64url: {e}"))?;
            let Claims(claims) = serde_json::from_slice(&bytes)
                .map_err(|e| format!("header `{header}` is not a JSON payload: {e}"))?;
            match claims.get(&**claim) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                _ => Err(format!(
                    "the JWT payload in `{header}` has no string claim `{claim}`"
                )),
            }
        }
    }
}

/// The trimmed value of header `name` when sent once and not blank; an error when it
/// is sent more than once.
fn single<'h>(headers: &'h impl Headers, name: &str) -> Result<Option<&'h str>, String> {
    if headers.repeated(name) {
        return Err(format!(
            "header `{name}` is sent more than once: the customer is ambiguous"
        ));
    }
    Ok(headers
        .header(name)
        .map(str::trim)
        .filter(|v| !v.is_empty()))
}

/// A JWT payload's claims, each named once (RFC 7519 §4: a parser must refuse
/// duplicates or keep the last; refusing leaves nothing to disagree about).
struct Claims(serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for Claims {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Unique;
        impl<'de> serde::de::Visitor<'de> for Unique {
            type Value = Claims;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of claims")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Claims, A::Error> {
                let mut claims = serde_json::Map::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v = m.next_value()?;
                    if claims.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "claim `{k}` appears twice"
                        )));
                    }
                    claims.insert(k, v);
                }
                Ok(Claims(claims))
            }
        }
        d.deserialize_map(Unique)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn paths_are_normalized_before_matching() {
        assert_eq!(normalize_path("/api/reports"), "/api/reports");
        assert_eq!(normalize_path("/api/reports?x=1#f"), "/api/reports");
        assert_eq!(normalize_path("/api//reports"), "/api/reports");
        assert_eq!(normalize_path("/api/public/../reports/"), "/api/reports/");
        assert_eq!(normalize_path("/api/./reports"), "/api/reports");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("api"), "/api");
        assert_eq!(normalize_path("/api/.."), "/");
        // Escapes of unreserved characters are the characters; dot segments written
        // as escapes are dot segments.
        assert_eq!(normalize_path("/api/%72eports"), "/api/reports");
        assert_eq!(normalize_path("/api/%72%65ports/x"), "/api/reports/x");
        assert_eq!(normalize_path("/api/public/%2e%2E/reports"), "/api/reports");
        assert_eq!(normalize_path("/api/%7Euser"), "/api/~user");
        // Reserved and other escapes stay escaped (upper-case), and bad ones as written.
        assert_eq!(normalize_path("/api%2freports"), "/api%2Freports");
        assert_eq!(normalize_path("/a%20b"), "/a%20b");
        assert_eq!(normalize_path("/a%zz%4"), "/a%zz%4");
        assert_eq!(normalize_path("/é/%C3%A9"), "/é/%C3%A9");
    }

    #[test]
    fn customer_from_header_and_jwt_claim() {
        let mut h = HashMap::new();
        h.insert("x-customer-id".to_string(), " acme ".to_string());
        let from = CustomerFrom::Header("x-customer-id".into());
        assert_eq!(customer_id(&from, &h).as_deref(), Ok("acme"));
        let missing = CustomerFrom::Header("x-other".into());
        assert!(customer_id(&missing, &h).is_err());

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(br#"{"sub":"globex","org":42}"#);
        h.insert("x-jwt-payload".to_string(), payload.clone());
        let sub = CustomerFrom::JwtClaim {
            header: "x-jwt-payload".into(),
            claim: "sub".into(),
        };
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("globex"));
        let org = CustomerFrom::JwtClaim {
            header: "x-jwt-payload".into(),
            claim: "org".into(),
        };
        assert_eq!(customer_id(&org, &h).as_deref(), Ok("42"));
        // A whole token: only the payload is read.
        h.insert(
            "x-jwt-payload".to_string(),
            format!("Bearer eyJhbGciOiJub25lIn0.{payload}.sig"),
        );
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("globex"));
        // Padded base64url is accepted too.
        h.insert(
            "x-jwt-payload".to_string(),
            base64::engine::general_purpose::URL_SAFE.encode(br#"{"sub":"x"}"#),
        );
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("x"));
        for bad in ["%%%", "bm90IGpzb24", ""] {
            h.insert("x-jwt-payload".to_string(), bad.to_string());
            assert!(customer_id(&sub, &h).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_ambiguous_jwt_payload_is_refused() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sub = CustomerFrom::JwtClaim {
            header: "x-jwt-payload".into(),
            claim: "sub".into(),
        };
        let mut h = HashMap::new();
        for (payload, wants) in [
            (
                &br#"{"sub":"globex","sub":"acme"}"#[..],
                "claim `sub` appears twice",
            ),
            (
                br#"{"org":1,"sub":"acme","org":2}"#,
                "claim `org` appears twice",
            ),
            // serde_json refuses lone surrogates: `\ud800` never becomes U+0000 here.
            (br#"{"sub":"a\ud800"}"#, "hex escape"),
            (br#"{"sub":"a\udc00"}"#, "surrogate"),
            (br#"["sub"]"#, "a JSON object of claims"),
        ] {
            h.insert("x-jwt-payload".to_string(), b64.encode(payload));
            let e = customer_id(&sub, &h).expect_err("ambiguous");
            assert!(e.contains(wants), "{e}");
        }
        h.insert(
            "x-jwt-payload".to_string(),
            b64.encode(br#"{"sub":"acme","nested":{"a":1}}"#),
        );
        assert_eq!(customer_id(&sub, &h).as_deref(), Ok("acme"));
    }
}
