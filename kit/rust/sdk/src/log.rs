//! Log lines, tagged by the node with the run's ids and capped per run.
//! The macros take `format!` arguments: `info!("read {} rows", n)`.

pub use crate::bindings::node_runtime::agent::log::Level;

/// One line with fields: `log::write(Level::Info, "done", &[("rows", "3")])`.
pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
    let fields: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::bindings::node_runtime::agent::log::log(level, message, &fields);
}

/// Logs at `level`: `log!(Level::Warn, "slow: {} ms", ms)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::log::write($level, &::std::format!($($arg)+), &[])
    };
}

#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Debug, $($arg)+) };
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Info, $($arg)+) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Warn, $($arg)+) };
}

#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::log::Level::Error, $($arg)+) };
}
