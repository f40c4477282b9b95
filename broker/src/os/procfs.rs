// SPDX-License-Identifier: MIT OR Apache-2.0
//! Readers for the few `/proc/PID/*` files the broker needs.
//!
//! A pid-named read is only meaningful when the caller re-validates it
//! against a pidfd afterwards (the pid number cannot be reused while the
//! pidfd's process still exists); see `target.rs`.
//!
//! Every file is read as bytes: a process names itself (`prctl(PR_SET_NAME)`
//! takes any 15 bytes, and the kernel cuts a UTF-8 name mid-character at 15
//! bytes), so `comm` is not UTF-8 in general. It is kept escaped
//! ([`escape_comm`]) and is for display only: no decision reads it.

use std::fs;
use std::io;

/// Fields of `/proc/PID/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Field 2, escaped by [`escape_comm`].
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    /// Field 9: `PF_*` flags of the task.
    pub flags: u64,
    /// Field 22: clock ticks since boot at process start.
    pub start_time: u64,
}

/// `PF_KTHREAD` from `include/linux/sched.h`.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// A command name made printable: valid UTF-8 is kept, every invalid byte
/// becomes `\xNN`, and control characters and backslashes are escaped as
/// Rust's `escape_debug` does, so a name can never forge a log field, a line
/// break or a JSON structure, and distinct byte strings stay distinct.
pub fn escape_comm(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch.is_control() || ch == '\\' {
                out.extend(ch.escape_debug());
            } else if is_invisible_format(ch) {
                // Printed as nothing, yet it reorders or hides what follows
                // ("\u{202e}dhss" reads "sshd"): shown by its code point.
                out.extend(ch.escape_unicode());
            } else {
                out.push(ch);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Bidirectional controls, zero-width and other invisible formatting
/// characters (Unicode category Cf), and the line and paragraph separators.
fn is_invisible_format(ch: char) -> bool {
    matches!(ch,
        '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// Valid UTF-8 kept as it is, every invalid byte written `\xNN`: for cgroup
/// paths, whose names are chosen by whoever may create them (systemd's own
/// names carry backslashes, `system-systemd\x2dfsck.slice`, so these are
/// kept; the result is for display and matching, never for file access).
pub fn escape_invalid_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Parses `/proc/PID/stat`. `comm` may hold any bytes but NUL, spaces and
/// parentheses included, so the fields after it are found from the last `)`.
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let comm = escape_comm(text.get(open + 1..close)?);
    // After ") " the fields start at field 3 (state); they are ASCII.
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let rest: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    Some(Stat {
        comm,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        flags: field(9)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
}

/// Reads a small /proc file with one open and, when it fits in 4 KiB, one
/// read(): the per-process files read here (`stat`, `status`, `cgroup`,
/// `oom_score_adj`) are `single_open` seq files, which hand over the whole
/// text when the buffer holds it, so a short read is the end of the file.
/// Longer files (a deep cgroup path) are read on until read() returns 0.
/// `fs::read` would add a statx and a second, empty read().
fn read_proc(path: &str) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    // Into the vector's spare capacity: a zeroed buffer (calloc + memset of
    // 4 KiB per file) was 12k of a CheckPermission's ~80k instructions.
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let spare = buffer.capacity() - buffer.len();
        let n = rustix::io::read(&file, rustix::buffer::spare_capacity(&mut buffer))?;
        if n == 0 || n < spare {
            break;
        }
        buffer.reserve(buffer.capacity());
    }
    Ok(buffer)
}

pub fn read_stat(pid: i32) -> io::Result<Stat> {
    let text = read_proc(&format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// Ids and memory from `/proc/PID/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Real, effective, saved, filesystem uid.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub memory: Memory,
    /// `NSpid` (Linux 4.1+): the process's pid in each pid namespace from
    /// the one the procfs mount belongs to (the broker's) down to its own.
    /// One entry when it lives in the broker's pid namespace; empty when the
    /// kernel prints no such line.
    pub ns_pids: Vec<i32>,
    /// `CapEff`: the effective capabilities, in the process's own user
    /// namespace.
    pub cap_eff: u64,
    /// The task still has an mm (its status shows `RssAnon`): false for a
    /// zombie, a kernel thread, or a leader that called `pthread_exit()`
    /// while other threads run on.
    pub has_mm: bool,
    /// `SigPnd | ShdPnd` holds SIGKILL: a fatal signal is already on its way.
    pub sigkill_pending: bool,
}

/// Resident and swapped memory in bytes. A process whose mm is gone (a
/// zombie, a kernel thread) has none of these lines: all zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    /// `HugetlbPages`: hugetlbfs pages mapped (the reaper skips them; they
    /// return to the hugetlb pool only when the last mapping goes).
    pub hugetlb_bytes: u64,
    /// `VmPTE`: the mm's page tables, every level. The reap walks them all,
    /// including entries that map only the shared zero page, which no Rss
    /// line counts (mm/oom_kill.c `__oom_reap_task_mm()` → `unmap_page_range()`).
    pub page_table_bytes: u64,
}

impl Memory {
    /// Memory a reap gives back to the system: private anonymous pages and
    /// their swap. File pages stay in the page cache and shmem is shared, so
    /// neither counts as released.
    pub fn reapable_bytes(&self) -> u64 {
        self.anon_bytes + self.swap_bytes
    }
}

/// Parses `/proc/PID/status`. Its `Name:` line is the process's own choice
/// and need not be UTF-8; the lines used here are ASCII, and a line that is
/// not UTF-8 is skipped.
pub fn parse_status(bytes: &[u8]) -> Option<Status> {
    let mut status = Status::default();
    let mut have_uid = false;
    let mut have_gid = false;
    for line in bytes.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = || -> Option<u64> { value.split_whitespace().next()?.parse::<u64>().ok().map(|k| k * 1024) };
        let ids = || -> Option<[u32; 4]> {
            let v: Vec<u32> = value
                .split_whitespace()
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            v.try_into().ok()
        };
        match key {
            "Uid" => {
                status.uids = ids()?;
                have_uid = true;
            }
            "Gid" => {
                status.gids = ids()?;
                have_gid = true;
            }
            "RssAnon" => {
                status.memory.anon_bytes = kib()?;
                status.has_mm = true;
            }
            "HugetlbPages" => status.memory.hugetlb_bytes = kib()?,
            "SigPnd" | "ShdPnd" => {
                let mask = u64::from_str_radix(value.trim(), 16).ok()?;
                status.sigkill_pending |= mask & (1 << (libc::SIGKILL - 1)) != 0;
            }
            "RssFile" => status.memory.file_bytes = kib()?,
            "RssShmem" => status.memory.shmem_bytes = kib()?,
            "VmSwap" => status.memory.swap_bytes = kib()?,
            "VmPTE" => status.memory.page_table_bytes = kib()?,
            "NSpid" => {
                status.ns_pids = value
                    .split_whitespace()
                    .map(|n| n.parse().ok())
                    .collect::<Option<_>>()?;
            }
            "CapEff" => status.cap_eff = u64::from_str_radix(value.trim(), 16).ok()?,
            _ => {}
        }
    }
    (have_uid && have_gid).then_some(status)
}

pub fn read_status(pid: i32) -> io::Result<Status> {
    read_status_at(&format!("/proc/{pid}/status"))
}

fn read_status_at(path: &str) -> io::Result<Status> {
    let text = read_proc(path)?;
    parse_status(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/status"))
}

/// The memory of process `pid`'s address space, and whether it still has
/// one. Read from the process's status, or, when its leader has exited
/// (`pthread_exit()`: the leader is a zombie without an mm while other
/// threads run on), from the first thread that still has the mm: the
/// counters are the mm's, shared by all its threads.
pub fn read_process_memory(pid: i32) -> io::Result<(Memory, bool)> {
    let status = read_status(pid)?;
    if status.has_mm {
        return Ok((status.memory, true));
    }
    for entry in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(task) = read_status_at(&format!("/proc/{pid}/task/{tid}/status")) {
            if task.has_mm {
                return Ok((task.memory, true));
            }
        }
    }
    Ok((status.memory, false))
}

/// System-wide anonymous and swap memory in use, in bytes: `AnonPages` +
/// `SwapTotal` − `SwapFree` from `/proc/meminfo` (one open, one read()).
/// Under the unit's `ProcSubset=pid` that file is hidden: `AnonPages` is
/// then summed over `/sys/devices/system/node/node*/meminfo` (the same
/// `NR_ANON_MAPPED` counters, per node; the node list is read once) and
/// swap counts as unchanged, so a figure built on this can only
/// under-report. What a kill gives back to the system shows here;
/// copy-on-write pages still mapped by a survivor do not.
///
/// Read on either side of every kill, so it is kept to the fewest
/// syscalls: the first read sits between the decision and the SIGKILL.
pub fn system_anon_and_swap() -> io::Result<u64> {
    let kib_of = |text: &str, key: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            // "AnonPages:  123 kB" or, per node, "Node 0 AnonPages:  123 kB".
            let (left, value) = line.split_once(':')?;
            (left.split_whitespace().last()? == key).then(|| value.split_whitespace().next()?.parse().ok())?
        })
    };
    if let Ok(bytes) = read_proc("/proc/meminfo") {
        let text = String::from_utf8_lossy(&bytes);
        if let Some(anon) = kib_of(&text, "AnonPages") {
            let swap = kib_of(&text, "SwapTotal")
                .zip(kib_of(&text, "SwapFree"))
                .map_or(0, |(total, free)| total.saturating_sub(free));
            return Ok((anon + swap) * 1024);
        }
    }
    let mut anon = None;
    for path in node_meminfo_paths() {
        if let Some(kib) = read_proc(path)
            .ok()
            .and_then(|bytes| kib_of(&String::from_utf8_lossy(&bytes), "AnonPages"))
        {
            *anon.get_or_insert(0) += kib;
        }
    }
    anon.map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no AnonPages in /proc/meminfo or node meminfo"))
}

/// `/sys/devices/system/node/node*/meminfo`, listed once: memory nodes come
/// and go only with memory hotplug, which a node added later would miss
/// (its anon pages then count as unchanged: an under-report, never more).
fn node_meminfo_paths() -> &'static [String] {
    static PATHS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    PATHS.get_or_init(|| {
        let Ok(nodes) = fs::read_dir("/sys/devices/system/node") else {
            return Vec::new();
        };
        nodes
            .flatten()
            .filter(|node| node.file_name().to_string_lossy().starts_with("node"))
            .map(|node| node.path().join("meminfo").to_string_lossy().into_owned())
            .collect()
    })
}

/// The cgroup v2 path of a process ("0::/path" in `/proc/PID/cgroup`), as
/// the bytes the kernel gives, or empty on a machine with no unified
/// hierarchy. The path is relative to the reader's (the broker's) cgroup
/// namespace. Names are chosen by whoever may create the cgroup, so they
/// need not be UTF-8 (see `crate::os::cgroup` for what of it is believed).
pub fn read_cgroup_bytes(pid: i32) -> io::Result<Vec<u8>> {
    let bytes = read_proc(&format!("/proc/{pid}/cgroup"))?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"0::"))
        .unwrap_or_default()
        .to_vec())
}

/// Whether process `pid` is in the broker's own user namespace: its
/// `/proc/PID/uid_map` (world-readable, no ptrace check:
/// fs/proc/base.c `proc_id_map_open`; shown relative to the reader's
/// namespace, kernel/user_namespace.c `uid_m_show`) is the same as the
/// broker's own `/proc/self/uid_map`. A process in a namespace of its own
/// shows that namespace's map; only a namespace's creator with privilege
/// over the whole range could give it the broker's. Like every read by
/// pid, trusted only once the caller re-validates the pid by its pidfd.
pub fn in_own_user_namespace(pid: i32) -> io::Result<bool> {
    static OWN: std::sync::LazyLock<Option<Vec<u8>>> =
        std::sync::LazyLock::new(|| read_proc("/proc/self/uid_map").ok());
    let theirs = read_proc(&format!("/proc/{pid}/uid_map"))?;
    match &*OWN {
        Some(own) => Ok(*own == theirs),
        None => Err(io::Error::other("the broker's own /proc/self/uid_map is unreadable")),
    }
}

/// [`read_cgroup_bytes`], invalid UTF-8 escaped ([`escape_invalid_utf8`]).
pub fn read_cgroup(pid: i32) -> io::Result<String> {
    read_cgroup_bytes(pid).map(|bytes| escape_invalid_utf8(&bytes))
}

pub fn read_oom_score_adj(pid: i32) -> io::Result<i32> {
    let text = read_proc(&format!("/proc/{pid}/oom_score_adj"))?;
    std::str::from_utf8(&text)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unparsable oom_score_adj"))?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unparsable oom_score_adj"))
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (commonly `/sys/fs/cgroup`, `/sys/fs/cgroup/unified` on hybrid systems).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let text = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        let stat = parse_stat(text.as_bytes()).unwrap();
        assert_eq!(stat.comm, "a) b (c)");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.start_time, 12345);
        assert!(!stat.is_kernel_thread());
    }

    #[test]
    fn comm_bytes_are_escaped_and_stay_distinct() {
        let text = b"7 (\xff\xfe) S 1 7 7 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 99 1000 10 0 0\n";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.comm, r"\xff\xfe");
        assert_eq!(stat.start_time, 99);
        // A Cyrillic name cut at 15 bytes by the kernel ends mid-character.
        let name = "жжжжжжжж";
        let cut = &name.as_bytes()[..15];
        assert_eq!(escape_comm(cut), r"жжжжжжж\xd0");
        assert_eq!(escape_comm(b"a\nb\\"), r"a\nb\\");
        assert_ne!(escape_comm(br"\xff"), escape_comm(b"\xff"));
        // Invisible formatting is shown by code point: "\u{202e}dhss" must
        // not read "sshd".
        assert_eq!(escape_comm("\u{202e}dhss".as_bytes()), r"\u{202e}dhss");
        assert_eq!(escape_comm("ss\u{200b}hd".as_bytes()), r"ss\u{200b}hd");
    }

    #[test]
    fn cgroup_paths_keep_valid_utf8_and_escape_the_rest() {
        assert_eq!(
            escape_invalid_utf8(br"/system.slice/system-systemd\x2dfsck.slice"),
            r"/system.slice/system-systemd\x2dfsck.slice"
        );
        assert_eq!(escape_invalid_utf8(b"/u/app\xff.scope"), r"/u/app\xff.scope");
    }

    /// A file longer than the first 4 KiB read comes back whole (a deep
    /// cgroup path), and a short one in one piece.
    #[test]
    fn read_proc_reads_past_the_first_buffer() {
        let dir = std::env::temp_dir().join(format!("reapd-read-proc-{}", std::process::id()));
        let long: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&dir, &long).unwrap();
        assert_eq!(read_proc(dir.to_str().unwrap()).unwrap(), long);
        std::fs::remove_file(&dir).unwrap();
        assert!(read_proc("/proc/self/stat")
            .unwrap()
            .starts_with(std::process::id().to_string().as_bytes()));
    }

    #[test]
    fn system_counters_read() {
        assert!(system_anon_and_swap().unwrap() > 0);
        let (memory, has_mm) = read_process_memory(std::process::id() as i32).unwrap();
        assert!(has_mm && memory.anon_bytes > 0);
    }

    #[test]
    fn stat_of_self() {
        let stat = read_stat(std::process::id() as i32).unwrap();
        assert!(stat.start_time > 0);
    }

    #[test]
    fn status_fields() {
        let text = b"Name:\t\xff\xfe\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nNSpid:\t900\t3\nCapEff:\t0000000000000020\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\nRssAnon:\t  100 kB\nRssFile:\t 2 kB\nRssShmem:\t0 kB\nVmSwap:\t3 kB\nVmPTE:\t   52 kB\nHugetlbPages:\t 2048 kB\n";
        let status = parse_status(text).unwrap();
        assert_eq!(status.uids, [1, 2, 3, 4]);
        assert_eq!(status.gids, [5, 6, 7, 8]);
        assert_eq!(status.ns_pids, [900, 3]);
        assert_eq!(status.cap_eff, 1 << 5);
        assert!(status.sigkill_pending);
        assert!(status.has_mm);
        assert_eq!(status.memory.hugetlb_bytes, 2 << 20);
        assert_eq!(status.memory.anon_bytes, 100 * 1024);
        assert_eq!(status.memory.swap_bytes, 3 * 1024);
        assert_eq!(status.memory.page_table_bytes, 52 * 1024);
        assert!(parse_status(b"Name: x\n").is_none());
    }
}
