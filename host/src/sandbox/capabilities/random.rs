//! `wasi:random`'s byte draws, in place of wasmtime-wasi's own: bounded
//! per call, filled in bulk (wasmtime-wasi draws byte by byte, about 12 ms
//! a MiB), and paid in fuel, so that a loop of large draws cannot buy host
//! CPU beyond the run's fuel budget. The other random functions (single
//! numbers, the insecure seed) stay wasmtime-wasi's.

use rand::RngCore;
use wasmtime::StoreContextMut;
use wasmtime::component::Linker;

use crate::sandbox::state::RunState;

/// Fuel a run pays for each random byte it draws: about what the host
/// spends filling and copying it.
const FUEL_PER_BYTE: u64 = 10;

/// The interfaces and functions replaced; the version is the one
/// wasmtime-wasi defines, which serves every 0.2 import by semver.
const DRAWS: [(&str, &str); 2] = [
    ("wasi:random/random@0.2.12", "get-random-bytes"),
    ("wasi:random/insecure@0.2.12", "get-insecure-random-bytes"),
];

/// Replaces the byte draws wasmtime-wasi linked (call after it).
pub fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    for (interface, function) in DRAWS {
        linker.instance(interface)?.func_wrap(function, draw)?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

fn draw(mut store: StoreContextMut<'_, RunState>, (len,): (u64,)) -> wasmtime::Result<(Vec<u8>,)> {
    let state = store.data_mut();
    let limit = state.host_limits.random_bytes;
    if len > limit {
        // The words the sandbox classifies by, as wasmtime-wasi says them.
        wasmtime::bail!("requested len {len} exceeds limit {limit}");
    }
    state.host_work_fuel += len * FUEL_PER_BYTE;
    let mut bytes = vec![0; len as usize];
    rand::rng().fill_bytes(&mut bytes);
    Ok((bytes,))
}
