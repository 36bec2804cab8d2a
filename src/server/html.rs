//! Server-rendered HTML for the customer portal and the operator console: one
//! escaping function every piece of data goes through, the page shell with its
//! inline stylesheet, and the small drawing parts (usage bars, SVG bar charts).
//!
//! No script runs on these pages and nothing is loaded from elsewhere: the
//! Content-Security-Policy sent with them forbids scripts, so even text that escaped
//! escaping could not run. Every figure is also written as text (a bar says "3 of 10
//! (30%)"), so the pages read without colour and in a screen reader.

use std::fmt::Write as _;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// `s` safe inside HTML text and double- or single-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as one query-string value.
pub fn url_param(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// No script, no outside resource, no framing, forms only to this server.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// An HTML answer with the headers every page carries: not cached (it shows one
/// customer's data), no referrer (a portal link carries its token), no framing.
pub fn page(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_referrer(status, body, "no-referrer")
}

/// As [`page`], sending the referrer to this server only: the console's forms need
/// browsers to send their `Origin` (under `no-referrer` Chromium sends `null`), and
/// its URLs carry no secret.
pub fn console_page(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_referrer(status, body, "same-origin")
}

fn with_referrer(
    status: StatusCode,
    body: String,
    referrer: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, header::HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::REFERRER_POLICY, referrer);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    r
}

const STYLE: &str = r#"
:root{--fg:#1d2330;--muted:#5b6475;--line:#d8dce4;--bg:#f6f7f9;--card:#fff;--ok:#1f7a4d;--warn:#a15c00;--bad:#b3261e;--accent:#2f5bd3}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg)}
header.top{background:#1d2330;color:#fff;padding:12px 20px;display:flex;flex-wrap:wrap;gap:8px 20px;align-items:baseline}
header.top h1{font-size:18px;margin:0}
header.top .sub{color:#c9cfdb;font-size:13px}
header.top form{display:flex;gap:6px;align-items:center}
header.top form.out{margin-left:auto}
header.top input[type=search]{width:min(220px,60vw)}
main{max-width:1080px;margin:0 auto;padding:16px}
section.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:0 0 16px}
section.card h2{font-size:16px;margin:0 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.feature{border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:#fff}
.feature h3{font-size:15px;margin:0 0 2px;overflow-wrap:anywhere}
.feature .desc{color:var(--muted);font-size:13px;margin:0 0 6px}
.state{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:10px;border:1px solid currentColor}
.state.on{color:var(--ok)}.state.warn{color:var(--warn)}.state.off{color:var(--bad)}.state.info{color:var(--muted)}
.bar{height:12px;border-radius:6px;background:#e7eaf0;border:1px solid #c3c9d4;overflow:hidden;margin:6px 0 2px}
.bar>span{display:block;height:100%;background:var(--accent)}
.bar.high>span{background:var(--warn);background-image:repeating-linear-gradient(45deg,transparent 0 4px,rgba(255,255,255,.35) 4px 8px)}
.bar.full>span{background:var(--bad);background-image:repeating-linear-gradient(-45deg,transparent 0 3px,rgba(255,255,255,.45) 3px 6px)}
.figure{font-size:13px;margin:0}
.muted{color:var(--muted)}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top;overflow-wrap:anywhere}
th{font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
.big{font-size:22px;font-weight:700}
.kpis{display:flex;flex-wrap:wrap;gap:12px}
.kpi{flex:1 1 160px;border:1px solid var(--line);border-radius:6px;padding:8px 12px;background:#fff}
.kpi .label{font-size:12px;color:var(--muted);text-transform:uppercase}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;overflow-wrap:anywhere}
.error{color:var(--bad)}
input[type=text],input[type=password],input[type=search]{font:inherit;padding:6px 8px;border:1px solid #aab2c0;border-radius:4px;min-width:0;width:min(320px,100%)}
button{font:inherit;padding:6px 12px;border-radius:4px;border:1px solid var(--accent);background:var(--accent);color:#fff;cursor:pointer}
button.link{background:none;border:none;color:inherit;text-decoration:underline;padding:0}
a{color:var(--accent)}
ul.plain{list-style:none;padding:0;margin:0}
ul.plain li{padding:4px 0;border-bottom:1px solid var(--line)}
.notice{padding:24px;text-align:center}
.notice h1{font-size:24px}
svg text{font:12px system-ui,"DejaVu Sans",sans-serif;fill:var(--fg)}
@media (max-width:600px){main{padding:8px}section.card{padding:10px}th,td{padding:4px}.grid{grid-template-columns:1fr}table.wide thead{display:none}table.wide tr{display:block;border-bottom:1px solid var(--line);padding:4px 0}table.wide td{display:block;border:none;padding:2px 4px}table.wide td[data-label]::before{content:attr(data-label) ": ";font-weight:600;color:var(--muted)}}
"#;

/// A whole document: `title` (escaped here), a top bar and `body` (already HTML).
pub fn document(title: &str, top: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head>\
         <body><header class=\"top\">{top}</header><main>{body}</main></body></html>\n",
        esc(title)
    )
}

/// A page that says one thing (an expired link, a missing portal), with `status`.
pub fn notice(status: StatusCode, title: &str, message: &str) -> Response<Full<Bytes>> {
    let top = "<h1>entitled</h1>";
    let body = format!(
        "<section class=\"card notice\" id=\"notice\" data-status=\"{}\"><h1>{}</h1><p>{}</p></section>",
        status.as_u16(),
        esc(title),
        esc(message)
    );
    page(status, document(title, top, &body))
}

/// A usage bar with its figure in words: `used` of `limit` `unit`, the percentage,
/// and when it resets. `feature` names it for tests and assistive technology.
pub fn usage_bar(
    feature: &str,
    used: u64,
    limit: u64,
    unit: Option<&str>,
    resets: Option<&str>,
) -> String {
    let pct = percent(used, limit);
    let class = match pct {
        100.. => "bar full",
        80..=99 => "bar high",
        _ => "bar",
    };
    let width = pct.min(100);
    let unit = unit
        .map(|u| format!(" {}", esc(&plural(u, limit))))
        .unwrap_or_default();
    let mut s = format!(
        "<div class=\"{class}\" role=\"progressbar\" aria-label=\"{f} usage\" aria-valuemin=\"0\" aria-valuemax=\"100\" aria-valuenow=\"{width}\" data-feature=\"{f}\" data-percent=\"{pct}\"><span style=\"width:{width}%\"></span></div>\
         <p class=\"figure\" data-usage=\"{f}\">{used} of {limit}{unit} used ({pct}%)",
        f = esc(feature),
    );
    if let Some(r) = resets {
        let _ = write!(s, " · resets {}", esc(r));
    }
    s.push_str("</p>");
    s
}

/// `unit` for `n` of them: a lowercase word gets an `s` ("calls", "GB" stays).
fn plural(unit: &str, n: u64) -> String {
    let word = unit.chars().all(|c| c.is_ascii_lowercase());
    if n != 1 && word && !unit.ends_with('s') {
        format!("{unit}s")
    } else {
        unit.to_string()
    }
}

/// `used` as a whole percentage of `limit`, rounded down (0 of 0 is 100%: nothing
/// is left).
pub fn percent(used: u64, limit: u64) -> u64 {
    if limit == 0 {
        return 100;
    }
    ((u128::from(used) * 100) / u128::from(limit)) as u64
}

/// A horizontal SVG bar chart of `(label, value)` rows, with each value written at
/// the end of its bar. Labels are escaped. Empty rows draw "nothing to show".
pub fn bar_chart(id: &str, title: &str, rows: &[(String, u64)]) -> String {
    if rows.is_empty() {
        return format!(
            "<figure id=\"{}\"><figcaption>{}</figcaption><p class=\"muted\">nothing to show for this period</p></figure>",
            esc(id),
            esc(title)
        );
    }
    let max = rows.iter().map(|r| r.1).max().unwrap_or(1).max(1);
    let row_h = 24;
    let label_w = 220;
    let bar_w = 300;
    let h = row_h * rows.len() + 4;
    let mut s = format!(
        "<figure id=\"{}\"><figcaption>{}</figcaption><svg role=\"img\" aria-label=\"{}\" viewBox=\"0 0 {} {h}\" width=\"100%\" preserveAspectRatio=\"xMinYMin meet\">",
        esc(id),
        esc(title),
        esc(title),
        label_w + bar_w + 70
    );
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = i * row_h + 2;
        let w = ((u128::from(*v) * bar_w as u128) / u128::from(max)) as usize;
        let _ = write!(
            s,
            "<g data-label=\"{l}\" data-value=\"{v}\"><text x=\"0\" y=\"{ty}\">{l}</text>\
             <rect x=\"{label_w}\" y=\"{y}\" width=\"{w}\" height=\"{bh}\" fill=\"#2f5bd3\"></rect>\
             <text x=\"{tx}\" y=\"{ty}\">{v}</text></g>",
            l = esc(label),
            ty = y + 15,
            bh = row_h - 6,
            tx = label_w + w + 6,
        );
    }
    s.push_str("</svg></figure>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_data_is_text() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        let bar = usage_bar("<b>", 3, 10, Some("<i>"), Some("<u>"));
        assert!(!bar.contains("<b>") && !bar.contains("<i>") && !bar.contains("<u>"));
        let chart = bar_chart("c", "<t>", &[("<x>".into(), 2)]);
        assert!(!chart.contains("<x>") && !chart.contains("<t>"));
    }

    #[test]
    fn a_bar_says_its_figure_in_words() {
        let bar = usage_bar("api.calls", 3, 10, Some("call"), Some("2026-02-01"));
        assert!(bar.contains("data-percent=\"30\""), "{bar}");
        assert!(
            bar.contains("3 of 10 calls used (30%) · resets 2026-02-01"),
            "{bar}"
        );
        assert_eq!(percent(15, 10), 150);
        assert!(usage_bar("f", 15, 10, None, None).contains("width:100%"));
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }
}
