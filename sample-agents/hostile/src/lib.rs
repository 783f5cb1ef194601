//! Hostile agent: one agent, many attacks on the node, chosen by
//! input_ref `attack`. Each attack either reaches for something the sandbox
//! must not grant (and returns what it observed, so a test can check the
//! node refused it) or tries to exhaust the node from inside a host call
//! (and never returns; the node must end it by a budget).
//!
//! - `fs`: reads `/etc/passwd`, `../../../../etc/passwd` and
//!   `/etc/hostname`, lists `/`, `.` and `..`, writes a file in `/tmp`;
//!   returns each error (`fs.<n>.error`, `dir.<n>.error`, `write.error`) or
//!   what it got (`fs.<n>.read`, `dir.<n>.read`, `write.ok`).
//! - `env`: returns the number of environment variables, their names, what
//!   `PATH` and `HOME` read as, the command-line arguments and the working
//!   directory.
//! - `socket`: `TcpStream::connect` to input_ref `addr` (a loopback
//!   address); returns the error, or `socket.connected` if it got through.
//! - `budget-loop`: calls `budget.remaining` forever.
//! - `log-loop`: calls `log` forever (every line after the cap is dropped),
//!   with a message of input_ref `bytes` bytes (default 5).
//! - `random-loop`: draws 1 MiB of random bytes, forever.
//! - `llm-escape`: one `llm.chat` whose message is input_ref `bytes`
//!   (default 2,000,000) control characters, which JSON writes as six
//!   bytes each; returns the answer or the error.
//! - `unreachable`: executes the `unreachable` instruction.
//! - `huge-log`: logs one line of input_ref `bytes` bytes (default 10 MiB)
//!   and completes.
//! - `http-fields`: creates `wasi:http` header maps and keeps them,
//!   forever (the node must stop it at its memory budget): each holds one
//!   value of input_ref `value_bytes` (default 30 KiB), or, with input_ref
//!   `tiny` set, `per_map` (default 380) one-byte values.
//! - `out-responses`: the same maps, each moved into an
//!   `outgoing-response` (a resource that holds them) and kept.
//! - `keep-responses`: GETs input_ref `url` again and again, waits for each
//!   response and keeps it unread, forever.
//! - `response-headers`: GETs input_ref `url` once and returns the status,
//!   or the error the node answered (`error`).
//! - `audit-loop`: creates 2,000 clock pollables (4,000 host resources:
//!   each is a pollable and its deadline), then asks a header map
//!   whether it has a header, forever: each `wasi:http` call makes the host
//!   look at every resource the run holds.
//! - `resource-flood`: creates clock pollables and keeps them, forever
//!   (the node must stop it at its count of host resources).
//! - `random-bytes`: asks for input_ref `bytes` random bytes at once
//!   (default 64 MiB) and returns how many it got.
//! - `huge-error`: writes input_ref `stderr` bytes to stderr (default 0),
//!   then returns an error whose message is input_ref `bytes` bytes long
//!   (default 1.5 MiB) of the character input_ref `fill` (default `m`).
//! - `residue`: looks for what an earlier run left in this instance's
//!   memory (a static and a heap block), reports it (`residue.static`,
//!   `residue.heap`), then leaves its own for the next run to find;
//!   `residue.heap.same_run` shows the probe finds its own freed block.
//! - `http-flood`: GETs input_ref `url` (a host it is not granted)
//!   input_ref `count` times (default 5,000); returns how many were denied.
//! - `symlink-swap`: in its first preopened directory, removes the
//!   directory input_ref `name` (default `shared`) and puts a symlink to
//!   input_ref `target` (default `../../../../../../../../etc`) in its
//!   place, as an agent with a writable grant could to redirect another
//!   grant; returns what each step answered (`rmdir`, `symlink`).

// The agent world, plus `wasi:random` (linked by every node, as all of
// WASI is) to ask for more random bytes than a call may carry.
wit_bindgen::generate!({
    path: "../../wit",
    inline: "package hostile:attacks;
             world hostile {
                 include node-runtime:agent/agent@0.1.0;
                 import wasi:random/random@0.2.12;
                 import wasi:filesystem/preopens@0.2.12;
             }",
    world: "hostile:attacks/hostile",
    generate_all,
});

use node_runtime::agent::{budget, llm, log};

struct Hostile;

fn input(context: &RunContext, key: &str) -> Option<String> {
    context
        .input_ref
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

impl Guest for Hostile {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let attack = input(&context, "attack").unwrap_or_default();
        let mut seen = vec![("attack".to_string(), attack.clone())];
        match attack.as_str() {
            "fs" => filesystem(&mut seen),
            "env" => environment(&mut seen),
            "socket" => {
                let addr = input(&context, "addr").unwrap_or_else(|| "127.0.0.1:9".to_string());
                socket(&addr, &mut seen)
            }
            "budget-loop" => {
                let mut fuel = 0u64;
                loop {
                    fuel = std::hint::black_box(fuel ^ budget::remaining().fuel);
                }
            }
            "log-loop" => {
                let message = "a".repeat(number(&context, "bytes", 5));
                let mut i = 0u64;
                loop {
                    log::log(log::Level::Info, &message, &[]);
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "random-loop" => {
                let mut total = 0usize;
                loop {
                    total = std::hint::black_box(total + wasi::random::random::get_random_bytes(1 << 20).len());
                }
            }
            "llm-escape" => {
                let content = "\u{1}".repeat(number(&context, "bytes", 2_000_000));
                let request = llm::ChatRequest {
                    model: None,
                    messages: vec![llm::Message {
                        role: llm::Role::User,
                        content,
                    }],
                    max_tokens: None,
                    temperature: None,
                };
                match llm::chat(&request) {
                    Ok(answer) => seen.push(("answer".to_string(), answer.content)),
                    Err(err) => seen.push(("error".to_string(), format!("{err:?}"))),
                }
            }
            "unreachable" => core::arch::wasm32::unreachable(),
            // Computes until it is cut off, 30 frames deep, each frame
            // holding 64 inlined calls with long names: wasmtime's
            // backtrace of it is megabytes of text.
            "inline-spin" => {
                seen.push(("r".to_string(), recurse(30).to_string()));
            }
            "huge-log" => {
                let bytes = input(&context, "bytes")
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(10 * 1024 * 1024);
                log::log(log::Level::Warn, &"z".repeat(bytes), &[]);
                seen.push(("logged_bytes".to_string(), bytes.to_string()));
            }
            "residue" => residue(&mut seen),
            "http-fields" => {
                let mut kept = Vec::new();
                loop {
                    kept.push(header_map(&context)?);
                }
            }
            "out-responses" => {
                let mut kept = Vec::new();
                loop {
                    kept.push(wasi::http::types::OutgoingResponse::new(header_map(&context)?));
                }
            }
            "keep-responses" => {
                let url = input(&context, "url").unwrap_or_default();
                let mut kept = Vec::new();
                loop {
                    let response = get(&url)?;
                    response.subscribe().block();
                    kept.push(response);
                }
            }
            "response-headers" => {
                let url = input(&context, "url").unwrap_or_default();
                let response = get(&url)?;
                response.subscribe().block();
                match response.get() {
                    Some(Ok(Ok(answer))) => seen.push(("status".to_string(), answer.status().to_string())),
                    Some(Ok(Err(code))) => seen.push(("error".to_string(), format!("{code:?}"))),
                    other => seen.push(("error".to_string(), format!("{other:?}"))),
                }
            }
            "audit-loop" => {
                let _held: Vec<_> = (0..2000)
                    .map(|_| wasi::clocks::monotonic_clock::subscribe_duration(1_000_000_000))
                    .collect();
                let fields = wasi::http::types::Fields::new();
                let mut found = false;
                loop {
                    found = std::hint::black_box(found ^ fields.has("x-absent"));
                }
            }
            "resource-flood" => {
                let mut kept = Vec::new();
                loop {
                    kept.push(wasi::clocks::monotonic_clock::subscribe_duration(1_000_000_000));
                }
            }
            "random-bytes" => {
                let bytes = number(&context, "bytes", 64 * 1024 * 1024);
                let got = wasi::random::random::get_random_bytes(bytes as u64);
                seen.push(("random_bytes".to_string(), got.len().to_string()));
            }
            "huge-error" => {
                let stderr = number(&context, "stderr", 0);
                if stderr > 0 {
                    eprintln!("{}", "e".repeat(stderr));
                }
                return Err(AgentError {
                    message: input(&context, "fill")
                        .unwrap_or_else(|| "m".to_string())
                        .repeat(number(&context, "bytes", 3 * 1024 * 1024 / 2)),
                    retryable: false,
                });
            }
            "http-flood" => {
                // Denied requests are refused before anything is sent: each
                // costs the guest little, and the node one (bounded) warning.
                let url = input(&context, "url").unwrap_or_default();
                let mut denied = 0usize;
                for _ in 0..number(&context, "count", 5000) {
                    let refused = match get(&url) {
                        Err(_) => true,
                        Ok(response) => {
                            response.subscribe().block();
                            matches!(response.get(), Some(Ok(Err(_))))
                        }
                    };
                    if refused {
                        denied += 1;
                    }
                }
                seen.push(("denied".to_string(), denied.to_string()));
            }
            "symlink-swap" => {
                let name = input(&context, "name").unwrap_or_else(|| "shared".to_string());
                let target = input(&context, "target").unwrap_or_else(|| "../../../../../../../../etc".to_string());
                match wasi::filesystem::preopens::get_directories().into_iter().next() {
                    Some((dir, _guest)) => {
                        let removed = dir.remove_directory_at(&name);
                        seen.push(("rmdir".to_string(), format!("{removed:?}")));
                        let linked = dir.symlink_at(&target, &name);
                        seen.push(("symlink".to_string(), format!("{linked:?}")));
                    }
                    None => seen.push(("error".to_string(), "no preopened directory".to_string())),
                }
            }
            other => {
                return Err(AgentError {
                    message: format!("unknown attack {other:?}"),
                    retryable: false,
                });
            }
        }
        Ok(seen)
    }
}

/// A header map as input_ref asks: one value of `value_bytes`, or
/// `per_map` tiny ones.
fn header_map(context: &RunContext) -> Result<wasi::http::types::Fields, AgentError> {
    let fields = wasi::http::types::Fields::new();
    let appended = if input(context, "tiny").is_some() {
        (0..number(context, "per_map", 380)).try_for_each(|n| fields.append(&format!("x-{n}"), b"1"))
    } else {
        fields.append("x-bomb", &vec![b'a'; number(context, "value_bytes", 30 * 1024)])
    };
    appended.map_err(|err| AgentError {
        message: format!("append refused: {err:?}"),
        retryable: false,
    })?;
    Ok(fields)
}

/// A GET of `url` (`http://host:port/path`), sent.
fn get(url: &str) -> Result<wasi::http::types::FutureIncomingResponse, AgentError> {
    use wasi::http::types::{Fields, Method, OutgoingRequest, Scheme};
    let failed = |message: String| AgentError {
        message,
        retryable: false,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| failed(format!("not an http:// URL: {url:?}")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_method(&Method::Get);
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
    wasi::http::outgoing_handler::handle(request, None).map_err(|code| failed(format!("{code:?}")))
}

fn number(context: &RunContext, key: &str, default: usize) -> usize {
    input(context, key).and_then(|n| n.parse().ok()).unwrap_or(default)
}

/// Written by every `residue` run; a fresh instance starts with zero.
static MARK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const RESIDUE: u64 = 0x5e_c2e7_1ef7_0ee2;

fn residue(seen: &mut Vec<(String, String)>) {
    use std::sync::atomic::Ordering;
    let before = MARK.swap(RESIDUE, Ordering::SeqCst);
    // A heap block of the same size lands where the last run's did (a
    // fresh allocator, the same calls); read it before writing. Nothing
    // else is allocated until both probes are done.
    let (found, mut block) = probe_heap();
    block.resize(4096, RESIDUE);
    std::hint::black_box(&block);
    drop(block);
    // The probe itself works: within this run, the freed block is found.
    let (again, _) = probe_heap();
    seen.push(("residue.static".to_string(), format!("{before:x}")));
    seen.push(("residue.heap".to_string(), found.to_string()));
    seen.push(("residue.heap.same_run".to_string(), again.to_string()));
}

/// Allocates 4096 words and counts those already holding RESIDUE.
fn probe_heap() -> (usize, Vec<u64>) {
    let block: Vec<u64> = Vec::with_capacity(4096);
    // Volatile reads through an opaque pointer: the compiler may not
    // assume a fresh allocation holds nothing in particular.
    let base = std::hint::black_box(block.as_ptr());
    // SAFETY: the 4096 words are allocated; any bit pattern is a valid u64,
    // and wasm memory always holds some bytes.
    let found = (0..4096)
        .filter(|&i| unsafe { std::ptr::read_volatile(base.add(i)) } == RESIDUE)
        .count();
    (found, block)
}

fn filesystem(seen: &mut Vec<(String, String)>) {
    let paths = ["/etc/passwd", "../../../../etc/passwd", "/etc/hostname"];
    for (n, path) in paths.iter().enumerate() {
        seen.push((format!("fs.{n}.path"), path.to_string()));
        match std::fs::read_to_string(path) {
            Ok(text) => seen.push((format!("fs.{n}.read"), text)),
            Err(err) => seen.push((format!("fs.{n}.error"), err.to_string())),
        }
    }
    for (n, dir) in ["/", ".", ".."].iter().enumerate() {
        let key = format!("dir.{n}");
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let names: Vec<String> = entries
                    .take(100)
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                seen.push((format!("{key}.read"), names.join(",")));
            }
            Err(err) => seen.push((format!("{key}.error"), err.to_string())),
        }
    }
    match std::fs::write("/tmp/hostile-agent-was-here", b"x") {
        Ok(()) => seen.push(("write.ok".to_string(), "written".to_string())),
        Err(err) => seen.push(("write.error".to_string(), err.to_string())),
    }
}

fn environment(seen: &mut Vec<(String, String)>) {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    seen.push(("env.count".to_string(), vars.len().to_string()));
    let names: Vec<String> = vars.into_iter().map(|(k, _)| k).collect();
    seen.push(("env.names".to_string(), names.join(",")));
    for name in ["PATH", "HOME"] {
        let value = match std::env::var(name) {
            Ok(value) => format!("set: {value}"),
            Err(err) => format!("error: {err}"),
        };
        seen.push((format!("env.{name}"), value));
    }
    let args: Vec<String> = std::env::args().collect();
    seen.push(("args".to_string(), args.join(" ")));
    match std::env::current_dir() {
        Ok(dir) => seen.push(("cwd".to_string(), dir.display().to_string())),
        Err(err) => seen.push(("cwd.error".to_string(), err.to_string())),
    }
}

fn socket(addr: &str, seen: &mut Vec<(String, String)>) {
    seen.push(("socket.addr".to_string(), addr.to_string()));
    let addr: std::net::SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(err) => {
            seen.push(("socket.error".to_string(), format!("bad address: {err}")));
            return;
        }
    };
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)) {
        Ok(mut stream) => {
            use std::io::Write;
            let _ = stream.write_all(b"hostile agent was here\n");
            seen.push(("socket.connected".to_string(), "yes".to_string()));
        }
        Err(err) => seen.push(("socket.error".to_string(), format!("{:?}: {err}", err.kind()))),
    }
    match std::net::UdpSocket::bind("0.0.0.0:0") {
        Ok(udp) => match udp.send_to(b"hostile", addr) {
            Ok(n) => seen.push(("udp.sent".to_string(), n.to_string())),
            Err(err) => seen.push(("udp.error".to_string(), format!("{:?}: {err}", err.kind()))),
        },
        Err(err) => seen.push(("udp.error".to_string(), format!("bind {:?}: {err}", err.kind()))),
    }
}

export!(Hostile);

/// A frame of the `inline-spin` recursion: 64 inlined levels of
/// [`Chain::go`] down to the next one, and a spin at the bottom.
#[inline(never)]
fn recurse(depth: u32) -> u64 {
    if depth == 0 {
        let mut counter = 0u64;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
    <Nested as Chain>::go(depth - 1)
}

/// One inlined level per wrapper: the type's name (and so the frame's)
/// grows with every level.
trait Chain {
    fn go(depth: u32) -> u64;
}

struct Bottom;
struct Wrap<T>(std::marker::PhantomData<T>);

impl Chain for Bottom {
    #[inline(always)]
    fn go(depth: u32) -> u64 {
        recurse(depth)
    }
}

impl<T: Chain> Chain for Wrap<T> {
    #[inline(always)]
    fn go(depth: u32) -> u64 {
        std::hint::black_box(T::go(depth)) ^ 1
    }
}

/// `Wrap<Wrap<...<Bottom>...>>`, a level per token.
macro_rules! nested {
    () => { Bottom };
    ($level:tt $($rest:tt)*) => { Wrap<nested!($($rest)*)> };
}

type Nested = nested!(
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
);
