//! Secrets kept out of logs and error messages: a URL given on the command line (the
//! Redis store, the notice webhook) may carry a password in its userinfo or a token in
//! its query, and both are logged at start-up. What is kept is what an operator needs
//! to recognise the endpoint: scheme, host, port, path and the query's keys.

/// `url` with its userinfo replaced by `***` and every query value by `***`:
/// `http://user:pw@host/hook?token=T&v` → `http://***@host/hook?token=***&v`.
pub fn url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, _)) => (rest, Some("***")),
        None => (rest, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    match authority.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str("***@");
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) => {
                    out.push_str(key);
                    out.push_str("=***");
                }
                None => out.push_str(pair),
            }
        }
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn userinfo_and_query_values_are_hidden() {
        assert_eq!(
            url("http://user:pw@host:8080/hook?token=T&v=2&flag"),
            "http://***@host:8080/hook?token=***&v=***&flag"
        );
        assert_eq!(
            url("redis://:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(url("rediss://h/0#frag"), "rediss://h/0#***");
    }

    #[test]
    fn a_url_without_secrets_is_unchanged() {
        for u in [
            "https://billing.example/hooks",
            "redis://127.0.0.1:6379",
            "h:1",
        ] {
            assert_eq!(url(u), u);
        }
    }

    #[test]
    fn an_at_sign_in_the_path_is_not_userinfo() {
        assert_eq!(url("http://host/a@b"), "http://host/a@b");
    }
}
