// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the benchmark reads from the kernel: free memory (MemAvailable plus
//! the per-CPU page lists), a process's RSS, and the cgroup v1 freezer.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} has no {field} line")]
    Missing { path: String, field: &'static str },
    #[error("freezer: {0}")]
    Freezer(String),
}

fn read_err(path: &str) -> impl FnOnce(io::Error) -> ProbeError + '_ {
    move |source| ProbeError::Read {
        path: path.to_string(),
        source,
    }
}

/// Reads free memory quickly and repeatedly: the two proc files stay open
/// and are re-read with pread at offset 0, which regenerates them.
pub struct MemSampler {
    meminfo: File,
    zoneinfo: File,
    buf: Vec<u8>,
    page: u64,
}

impl MemSampler {
    pub fn new() -> Result<Self, ProbeError> {
        Ok(MemSampler {
            meminfo: File::open("/proc/meminfo").map_err(read_err("/proc/meminfo"))?,
            zoneinfo: File::open("/proc/zoneinfo").map_err(read_err("/proc/zoneinfo"))?,
            buf: vec![0; 1 << 20],
            page: rustix::param::page_size() as u64,
        })
    }

    fn read(file: &File, buf: &mut [u8], path: &str) -> Result<usize, ProbeError> {
        let mut len = 0;
        loop {
            let n = file.read_at(&mut buf[len..], len as u64).map_err(read_err(path))?;
            if n == 0 || len + n == buf.len() {
                return Ok(len + n);
            }
            len += n;
        }
    }

    /// MemAvailable plus the pages sitting on per-CPU free lists, in bytes.
    /// Freed pages go to the per-CPU lists first, where MemAvailable does
    /// not count them; without them a complete reap reads as partial.
    pub fn available(&mut self) -> Result<u64, ProbeError> {
        let n = Self::read(&self.meminfo, &mut self.buf, "/proc/meminfo")?;
        let text = std::str::from_utf8(&self.buf[..n]).unwrap_or("");
        let avail_kib = text
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(ProbeError::Missing {
                path: "/proc/meminfo".into(),
                field: "MemAvailable",
            })?;
        let n = Self::read(&self.zoneinfo, &mut self.buf, "/proc/zoneinfo")?;
        let text = std::str::from_utf8(&self.buf[..n]).unwrap_or("");
        Ok(avail_kib * 1024 + pcp_pages(text) * self.page)
    }
}

/// Sum of the per-CPU list sizes: the `count:` lines under each zone's
/// `pagesets`.
pub fn pcp_pages(zoneinfo: &str) -> u64 {
    let mut in_pagesets = false;
    let mut total = 0;
    for line in zoneinfo.lines() {
        let t = line.trim_start();
        if t.starts_with("Node ") {
            in_pagesets = false;
        } else if t.starts_with("pagesets") {
            in_pagesets = true;
        } else if in_pagesets {
            if let Some(v) = t.strip_prefix("count:") {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// A field of /proc/PID/status in bytes (the file gives kB).
pub fn status_bytes(pid: i32, field: &'static str) -> Result<u64, ProbeError> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(read_err(&path))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or(ProbeError::Missing { path, field })
}

/// A cgroup of the v1 freezer, removed on drop.
pub struct FreezerCgroup {
    dir: PathBuf,
}

/// Where the v1 freezer hierarchy is mounted, from /proc/self/mountinfo.
fn freezer_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let _source = r.next()?;
        let options = r.next()?;
        if fstype == "cgroup" && options.split(',').any(|o| o == "freezer") {
            left.split_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}

impl FreezerCgroup {
    /// A fresh cgroup under the v1 freezer, mounting the hierarchy at
    /// /run/reapd-bench-freezer if nothing has it mounted.
    pub fn create(name: &str) -> Result<Self, ProbeError> {
        let root = match freezer_mount() {
            Some(root) => root,
            None => {
                let mnt = Path::new("/run/reapd-bench-freezer");
                fs::create_dir_all(mnt).map_err(|e| ProbeError::Freezer(format!("mkdir {}: {e}", mnt.display())))?;
                let status = std::process::Command::new("mount")
                    .args(["-t", "cgroup", "-o", "freezer", "freezer"])
                    .arg(mnt)
                    .status()
                    .map_err(|e| ProbeError::Freezer(format!("running mount: {e}")))?;
                if !status.success() {
                    return Err(ProbeError::Freezer(format!(
                        "mounting the v1 freezer at {} failed ({status}); the kernel may lack CONFIG_CGROUP_FREEZER for v1",
                        mnt.display()
                    )));
                }
                mnt.to_path_buf()
            }
        };
        let dir = root.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ProbeError::Freezer(format!("mkdir {}: {e}", dir.display()))),
        }
        Ok(FreezerCgroup { dir })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), ProbeError> {
        let path = self.dir.join(file);
        fs::write(&path, value)
            .map_err(|e| ProbeError::Freezer(format!("writing {value:?} to {}: {e}", path.display())))
    }

    /// Moves `pid` in and freezes the cgroup, waiting until it is frozen.
    pub fn freeze(&self, pid: i32) -> Result<(), ProbeError> {
        self.write("cgroup.procs", &pid.to_string())?;
        self.write("freezer.state", "FROZEN")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = fs::read_to_string(self.dir.join("freezer.state")).unwrap_or_default();
            if state.trim() == "FROZEN" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ProbeError::Freezer(format!("still {} after 5 s", state.trim())));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn thaw(&self) -> Result<(), ProbeError> {
        self.write("freezer.state", "THAWED")
    }
}

impl Drop for FreezerCgroup {
    fn drop(&mut self) {
        let _ = self.thaw();
        // Tasks leave when they exit; retry briefly so rmdir sees it empty.
        for _ in 0..200 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_pageset_counts() {
        let text = "Node 0, zone   Normal\n  pages free     10\n  pagesets\n    cpu: 0\n              count: 12\n              high:  100\n    cpu: 1\n              count: 30\nNode 0, zone  Movable\n  count: 999\n";
        assert_eq!(pcp_pages(text), 42);
    }
}
