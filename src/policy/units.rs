//! The small languages inside policy values: durations (`500ms`, `15m`, `14d`) and
//! percentages (`80%`). Each parser returns a message saying what was expected, which
//! the loader places at the value's file:line:col.

use crate::time::{DAY, HOUR, MINUTE, SECOND};

/// Parses `<integer><unit>` with unit `ms`, `s`, `m`, `h`, `d` or `w` into microseconds.
/// Several parts may be chained (`1h30m`). Zero is refused: no period or grace of
/// length zero means anything.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let err = || {
        format!("expected a duration like `500ms`, `1s`, `15m`, `4h`, `14d` or `2w`, found `{s}`")
    };
    let bytes = s.trim().as_bytes();
    if bytes.is_empty() {
        return Err(err());
    }
    let mut total: i64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(err());
        }
        let n: i64 = std::str::from_utf8(&bytes[start..i])
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(err)?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let scale = match &bytes[unit_start..i] {
            b"ms" => 1_000,
            b"s" => SECOND,
            b"m" => MINUTE,
            b"h" => HOUR,
            b"d" => DAY,
            b"w" => 7 * DAY,
            _ => return Err(err()),
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{s}` is too long"))?;
    }
    if total == 0 {
        return Err(format!(
            "expected a duration greater than zero, found `{s}`"
        ));
    }
    Ok(total)
}

/// Formats microseconds back into the policy notation, largest exact unit first.
pub fn format_duration(us: i64) -> String {
    for (scale, unit) in [
        (7 * DAY, "w"),
        (DAY, "d"),
        (HOUR, "h"),
        (MINUTE, "m"),
        (SECOND, "s"),
    ] {
        if us % scale == 0 && us != 0 {
            return format!("{}{unit}", us / scale);
        }
    }
    format!("{}ms", us / 1_000)
}

/// Parses `80%` (0 < p ≤ 100, decimals allowed) into a fraction of one.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let err = || format!("expected a percentage like `80%` (between 0% and 100%), found `{s}`");
    let digits = s.trim().strip_suffix('%').ok_or_else(err)?;
    let p: f64 = digits.trim().parse().map_err(|_| err())?;
    if !(p > 0.0 && p <= 100.0) {
        return Err(err());
    }
    Ok(p / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(500_000));
        assert_eq!(parse_duration("1s"), Ok(SECOND));
        assert_eq!(parse_duration("15m"), Ok(15 * MINUTE));
        assert_eq!(parse_duration("4h"), Ok(4 * HOUR));
        assert_eq!(parse_duration("14d"), Ok(14 * DAY));
        assert_eq!(parse_duration("1h30m"), Ok(90 * MINUTE));
        for bad in [
            "",
            "h",
            "10",
            "10x",
            "-1s",
            "1.5h",
            "0s",
            "99999999999999999d",
            "1 h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(format_duration(2 * HOUR), "2h");
        assert_eq!(format_duration(90 * MINUTE), "90m");
        assert_eq!(format_duration(14 * DAY), "2w");
    }

    #[test]
    fn percents() {
        assert_eq!(parse_percent("80%"), Ok(0.8));
        assert_eq!(parse_percent("100%"), Ok(1.0));
        for bad in ["80", "0%", "101%", "%", "abc%", "-5%"] {
            assert!(parse_percent(bad).is_err(), "{bad} should be rejected");
        }
    }
}
