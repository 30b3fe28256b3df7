//! The Python package (`python/`): `pip install ./python` in a fresh venv (maturin from PyPI
//! builds the executable), its own tests (pytest, `python/tests`) against the node it starts, its
//! sources checked to run on Python 3.9, and a wheel installed where no Rust toolchain is.
//!
//! A test binary of its own, not a module of `e2e`: maturin builds the `portmesh` binary into the
//! tests' target directory, relinking `target/debug/portmesh` (the file every e2e test runs), and
//! Cargo runs test binaries one after another, never two at once.

use std::process::Command;

/// Issue 18: `pip install ./python` in a fresh venv (maturin from PyPI builds the executable),
/// the package's own tests (pytest, `python/tests`) against the node it starts, its sources
/// checked to run on Python 3.9 (vermin), and a wheel built once installed into a second fresh
/// venv with no Rust toolchain on PATH, where both the command and the package work.
#[test]
fn the_python_package_installs_with_pip_passes_its_tests_and_its_wheel_needs_no_rust() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // The build's own target directory, so maturin reuses what Cargo built for the tests.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
    let setup = Command::new(format!("{root}/python/setup-tests.sh"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run setup-tests.sh");
    assert!(setup.status.success(), "setup-tests.sh failed: {}", String::from_utf8_lossy(&setup.stderr));
    let python = String::from_utf8_lossy(&setup.stdout).lines().last().unwrap().to_string();
    let bin = std::path::Path::new(&python).parent().unwrap().to_path_buf();

    let home = tempfile::tempdir().unwrap();
    let pytest = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(format!("{root}/python"))
        .env("PORTMESH_HOME", home.path())
        .env_remove("PORTMESH_NODE")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&pytest.stdout);
    assert!(pytest.status.success(), "pytest failed:\n{said}\n{}", String::from_utf8_lossy(&pytest.stderr));
    assert!(said.contains(" passed"), "{said}");

    // Python 3.9: the package's sources, and the check can fail (a 3.10 `match`).
    let vermin = |path: &str| {
        Command::new(bin.join("vermin"))
            .args(["-t=3.9-", "--violations", "--no-tips", path])
            .output()
            .unwrap()
    };
    let v = vermin(&format!("{root}/python/src"));
    assert!(
        v.status.success(),
        "the package needs a newer Python than 3.9: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    let newer = tempfile::tempdir().unwrap();
    std::fs::write(newer.path().join("m.py"), "match 1:\n    case 1:\n        pass\n").unwrap();
    assert!(!vermin(newer.path().to_str().unwrap()).status.success(), "vermin catches 3.10 syntax");

    // A wheel, built once, into a fresh venv with no Rust on PATH.
    let work = tempfile::tempdir().unwrap();
    let wheels = work.path().join("wheels");
    let built = Command::new(bin.join("maturin"))
        .args(["build", "--profile", "dev", "--out"])
        .arg(&wheels)
        .current_dir(format!("{root}/python"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(built.status.success(), "maturin build: {}", String::from_utf8_lossy(&built.stderr));
    let wheel = std::fs::read_dir(&wheels).unwrap().next().unwrap().unwrap().path();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        wheel.file_name().unwrap().to_string_lossy().starts_with(&format!("portmesh-{version}-")),
        "the wheel has the workspace's version: {wheel:?}"
    );
    let fresh = work.path().join("fresh");
    assert!(Command::new("python3").arg("-m").arg("venv").arg(&fresh).status().unwrap().success());
    let no_rust = "/usr/local/bin:/usr/bin:/bin";
    let install = Command::new(fresh.join("bin/pip"))
        .args(["install", "--quiet", "--no-index", "--disable-pip-version-check"])
        .arg(&wheel)
        .env("PATH", no_rust)
        .output()
        .unwrap();
    assert!(install.status.success(), "pip install the wheel: {}", String::from_utf8_lossy(&install.stderr));
    let wheel_home = work.path().join("home");
    let run = |cmd: &std::path::Path, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .env("PATH", no_rust)
            .env("PORTMESH_HOME", &wheel_home)
            .env_remove("PORTMESH_NODE")
            .env_remove("PORTMESH_BIN")
            .output()
            .unwrap()
    };
    let v = run(&fresh.join("bin/portmesh"), &["--version"]);
    assert!(String::from_utf8_lossy(&v.stdout).contains(version), "{v:?}");
    let p = run(
        &fresh.join("bin/python"),
        &["-c", "import portmesh; print(portmesh.__version__, portmesh.port('web', key='wheel/web'))"],
    );
    let out = String::from_utf8_lossy(&p.stdout).to_string();
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let (v, port) = out.trim().split_once(' ').unwrap();
    assert_eq!(v, version);
    assert!(port.parse::<u16>().is_ok(), "{out}");
    run(&fresh.join("bin/portmesh"), &["stop"]);
}
