//! Man pages and shell completions made from a binary's own clap definitions, so that `--help`,
//! the man page and the completions cannot disagree. Each binary answers the hidden
//! `PROG --generate man|bash|zsh|fish` (outside clap, so `--help` never shows it); `make install`
//! writes what it prints. The man page is clap's title, NAME, SYNOPSIS and OPTIONS, one
//! subsection per (sub)command with its synopsis, description and options, and the hand-written
//! sections of the page's source (`cli/man/`, `daemon/man/`) around them.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;

/// The line of a page's hand-written source where the generated OPTIONS and COMMANDS go: what
/// comes before it (DESCRIPTION) follows the SYNOPSIS, what comes after (EXIT STATUS, FILES,
/// EXAMPLES, SEE ALSO) ends the page.
pub const GENERATED: &str = ".\\\" @GENERATED@";

/// The hidden flag each binary answers before clap parses anything.
pub const FLAG: &str = "--generate";

/// A man page: its section and its hand-written roff source (with the [`GENERATED`] line).
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub section: &'static str,
    pub source: &'static str,
}

/// What `--generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Man,
    Shell(Shell),
}

impl Output {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "man" => Self::Man,
            "bash" => Self::Shell(Shell::Bash),
            "zsh" => Self::Shell(Shell::Zsh),
            "fish" => Self::Shell(Shell::Fish),
            _ => return None,
        })
    }
}

/// When the process was started as exactly `PROG --generate KIND`, prints the man page or the
/// completion script on stdout and returns the exit code; `None` otherwise (the binary goes on
/// to parse its arguments as usual).
pub fn generate_if_asked(command: impl FnOnce() -> Command, page: &Page) -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.len() != 3 || args[1] != FLAG {
        return None;
    }
    let command = command();
    let name = command.get_name().to_owned();
    let Some(output) = args[2].to_str().and_then(Output::parse) else {
        eprintln!("{name}: {FLAG} takes man, bash, zsh or fish");
        return Some(ExitCode::from(2));
    };
    let written = render(command, page, output).and_then(|text| {
        std::io::stdout()
            .lock()
            .write_all(&text)
            .map_err(|e| format!("writing: {e}"))
    });
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{name}: {FLAG}: {why}");
            ExitCode::FAILURE
        }
    })
}

/// The man page or completion script of `command`.
pub fn render(command: Command, page: &Page, output: Output) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match output {
        Output::Man => man(command, page, &mut out).map_err(|e| e.to_string())?,
        Output::Shell(shell) => {
            let mut command = command;
            let name = command.get_name().to_owned();
            clap_complete::generate(shell, &mut command, name, &mut out);
        }
    }
    Ok(out)
}

fn man(command: Command, page: &Page, out: &mut Vec<u8>) -> std::io::Result<()> {
    let (description, tail) = page
        .source
        .split_once(GENERATED)
        .ok_or_else(|| std::io::Error::other(format!("the page source has no {GENERATED} line")))?;
    let mut command = command;
    command.build();
    let name = command.get_name().to_owned();
    let top = Man::new(command.clone())
        .title(name.to_uppercase())
        .section(page.section)
        .manual("passthroughd manual");
    top.render_title(out)?;
    top.render_name_section(out)?;
    top.render_synopsis_section(out)?;
    out.extend_from_slice(description.trim_start_matches('\n').as_bytes());
    top.render_options_section(out)?;
    if command.get_subcommands().any(|s| !s.is_hide_set()) {
        out.extend_from_slice(b".SH COMMANDS\n");
        commands(&command, &name, out)?;
    }
    out.extend_from_slice(tail.trim_start_matches('\n').as_bytes());
    *out = escape_non_ascii(&String::from_utf8_lossy(out)).into_bytes();
    Ok(())
}

/// groff reads its input as Latin-1 unless preconv runs first (man does, groff alone does not):
/// every other character becomes a named glyph escape, so the page renders the same either way.
fn escape_non_ascii(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            escaped.push(c);
        } else {
            escaped.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    escaped
}

/// A part of a page as clap_mangen renders it.
type Section = fn(&Man, &mut dyn Write) -> std::io::Result<()>;

/// One `.SS` per subcommand, depth first: its synopsis, description and own options (the global
/// ones are in OPTIONS already). clap's `help` subcommand is listed, its own subcommands (one per
/// command again) are not.
fn commands(parent: &Command, path: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    for sub in parent.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = format!("{path} {}", sub.get_name());
        let sub = sub.clone().bin_name(&full).mut_args(|arg| {
            let hide = arg.is_global_set() || arg.get_id() == "help" || arg.is_hide_set();
            arg.hide(hide)
        });
        let man = Man::new(sub.clone());
        writeln!(out, ".SS \"{full}\"")?;
        let bare = !sub.has_subcommands() && sub.get_arguments().all(|a| a.is_hide_set());
        let mut parts: Vec<Section> = Vec::new();
        if !bare {
            // The heading says it all when there is nothing to add.
            parts.push(Man::render_synopsis_section);
        }
        parts.push(Man::render_description_section);
        parts.push(Man::render_options_section);
        for part in parts {
            let mut text = Vec::new();
            part(&man, &mut text)?;
            // The section headings are this page's, not the subcommand's.
            for line in String::from_utf8_lossy(&text).lines() {
                if !line.starts_with(".SH ") {
                    writeln!(out, "{line}")?;
                }
            }
            out.extend_from_slice(b".PP\n");
        }
        if sub.get_name() != "help" {
            commands(&sub, &full, out)?;
        }
    }
    Ok(())
}
