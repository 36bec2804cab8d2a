//! "Did you mean": the defined name closest to a misspelt one.
//!
//! Case is ignored (`Pro` finds `pro`) and a swap of two neighbouring characters is
//! one edit (`export.pfd` finds `export.pdf`): Damerau-Levenshtein over the lowercased
//! names. A suggestion is offered only within a third of the name's length (at least
//! one edit), so a short name is not matched to an unrelated one.

/// The candidate closest to `name`, if one is close enough; ties go to the
/// alphabetically first, so the message does not depend on table order.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = name.to_lowercase();
    let budget = (lower.chars().count() / 3).max(1);
    candidates
        .filter(|c| *c != name)
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|&(d, _)| d <= budget)
        .min()
        .map(|(_, c)| c)
}

/// ` (did you mean `x`?)`, or nothing.
pub(crate) fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    closest(name, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn typos_transpositions_and_case_find_the_name() {
        let names = ["pro", "enterprise", "export.pdf", "sso", "team"];
        let find = |n: &str| closest(n, names.iter().copied());
        assert_eq!(find("enterprize"), Some("enterprise"));
        assert_eq!(find("por"), Some("pro"));
        assert_eq!(find("Pro"), Some("pro"));
        assert_eq!(find("export.pfd"), Some("export.pdf"));
        assert_eq!(find("ssso"), Some("sso"));
        assert_eq!(find("billing"), None);
        assert_eq!(find("x"), None);
    }
}
