//! Generates the LeaseService client and server from
//! `lease_service.proto` at build time. protox parses the .proto in Rust,
//! so a fresh machine needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "lease_service.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
