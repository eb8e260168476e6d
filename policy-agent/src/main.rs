use anyhow::Result;

fn main() -> Result<()> {
    tracing_subscriber::fmt::init();
    tracing::info!("policy-agent: nothing to do yet");
    Ok(())
}
