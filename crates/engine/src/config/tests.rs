//! Tests of the settings: every variable's parser, defaults and refusals.

use super::*;
use std::net::Ipv4Addr;

#[test]
fn loopback_has_an_address_and_unknown_interfaces_are_named() {
    assert_eq!(interface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
    let err = interface_ipv4("nope0").unwrap_err();
    assert!(err.to_string().contains("'nope0'") && err.to_string().contains("lo"));
}

#[test]
fn host_is_star_an_address_or_an_interface() {
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    assert_eq!(listen_address("127.0.0.1").unwrap(), v4(127, 0, 0, 1));
    assert_eq!(listen_address("0.0.0.0").unwrap(), v4(0, 0, 0, 0));
    assert_eq!(listen_address("*").unwrap(), v4(0, 0, 0, 0));
    assert_eq!(listen_address("lo").unwrap(), v4(127, 0, 0, 1));
    let v6: IpAddr = "::1".parse().unwrap();
    assert_eq!(listen_address("::1").unwrap(), v6);
    assert_eq!(listen_address("[::1]").unwrap(), v6);
    for bad in ["", "localhost", "nope0", "a b", "eth0\n"] {
        let err = listen_address(bad).unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT", "{bad}");
        let text = err.to_string();
        assert!(
            text.contains("invalid host") && text.contains("interface"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
    let err = listen_address("localhost").unwrap_err().to_string();
    assert!(err.contains("'localhost'") && err.contains("lo"), "{err}");
}

#[test]
fn transport_choice_parses() {
    assert_eq!(
        TransportChoice::parse("tcp", "transport").unwrap(),
        TransportChoice::Only(TransportKind::Tcp)
    );
    assert_eq!(
        TransportChoice::parse(" auto ", "transport").unwrap(),
        TransportChoice::Auto
    );
    let err = TransportChoice::parse("ib", "transport").unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
    assert!(err.to_string().contains("'ib'") && err.to_string().contains("'rdma'"));
}

#[test]
fn log_levels_parse_by_name_in_any_case() {
    for level in LogLevel::ALL {
        assert_eq!(LogLevel::parse(level.name()), Some(level));
        assert_eq!(
            LogLevel::parse(&format!(" {} ", level.name().to_uppercase())),
            Some(level)
        );
    }
    for bad in ["", "verbose", "warning", "trace", "off", "2", "info,debug"] {
        assert_eq!(LogLevel::parse(bad), None, "{bad}");
    }
    assert!(LogLevel::Error < LogLevel::Warn && LogLevel::Info < LogLevel::Debug);
}

/// Quiet by default; `KVCACHE_LOG_LEVEL` chooses; `KVCACHE_DEBUG` on still means debug.
#[test]
fn the_log_level_is_the_variable_else_warn_and_kvcache_debug_means_debug() {
    use LogLevel::*;
    assert_eq!(DEFAULT_LOG_LEVEL, Warn);
    assert_eq!(effective_log_level(None, None), Warn);
    assert_eq!(effective_log_level(None, Some(false)), Warn);
    assert_eq!(effective_log_level(None, Some(true)), Debug);
    for level in LogLevel::ALL {
        assert_eq!(effective_log_level(Some(level), None), level);
        assert_eq!(effective_log_level(Some(level), Some(false)), level);
        assert_eq!(effective_log_level(Some(level), Some(true)), Debug);
    }
}

/// The doctor's list (`VARIABLES`) names every variable the settings read.
#[test]
fn every_variable_read_here_is_in_the_doctors_list() {
    let source = concat!(include_str!("mod.rs"), include_str!("address.rs"));
    let mut names: Vec<&str> = source
        .match_indices("\"KVCACHE_")
        .map(|(at, _)| {
            let rest = &source[at + 1..];
            &rest[..rest.find('"').unwrap()]
        })
        .filter(|name| *name != "KVCACHE_")
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 17, "{names:?}");
    for name in names {
        assert!(
            VARIABLES.iter().any(|(known, _, _)| *known == name),
            "{name} is read but not in VARIABLES"
        );
    }
}

/// Each malformed value names the variable, the value and what is allowed. Run in a
/// child process per case: the environment is process-wide.
#[test]
fn malformed_variables_are_refused_by_name() {
    let cases = [
        ("KVCACHE_IB_TIMEOUT", "99", "14..=31"),
        ("KVCACHE_RELAX_ORDERING", "maybe", "yes/no"),
        ("KVCACHE_RDMA_GID_INDEX", "x", "0..=255"),
        ("KVCACHE_TCP_USER_TIMEOUT_MS", "soon", "0..=3600000"),
        ("KVCACHE_RDMA_TUNING", "chain=0", "out of range"),
        ("KVCACHE_RDMA_TUNING", "speed=3", "names no tuning key"),
        ("KVCACHE_CUDA_COPY_KERNEL", "2", "yes/no"),
        ("KVCACHE_TRANSPORT", "ib", "'auto'"),
        ("KVCACHE_DEBUG", "verbose", "yes/no"),
        ("KVCACHE_LOG_LEVEL", "verbose", "error, warn, info or debug"),
        ("KVCACHE_LOG_LEVEL", "trace", "error, warn, info or debug"),
    ];
    if let Ok(case) = std::env::var("KVT_CONFIG_CASE") {
        let (name, value, allowed) = cases[case.parse::<usize>().unwrap()];
        let err = Settings::from_env().unwrap_err();
        let text = err.to_string();
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
        assert!(
            text.contains(name) && text.contains(value) && text.contains(allowed),
            "{text}"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for (i, (name, value, _)) in cases.iter().enumerate() {
        let status = std::process::Command::new(&exe)
            .args([
                "--exact",
                "config::tests::malformed_variables_are_refused_by_name",
                "--quiet",
            ])
            .env("KVT_CONFIG_CASE", i.to_string())
            .env(name, value)
            // The child's own result line must not count as a test of this run.
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{name}={value} was not refused by name");
    }
}

#[test]
fn rdma_device_lists_are_checked_in_one_place() {
    let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert!(check_rdma_devices("rdmaDevices", &list(&["mlx5_0", "mlx5_1"])).is_ok());
    for (bad, says) in [
        (list(&[]), "names 0 devices; it must name 1..=8"),
        (list(&["m"; 9]), "names 9 devices; it must name 1..=8"),
        (
            list(&["mlx5_0", ""]),
            "entry 1 (\"\") is not an RDMA device name",
        ),
        (
            list(&["mlx5 0"]),
            "entry 0 (\"mlx5 0\") is not an RDMA device name",
        ),
        (list(&["mlx5_0", "mlx5_0"]), "names 'mlx5_0' twice"),
    ] {
        let err = check_rdma_devices("rdmaDevices", &bad).unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
        let text = err.to_string();
        assert!(text.starts_with("invalid rdmaDevices: ["), "{text}");
        assert!(text.contains(says), "{text}");
    }
    // The option is applied over the variable's settings, checked as it is applied.
    let settings = RdmaSettings {
        nics: list(&["rxe0"]),
        devices: None,
        gid_index: None,
        ib_timeout: DEFAULT_IB_TIMEOUT,
        relaxed_ordering: false,
        gdr_flush: false,
        qps_per_peer: DEFAULT_QPS_PER_PEER,
    };
    let both = settings
        .clone()
        .with_devices(Some(list(&["rxe1"])))
        .unwrap();
    assert_eq!(both.devices, Some(list(&["rxe1"])));
    assert_eq!(both.nics, list(&["rxe0"]));
    assert_eq!(settings.clone().with_devices(None).unwrap(), settings);
    let err = settings
        .with_devices(Some(list(&["rxe1", "rxe1"])))
        .unwrap_err();
    assert!(err.to_string().contains("invalid rdmaDevices"));
}
