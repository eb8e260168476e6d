//! Named network namespaces (`ip netns`), commands and closures run inside them.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Every command a test bed runs is bounded by this.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A network namespace created by this process; deleted on drop (unless it is a handle
/// from [`Netns::handle`]).
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates `name` (must not exist).
    pub fn create(name: &str) -> io::Result<Self> {
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Netns {
            name: name.to_string(),
            owned: true,
        })
    }

    /// Another handle on this namespace, which does not delete it on drop (the owner does).
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owned: false,
        }
    }

    /// Creates a node namespace: loopback up holding the node's own addresses, forwarding on,
    /// no duplicate address detection (addresses are usable at once).
    pub fn create_node(
        name: &str,
        v4: std::net::Ipv4Addr,
        v6: std::net::Ipv6Addr,
    ) -> io::Result<Self> {
        let node = Netns::create(name)?;
        node.ip(&["link", "set", "lo", "up"])?;
        node.ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"])?;
        node.ip(&["-6", "addr", "add", &format!("{v6}/128"), "dev", "lo"])?;
        node.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ])?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`, failing on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.name).args(args);
        run_checked(&mut c)
    }

    /// Runs a program inside the namespace (`ip netns exec`), bounded in time, failing on a
    /// non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        run_checked(&mut c)
    }

    /// Like [`Netns::exec`] but returns the output whatever the exit status.
    pub fn exec_unchecked(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> io::Result<Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        run_bounded(&mut c, timeout)
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> io::Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(|_| ())
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets it creates stay in the
    /// namespace when they are used from other threads afterwards.
    pub fn enter<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> io::Result<R> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path)?;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Whether a namespace of this name exists.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new("/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Deleting the namespace removes its interfaces and the veth peers in other ones.
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(ns = %self.name, error = %e, "deleting network namespace failed");
        }
    }
}

/// Runs a command to completion within `timeout` (killed after it), capturing output.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} timed out"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`run_bounded`] with [`COMMAND_TIMEOUT`], failing with stderr on a non-zero exit.
pub fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = run_bounded(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}
