//! The `kvault` CLI against a real server: import, export, stat, rm, profiles,
//! and its errors on bad files.

use kvault_codec::Dtype;
use kvault_tests::{TestServer, ids, kvault, random_kv, smol_layout, write_kv_file};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn import_export_round_trip_and_summary_line() {
    let srv = TestServer::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    let layout = smol_layout("cli", Dtype::F16, 256);
    let kv = random_kv(&layout, 600, 11);
    let ids = ids(600, 11);
    let file = write_kv_file(dir.path(), "in.safetensors", &kv, &ids);
    let f = file.to_str().unwrap();

    let o = kvault(&["import", "--server", &url, "--model-id", "cli", "--file", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    let fields: std::collections::HashMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    assert_eq!(fields["chunks"], 3);
    assert_eq!(fields["new"], 3);
    assert_eq!(fields["fp16_bytes"], 600 * 30 * 2 * 3 * 64 * 2);
    assert!(fields["stored_bytes"] > 0);

    // Again: nothing new, same sizes, as JSON.
    let o = kvault(&[
        "import",
        "--server",
        &url,
        "--model-id",
        "cli",
        "--file",
        f,
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"new\":0"), "{}", stdout(&o));

    let out = dir.path().join("out.safetensors");
    let o = kvault(&[
        "export",
        "--server",
        &url,
        "--model-id",
        "cli",
        "--ids",
        f,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("found 600 of 600 tokens"), "{}", stdout(&o));
    let back = kvault_client::kv_file::read(&out).unwrap();
    assert!(back.kv.data() == kv.data());
    assert_eq!(back.ids, ids);

    // Export as f32: the same values, widened.
    let out32 = dir.path().join("out32.safetensors");
    let o = kvault(&[
        "export",
        "--server",
        &url,
        "--model-id",
        "cli",
        "--ids",
        f,
        "--out",
        out32.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let back32 = kvault_client::kv_file::read(&out32).unwrap();
    let mut want = vec![0u8; back32.kv.data().len()];
    kvault_codec::convert(kv.data(), Dtype::F16, &mut want, Dtype::F32).unwrap();
    assert!(back32.kv.data() == &want[..]);

    let o = kvault(&["stat", "--server", &url]);
    assert!(o.status.success());
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("ram") && l.contains(" 3 ")),
        "{}",
        stdout(&o)
    );

    let o = kvault(&["rm", "--server", &url, "--model-id", "cli", "--ids", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("deleted=3"), "{}", stdout(&o));
    let o = kvault(&[
        "export",
        "--server",
        &url,
        "--model-id",
        "cli",
        "--ids",
        f,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout(&o).contains("found 0 of 600"), "{}", stdout(&o));
}

#[test]
fn bad_files_give_clear_errors_and_store_nothing() {
    let srv = TestServer::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    let run = |path: &std::path::Path| {
        kvault(&[
            "import",
            "--server",
            &url,
            "--model-id",
            "bad",
            "--file",
            path.to_str().unwrap(),
        ])
    };

    let missing = dir.path().join("missing.safetensors");
    let o = run(&missing);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.safetensors"), "{}", stderr(&o));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json").unwrap();
    let o = run(&garbage);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a valid safetensors file"),
        "{}",
        stderr(&o)
    );

    // ids and kv disagree on the token count.
    let layout = smol_layout("bad", Dtype::F16, 256);
    let kv = random_kv(&layout, 50, 1);
    let p = write_kv_file(dir.path(), "mismatch.safetensors", &kv, &ids(49, 1));
    let o = run(&p);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`ids` has 49 tokens"), "{}", stderr(&o));

    let o = kvault(&["stat", "--server", &url, "--json"]);
    assert!(stdout(&o).contains("\"chunks\":0"), "{}", stdout(&o));

    // Export of an unknown model id.
    let ok = write_kv_file(dir.path(), "ok.safetensors", &kv, &ids(50, 1));
    let o = kvault(&[
        "export",
        "--server",
        &url,
        "--model-id",
        "nobody",
        "--ids",
        ok.to_str().unwrap(),
        "--out",
        "/dev/null",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no registered layout"), "{}", stderr(&o));
}

#[test]
fn bench_attend_refuses_empty_settings_before_measuring() {
    for (flag, value) in [
        ("--streams", "0"),
        ("--rounds-per-layout", "0"),
        ("--tokens", "0"),
    ] {
        let o = kvault(&["bench", "attend", flag, value]);
        assert!(!o.status.success(), "{flag} {value} was taken");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("must be positive"), "{flag} {value}: {err}");
    }
}

#[test]
fn profiles_lists_names_first() {
    let o = kvault(&["profiles"]);
    assert!(o.status.success());
    let names: Vec<String> = stdout(&o)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert!(names.contains(&"lossless".to_string()), "{names:?}");
}

#[test]
fn unreachable_server_fails_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = kvault(&["stat", "--server", &format!("http://127.0.0.1:{port}")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unavailable"), "{}", stderr(&o));
}
