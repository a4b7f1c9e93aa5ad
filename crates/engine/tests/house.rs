//! The engine knows no concrete transport: only `transport/` (its registry and the
//! transports' own folders) names one. Read from the sources, so that adding a transport
//! stays a matter of its own folder and the registry.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn nothing_in_the_engine_names_a_concrete_transport() {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = Vec::new();
    rust_files(&engine, &mut files);
    assert!(files.len() >= 5, "the engine's sources were not found");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            for name in [
                "TransportKind::Rdma",
                "TransportKind::Nvlink",
                "TransportKind::Tcp",
                "TransportDetails::",
                "transport::rdma",
                "transport::tcp",
                "transport::nvlink",
            ] {
                if line.contains(name) {
                    found.push(format!("{}:{}: {name}", file.display(), number + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
