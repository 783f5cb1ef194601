//! Parsers for the values people type on the command line; sizes and
//! durations are `support::units`.

pub use support::units::{parse_duration, parse_size};

/// `KEY=VALUE`; the value may contain `=`, the key may not be empty.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid `{text}`: expected KEY=VALUE with a non-empty key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        assert_eq!(parse_key_value("q=a=b"), Ok(("q".to_string(), "a=b".to_string())));
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("novalue").is_err());
    }
}
