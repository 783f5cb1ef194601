//! Credentials taken out of URLs before anything prints them.
//!
//! A URL may carry a secret two ways: in its user information
//! (`https://user:pass@host/`, or a token alone as the user: both become
//! `https://***@host/`) and in query
//! or fragment parameters named like one (`?token=`, `api_key=`, `sig=`,
//! `X-Amz-Signature=`, `password=`, `pass=`, `jwt=`). [`url`] redacts one URL; [`urls_in`]
//! every URL inside a longer text (an error chain, a log line), so that a
//! message built by a library that quotes a URL is safe to print too.
//! Whatever is redacted becomes `***`; the scheme, host, port and path stay,
//! as they are what a reader needs to find the fault.

use std::borrow::Cow;

/// What replaces a secret.
pub const REDACTED: &str = "***";

/// Parameter names (lower-cased, matched as parts of the name) whose values
/// are secrets.
const SECRET_PARAMETERS: &[&str] = &[
    "token", "key", "secret", // password, passwd, passphrase
    "pass", "pwd", "sig", "auth", "bearer", "jwt", // credential, creds
    "cred", "session",
];

/// `url` without its credentials: its user information (user and
/// password: a user alone may be a token), and the values
/// of query and fragment parameters named like secrets. Text that is not
/// a URL comes back unchanged.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_parameters(url);
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // The user too: alone, it is often a token (`https://TOKEN@host/`).
    let authority = match authority.rsplit_once('@') {
        Some((_userinfo, host)) => format!("{REDACTED}@{host}"),
        None => authority.to_string(),
    };
    format!("{scheme}{authority}{}", redact_parameters(tail))
}

/// `text` with every URL in it passed through [`url`]. A URL runs from
/// `scheme://` to a blank, a quote, a bracket or a control character
/// (braces belong to it, as in a `{agent_id}` template), except in its
/// user information: an `@` before the first `/`, `?`, `#`, blank, control
/// character, `"`, `<` or `>` after `scheme://` ends the user information
/// whatever comes before it (RFC 3986 allows `( ) ' ! $ & * + , ; =` in a
/// password, and people write others unescaped), and all of it is
/// redacted. A `"` (never part of a URL) ends the search so that a URL at
/// the end of one JSON string is not joined to an `@` in a later one.
/// Borrowed when nothing needed redacting.
pub fn urls_in(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(found) = rest.find("://") {
        let scheme_start = rest[..found]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let after_scheme = found + 3;
        // The user information, if any, ends at the last `@` of the authority.
        let authority_end = rest[after_scheme..]
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '<' | '>') || c.is_whitespace() || c.is_control())
            .map_or(rest.len(), |i| after_scheme + i);
        let host_start = rest[after_scheme..authority_end]
            .rfind('@')
            .map_or(after_scheme, |i| after_scheme + i + 1);
        let end = rest[host_start..]
            .find(|c: char| c.is_whitespace() || c.is_control() || "\"'`<>()[]\\|^".contains(c))
            .map_or(rest.len(), |i| host_start + i);
        let original = &rest[scheme_start..end];
        let redacted = url(original);
        changed |= redacted != original;
        out.push_str(&rest[..scheme_start]);
        out.push_str(&redacted);
        rest = &rest[end..];
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The query and fragment of a path with secret-named parameters redacted.
fn redact_parameters(tail: &str) -> String {
    let Some(start) = tail.find(['?', '#']) else {
        return tail.to_string();
    };
    let mut out = String::with_capacity(tail.len());
    out.push_str(&tail[..start]);
    let mut rest = &tail[start..];
    while !rest.is_empty() {
        // A separator (`?`, `#` or `&`), then one `name=value` up to the next.
        let separator = &rest[..1];
        out.push_str(separator);
        rest = &rest[1..];
        let end = rest.find(['&', '#']).unwrap_or(rest.len());
        let parameter = &rest[..end];
        match parameter.split_once('=') {
            Some((name, value)) if !value.is_empty() && secret_name(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(parameter),
        }
        rest = &rest[end..];
    }
    out
}

fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.iter().any(|secret| name.contains(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_is_redacted_whole() {
        assert_eq!(
            url("https://user:hunter2@plane.example:8443/v1?x=1"),
            "https://***@plane.example:8443/v1?x=1"
        );
        assert_eq!(url("https://ghp_abc@host/"), "https://***@host/");
        assert_eq!(url("http://127.0.0.1:5109"), "http://127.0.0.1:5109");
        // A password with `@` or `:` in it: the last `@` ends the user information.
        assert_eq!(url("https://u:p@ss:w@host/a@b"), "https://***@host/a@b");
    }

    #[test]
    fn parameters_named_like_secrets_lose_their_values() {
        assert_eq!(
            url("https://h/p?access_token=abc&page=2&API_KEY=k&X-Amz-Signature=s&sig=z#id_token=t"),
            "https://h/p?access_token=***&page=2&API_KEY=***&X-Amz-Signature=***&sig=***#id_token=***"
        );
        assert_eq!(url("https://h/p?password=&q"), "https://h/p?password=&q");
        assert_eq!(
            url("https://h/p?pass=a&passphrase=b&jwt=c&bearer=d&creds=e&page=2"),
            "https://h/p?pass=***&passphrase=***&jwt=***&bearer=***&creds=***&page=2"
        );
    }

    #[test]
    fn a_password_with_any_characters_is_redacted_inside_a_text() {
        // RFC 3986 allows `( ) ' ! $ & * + , ; =` in the user information;
        // `[ ] \ | ^ { }` are not allowed but are written anyway.
        for password in [
            "s3cr(et)PW",
            "it's",
            "a!$&*+,;=b",
            "x[y]z",
            "b\\ck|sl^{a}sh",
            "p)",
            "(p",
        ] {
            let text = format!("fetching (https://deploy:{password}@artifacts.example/a.wasm?x=1) failed");
            let redacted = urls_in(&text);
            assert_eq!(
                redacted, "fetching (https://***@artifacts.example/a.wasm?x=1) failed",
                "{password}"
            );
        }
        // The user information ends before a path, a query or a blank: an
        // `@` after them is not part of it.
        assert_eq!(
            urls_in("see http://h.test/p@q and a@b"),
            "see http://h.test/p@q and a@b"
        );
        assert_eq!(urls_in("see (http://h.test) mail a@b"), "see (http://h.test) mail a@b");
        assert_eq!(
            urls_in("\"https://u:p(w@h.test:8443\" then"),
            "\"https://***@h.test:8443\" then"
        );
        // One JSON string's URL is not joined to a later string's `@`.
        let json = r#"{"message":"plane http://h.test:1","spans":[{"agent.id":"team@x"}]}"#;
        assert_eq!(urls_in(json), json);
    }

    #[test]
    fn every_url_inside_a_text_is_redacted_and_the_rest_kept() {
        let text = "error sending request for url (https://a:secret1@x.test/v1?token=secret2): \
                    connection refused; then \"grpc://b:secret3@y.test\"";
        let redacted = urls_in(text);
        for secret in ["secret1", "secret2", "secret3"] {
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert_eq!(
            redacted,
            "error sending request for url (https://***@x.test/v1?token=***): connection refused; \
             then \"grpc://***@y.test\""
        );
        assert!(matches!(urls_in("no url here"), Cow::Borrowed(_)));
        assert!(matches!(urls_in("see http://plain.test/x"), Cow::Borrowed(_)));
        assert_eq!(urls_in("://odd"), "://odd");
        assert_eq!(
            urls_in("template https://u:p@h/{agent_id}.wasm?sig=s."),
            "template https://***@h/{agent_id}.wasm?sig=***"
        );
    }
}
