//! How many tokens a prompt will cost, estimated before it is sent.
//!
//! The provider counts a prompt's tokens only in its answer, too late to
//! keep a call within the run's budget. So the node estimates them first,
//! cheaply and on the high side for most text, and refuses a call whose
//! estimated prompt plus its output cap does not fit what remains of the
//! budget (`chat.rs`). The estimate, in one pass over the bytes:
//!
//! - a quarter of a token per ASCII byte, rounded up per message (English
//!   and code average about four characters a token in the common
//!   tokenizers);
//! - one token per non-ASCII character (a CJK character is one or two
//!   tokens, an accented letter usually part of one), so text in other
//!   scripts is not estimated at a quarter of its UTF-8 bytes;
//! - [`TOKENS_PER_MESSAGE`] for each message's role and framing, and
//!   [`TOKENS_PER_REQUEST`] for the reply's priming, as OpenAI's chat
//!   format adds them.
//!
//! The chat request carries no tool schemas (the agent world's
//! `chat-request` has none), so messages are all there is to count. What
//! the estimate misses on the call that crosses the budget is what the
//! token tolerance of `meters.rs` covers.

use crate::sandbox::bindings::llm::Message;

/// Tokens counted for each message's role and separators.
pub const TOKENS_PER_MESSAGE: u32 = 4;
/// Tokens counted once per request, for the priming of the reply.
pub const TOKENS_PER_REQUEST: u32 = 4;

/// The estimated prompt tokens of `messages`, saturating.
pub(crate) fn estimate_prompt_tokens(messages: &[Message]) -> u32 {
    let tokens = messages.iter().fold(u64::from(TOKENS_PER_REQUEST), |sum, message| {
        sum + u64::from(TOKENS_PER_MESSAGE) + text_tokens(message.content.as_bytes())
    });
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// A quarter token per ASCII byte (rounded up), one per other character.
fn text_tokens(text: &[u8]) -> u64 {
    let ascii = text.iter().filter(|byte| byte.is_ascii()).count() as u64;
    // Each non-ASCII character has exactly one lead byte (0b11xxxxxx).
    let other_chars = text.iter().filter(|byte| **byte >= 0xC0).count() as u64;
    ascii.div_ceil(4) + other_chars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::bindings::llm::Role;

    fn user(content: &str) -> Message {
        Message {
            role: Role::User,
            content: content.to_string(),
        }
    }

    #[test]
    fn ascii_counts_a_quarter_token_a_byte_and_every_message_its_framing() {
        assert_eq!(estimate_prompt_tokens(&[]), TOKENS_PER_REQUEST);
        assert_eq!(estimate_prompt_tokens(&[user("")]), 8);
        assert_eq!(estimate_prompt_tokens(&[user("Hello")]), 8 + 2);
        assert_eq!(estimate_prompt_tokens(&[user(&"a".repeat(4000))]), 8 + 1000);
        assert_eq!(estimate_prompt_tokens(&[user("abcd"), user("abcd")]), 4 + 2 * (4 + 1));
    }

    #[test]
    fn other_scripts_count_a_token_a_character_not_a_quarter_of_their_bytes() {
        // 1000 CJK characters are 3000 bytes of UTF-8.
        let cjk = "\u{4e2d}".repeat(1000);
        assert_eq!(estimate_prompt_tokens(&[user(&cjk)]), 8 + 1000);
        assert_eq!(estimate_prompt_tokens(&[user("caf\u{e9}")]), 8 + 1 + 1);
    }
}
