//! `node-runtime keygen`: a new Ed25519 key pair for signing `.cwasm`
//! files (`compile --sign`), in the formats openssl writes, so either tool
//! may make or use them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use clap::Args;

use super::{CommandError, Exit};
use crate::sandbox::signature::SigningKey;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (PKCS#8 PEM, readable by its owner
    /// only); the public key goes next to it, with `.pub` appended.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
}

pub async fn run(args: KeygenArgs) -> Result<Exit, CommandError> {
    let public_path = {
        let mut name = args.output.clone().into_os_string();
        name.push(".pub");
        PathBuf::from(name)
    };
    let (private_pem, public) = SigningKey::generate().map_err(CommandError::internal)?;
    // Never over an existing key: losing one strands every node that
    // trusts it.
    let write = |path: &PathBuf, text: &str, mode: u32| -> Result<(), CommandError> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|err| {
                CommandError::usage(format!(
                    "cannot create {}: {err}; keygen never replaces a file, so give a new path",
                    path.display()
                ))
            })?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|err| CommandError::internal(format!("cannot write {}: {err}", path.display())))
    };
    if public_path.exists() {
        return Err(CommandError::usage(format!(
            "{} exists; keygen never replaces a file, so give a new path",
            public_path.display()
        )));
    }
    write(&args.output, &private_pem, 0o600)?;
    write(&public_path, &public.to_pem(), 0o644)?;
    println!(
        "private key {} (sign with `node-runtime compile --sign {0}`)",
        args.output.display()
    );
    println!(
        "public key {} ({public}; list it in AgentStore.TrustedSigningKeys on the nodes that take these agents)",
        public_path.display()
    );
    Ok(Exit::Completed)
}
