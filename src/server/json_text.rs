//! Checks on a request body's JSON text that simd-json does not make, and the words
//! for what it refuses.
//!
//! simd-json decodes a lone UTF-16 surrogate escape (`"\ud800"`) to U+0000 and a high
//! surrogate followed by a non-surrogate escape to some other character, so two
//! different idempotency keys or seat holders could become one. Every `\u` escape is
//! checked here first, and a bad one is refused naming the field it is in. simd-json's
//! errors say little (`InternalError(TapeError) at character 0`): a body it refuses is
//! described again by serde_json, whose messages carry a line and column.

/// What one pass over a JSON text found: the deepest bracket nesting, and whether any
/// string holds a backslash or a `\u` escape (which the slower checks below then look at).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    pub depth: usize,
    pub escapes: bool,
    pub unicode_escapes: bool,
}

/// One pass over bytes already in cache, ignoring brackets inside strings.
pub fn scan(buf: &[u8]) -> Scan {
    let mut s = Scan::default();
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in buf {
        if in_str {
            match b {
                _ if escaped => {
                    escaped = false;
                    s.unicode_escapes |= b == b'u';
                }
                b'\\' => {
                    escaped = true;
                    s.escapes = true;
                }
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                s.depth = s.depth.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    s
}

/// Where a string is in the document: a key of an object, or an array index.
enum Frame {
    Object(Option<String>),
    Array(usize),
}

/// A string whose `\u` escapes do not make characters: the field it is the value (or
/// the key) of, as `context.region` or `requests[2].holder` (`None` at the top level),
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEscape {
    pub field: Option<String>,
    pub problem: &'static str,
}

/// Finds the first string with an escape that is no character: a lone surrogate (a
/// high one not followed by a low one, or a low one alone) or `\u` without four hex
/// digits. A text that is not JSON is left to the parser.
pub fn bad_unicode_escape(buf: &[u8]) -> Option<BadEscape> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'{' => {
                stack.push(Frame::Object(None));
                expect_key = true;
            }
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object(_)) => expect_key = true,
                Some(Frame::Array(n)) => *n += 1,
                None => {}
            },
            b'"' => {
                let end = string_end(buf, i + 1);
                let text = &buf[i + 1..end];
                if expect_key && let Some(Frame::Object(key)) = stack.last_mut() {
                    *key = Some(String::from_utf8_lossy(text).into_owned());
                    expect_key = false;
                }
                if let Some(problem) = escape_problem(text) {
                    return Some(BadEscape {
                        field: path(&stack),
                        problem,
                    });
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the quote closing a string that starts at `from` (or the end).
fn string_end(buf: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < buf.len() {
        match buf[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    buf.len()
}

/// `a.b[2].c` for a stack of frames; `None` for the top level.
fn path(stack: &[Frame]) -> Option<String> {
    let mut out = String::new();
    for f in stack {
        match f {
            Frame::Object(Some(k)) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Frame::Object(None) => {}
            Frame::Array(n) => out.push_str(&format!("[{n}]")),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// What is wrong with a string's `\u` escapes, if anything.
fn escape_problem(text: &[u8]) -> Option<&'static str> {
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            i += 1;
            continue;
        }
        if text.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let Some(cp) = hex4(text, i + 2) else {
            return Some("a `\\u` escape without four hex digits");
        };
        match cp {
            0xD800..=0xDBFF => match (text.get(i + 6..i + 8), hex4(text, i + 8)) {
                (Some(b"\\u"), Some(0xDC00..=0xDFFF)) => i += 12,
                _ => return Some(LONE_SURROGATE),
            },
            0xDC00..=0xDFFF => return Some(LONE_SURROGATE),
            _ => i += 6,
        }
    }
    None
}

const LONE_SURROGATE: &str =
    "a lone UTF-16 surrogate escape (such as `\\ud800`), which is not a character";

/// The four hex digits at `at`, as a number.
fn hex4(text: &[u8], at: usize) -> Option<u32> {
    let digits = text.get(at..at + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Says what is wrong with a JSON text simd-json refused, in words and with its line
/// and column (serde_json reads the text again for that). `fallback` is simd-json's
/// byte position, for the rare text serde_json accepts.
pub fn describe(buf: &[u8], fallback: usize) -> String {
    match serde_json::from_slice::<serde::de::IgnoredAny>(buf) {
        Err(e) if e.line() > 0 => format!(
            "malformed JSON: {} at line {} column {}",
            words(&e),
            e.line(),
            e.column()
        ),
        _ => format!("malformed JSON at byte {fallback}"),
    }
}

/// serde_json's message without its position, in the words of this API.
fn words(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let msg = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m);
    let plain = match msg {
        "expected value" if e.line() == 1 && e.column() == 1 => "expected a JSON object",
        "expected value" => {
            "expected a JSON value (a string, number, object, array, true, false or null)"
        }
        "EOF while parsing a value" => "unexpected end of input, where a value was expected",
        "EOF while parsing an object" => "unexpected end of input inside an object",
        "EOF while parsing a list" => "unexpected end of input inside an array",
        "EOF while parsing a string" => "unexpected end of input inside a string",
        "key must be a string" => "expected an object key in double quotes",
        "trailing characters" => "unexpected text after the JSON value",
        "invalid escape" => "invalid string escape",
        "expected `:`" => "expected `:` after an object key",
        "expected `,` or `}`" => "expected `,` or `}` after an object member",
        "expected `,` or `]`" => "expected `,` or `]` after an array element",
        m if m.starts_with("control character") => {
            "unescaped control character in a string (write it as `\\n`, `\\t` or `\\u00XX`)"
        }
        m if m.starts_with("expected ident") => {
            "unknown word (expected true, false or null; strings need double quotes)"
        }
        m => return m.to_string(),
    };
    plain.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_depth_and_escapes_outside_and_inside_strings() {
        assert_eq!(
            scan(br#"{"a":[{"b":"[[[\""}]}"#),
            Scan {
                depth: 3,
                escapes: true,
                unicode_escapes: false
            }
        );
        assert!(scan(br#"{"a":"\u0041"}"#).unicode_escapes);
        assert!(!scan(br#"{"a":"\\u0041"}"#).unicode_escapes);
    }

    #[test]
    fn lone_surrogates_are_found_with_their_field() {
        let bad = |s: &str| bad_unicode_escape(s.as_bytes()).map(|b| b.field);
        assert_eq!(
            bad(r#"{"customer":"a\ud800"}"#),
            Some(Some("customer".into()))
        );
        assert_eq!(
            bad(r#"{"customer":"\udc00"}"#),
            Some(Some("customer".into()))
        );
        assert_eq!(
            bad(r#"{"customer":"a","context":{"x":"y","region":"\uD800\u0041"}}"#),
            Some(Some("context.region".into()))
        );
        assert_eq!(
            bad(r#"{"requests":[{"op":"check"},{"holder":"\ud83d\ue000"}]}"#),
            Some(Some("requests[1].holder".into()))
        );
        assert_eq!(bad(r#"{"k\ud800":1}"#), Some(Some("k\\ud800".into())));
        assert_eq!(bad(r#""\ud800""#), Some(None));
        assert_eq!(bad(r#"{"a":"\u12"}"#), Some(Some("a".into())));
        // Pairs, escaped backslashes and plain escapes are fine.
        for ok in [
            r#"{"a":"\ud83d\ude00","b":"\\ud800","c":"\u00e9\n\"\\"}"#,
            r#"{"a":"x"}"#,
        ] {
            assert_eq!(bad(ok), None, "{ok}");
        }
    }

    #[test]
    fn malformed_json_is_described_in_words_with_its_position() {
        let cases = [
            ("customer=acme", "expected a JSON object at line 1 column 1"),
            (
                r#"{"customer":"a""#,
                "unexpected end of input inside an object at line 1 column 15",
            ),
            (
                "{\"customer\":\"a",
                "unexpected end of input inside a string",
            ),
            (
                r#"{"customer":"a\q"}"#,
                "invalid string escape at line 1 column 16",
            ),
            (
                "{customer:1}",
                "expected an object key in double quotes at line 1 column 2",
            ),
            (r#"{"a":1} x"#, "unexpected text after the JSON value"),
            ("{\"a\":\n  tru}", "unknown word"),
            (r#"{"a" 1}"#, "expected `:` after an object key"),
            (
                r#"{"a":1,}"#,
                "expected an object key in double quotes at line 1 column 8",
            ),
            (r#"[1,]"#, "expected a JSON value (a string"),
        ];
        for (body, want) in cases {
            let got = describe(body.as_bytes(), 0);
            assert!(got.starts_with("malformed JSON: "), "{body}: {got}");
            assert!(got.contains(want), "{body}: {got}");
            assert!(!got.contains("Error"), "{body}: {got}");
        }
    }
}
