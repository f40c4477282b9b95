// SPDX-License-Identifier: MIT OR Apache-2.0
//! The broker under test: target/release/reapd started as a subprocess on
//! a private socket, reached only through its public gRPC interface.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd_client::Client;

/// A directory for sockets, readable by the unprivileged benchmark workers,
/// removed on drop.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn create(name: &str) -> anyhow::Result<RunDir> {
        let dir = std::env::temp_dir().join(format!("reapd-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Workers run under other uids and must reach the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Broker {
    pub child: Child,
    pub socket: PathBuf,
    /// Its varlink socket (io.reapd.Reaper), given explicitly so brokers
    /// sharing the directory never collide.
    pub varlink: PathBuf,
    /// From spawn to the first answered GetCapabilities.
    pub start_to_first_reply: Duration,
}

/// The built-in default policy, spelled out: the kernel's kill(2) rule and
/// anyone may check.
const DEFAULT_POLICY: &str = "[defaults]\nkill-rule = true\ncheck = \"anyone\"\n";

/// Writes the built-in default policy for broker `name` into `dir`.
pub fn default_policy(dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let file = dir.join(format!("{name}.policy.toml"));
    std::fs::write(&file, DEFAULT_POLICY)?;
    Ok(file)
}

impl Broker {
    pub async fn start(reapd: &Path, dir: &Path, name: &str, extra: &[String]) -> anyhow::Result<Broker> {
        let socket = dir.join(format!("{name}.sock"));
        let varlink = dir.join(format!("{name}.varlink"));
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        // Hermetic: every benchmark broker gets an explicit policy (the
        // kill(2) rule, as built in), never the host's /etc/reapd one.
        let mut policy = Vec::new();
        if !extra.iter().any(|a| a == "--policy") {
            policy = vec!["--policy".into(), default_policy(dir, name)?.into_os_string()];
        }
        let started = Instant::now();
        let child = Command::new(reapd)
            .arg("--grpc-socket")
            .arg(&socket)
            .arg("--varlink-socket")
            .arg(&varlink)
            .args(&policy)
            .args(extra)
            .env("REAPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", reapd.display()))?;
        let mut broker = Broker {
            child,
            socket,
            varlink,
            start_to_first_reply: Duration::ZERO,
        };
        let deadline = started + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = Client::connect(&broker.socket).await {
                if client.capabilities().await.is_ok() {
                    broker.start_to_first_reply = started.elapsed();
                    return Ok(broker);
                }
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                anyhow::bail!("reapd exited during start ({status}); see {}", dir.display());
            }
            if Instant::now() > deadline {
                anyhow::bail!("reapd did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn rss(&self) -> u64 {
        crate::probe::status_bytes(self.pid(), "VmRSS").unwrap_or(0)
    }

    pub fn stop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.pid());
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
