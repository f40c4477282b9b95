//! reapd-lmk (issue 15) on real memory pressure: a cgroup with a memory
//! limit and no swap, hogs of another uid filling it, and the killer running
//! unprivileged (a test uid, no capabilities) against a hermetic test broker.
//! It must kill the right victim before the kernel's OOM killer fires
//! (`oom_kill` stays 0) and leave protected processes alone; with
//! `--dry-run` nothing dies and the would-be kill is logged.
//!
//! The limit is cgroup2's `memory.max` where the memory controller is on
//! cgroup2, else (hybrid hosts) cgroup v1's `memory.limit_in_bytes` on a
//! v1 cgroup below the test's own, with the processes in both hierarchies;
//! PSI and the broker's cgroup paths are cgroup2's either way.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reapd_e2e::{bin, policy_file, skip, spawn_as, start_with_policy, top, wait_for_log, CgroupTree, Creds, Value};

/// The killer's uid.
const KILLER: u32 = 61510;
/// The hogs' uid: the killer is granted over it.
const HOGS: u32 = 61511;
/// Another uid the killer is not granted over.
const OTHER: u32 = 61512;
const MIB: u64 = 1 << 20;
const LIMIT: u64 = 256 * MIB;

/// The test's cgroup with a memory limit, in cgroup2 and (hybrid hosts)
/// cgroup v1.
struct Arena {
    name: String,
    v2: PathBuf,
    /// The v1 memory cgroup holding the limit; `None` on cgroup2 alone.
    v1: Option<PathBuf>,
    /// The v1 directory's path as the killer names it (below the v1 mount).
    v1_path: Option<String>,
    _tree: CgroupTree,
}

fn mount_of(fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        let opts_ok = option.is_none_or(|o| f.get(dash + 3).is_some_and(|s| s.split(',').any(|x| x == o)));
        (f.get(dash + 1) == Some(&fstype) && opts_ok).then(|| PathBuf::from(f[4]))
    })
}

impl Arena {
    /// `None` (a counted skip) when no memory controller can limit a test
    /// cgroup here.
    fn new(test: &str) -> Option<Arena> {
        let name = top(test);
        let tree = CgroupTree::new(&name);
        let v2 = tree.dir.clone();
        std::fs::create_dir_all(&v2).unwrap();
        if v2.join("memory.max").exists() {
            std::fs::write(v2.join("memory.max"), LIMIT.to_string()).unwrap();
            if v2.join("memory.swap.max").exists() {
                std::fs::write(v2.join("memory.swap.max"), "0").unwrap();
            }
            return Some(Arena {
                name,
                v2,
                v1: None,
                v1_path: None,
                _tree: tree,
            });
        }
        let Some(v1_mount) = mount_of("cgroup", Some("memory")) else {
            skip(test, "no memory controller on cgroup2 or cgroup v1");
            return None;
        };
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .unwrap_or_else(|| "/".into());
        let v1_path = format!("{}/{name}", own.trim_end_matches('/'));
        let v1 = v1_mount.join(v1_path.trim_start_matches('/'));
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), LIMIT.to_string()).unwrap();
        // No swap for it (the memsw limit exists only with swap accounting).
        let _ = std::fs::write(v1.join("memory.swappiness"), "0");
        let _ = std::fs::write(v1.join("memory.memsw.limit_in_bytes"), LIMIT.to_string());
        Some(Arena {
            name,
            v2,
            v1: Some(v1),
            v1_path: Some(v1_path),
            _tree: tree,
        })
    }

    /// The cgroup directories a member of group `sub` joins.
    fn group(&self, sub: &str) -> Vec<PathBuf> {
        let dir = self.v2.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        let mut dirs = vec![dir];
        dirs.extend(self.v1.clone());
        dirs
    }

    /// The kernel OOM killer's kills in the arena.
    fn oom_kills(&self) -> u64 {
        let (file, key) = match &self.v1 {
            None => (self.v2.join("memory.events"), "oom_kill "),
            Some(v1) => (v1.join("memory.oom_control"), "oom_kill "),
        };
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|n| n.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// The killer's config for this arena (readable by the killer's uid).
    fn config(&self, broker: &Path, extra: &str) -> tempfile::NamedTempFile {
        self.config_at(broker, 25, extra)
    }

    /// As [`Arena::config`], killing below `percent` % of the limit left
    /// (0: on PSI only).
    fn config_at(&self, broker: &Path, percent: u32, extra: &str) -> tempfile::NamedTempFile {
        let memory = match &self.v1_path {
            Some(p) => format!("memory-cgroup = {p:?}\n"),
            None => String::new(),
        };
        let file = policy_file(&format!(
            "socket = {broker:?}\n[scope]\ncgroup = \"/{}\"\n{memory}\
             [trigger]\nmem-available-percent = {percent}\n\
             psi = {{ level = \"some\", stall-ms = 100, window-ms = 2000 }}\n\
             [kill]\navoid = {{ comm = [\"^lmk-db$\"] }}\n{extra}",
            self.name
        ));
        std::fs::set_permissions(file.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        file
    }

    /// The killer may arm a PSI trigger on the arena, as a delegated user may.
    fn delegate_pressure_to(&self, uid: u32) {
        chown(self.v2.join("memory.pressure"), Some(uid), None).unwrap();
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let Some(v1) = &self.v1 {
            for _ in 0..200 {
                if std::fs::remove_dir(v1).is_ok() || !v1.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A hog process, killed and waited for on drop.
struct Hog {
    child: Child,
}

impl Hog {
    /// `lmk-hog NAME HOLD [STEP EVERY MAX]` as `uid` in `cgroups`, returned
    /// once it holds HOLD MiB.
    fn start(uid: u32, cgroups: &[PathBuf], args: &[&str]) -> Hog {
        let mut command = Command::new(bin("lmk-hog"));
        command.args(args).stdout(Stdio::piped());
        let mut child = spawn_as(Creds::uid(uid), cgroups, &mut command);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "hog {args:?}");
        Hog { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The signal that ended it, or `None` while it runs.
    fn killed_by(&mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.child.try_wait().unwrap().map(|s| s.signal().unwrap_or(0))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An arena, a broker granting the killer the hogs' uid in it, and the
/// arena's PSI file delegated to the killer.
struct Scene {
    arena: Arena,
    broker: reapd_e2e::Broker,
    _policy: tempfile::NamedTempFile,
}

impl Scene {
    fn new(test: &str) -> Option<Scene> {
        let arena = Arena::new(test)?;
        let policy = grant(&arena);
        let broker = start_with_policy(&policy);
        arena.delegate_pressure_to(KILLER);
        Some(Scene {
            arena,
            broker,
            _policy: policy,
        })
    }
}

/// Waits (up to 5 s) for `hog` to end; the signal that ended it.
fn wait_killed(hog: &mut Hog) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while hog.killed_by().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    hog.killed_by()
}

/// The broker's policy: the killer's uid may kill the hogs' uid in the arena.
fn grant(arena: &Arena) -> tempfile::NamedTempFile {
    policy_file(&format!(
        "[[rule]]\nname = \"lmk\"\nactions = [\"kill-and-reap\"]\n\
         caller.uids = [{KILLER}]\ntarget.uids = [{HOGS}]\ntarget.cgroups = [\"/{}\"]\n",
        arena.name
    ))
}

/// The killer, started as the unprivileged test uid; returned once it
/// watches (its log says so).
struct Killer {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Killer {
    fn start(config: &Path, args: &[&str]) -> Killer {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(bin("reapd-lmk"));
        command
            .arg("--config")
            .arg(config)
            .args(args)
            .env("REAPD_LMK_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap());
        let mut child = spawn_as(Creds::uid(KILLER), &[], &mut command);
        let watching = wait_for_log(log.path(), "watching", Duration::from_secs(10));
        if !watching {
            let _ = child.kill();
        }
        assert!(
            watching,
            "killer did not start:\n{}",
            std::fs::read_to_string(log.path()).unwrap()
        );
        Killer { child, log }
    }

    /// It holds no capability at all.
    fn capabilities(&self) -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .map(String::from)
            .collect()
    }

    /// Waits (up to `timeout`) for it to exit after --max-kills; returns its
    /// exit code, its event lines and its log (stderr) by then.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<Value>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let events = BufReader::new(self.child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        (status, events, self.log())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn no_caps(lines: &[String]) {
    for l in lines
        .iter()
        .filter(|l| !l.starts_with("CapBnd") && !l.starts_with("CapAmb"))
    {
        assert!(l.ends_with("0000000000000000"), "the killer holds a capability: {l}");
    }
}

/// The standing workload: a big avoided process, a process of a uid the
/// killer is not granted, and a small one.
struct Standing {
    db: Hog,
    other: Hog,
    small: Hog,
}

impl Standing {
    fn start(arena: &Arena) -> Standing {
        Standing {
            db: Hog::start(HOGS, &arena.group("db"), &["lmk-db", "96"]),
            other: Hog::start(OTHER, &arena.group("other"), &["lmk-other", "32"]),
            small: Hog::start(HOGS, &arena.group("small"), &["lmk-small", "16"]),
        }
    }

    fn all_alive(&mut self) {
        assert_eq!(self.db.killed_by(), None, "the avoided process must survive");
        assert_eq!(self.other.killed_by(), None, "the ungranted uid's process must survive");
        assert_eq!(self.small.killed_by(), None, "the small process must survive");
    }
}

#[test]
fn the_unprivileged_killer_kills_the_leak_before_the_oom_killer() {
    let Some(Scene { arena, broker, _policy }) = Scene::new("lmk-kill") else {
        return;
    };
    let mut standing = Standing::start(&arena);
    let config = arena.config(&broker.grpc, "");
    let killer = Killer::start(config.path(), &["--max-kills", "1"]);
    no_caps(&killer.capabilities());
    // Grows 4 MiB every 20 ms without end: past the trigger (25% of 256 MiB
    // left) in about 0.2 s, past the limit in about 0.5 s.
    let mut leak = Hog::start(HOGS, &arena.group("leak"), &["lmk-leak", "0", "4", "20", "0"]);
    let (code, events, log) = killer.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "killer log:\n{log}");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["event"], "kill", "{e}");
    assert_eq!(e["pid"], leak.pid(), "the leak is the victim: {e}");
    assert_eq!(e["uid"], HOGS);
    assert_eq!(e["cause"], "low_memory");
    assert_eq!(e["tier"], "normal");
    assert_eq!(e["rule"], "lmk");
    assert!(e["bytes_released"].as_u64().unwrap() > 0, "{e}");
    assert!(e["available_percent"].as_f64().unwrap() < 25.0, "{e}");
    assert_eq!(wait_killed(&mut leak), Some(libc::SIGKILL));
    standing.all_alive();
    assert_eq!(arena.oom_kills(), 0, "the kernel's OOM killer fired");
}

#[test]
fn dry_run_kills_nothing_and_logs_the_would_be_kill() {
    let Some(Scene { arena, broker, _policy }) = Scene::new("lmk-dry") else {
        return;
    };
    let mut standing = Standing::start(&arena);
    let config = arena.config(&broker.grpc, "");
    let killer = Killer::start(config.path(), &["--dry-run", "--max-kills", "1"]);
    // Stops at 64 MiB: past the trigger, under the limit.
    let mut leak = Hog::start(HOGS, &arena.group("leak"), &["lmk-leak", "0", "4", "20", "64"]);
    let (code, events, _) = killer.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0));
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["event"], "would_kill", "{e}");
    assert_eq!(e["pid"], leak.pid(), "{e}");
    assert_eq!(e["bytes_released"], 0);
    assert_eq!(leak.killed_by(), None, "a dry run kills nothing");
    standing.all_alive();
    assert_eq!(arena.oom_kills(), 0);
}

#[test]
fn cgroup_mode_kills_the_whole_leaking_group_and_nothing_else() {
    let Some(Scene { arena, broker, _policy }) = Scene::new("lmk-group") else {
        return;
    };
    let mut standing = Standing::start(&arena);
    let config = arena.config(&broker.grpc, "mode = \"cgroup\"\n");
    let killer = Killer::start(config.path(), &["--max-kills", "1"]);
    let group = arena.group("leaky");
    let mut helper = Hog::start(HOGS, &group, &["lmk-helper", "8"]);
    let mut leak = Hog::start(HOGS, &group, &["lmk-leak", "0", "4", "20", "0"]);
    let (code, events, log) = killer.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "killer log:\n{log}");
    let e = &events[0];
    assert_eq!(e["event"], "kill", "{e}");
    assert_eq!(e["cgroup"], format!("/{}/leaky", arena.name), "{e}");
    assert_eq!(e["processes"], 2, "{e}");
    assert_eq!(wait_killed(&mut leak), Some(libc::SIGKILL));
    assert_eq!(wait_killed(&mut helper), Some(libc::SIGKILL));
    standing.all_alive();
    assert_eq!(arena.oom_kills(), 0, "the kernel's OOM killer fired");
}

#[test]
fn config_errors_are_reported_at_file_line_col_with_exit_code_3() {
    let config = policy_file("[trigger]\nmem-available-percent = 101\n[kill]\nmodee = \"x\"\n");
    let out = Command::new(bin("reapd-lmk"))
        .arg("--check")
        .arg("--config")
        .arg(config.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = config.path().display().to_string();
    assert!(stderr.contains(&format!("{at}:4:1: unknown field `modee`")), "{stderr}");
}

/// A file on disk (not tmpfs: its pages must be reclaimable page cache)
/// with none of it cached.
fn uncached_file(bytes: u64) -> tempfile::NamedTempFile {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut file = tempfile::Builder::new().tempfile_in("/var/tmp").unwrap();
    let chunk = vec![0x5au8; MIB as usize];
    for _ in 0..bytes / MIB {
        file.write_all(&chunk).unwrap();
    }
    file.as_file().sync_all().unwrap();
    // SAFETY: fadvise on an fd we own; it only drops clean cached pages.
    unsafe { libc::posix_fadvise(file.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    std::fs::set_permissions(file.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    file
}

#[test]
fn psi_fires_the_killer_on_thrashing_without_low_memory() {
    let Some(Scene { arena, broker, _policy }) = Scene::new("lmk-psi") else {
        return;
    };
    // 208 MiB of anon memory the killer may not touch leaves about 48 MiB
    // of the limit for page cache ...
    let mut other = Hog::start(OTHER, &arena.group("other"), &["lmk-other", "208"]);
    // ... and no memory threshold: only PSI can set the killer off.
    let config = arena.config_at(&broker.grpc, 0, "");
    let killer = Killer::start(config.path(), &["--max-kills", "1"]);
    // ... so a reader touching every page of a 96 MiB file mapped into its
    // memory, over and over, thrashes: each pass faults back in what the
    // last one evicted. Mapped pages, unlike read(2)'s streaming cache,
    // are the working set the kernel protects: their refaults wait for I/O
    // and their reclaim must unmap them, and both count as memory stall.
    // Measured on the 2-core development VM: 0.5-1.3 s of stall per 2 s
    // (the trigger wants 0.1 s), with or without parallel builds; the old
    // read(2) loop over a 256 MiB file made 0.1-0.2 s, too close to it.
    let data = uncached_file(96 * MIB);
    let code = format!(
        "import mmap\nf = open({:?}, 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
         print('ready', flush=True)\nwhile True:\n    for i in range(0, len(m), 4096):\n        m[i]\n",
        data.path().display()
    );
    let mut command = Command::new("python3");
    command.arg("-c").arg(code).stdout(Stdio::piped());
    let mut reader = Hog {
        child: spawn_as(Creds::uid(HOGS), &arena.group("reader"), &mut command),
    };
    let mut line = String::new();
    BufReader::new(reader.child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let started = Instant::now();
    // Unprivileged triggers are evaluated every 2 s, so the first can fire
    // 2-4 s after the thrash starts; the wait is generous and ends as soon
    // as the killer has killed.
    let (code, events, log) = killer.finish(Duration::from_secs(60));
    let pressure = std::fs::read_to_string(arena.v2.join("memory.pressure")).unwrap_or_default();
    eprintln!(
        "psi: thrash start to killer exit {} ms; arena memory.pressure: {}",
        started.elapsed().as_millis(),
        pressure.replace('\n', "; ")
    );
    assert_eq!(code, Some(0), "killer log:\n{log}\narena memory.pressure:\n{pressure}");
    let e = &events[0];
    assert_eq!(e["event"], "kill", "{e}");
    assert_eq!(e["cause"], "pressure", "{e}");
    assert_eq!(e["pid"], reader.pid(), "{e}");
    assert_eq!(wait_killed(&mut reader), Some(libc::SIGKILL));
    assert_eq!(other.killed_by(), None);
    assert_eq!(arena.oom_kills(), 0);
}
