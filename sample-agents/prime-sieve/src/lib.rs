//! Prime-sieve agent: CPU-bound work sized by its input, for measuring
//! what fuel and epoch metering cost (`bench metering`).
//!
//! Input-ref `limit` (default 2,000,000): sieves the primes below it,
//! `rounds` times (default 1), and returns `primes` (their count) and
//! `checksum` (a sum over them, so no round can be optimised away).

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

struct PrimeSieve;

fn number(context: &RunContext, key: &str, default: usize) -> Result<usize, AgentError> {
    match context.input_ref.iter().find(|(k, _)| k == key) {
        None => Ok(default),
        Some((_, value)) => value.trim().parse().map_err(|_| AgentError {
            message: format!("input-ref {key} must be a whole number, got {value:?}"),
            retryable: false,
        }),
    }
}

fn sieve(limit: usize) -> (u64, u64) {
    let mut composite = vec![false; limit];
    let (mut count, mut checksum) = (0u64, 0u64);
    for n in 2..limit {
        if composite[n] {
            continue;
        }
        count += 1;
        checksum = checksum.wrapping_mul(31).wrapping_add(n as u64);
        let mut multiple = n * n;
        while multiple < limit {
            composite[multiple] = true;
            multiple += n;
        }
    }
    (count, checksum)
}

impl Guest for PrimeSieve {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let limit = number(&context, "limit", 2_000_000)?;
        let rounds = number(&context, "rounds", 1)?;
        let (mut primes, mut checksum) = (0, 0u64);
        for _ in 0..rounds {
            let (count, sum) = sieve(std::hint::black_box(limit));
            primes = count;
            checksum = checksum.wrapping_add(sum);
        }
        Ok(vec![
            ("primes".to_string(), primes.to_string()),
            ("checksum".to_string(), checksum.to_string()),
        ])
    }
}

export!(PrimeSieve);
