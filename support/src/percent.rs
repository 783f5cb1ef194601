//! Text made safe to stand inside a URL, with the `percent-encoding`
//! crate: one set of characters kept as they are, for every place the
//! node builds a URL from a value it did not write (an agent id, a
//! version, a secret filled into a path).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but the unreserved characters (RFC 3986: letters, digits,
/// `-`, `.`, `_`, `~`) is encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `text` as one path segment or query value: it cannot add a `/`, `?`,
/// `#` or `&`, and `.` or `..` alone are encoded whole, so it cannot walk
/// up a path either.
pub fn component(text: &str) -> String {
    if text == "." || text == ".." {
        return text.replace('.', "%2E");
    }
    utf8_percent_encode(text, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::component;

    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(component("invoice-classifier_1.0~x"), "invoice-classifier_1.0~x");
        assert_eq!(component("a b?c#d/e&f"), "a%20b%3Fc%23d%2Fe%26f");
        assert_eq!(component("1.0.0+build"), "1.0.0%2Bbuild");
        assert_eq!(component(".."), "%2E%2E");
        assert_eq!(component("ü"), "%C3%BC");
    }
}
