//! Start-up and developer-workflow figures: one-shot commands timed by hyperfine against an
//! empty Rust binary, and `up` of a small stack.

use super::*;

/// Builds `fn main() {}` with rustc -O in `dir`: the start-up cost of any Rust binary.
pub(crate) fn build_empty(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("empty.rs");
    std::fs::write(&src, "fn main() {}\n")?;
    let empty = dir.join("empty");
    let ok = Command::new("rustc").args(["-O", "-o"]).arg(&empty).arg(&src).status()?.success();
    if !ok {
        bail!("rustc could not build the empty binary");
    }
    Ok(empty)
}

/// Runs `hyperfine -N` on `commands` (with `home` as PORTMESH_HOME); the mean of each, in ms.
pub(crate) fn hyperfine(dir: &Path, home: &Path, commands: &[String]) -> Result<Vec<f64>> {
    let json = dir.join("hyperfine.json");
    let status = Command::new("hyperfine")
        .args(["-N", "--warmup", "20", "--runs", "300", "--export-json"])
        .arg(&json)
        .args(commands)
        .env("PORTMESH_HOME", home)
        .status()
        .context("running hyperfine (install Debian's hyperfine)")?;
    if !status.success() {
        bail!("hyperfine failed");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    Ok((0..commands.len()).map(|i| v["results"][i]["mean"].as_f64().unwrap_or(f64::NAN) * 1e3).collect())
}

/// `portmesh run -- /bin/true` (its cost over /bin/true, against an empty Rust binary's start-up)
/// and `portmesh up -d` of five services that are ready at once, against a warm node.
pub(crate) async fn workflow(bin: &Path, ups: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = build_empty(dir.path())?;
    let server = start_portmesh(bin, 1).await?;
    let node = server.leader_addr().to_string();
    let home = dir.path().join("home");
    let run = format!("{} --node {node} run -- /bin/true", bin.display());
    let means = hyperfine(dir.path(), &home, &["/bin/true".to_string(), empty.display().to_string(), run])?;
    let (t, e, r) = (means[0], means[1], means[2]);
    println!(
        "\nrun: /bin/true {t:.2} ms, empty Rust binary {e:.2} ms, `portmesh run -- /bin/true` {r:.2} ms: \
         run adds {:.2} ms = {:.2}× the empty binary's start-up",
        r - t,
        (r - t) / e
    );

    let project = dir.path().join("portmesh.toml");
    let mut text = String::from("project = \"bench\"\n");
    for i in 1..=5 {
        text.push_str(&format!("[services.s{i}]\ncommand = \"sleep 600\"\ncheck = \"cmd:true\"\n"));
    }
    std::fs::write(&project, text)?;
    let pm = |args: &[&str]| -> Result<Duration> {
        let t0 = Instant::now();
        let out = Command::new(bin)
            .arg("--node")
            .arg(&node)
            .args(args)
            .arg("-f")
            .arg(&project)
            .env("PORTMESH_HOME", &home)
            .output()?;
        if !out.status.success() {
            bail!("portmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t0.elapsed())
    };
    let mut times = Vec::new();
    for _ in 0..ups {
        times.push(pm(&["up", "-d"])?.as_secs_f64() * 1e3);
        pm(&["down"])?;
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "up: 5 services ready at once, command to all healthy: median {:.1} ms (min {min:.1}, max {max:.1}) over {ups} runs",
        median(times)
    );
    Ok(())
}

/// One-shot `portmesh alloc` against a warm node vs an empty Rust binary, with `hyperfine -N`.
pub(crate) async fn startup(bin: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = build_empty(dir.path())?;
    let server = start_portmesh(bin, 1).await?;
    let alloc = format!("{} --node {} alloc bench --key hyperfine", bin.display(), server.leader_addr());
    let means = hyperfine(dir.path(), &dir.path().join("home"), &[empty.display().to_string(), alloc])?;
    let (e, a) = (means[0], means[1]);
    println!(
        "\nstart-up: empty Rust binary {e:.2} ms, one-shot `portmesh alloc` (warm node) {a:.2} ms: {:.2}×",
        a / e
    );
    Ok(())
}

/// `python/bench/startup.py` in the package's test venv: what `import portmesh; port()` and the
/// Flask extension add at start-up (it prints its own table).
pub(crate) fn python_startup(rounds: usize) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let setup =
        Command::new(root.join("python/setup-tests.sh")).output().context("running python/setup-tests.sh")?;
    if !setup.status.success() {
        bail!("python/setup-tests.sh failed: {}", String::from_utf8_lossy(&setup.stderr));
    }
    let stdout = String::from_utf8_lossy(&setup.stdout);
    let python = stdout.lines().last().context("python/setup-tests.sh printed no interpreter")?;
    let status = Command::new(python)
        .arg(root.join("python/bench/startup.py"))
        .args(["--rounds", &rounds.to_string()])
        .status()
        .context("running python/bench/startup.py")?;
    if !status.success() {
        bail!("python/bench/startup.py failed");
    }
    Ok(())
}
