// SPDX-License-Identifier: MIT OR Apache-2.0
//! The man pages and completions that `reapd generate-docs` and `reapctl
//! generate-docs` write (what the package ships) cover the command lines
//! as the binaries parse them: every option and argument that a `--help`
//! lists is on the page of its (sub)command, every subcommand has a page,
//! the prose sections are there, and the bash completions load.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use reapd_e2e::bin;

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn generate(binary: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(&bin(binary), &["generate-docs", dir.path().to_str().unwrap()]);
    dir
}

/// A roff page as plain words: font escapes dropped, `\-` as `-`.
fn page_text(path: &Path) -> String {
    let roff = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
}

/// What a `--help` lists: long options (`--name`), positional arguments
/// (`<PID>`, `[PID]` as `PID`) and, under "Commands:", subcommand names.
struct Help {
    options: BTreeSet<String>,
    positionals: BTreeSet<String>,
    subcommands: BTreeSet<String>,
}

fn help_of(binary: &Path, path: &[&str]) -> Help {
    let mut args: Vec<&str> = path.to_vec();
    args.push("--help");
    let text = run(binary, &args);
    let mut help = Help {
        options: BTreeSet::new(),
        positionals: BTreeSet::new(),
        subcommands: BTreeSet::new(),
    };
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        match section {
            "Commands" if first != "help" && !first.is_empty() => {
                help.subcommands.insert(first.to_owned());
            }
            "Arguments" if !first.is_empty() => {
                help.positionals
                    .insert(first.trim_matches(['<', '>', '[', ']', '.']).to_owned());
            }
            "Options" => {
                for word in line.split_whitespace() {
                    let word = word.trim_end_matches(',');
                    if let Some(name) = word.strip_prefix("--") {
                        let name = name.split(['=', '<', ' ']).next().unwrap();
                        if name != "help" && name != "version" {
                            help.options.insert(format!("--{name}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    help
}

/// Every option and argument of `binary path...` is on `page`.
fn assert_page_covers(binary: &Path, path: &[&str], page: &Path) -> Help {
    let help = help_of(binary, path);
    let text = page_text(page);
    for option in &help.options {
        assert!(
            text.contains(option.as_str()),
            "{option} of {path:?} missing from {}",
            page.display()
        );
    }
    for arg in &help.positionals {
        assert!(
            text.contains(arg.as_str()),
            "argument {arg} of {path:?} missing from {}",
            page.display()
        );
    }
    help
}

fn assert_every_subcommand_has_its_page(binary: &str, section: &str) -> (tempfile::TempDir, Help) {
    let dir = generate(binary);
    let exe = bin(binary);
    let man = dir.path().join("man");
    let top = assert_page_covers(&exe, &[], &man.join(format!("{binary}.{section}")));
    assert!(!top.subcommands.is_empty(), "{binary} --help lists no subcommand");
    assert!(
        !top.subcommands.contains("generate-docs"),
        "the hidden generate-docs must stay out of --help"
    );
    for sub in &top.subcommands {
        let page = man.join(format!("{binary}-{sub}.{section}"));
        assert_page_covers(&exe, &[sub], &page);
        // The page names the command as it is typed.
        assert!(
            page_text(&page).contains(&format!("{binary} {sub}")),
            "{}",
            page.display()
        );
    }
    // No page for what --help does not show (generate-docs, help).
    let pages = std::fs::read_dir(&man).unwrap().count();
    assert_eq!(pages, 1 + top.subcommands.len(), "pages: {man:?}");
    (dir, top)
}

fn assert_mentions(dir: &Path, page: &str, needles: &[&str]) {
    let text = page_text(&dir.join("man").join(page));
    for needle in needles {
        assert!(text.contains(needle), "{needle} missing from {page}");
    }
}

#[test]
fn reapctl_pages_cover_every_option_argument_and_subcommand() {
    let (dir, _) = assert_every_subcommand_has_its_page("reapctl", "1");
    let needles = [
        "--varlink",
        "--socket",
        "--json",
        "EXIT STATUS",
        "Rate limited",
        "reapd(8)",
    ];
    assert_mentions(dir.path(), "reapctl.1", &needles);
    assert_mentions(dir.path(), "reapctl-kill.1", &["--pidfd-of", "--start-time"]);
}

#[test]
fn reapd_pages_cover_every_option_and_the_audit_log() {
    let (dir, _) = assert_every_subcommand_has_its_page("reapd", "8");
    let needles = [
        "AUDIT LOG",
        "check_suppressed",
        "SIGHUP",
        "/etc/reapd/policy.toml",
        "REAPD_LOG",
        "EXIT STATUS",
    ];
    assert_mentions(dir.path(), "reapd.8", &needles);
}

#[test]
fn every_reapctl_option_has_help_text() {
    // `check --start-time` had none: each option line of every subcommand's
    // --help carries a description after the option itself.
    let exe = bin("reapctl");
    let top = help_of(&exe, &[]);
    for sub in top.subcommands.iter().map(String::as_str).chain([""]) {
        let path: Vec<&str> = if sub.is_empty() { vec![] } else { vec![sub] };
        let mut args = path.clone();
        args.push("--help");
        let text = run(&exe, &args);
        for line in text.lines().filter(|l| l.trim_start().starts_with("--")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let described = words.len() > 1 && !(words.len() == 2 && words[1].starts_with('<'));
            assert!(described, "reapctl {sub}: option without help text: {line:?}");
        }
    }
}

#[test]
fn bash_completions_load() {
    for binary in ["reapctl", "reapd"] {
        let dir = generate(binary);
        let script = dir.path().join("completions").join(binary);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && complete -p {binary}", script.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let registered = String::from_utf8_lossy(&out.stdout);
        assert!(registered.contains(binary), "{registered}");
        for file in [binary.to_owned(), format!("_{binary}"), format!("{binary}.fish")] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(&file)).unwrap();
            assert!(
                !text.contains("generate-docs"),
                "{file} completes the packaging-only command"
            );
        }
    }
}

#[test]
fn bash_completes_reapctl_subcommands_and_options() {
    let dir = generate("reapctl");
    let script = dir.path().join("completions/reapctl");
    // Ask the completion function what it offers, as bash would on TAB.
    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}'; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _reapctl reapctl \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(complete("reapctl ki").lines().any(|w| w == "kill"));
    assert!(complete("reapctl kill --pid").lines().any(|w| w == "--pidfd-of"));
    assert!(complete("reapctl --var").lines().any(|w| w == "--varlink"));
}
