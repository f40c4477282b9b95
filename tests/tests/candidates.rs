// SPDX-License-Identifier: MIT OR Apache-2.0
//! ListCandidates (issue 12): exactly the processes the caller may kill,
//! checked against an independent scan of /proc under the caller's uid and
//! the built-in policy; ranked; paged.

use std::collections::BTreeSet;

use reapd_e2e::{varlink_call_as, varlink_socket, Broker, Creds, Value, Victim};

const U: u32 = 61700;
const W: u32 = 61701;
const MIB: usize = 1 << 20;

fn list(broker: &Broker, creds: Creds, params: &str) -> Value {
    varlink_call_as(
        creds,
        &varlink_socket(broker),
        &format!(r#"{{"method":"io.reapd.Reaper.ListCandidates","parameters":{{{params}}}}}"#),
        &[],
    )
}

/// Every pid the caller may kill by the built-in policy, scanned here
/// independently: real or saved uid is the caller's (kill(2)), not pid 1,
/// not a kernel thread, not oom_score_adj -1000.
fn independent_scan(uid: u32) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read(format!("/proc/{pid}/status")) else {
            continue;
        };
        let status = String::from_utf8_lossy(&status);
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap_or_default();
        if uids.len() == 4 && (uids[0] == uid || uids[2] == uid) && pid != 1 && adj.trim() != "-1000" {
            out.insert(pid);
        }
    }
    out
}

#[test]
fn candidates_are_exactly_what_the_caller_may_kill_ranked_and_paged() {
    let broker = Broker::start();
    let sizes = [2 * MIB, 16 * MIB, 8 * MIB];
    let mine: Vec<Victim> = sizes.iter().map(|s| Victim::spawn(Creds::uid(U), *s)).collect();
    let _others: Vec<Victim> = (0..2).map(|_| Victim::spawn(Creds::uid(W), MIB)).collect();
    let _root = Victim::spawn(Creds::ROOT, MIB);
    let shy = Victim::spawn(Creds::uid(U), MIB);
    // Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some sandboxes
    // withhold even from root: then that part is a counted skip.
    let shy_protected = std::fs::write(format!("/proc/{}/oom_score_adj", shy.pid), "-1000").is_ok();
    if !shy_protected {
        reapd_e2e::skip("candidates", "cannot set oom_score_adj -1000 (no CAP_SYS_RESOURCE)");
    }

    let reply = list(&broker, Creds::uid(U), r#""limit":1000"#);
    let p = &reply["parameters"];
    let listed: BTreeSet<i64> = p["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|c| c["process"]["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, independent_scan(U), "{reply}");
    assert_eq!(p["total"].as_u64().unwrap() as usize, listed.len());
    for v in &mine {
        assert!(listed.contains(&(v.pid as i64)));
    }
    if shy_protected {
        assert!(
            !listed.contains(&(shy.pid as i64)),
            "protected processes are not candidates"
        );
    }

    // Ranked by unique bytes, largest first.
    let order: Vec<u64> = p["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["uniqueBytes"].as_u64().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
    assert_eq!(
        p["processes"][0]["process"]["pid"], mine[1].pid,
        "the 16 MiB victim ranks first"
    );

    // Pages of one cover the same set.
    let mut paged = BTreeSet::new();
    let mut offset = 0u64;
    loop {
        let page = list(&broker, Creds::uid(U), &format!(r#""limit":1,"offset":{offset}"#));
        let page = &page["parameters"];
        for c in page["processes"].as_array().unwrap() {
            paged.insert(c["process"]["pid"].as_i64().unwrap());
        }
        match page["nextOffset"].as_u64() {
            Some(next) => offset = next,
            None => break,
        }
    }
    assert_eq!(paged, listed);

    // Another caller sees none of these.
    let theirs = list(&broker, Creds::uid(W), r#""limit":1000"#);
    let theirs: BTreeSet<i64> = theirs["parameters"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["process"]["pid"].as_i64().unwrap())
        .collect();
    assert!(theirs.is_disjoint(&listed));
    assert_eq!(theirs, independent_scan(W));
    // Unknown sort keys are a precise error.
    let bad = list(&broker, Creds::uid(U), r#""sortBy":"size""#);
    assert_eq!(bad["error"], "org.varlink.service.InvalidParameter", "{bad}");
    assert_eq!(bad["parameters"]["parameter"], "sortBy");
}
