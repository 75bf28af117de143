//! The flag tables of `deploy/OPERATIONS.md` say what `--help` says: the same flags, each
//! with the same environment variable and default, for the node and for the router. The
//! binaries are asked with an empty environment, so `--help` shows the built-in defaults.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

const OPERATIONS: &str = include_str!("../../deploy/OPERATIONS.md");

/// `flag → (env, default)`, as a table row says: `none` for no default, `off` for a switch,
/// `empty` for an empty string.
type Flags = BTreeMap<String, (String, String)>;

fn table(heading: &str) -> Flags {
    let section = OPERATIONS
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("OPERATIONS.md has no {heading:?}"));
    let section = section.split("\n#").next().unwrap_or("");
    let mut flags = Flags::new();
    for line in section.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches(['|', ' ']))
            .collect();
        let unquote = |s: &str| s.trim_matches('`').to_owned();
        let (flag, env, default) = (unquote(cells[0]), unquote(cells[1]), cells[2]);
        let default = match default {
            "none" | "off" | "empty" => default.to_owned(),
            d => unquote(d),
        };
        assert!(
            flags.insert(flag.clone(), (env, default)).is_none(),
            "{flag} is listed twice under {heading:?}"
        );
    }
    assert!(flags.len() > 5, "{heading:?} has a table");
    flags
}

fn help(bin: &std::path::Path) -> Flags {
    let out = Command::new(bin)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // Each option starts on a line of its own (`      --name <VALUE>`, or `  -h, --help`);
    // its description, `[env: ...]` and `[default: ...]` follow until the next one.
    let mut blocks: Vec<(String, bool, String)> = Vec::new();
    for line in text.lines() {
        let head = line.trim_start();
        let head = head.split_once(", ").map_or(head, |(short, long)| {
            if short.starts_with('-') && short.len() == 2 {
                long
            } else {
                head
            }
        });
        if let Some(rest) = head.strip_prefix("--") {
            let (name, takes_value) = match rest.split_once(' ') {
                Some((name, _)) => (name.to_owned(), true),
                None => (rest.to_owned(), false),
            };
            blocks.push((name, takes_value, String::new()));
        } else if let Some((_, _, body)) = blocks.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let mut flags = Flags::new();
    for (name, takes_value, body) in blocks {
        if matches!(name.as_str(), "help" | "version") {
            continue;
        }
        let field = |key: &str| {
            body.split(&format!("[{key}: "))
                .nth(1)
                .and_then(|s| s.split(']').next())
                .map(str::to_owned)
        };
        let env = field("env")
            .map(|e| e.trim_end_matches('=').to_owned())
            .unwrap_or_default();
        let default = match field("default") {
            Some(d) if d.is_empty() || d == "\"\"" => "empty".to_owned(),
            // A value with spaces is shown quoted.
            Some(d) => d.trim_matches('"').to_owned(),
            None if takes_value => "none".to_owned(),
            None => "off".to_owned(),
        };
        flags.insert(format!("--{name}"), (env, default));
    }
    flags
}

fn same(heading: &str, bin: &std::path::Path) {
    let documented = table(heading);
    let actual = help(bin);
    let missing: Vec<_> = actual
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let extra: Vec<_> = documented
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "OPERATIONS.md {heading:?} lacks {missing:?} and lists {extra:?}, which {} does not have",
        bin.display()
    );
    let wrong: Vec<String> = actual
        .iter()
        .filter(|(flag, said)| documented[*flag] != **said)
        .map(|(flag, (env, default))| {
            let (doc_env, doc_default) = &documented[flag];
            format!("{flag}: --help says {env} / {default}, the table {doc_env} / {doc_default}")
        })
        .collect();
    assert!(wrong.is_empty(), "{heading:?}:\n{}", wrong.join("\n"));
}

#[test]
fn the_node_flag_table_says_what_chat_node_help_says() {
    same(
        "### Flags",
        std::path::Path::new(support::cluster::NODE_BIN),
    );
}

#[test]
fn the_router_flag_table_says_what_chat_router_help_says() {
    same("### Router flags", &support::cluster::router_bin());
}
