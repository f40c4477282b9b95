// SPDX-License-Identifier: MIT OR Apache-2.0
//! Man pages and shell completions for `reapd` and `reapctl`, generated from
//! their clap definitions so that they cannot drift from the command lines.
//!
//! Each binary answers `BIN generate-docs DIR` (see [`requested_dir`]) by
//! handing its `clap::Command` and its prose sections (exit status, files,
//! the audit log...) to [`generate`]. The packaging (`systemd/package.sh`)
//! runs it on the built binaries and ships the result; nothing is generated
//! at run time. `generate-docs` is recognised before clap parses the command
//! line, so it is in no page, no completion and no `--help`.
//!
//! Layout written under `DIR`:
//! - `man/NAME.SECTION`: the command's page (synopsis, options, subcommands,
//!   then the extra sections), and `man/NAME-SUB.SECTION` per visible
//!   subcommand (its own options and arguments), as git does;
//! - `completions/NAME` (bash), `completions/_NAME` (zsh),
//!   `completions/NAME.fish` (fish): the file names Debian's
//!   bash-completion, zsh and fish packages look up.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// A block of an extra man page section.
#[derive(Debug, Clone, Copy)]
pub enum Block {
    /// A paragraph of plain text (roff escaping is done here).
    Para(&'static str),
    /// A tagged paragraph: the tag in bold (an exit code, a path, a
    /// variable), then its explanation indented below.
    Item(&'static str, &'static str),
}

/// A section appended to the command's main page after the generated ones.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    /// The heading, upper case by man page convention ("EXIT STATUS").
    pub title: &'static str,
    /// Its body, in order.
    pub body: &'static [Block],
}

/// What a command's manual adds to what clap knows.
#[derive(Debug, Clone, Copy)]
pub struct Manual<'a> {
    /// The manual section: "1" for user commands, "8" for daemons.
    pub section: &'a str,
    /// Sections after the generated ones on the main page, in order.
    pub extra: &'a [Section],
    /// Other pages for SEE ALSO ("reapd(8)"); the subcommands' pages are
    /// added to the main page's list, the main page to theirs.
    pub see_also: &'a [&'a str],
}

/// `Some(DIR)` when the program was run as exactly `BIN generate-docs DIR`.
pub fn requested_dir() -> Option<PathBuf> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [command, dir] if command == "generate-docs" => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// [`generate`] for a binary's `main`: success, or the error on stderr and
/// exit status 1.
pub fn generate_command(cmd: clap::Command, manual: &Manual<'_>, dir: &Path) -> ExitCode {
    let name = cmd.get_name().to_owned();
    match generate(cmd, manual, dir) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: cannot write the docs under {}: {err}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// Writes the man pages and completions of `cmd` under `dir` (layout in the
/// crate docs) and returns the paths written.
///
/// Hidden subcommands and clap's `help` subcommand get no page (clap_complete
/// still completes hidden ones: keep them out of the command).
///
/// # Errors
/// Any I/O error creating the directories or writing a file.
pub fn generate(cmd: clap::Command, manual: &Manual<'_>, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let man_section = manual.section;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man_dir = dir.join("man");
    let completion_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completion_dir)?;
    let mut written = Vec::new();

    let page = man_dir.join(format!("{name}.{man_section}"));
    write_with(&page, |out| {
        let man = Man::new(cmd.clone()).title(name.to_uppercase()).section(man_section);
        render_head(&man, out)?;
        if visible_subcommands(&cmd).next().is_some() {
            man.render_subcommands_section(out)?;
        }
        for section in manual.extra {
            render_section(section).to_writer(out)?;
        }
        let subs = visible_subcommands(&cmd).map(|sub| format!("{name}-{}({man_section})", sub.get_name()));
        see_also(subs.chain(manual.see_also.iter().map(|page| page.to_string()))).to_writer(out)?;
        man.render_version_section(out)
    })?;
    written.push(page);

    for sub in visible_subcommands(&cmd) {
        let page_name = format!("{name}-{}", sub.get_name());
        let page = man_dir.join(format!("{page_name}.{man_section}"));
        write_with(&page, |out| {
            // The subcommand as it is typed ("reapctl kill") in its synopsis;
            // build() above set that bin name.
            let man = Man::new(sub.clone())
                .title(page_name.to_uppercase())
                .section(man_section);
            render_head(&man, out)?;
            see_also(std::iter::once(format!("{name}({man_section})"))).to_writer(out)
        })?;
        written.push(page);
    }

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let file = completion_dir.join(match shell {
            Shell::Bash => name.clone(),
            Shell::Zsh => format!("_{name}"),
            _ => format!("{name}.fish"),
        });
        write_with(&file, |out| {
            clap_complete::generate(shell, &mut cmd, name.clone(), out);
            Ok(())
        })?;
        written.push(file);
    }
    Ok(written)
}

/// What every page starts with: title, NAME, SYNOPSIS, DESCRIPTION, OPTIONS.
fn render_head(man: &Man, out: &mut dyn Write) -> io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|sub| !sub.is_hide_set())
}

fn write_with(path: &Path, render: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    render(&mut out)?;
    out.flush()
}

fn render_section(section: &Section) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", [section.title]);
    for block in section.body {
        match block {
            Block::Para(text) => {
                roff.control("PP", []);
                roff.text([roman(*text)]);
            }
            Block::Item(tag, text) => {
                roff.control("TP", []);
                roff.text([bold(*tag)]);
                roff.text([roman(*text)]);
            }
        }
    }
    roff
}

fn see_also(pages: impl Iterator<Item = String>) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(pages.collect::<Vec<_>>().join(", "))]);
    roff
}
