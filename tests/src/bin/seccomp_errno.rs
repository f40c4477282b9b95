// SPDX-License-Identifier: MIT OR Apache-2.0
//! `seccomp-errno RULE... -- PROGRAM ARGS...`: runs PROGRAM under a seccomp
//! filter that fails chosen syscalls with chosen errnos, so tests can show
//! how the broker behaves on older kernels and on rare errors, for real.
//!
//! Rules:
//! - `process_mrelease=ERRNO`: every process_mrelease call fails.
//! - `process_mrelease_flag=ERRNO`: process_mrelease with flags != 0 fails.
//! - `process_mrelease_plain=ERRNO`: process_mrelease with fd >= 0 and flags 0 fails (reaps, not the probe).
//! - `pidfd_get_info=ERRNO`: the PIDFD_GET_INFO ioctl fails.
//! - `so_peerpidfd=ERRNO`: getsockopt(SOL_SOCKET, SO_PEERPIDFD) fails.
//!
//! ERRNO is a name: ENOSYS, EINVAL, ENOTTY, ENOPROTOOPT, EAGAIN, EPERM, EBADF.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

const PIDFD_GET_INFO: u64 = 0xC040_FF0B;
const SO_PEERPIDFD: u64 = 77;

fn errno(name: &str) -> u32 {
    (match name {
        "ENOSYS" => libc::ENOSYS,
        "EINVAL" => libc::EINVAL,
        "ENOTTY" => libc::ENOTTY,
        "ENOPROTOOPT" => libc::ENOPROTOOPT,
        "EAGAIN" => libc::EAGAIN,
        "EPERM" => libc::EPERM,
        "EBADF" => libc::EBADF,
        other => panic!("unknown errno {other}"),
    }) as u32
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid condition")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (rules, program) = (&args[..split], args.get(split + 1..).unwrap_or(&[]));
    if program.is_empty() {
        eprintln!("usage: seccomp-errno RULE=ERRNO... -- PROGRAM ARGS...");
        std::process::exit(2);
    }
    // One errno per syscall: seccompiler matches a syscall's rules with a
    // single action, so a test names one failure at a time.
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut action_errno = None;
    for rule in rules {
        let (name, value) = rule.split_once('=').expect("RULE=ERRNO");
        action_errno = Some(errno(value));
        let (nr, conditions) = match name {
            "process_mrelease" => (libc::SYS_process_mrelease, vec![]),
            "process_mrelease_flag" => (libc::SYS_process_mrelease, vec![cond(1, SeccompCmpOp::Ne, 0)]),
            "process_mrelease_plain" => (
                libc::SYS_process_mrelease,
                vec![cond(0, SeccompCmpOp::Le, i32::MAX as u64), cond(1, SeccompCmpOp::Eq, 0)],
            ),
            "pidfd_get_info" => (libc::SYS_ioctl, vec![cond(1, SeccompCmpOp::Eq, PIDFD_GET_INFO)]),
            "so_peerpidfd" => (
                libc::SYS_getsockopt,
                vec![
                    cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
                    cond(2, SeccompCmpOp::Eq, SO_PEERPIDFD),
                ],
            ),
            other => panic!("unknown rule {other}"),
        };
        let rules = map.entry(nr).or_default();
        if conditions.is_empty() {
            // An unconditional rule: match when arg0 is anything.
            rules.push(SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(0), 0)]).unwrap());
        } else {
            rules.push(SeccompRule::new(conditions).unwrap());
        }
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(action_errno.expect("at least one rule")),
        std::env::consts::ARCH.try_into().expect("supported arch"),
    )
    .expect("valid filter");
    let program_bpf: BpfProgram = filter.try_into().expect("compiles");
    seccompiler::apply_filter(&program_bpf).expect("seccomp applied");
    let err = std::process::Command::new(&program[0]).args(&program[1..]).exec();
    eprintln!("exec {}: {err}", program[0]);
    std::process::exit(127);
}
