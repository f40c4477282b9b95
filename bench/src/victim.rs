// SPDX-License-Identifier: MIT OR Apache-2.0
//! Victims: children of the benchmark (the same binary, `victim` mode) that
//! touch a chosen amount of memory, say "ready", and wait to be killed.
//! They are spawned, and have touched their memory, before any timed
//! window opens. Spinners: children that keep one core busy.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

/// The uid and gid victims run as: an unprivileged user with no passwd
/// entry, as a real OOM-killer target would be.
pub const VICTIM_UID: u32 = 61000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Anonymous memory, every page written.
    Anon(usize),
    /// A private writable mapping of a file, every page written (so each
    /// page is copied on write into the process).
    PrivateFile { path: PathBuf, bytes: usize },
}

pub struct Victim {
    pub child: Child,
    pub pid: i32,
    _stdout: ChildStdout,
}

impl Victim {
    pub fn spawn(memory: &Memory, uid: Option<u32>) -> anyhow::Result<Victim> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("victim");
        match memory {
            Memory::Anon(bytes) => {
                cmd.arg("--bytes").arg(bytes.to_string());
            }
            Memory::PrivateFile { path, bytes } => {
                cmd.arg("--bytes").arg(bytes.to_string()).arg("--file").arg(path);
            }
        }
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("victim has no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("victim {pid} did not get ready (said {line:?})");
        }
        Ok(Victim {
            child,
            pid,
            _stdout: reader.into_inner(),
        })
    }

    /// Kills (if still alive) and waits; for cleanup paths.
    pub fn finish(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `victim` mode: touch the memory, say ready, wait forever.
pub fn victim_main(bytes: usize, file: Option<&Path>) -> anyhow::Result<()> {
    // Kept alive until the process dies.
    let memory: Vec<u8> = match file {
        Some(path) => {
            let file = std::fs::File::open(path)?;
            crate::sys::touch_private_file_mapping(&file, bytes)?;
            Vec::new()
        }
        // vec! with a non-zero byte writes every page (a zeroed Vec would be
        // calloc'd and left untouched).
        None => vec![1u8; bytes],
    };
    std::hint::black_box(&memory);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}

/// Keeps one core busy at normal priority while alive.
pub fn spin_main() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// One spinner per core, killed on drop.
pub struct Spinners(Vec<Child>);

impl Spinners {
    pub fn start(n: usize) -> anyhow::Result<Spinners> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..n {
            children.push(
                Command::new(&exe)
                    .arg("spin")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(Spinners(children))
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}
