//! Probes the filesystem, environment and socket grants of its run: it
//! tries each operation named in input_ref `ops` (one per line) and returns
//! what happened, keyed by the operation as written: `ok` or `ok: <what it
//! got>` when the operation succeeded, `error: <message>` when the sandbox
//! (or the host filesystem) refused it. Tests (`tests/logs/grants.rs`) use it to
//! check that an agent reaches exactly what it was granted.
//!
//! Operations:
//! - `read PATH`: the file's text.
//! - `write PATH=TEXT`: creates or truncates the file and writes TEXT.
//! - `list PATH`: the directory's entry names, sorted, comma-separated.
//! - `mkdir PATH`, `remove PATH` (a file).
//! - `env NAME`: the variable's value.
//! - `env-names`: the names of every variable the agent sees, sorted.
//! - `tcp ADDR`: a TCP connection to ADDR (`ip:port`).
//! - `udp ADDR`: a UDP socket bound to an ephemeral port, one datagram to ADDR.

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

struct FsEnvProbe;

impl Guest for FsEnvProbe {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let Some((_, ops)) = context.input_ref.iter().find(|(key, _)| key == "ops") else {
            return Err(AgentError {
                message: "no input_ref `ops`: name one operation per line".to_string(),
                retryable: false,
            });
        };
        let mut seen = Vec::new();
        for op in ops.lines().map(str::trim).filter(|op| !op.is_empty()) {
            seen.push((op.to_string(), attempt(op)));
        }
        Ok(seen)
    }
}

fn attempt(op: &str) -> String {
    let (verb, arg) = op.split_once(' ').unwrap_or((op, ""));
    let outcome: Result<String, String> = match verb {
        "read" => std::fs::read_to_string(arg).map_err(describe),
        "write" => match arg.split_once('=') {
            Some((path, text)) => std::fs::write(path, text).map(|()| String::new()).map_err(describe),
            None => Err("write needs PATH=TEXT".to_string()),
        },
        "list" => std::fs::read_dir(arg).map_err(describe).and_then(|entries| {
            let mut names = entries
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(describe)?;
            names.sort();
            Ok(names.join(","))
        }),
        "mkdir" => std::fs::create_dir(arg).map(|()| String::new()).map_err(describe),
        "remove" => std::fs::remove_file(arg).map(|()| String::new()).map_err(describe),
        "env" => std::env::var(arg).map_err(|err| err.to_string()),
        "env-names" => {
            let mut names: Vec<String> = std::env::vars().map(|(name, _)| name).collect();
            names.sort();
            Ok(names.join(","))
        }
        "tcp" => match arg.parse::<std::net::SocketAddr>() {
            Ok(addr) => std::net::TcpStream::connect(addr)
                .map(|_| "connected".to_string())
                .map_err(describe),
            Err(err) => Err(format!("bad address: {err}")),
        },
        "udp" => std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| socket.send_to(b"probe", arg))
            .map(|sent| format!("sent {sent} bytes"))
            .map_err(describe),
        other => Err(format!("unknown operation {other:?}")),
    };
    match outcome {
        Ok(text) if text.is_empty() => "ok".to_string(),
        Ok(text) => format!("ok: {text}"),
        Err(message) => format!("error: {message}"),
    }
}

fn describe(err: std::io::Error) -> String {
    format!("{:?}: {err}", err.kind())
}

export!(FsEnvProbe);
