//! How many tokens a prompt will cost, estimated before it is sent.
//!
//! The provider counts a prompt's tokens only in its answer, too late to
//! keep a call within the run's budget. So the node estimates them first,
//! cheaply and on the high side for most text, and refuses a call whose
//! estimated prompt plus its output cap does not fit what remains of the
//! budget (`chat.rs`). The estimate, in one pass over the bytes, counted
//! in quarter tokens and rounded up per message:
//!
//! - a quarter of a token per lowercase ASCII letter and half a token per
//!   uppercase one (English words average about four letters a token in
//!   the common tokenizers; capitals split more often), and at least one
//!   token per word: a run of letters, a new word starting where a capital
//!   follows a small letter (`camelCase` is two), so `a b c d` is not four
//!   bytes a token;
//! - a single space before a word counts with the word (` cat` is one
//!   token), one before punctuation a quarter token (tokenizers fold it
//!   into what follows); any other run of spaces and tabs a quarter a
//!   byte, at least one token;
//! - one token for every other ASCII character: digits, punctuation,
//!   symbols, newlines and control characters. A tokenizer often merges
//!   a few of them, but a prompt of random digits and punctuation costs
//!   about a token a character, and a quarter would let it cost four
//!   times its estimate;
//! - one token per non-ASCII character (a CJK character is one or two
//!   tokens, an accented letter usually part of one), so text in other
//!   scripts is not estimated at a quarter of its UTF-8 bytes;
//! - [`TOKENS_PER_MESSAGE`] for each message's role and framing, and
//!   [`TOKENS_PER_REQUEST`] for the reply's priming, as OpenAI's chat
//!   format adds them.
//!
//! Tool calls an assistant message hands back count
//! [`TOKENS_PER_MESSAGE`] each plus their ids, names and arguments; a
//! response format counts as its JSON text; each tool offered to the model counts
//! [`TOKENS_PER_MESSAGE`] plus its name, description and parameter
//! schema as JSON text, since providers put the schemas into the prompt.
//! What the estimate misses on the call that crosses the budget is what
//! the token tolerance of `meters.rs` covers.

use super::client::{ProviderMessage, ProviderTool};

/// Tokens counted for each message's role and separators.
pub const TOKENS_PER_MESSAGE: u32 = 4;
/// Tokens counted once per request, for the priming of the reply.
pub const TOKENS_PER_REQUEST: u32 = 4;

/// The estimated prompt tokens of `messages`, saturating.
pub(crate) fn estimate_prompt_tokens(
    messages: &[ProviderMessage],
    tools: &[ProviderTool],
    response_format: Option<&serde_json::Value>,
) -> u32 {
    let messages = messages.iter().fold(u64::from(TOKENS_PER_REQUEST), |sum, message| {
        let calls: u64 = message
            .tool_calls
            .iter()
            .map(|call| {
                u64::from(TOKENS_PER_MESSAGE)
                    + text_tokens(call.id.as_bytes())
                    + text_tokens(call.function.name.as_bytes())
                    + text_tokens(call.function.arguments.as_bytes())
            })
            .sum();
        let answers = message
            .tool_call_id
            .as_deref()
            .map_or(0, |id| text_tokens(id.as_bytes()));
        sum + u64::from(TOKENS_PER_MESSAGE) + text_tokens(message.content.as_bytes()) + calls + answers
    });
    let tools: u64 = tools
        .iter()
        .map(|tool| {
            let function = &tool.function;
            u64::from(TOKENS_PER_MESSAGE)
                + text_tokens(function.name.as_bytes())
                + text_tokens(function.description.as_bytes())
                + text_tokens(function.parameters.to_string().as_bytes())
        })
        .sum();
    // A response schema goes into the prompt as the tools' schemas do.
    let format = response_format.map_or(0, |format| text_tokens(format.to_string().as_bytes()));
    u32::try_from(messages + tools + format).unwrap_or(u32::MAX)
}

/// The tokens of one message's text, as the module describes: counted in
/// quarters, rounded up.
fn text_tokens(text: &[u8]) -> u64 {
    let mut quarters: u64 = 0;
    // The quarters of the word being read (0: none).
    let mut word: u64 = 0;
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if byte.is_ascii_alphabetic() {
            let follows_small = i > 0 && text[i - 1].is_ascii_lowercase();
            if word > 0 && follows_small && byte.is_ascii_uppercase() {
                quarters += word.max(4);
                word = 0;
            }
            word += if byte.is_ascii_uppercase() { 2 } else { 1 };
            i += 1;
            continue;
        }
        if word > 0 {
            quarters += word.max(4);
            word = 0;
        }
        if byte == b' ' || byte == b'\t' {
            let run = text[i..].iter().take_while(|b| **b == b' ' || **b == b'\t').count();
            let single_space = run == 1 && byte == b' ';
            match text.get(i + run) {
                // Folded into the word's own token (" cat" is one).
                Some(next) if single_space && next.is_ascii_alphabetic() => word = 1,
                Some(next) if single_space && next.is_ascii_punctuation() => quarters += 1,
                _ => quarters += (run as u64).max(4),
            }
            i += run;
            continue;
        }
        // A UTF-8 continuation byte (0b10xxxxxx) belongs to the character
        // its lead byte already counted.
        if !(0x80..0xC0).contains(&byte) {
            quarters += 4;
        }
        i += 1;
    }
    if word > 0 {
        quarters += word.max(4);
    }
    quarters.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::capabilities::llm::client::{ProviderCalledFunction, ProviderFunction, ProviderToolCall};

    fn user(content: &str) -> ProviderMessage {
        ProviderMessage::text("user", content.to_string())
    }

    /// The estimate of messages alone.
    fn estimate(messages: &[ProviderMessage]) -> u32 {
        estimate_prompt_tokens(messages, &[], None)
    }

    #[test]
    fn tool_schemas_and_tool_calls_count_in_the_prompt() {
        let tool = ProviderTool {
            kind: "function",
            function: ProviderFunction {
                name: "lookup".into(),
                description: "Looks a vendor up".into(),
                parameters: serde_json::json!({"type": "object", "properties": {"vendor": {"type": "string"}}}),
            },
        };
        let bare = estimate(&[user("Hello")]);
        let with_tool = estimate_prompt_tokens(&[user("Hello")], std::slice::from_ref(&tool), None);
        let schema = tool.function.parameters.to_string();
        assert_eq!(
            with_tool,
            bare + TOKENS_PER_MESSAGE
                + text_tokens(b"lookup") as u32
                + text_tokens(b"Looks a vendor up") as u32
                + text_tokens(schema.as_bytes()) as u32
        );
        assert!(with_tool > bare + 20, "{with_tool} vs {bare}");
        let call = ProviderMessage {
            tool_calls: vec![ProviderToolCall {
                id: "call_1".into(),
                kind: "function".into(),
                function: ProviderCalledFunction {
                    name: "lookup".into(),
                    arguments: r#"{"vendor": "Paper Co"}"#.into(),
                },
            }],
            ..ProviderMessage::text("assistant", String::new())
        };
        assert!(estimate(&[call]) > estimate(&[ProviderMessage::text("assistant", String::new())]) + 8);
        // An empty call still costs its framing.
        let empty = ProviderMessage {
            tool_calls: vec![
                ProviderToolCall {
                    id: String::new(),
                    kind: "function".into(),
                    function: ProviderCalledFunction::default(),
                };
                1000
            ],
            ..ProviderMessage::text("assistant", String::new())
        };
        assert!(estimate(&[empty]) >= 4000);
        // And a response schema counts as its text.
        let schema =
            serde_json::json!({"type": "json_schema", "json_schema": {"schema": {"description": "x".repeat(4000)}}});
        assert!(estimate_prompt_tokens(&[user("Hello")], &[], Some(&schema)) >= estimate(&[user("Hello")]) + 1000);
    }

    #[test]
    fn ascii_counts_a_quarter_token_a_byte_and_every_message_its_framing() {
        assert_eq!(estimate(&[]), TOKENS_PER_REQUEST);
        assert_eq!(estimate(&[user("")]), 8);
        assert_eq!(estimate(&[user("Hello")]), 8 + 2);
        assert_eq!(estimate(&[user(&"a".repeat(4000))]), 8 + 1000);
        assert_eq!(estimate(&[user("abcd"), user("abcd")]), 4 + 2 * (4 + 1));
    }

    #[test]
    fn words_count_at_least_a_token_and_capitals_half_a_token_a_letter() {
        // "The cat sat": three words of 4 quarters, the spaces with them.
        assert_eq!(estimate(&[user("The cat sat")]), 8 + 3);
        // One-letter words are a token each (with the space before them).
        // The last space, before nothing, is a token of its own.
        assert_eq!(estimate(&[user(&"a ".repeat(1000))]), 8 + 1001);
        assert_eq!(estimate(&[user("ABCDEFGH")]), 8 + 4);
        // Words: a, Ba, Ba, Ba, B.
        assert_eq!(estimate(&[user("aBaBaBaB")]), 8 + 5);
        // Indentation is a quarter a space, at least a token a run.
        assert_eq!(estimate(&[user("\n        x")]), 8 + 1 + 2 + 1);
    }

    #[test]
    fn digits_punctuation_and_symbols_count_a_token_each() {
        let dense: String = (0..3000u32)
            .map(|i| char::from(b"0123456789!#$%&()*+,-./:;<=>?@[]^_{|}~"[(i * 7 % 37) as usize]))
            .collect();
        assert_eq!(estimate(&[user(&dense)]), 8 + 3000);
        // Ordinary prose stays close: 12 words and 2 punctuation marks in
        // 55 bytes (a quarter token a byte was 14).
        assert_eq!(
            estimate(&[user("Classify the invoice, and say why: it is due on Monday.")]),
            8 + 18
        );
        // A space before a digit is its own token.
        assert_eq!(estimate(&[user("1 2 3")]), 8 + 5);
    }

    #[test]
    fn other_scripts_count_a_token_a_character_not_a_quarter_of_their_bytes() {
        // 1000 CJK characters are 3000 bytes of UTF-8.
        let cjk = "\u{4e2d}".repeat(1000);
        assert_eq!(estimate(&[user(&cjk)]), 8 + 1000);
        assert_eq!(estimate(&[user("caf\u{e9}")]), 8 + 1 + 1);
    }
}
