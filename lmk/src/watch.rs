//! When to kill: memory figures of the machine or of one cgroup, and a PSI
//! trigger waited on with poll(2).
//!
//! A cgroup's memory figures come from the cgroup2 memory controller
//! (`memory.current`, `memory.max`); on a hybrid host where the memory
//! controller is still on cgroup v1, from the v1 memory hierarchy's cgroup of
//! the same path (`memory.usage_in_bytes`, `memory.limit_in_bytes`). PSI is
//! always cgroup2's (`memory.pressure` exists in every cgroup2 cgroup) or
//! the machine's (`/proc/pressure/memory`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Psi, PsiLevel};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("cgroup {0} has no memory limit figures (no cgroup2 memory.current and no cgroup v1 memory controller)")]
    NoMemoryController(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot set the PSI trigger {trigger:?} on {path}: {source} (writing needs write access to the file; an unprivileged trigger's window must be a multiple of 2 s)"
    )]
    Trigger {
        path: PathBuf,
        trigger: String,
        source: std::io::Error,
    },
    #[error("poll: {0}")]
    Poll(std::io::Error),
}

/// Memory as the trigger sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryState {
    /// MemTotal, or the cgroup's limit (MemTotal when it has none).
    pub total: u64,
    /// MemAvailable, or the limit minus usage plus inactive file cache.
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl MemoryState {
    pub fn available_percent(&self) -> f64 {
        percent(self.available, self.total)
    }

    /// 100 when there is no swap: the swap condition never holds back a kill.
    pub fn swap_free_percent(&self) -> f64 {
        if self.swap_total == 0 {
            0.0
        } else {
            percent(self.swap_free, self.swap_total)
        }
    }

    /// earlyoom's condition: both below their thresholds.
    pub fn low(&self, mem_percent: f64, swap_percent: f64) -> bool {
        self.available_percent() < mem_percent && self.swap_free_percent() <= swap_percent
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Where the figures come from.
#[derive(Debug, Clone)]
pub enum Source {
    Machine,
    /// A cgroup2 cgroup with the memory controller.
    CgroupV2(PathBuf),
    /// The cgroup v1 memory hierarchy's cgroup.
    CgroupV1(PathBuf),
}

/// The mount points of cgroup2 and of the cgroup v1 memory hierarchy.
pub fn mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v2 = None;
    let mut v1_memory = None;
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else {
            continue;
        };
        let super_opts = fields.get(dash + 3).copied().unwrap_or_default();
        let mount = PathBuf::from(unescape(mount));
        if *fstype == "cgroup2" && v2.is_none() {
            v2 = Some(mount);
        } else if *fstype == "cgroup" && super_opts.split(',').any(|o| o == "memory") && v1_memory.is_none() {
            v1_memory = Some(mount);
        }
    }
    (v2, v1_memory)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(n) = n {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(path: &Path) -> Result<String, WatchError> {
    std::fs::read_to_string(path).map_err(|source| WatchError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `KEY value` lines (memory.stat) or `Key: value kB` lines (meminfo).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn number(path: &Path) -> Result<Option<u64>, WatchError> {
    Ok(read(path)?.trim().parse().ok())
}

impl Source {
    /// The source for `scope` (`None`: the machine).
    pub fn for_scope(scope: Option<&str>) -> Result<Source, WatchError> {
        let Some(scope) = scope else {
            return Ok(Source::Machine);
        };
        let (v2, v1) = mounts();
        let relative = scope.trim_start_matches('/');
        if let Some(v2) = v2 {
            let dir = v2.join(relative);
            if dir.join("memory.current").exists() {
                return Ok(Source::CgroupV2(dir));
            }
        }
        if let Some(v1) = v1 {
            let dir = v1.join(relative);
            if dir.join("memory.usage_in_bytes").exists() {
                return Ok(Source::CgroupV1(dir));
            }
        }
        Err(WatchError::NoMemoryController(scope.to_string()))
    }

    /// The figures now.
    pub fn read(&self) -> Result<MemoryState, WatchError> {
        let meminfo = read(Path::new("/proc/meminfo"))?;
        let kib = |k: &str| field(&meminfo, k).unwrap_or(0) * 1024;
        let machine = MemoryState {
            total: kib("MemTotal"),
            available: kib("MemAvailable"),
            swap_total: kib("SwapTotal"),
            swap_free: kib("SwapFree"),
        };
        let (usage, limit, inactive_file) = match self {
            Source::Machine => return Ok(machine),
            Source::CgroupV2(dir) => {
                let stat = read(&dir.join("memory.stat"))?;
                (
                    number(&dir.join("memory.current"))?.unwrap_or(0),
                    number(&dir.join("memory.max"))?, // "max": no limit
                    field(&stat, "inactive_file").unwrap_or(0),
                )
            }
            Source::CgroupV1(dir) => {
                let stat = read(&dir.join("memory.stat"))?;
                (
                    number(&dir.join("memory.usage_in_bytes"))?.unwrap_or(0),
                    number(&dir.join("memory.limit_in_bytes"))?,
                    field(&stat, "total_inactive_file").unwrap_or(0),
                )
            }
        };
        // v1 says "no limit" with a page-rounded i64::MAX.
        let limit = limit.filter(|l| *l < machine.total).unwrap_or(machine.total);
        Ok(MemoryState {
            total: limit,
            available: limit.saturating_sub(usage.saturating_sub(inactive_file)),
            // Swap is the machine's: a cgroup's swap limit is not readable on
            // every layout, and without swap the condition is met anyway.
            swap_total: machine.swap_total,
            swap_free: machine.swap_free,
        })
    }
}

/// A PSI trigger on `/proc/pressure/memory` or a cgroup's
/// `memory.pressure`; the kernel keeps it as long as the file stays open.
pub struct Trigger {
    file: File,
    pub path: PathBuf,
    pub psi: Psi,
}

impl Trigger {
    /// Arms `psi` on the machine (`scope` `None`) or on cgroup2 `scope`.
    pub fn arm(scope: Option<&str>, psi: Psi) -> Result<Trigger, WatchError> {
        let path = match scope {
            None => PathBuf::from("/proc/pressure/memory"),
            Some(scope) => mounts()
                .0
                .ok_or(WatchError::NoCgroup2)?
                .join(scope.trim_start_matches('/'))
                .join("memory.pressure"),
        };
        let level = match psi.level {
            PsiLevel::Some => "some",
            PsiLevel::Full => "full",
        };
        let trigger = format!("{level} {} {}", psi.stall.as_micros(), psi.window.as_micros());
        let fail = |source| WatchError::Trigger {
            path: path.clone(),
            trigger: trigger.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(fail)?;
        // One write with the terminating NUL, as the kernel documents.
        file.write_all(format!("{trigger}\0").as_bytes()).map_err(fail)?;
        Ok(Trigger { file, path, psi })
    }
}

/// Why [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The PSI trigger fired.
    Pressure,
    /// The timeout passed.
    Timeout,
}

/// Sleeps in poll(2) until the trigger fires (POLLPRI) or `timeout` passes;
/// with no trigger, only the timeout.
pub fn wait(trigger: Option<&Trigger>, timeout: Duration) -> Result<Wake, WatchError> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timespec = Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let Some(trigger) = trigger else {
        std::thread::sleep(timeout);
        return Ok(Wake::Timeout);
    };
    let mut fds = [PollFd::new(&trigger.file, PollFlags::PRI)];
    loop {
        match poll(&mut fds, Some(&timespec)) {
            Ok(0) => return Ok(Wake::Timeout),
            Ok(_) => {
                let revents = fds[0].revents();
                if revents.contains(PollFlags::ERR) {
                    // The cgroup (and its trigger) went away.
                    return Err(WatchError::Poll(std::io::Error::other(format!(
                        "{}: POLLERR (the cgroup was removed?)",
                        trigger.path.display()
                    ))));
                }
                return Ok(Wake::Pressure);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(WatchError::Poll(e.into())),
        }
    }
}

/// How long until the next threshold check: the time the headroom above
/// the threshold would last at 1 GiB/s (earlyoom's adaptive sleep), between
/// 20 ms and 1 s.
pub fn next_check(state: &MemoryState, mem_percent: f64) -> Duration {
    const FILL_RATE: f64 = (1u64 << 30) as f64; // bytes per second
    let threshold = state.total as f64 * mem_percent / 100.0;
    let headroom = (state.available as f64 - threshold).max(0.0);
    Duration::from_secs_f64(headroom / FILL_RATE).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlyoom_condition_needs_both_below_and_ignores_absent_swap() {
        let s = MemoryState {
            total: 1000,
            available: 50,
            swap_total: 0,
            swap_free: 0,
        };
        assert!(s.low(10.0, 10.0));
        let with_swap = MemoryState {
            swap_total: 1000,
            swap_free: 500,
            ..s
        };
        assert!(!with_swap.low(10.0, 10.0), "half the swap is free");
        assert!(!MemoryState { available: 200, ..s }.low(10.0, 10.0));
    }

    #[test]
    fn fields_parse_from_meminfo_and_memory_stat() {
        assert_eq!(
            field("MemTotal:  100 kB\nMemAvailable: 7 kB\n", "MemAvailable"),
            Some(7)
        );
        assert_eq!(field("active_file 3\ninactive_file 9\n", "inactive_file"), Some(9));
        assert_eq!(field("total_inactive_file 4\n", "inactive_file"), None);
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn the_next_check_comes_sooner_as_headroom_shrinks() {
        let state = |available| MemoryState {
            total: 8 << 30,
            available,
            swap_total: 0,
            swap_free: 0,
        };
        assert_eq!(next_check(&state(8 << 30), 10.0), Duration::from_secs(1));
        assert_eq!(next_check(&state(800 << 20), 10.0), Duration::from_millis(20));
    }
}
