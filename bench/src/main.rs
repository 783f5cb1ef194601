//! The benchmarks, one binary (each links all of wasmtime, so one link
//! instead of seven): `cargo run --release -p bench -- NAME [ARGS]`. Each
//! benchmark's module says what it measures, how to run it and what it
//! needs; `bench/README.md` holds the recorded results.

mod coldstart;
mod deadline;
mod density;
mod engines;
mod languages;
mod lease_cost;
mod metering;
mod startup;
mod throughput;

const USAGE: &str =
    "usage: bench <startup|languages|throughput|lease-cost|metering|deadline|engines|coldstart|density> [ARGS]";

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next();
    let args: Vec<String> = args.collect();
    match name.as_deref() {
        Some("startup") => startup::main(args).await,
        Some("languages") => languages::main(args).await,
        Some("throughput") => throughput::main(args).await,
        Some("lease-cost") => lease_cost::main(args).await,
        Some("metering") => metering::main(args).await,
        Some("deadline") => deadline::main(args).await,
        Some("engines") => engines::main(args).await,
        Some("coldstart") => coldstart::main(args).await,
        Some("density") => density::main(args).await,
        Some(other) => {
            eprintln!("unknown benchmark `{other}`\n{USAGE}");
            std::process::exit(2);
        }
        None => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}
