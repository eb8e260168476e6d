//! `netpol-cni`: run by the container runtime as a CNI plugin (crate `policy-cni`). Built
//! beside `policy-agent`, which installs it from there.

use std::io::{Read as _, Write as _};

fn main() {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut stdin = Vec::new();
    // A runtime always sends the configuration; an unreadable stdin is an empty one.
    let _ = std::io::stdin()
        .take(policy_cni::spec::MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin);
    let mut out = Vec::new();
    let code = policy_cni::plugin::run(&env, &stdin, &mut out);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out);
    let _ = stdout.flush();
    std::process::exit(code);
}
