//! {{name}}: a node-runtime agent. It reads its input (JSON, from
//! `input_ref["message"]`), logs one line, and answers with a greeting.

use node_runtime_agent::{Context, Error, Output, info};

fn run(ctx: Context) -> Result<Output, Error> {
    let input = ctx.input().ok_or_else(|| Error::fatal("no input: pass one with --input or --input-file"))?;
    info!("{{name}} got {} bytes of input", input.len());
    Ok(Output::from([
        ("greeting".to_string(), "hello from {{name}}".to_string()),
        ("input".to_string(), input.to_string()),
    ]))
}

node_runtime_agent::export!(run);
