//! Memory-bomb agent: allocates 1 MiB chunks and keeps them all, forever.
//!
//! Exercises the memory limit: every page of every chunk is written so the
//! memory is really used, and the agent grows its linear memory until the
//! node refuses to grow it further; the Rust allocator then aborts (a trap).

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

const CHUNK: usize = 1024 * 1024;
const PAGE: usize = 4096;

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            for offset in (0..CHUNK).step_by(PAGE) {
                chunk[offset] = 1;
            }
            chunks.push(std::hint::black_box(chunk));
        }
    }
}

export!(MemoryBomb);
