//! Public names of the ids the service hands out, and parsing them back.
//!
//! A reservation's id is shown to clients (in decisions, and in the paths that commit
//! or release it) and written to the usage ledger. Its spelling lives here, apart from
//! the journal's record format and from the engine, so that both can name it without
//! knowing about each other.

/// A reservation's id: 128 random bits, printed as `rsv_` and 32 hex digits.
pub type ReservationId = u128;

pub fn reservation_name(id: ReservationId) -> String {
    format!("rsv_{id:032x}")
}

pub fn parse_reservation(s: &str) -> Option<ReservationId> {
    let hex = s.strip_prefix("rsv_")?;
    (hex.len() == 32)
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_names_round_trip() {
        let id = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        assert_eq!(parse_reservation(&reservation_name(id)), Some(id));
        assert_eq!(parse_reservation("rsv_xyz"), None);
    }
}
