//! The verbs layer must not add a link-time dependency on rdma-core: this
//! test binary (which uses every verb) must have no `NEEDED` entry for
//! libibverbs or librdmacm. Uses `readelf -d` (binutils); fails when it is missing.

#[test]
fn no_needed_libibverbs_or_librdmacm() {
    // Reference the crate so it is linked in like in any real user.
    let _ = kvtransfer_verbs::Library::load as fn() -> _;
    let exe = std::env::current_exe().expect("current_exe");
    let out = match std::process::Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
    {
        Ok(o) if o.status.success() => o,
        other => panic!("readelf -d (binutils) is needed to check the NEEDED entries: {other:?}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        !needed.is_empty(),
        "no NEEDED entries parsed from readelf output:\n{text}"
    );
    for l in &needed {
        assert!(
            !l.contains("libibverbs") && !l.contains("librdmacm"),
            "{} links rdma-core: {l}",
            exe.display()
        );
    }
}
