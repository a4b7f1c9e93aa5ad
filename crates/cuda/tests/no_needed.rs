//! The CUDA layer must not add a link-time dependency on the NVIDIA driver: this test
//! binary (which uses the crate) must have no `NEEDED` entry for libcuda. Uses `readelf -d`;
//! skips when it is missing.

#[test]
fn no_needed_libcuda() {
    // Reference the crate so it is linked in like in any real user.
    let _ = kvtransfer_cuda::Cuda::get as fn() -> _;
    let exe = std::env::current_exe().expect("current_exe");
    let out = match std::process::Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
    {
        Ok(o) if o.status.success() => o,
        other => {
            eprintln!("SKIP no_needed_libcuda: readelf unavailable ({other:?})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        !needed.is_empty(),
        "no NEEDED entries parsed from readelf output:\n{text}"
    );
    for l in &needed {
        assert!(
            !l.contains("libcuda"),
            "{} links the CUDA driver: {l}",
            exe.display()
        );
    }
}
