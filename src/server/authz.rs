//! The HTTP forward-auth adapter: `/v1/authz/{path…}` translated to gateway
//! admission ([`crate::admission`]) and its answer back to a status, headers and body.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};

use super::App;
use super::error::ApiError;
use crate::admission::{self, Headers};
use crate::usage::UsageStore;

/// A header sent more than once is [`Headers::repeated`]: a customer id read from it
/// is refused as ambiguous.
impl Headers for hyper::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }

    fn repeated(&self, name: &str) -> bool {
        self.get_all(name).iter().nth(1).is_some()
    }
}

/// Forward-auth for gateways: any method on `/v1/authz/{path…}`. The request checked
/// is `X-Forwarded-Method` and `X-Forwarded-Uri` when the gateway sends them (Traefik
/// `forwardAuth`, nginx `auth_request` as configured in deploy/nginx), otherwise this
/// request's own method and the path after `/v1/authz` (Envoy ext_authz with
/// `path_prefix`). The body is never read.
pub(super) async fn authz<S: UsageStore>(
    app: &App<S>,
    method: &Method,
    path: &str,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let headers = req.headers();
    let method = headers
        .get("x-forwarded-method")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(method.as_str());
    let checked = match headers.get("x-forwarded-uri").and_then(|v| v.to_str().ok()) {
        Some(uri) => uri,
        None => match &path["/v1/authz".len()..] {
            "" => "/",
            rest => rest,
        },
    };
    let a = admission::admit(
        &app.decider,
        app.unmatched,
        "authz_http",
        method,
        checked,
        headers,
    )
    .await?;
    let extra = a.headers();
    let status = StatusCode::from_u16(a.status()).unwrap_or(StatusCode::FORBIDDEN);
    let has_body = !a.body.is_empty();
    let mut r = Response::new(Full::new(Bytes::from(a.body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if has_body {
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
    }
    for (k, v) in extra {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CustomerFrom;

    /// Headers as hyper holds them: one name, several values.
    #[test]
    fn a_header_sent_twice_is_refused() {
        let mut h = hyper::HeaderMap::new();
        h.append("x-customer-id", "acme".parse().expect("value"));
        let from = CustomerFrom::Header("x-customer-id".into());
        assert_eq!(admission::customer_id(&from, &h).as_deref(), Ok("acme"));
        h.append("x-customer-id", "globex".parse().expect("value"));
        let e = admission::customer_id(&from, &h).expect_err("ambiguous");
        assert!(e.contains("sent more than once"), "{e}");
    }
}
