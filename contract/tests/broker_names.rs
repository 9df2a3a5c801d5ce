//! Broker names live in the contract: no other crate's code spells an
//! exchange or a routing key as a string literal, where a typo would be a
//! silent break of the contract. Tests may (they check the contract from
//! outside), so files under `tests/` and `#[cfg(test)]` modules are left out.

use contract::{COMMANDS, EVENTS, MESSAGE_TYPES};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !matches!(name.as_ref(), "target" | "tests" | ".git" | "contract") {
                rust_files(&path, found);
            }
        } else if name.ends_with(".rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_crate_outside_the_contract_spells_a_broker_name() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the contract crate sits in the workspace");
    let mut files = Vec::new();
    rust_files(workspace, &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let names: Vec<String> = MESSAGE_TYPES
        .iter()
        .map(|t| t.kind)
        .chain([COMMANDS, EVENTS])
        .map(|name| format!("\"{name}\""))
        .collect();
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            for name in &names {
                if line.contains(name.as_str()) {
                    found.push(format!("{}:{}: {name}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "broker names spelled outside contract/src:\n{}",
        found.join("\n")
    );
}
