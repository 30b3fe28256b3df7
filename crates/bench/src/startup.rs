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

/// Runs `hyperfine -N` on `commands` (with `home` as PORTMESH_HOME), `runs` times each; the
/// median of each, in ms (the median: this machine is shared, and one slow run moves a mean).
pub(crate) fn hyperfine(dir: &Path, home: &Path, commands: &[String], runs: usize) -> Result<Vec<f64>> {
    let json = dir.join("hyperfine.json");
    let status = Command::new("hyperfine")
        .args(["-N", "--style", "none", "--warmup", "10", "--runs", &runs.to_string(), "--export-json"])
        .arg(&json)
        .args(commands)
        .env("PORTMESH_HOME", home)
        .status()
        .context("running hyperfine (install Debian's hyperfine)")?;
    if !status.success() {
        bail!("hyperfine failed");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    Ok((0..commands.len()).map(|i| v["results"][i]["median"].as_f64().unwrap_or(f64::NAN) * 1e3).collect())
}

/// A local node in `home`, as a developer has one: started by the CLI itself (`alloc`), stopped
/// (`stop`) when dropped.
struct LocalNode<'a> {
    bin: &'a Path,
    home: PathBuf,
}

impl<'a> LocalNode<'a> {
    fn start(bin: &'a Path, home: PathBuf) -> Result<LocalNode<'a>> {
        let out = Command::new(bin).args(["alloc", "warm-up"]).env("PORTMESH_HOME", &home).output()?;
        if !out.status.success() {
            bail!("starting a local node: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(LocalNode { bin, home })
    }
}

impl Drop for LocalNode<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.bin).arg("stop").env("PORTMESH_HOME", &self.home).output();
    }
}

/// Times `cmds` with hyperfine (PORTMESH_HOME `home`), next to an empty Rust binary and `extra`,
/// over `rounds` rounds, the order reversed every other round. Prints each round and returns the
/// median over rounds of each, in the order: empty binary, `extra`, then `cmds`.
fn alternate(
    dir: &Path,
    home: &Path,
    extra: Option<&str>,
    cmds: &[String],
    rounds: usize,
) -> Result<Vec<f64>> {
    let empty = build_empty(dir)?.display().to_string();
    let mut all: Vec<String> = std::iter::once(empty).chain(extra.map(str::to_string)).collect();
    all.extend(cmds.iter().cloned());
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    for round in 0..rounds.max(1) {
        let mut order: Vec<usize> = (0..all.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let cmds: Vec<String> = order.iter().map(|&i| all[i].clone()).collect();
        let got = hyperfine(dir, home, &cmds, 100)?;
        let mut line = format!("  round {}:", round + 1);
        for (k, &i) in order.iter().enumerate() {
            per[i].push(got[k]);
        }
        for (i, c) in all.iter().enumerate() {
            line.push_str(&format!(" [{}] {:.2} ms", short(c), per[i][round]));
        }
        println!("{line}");
    }
    Ok(per.into_iter().map(median).collect())
}

/// A command as printed: the binary's file name and the arguments.
fn short(cmd: &str) -> String {
    let mut words = cmd.split(' ');
    let bin = words.next().map(|b| Path::new(b).file_name().map(|f| f.to_string_lossy().into_owned()));
    std::iter::once(bin.flatten().unwrap_or_default())
        .chain(words.map(str::to_string))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `portmesh run -- /bin/true` (its cost over /bin/true, against an empty Rust binary's start-up)
/// with the local node a developer has, and `portmesh up -d` of five services that are ready at
/// once, against a warm node. With `against`, that binary's `run` too, in alternating rounds.
pub(crate) async fn workflow(bin: &Path, against: Option<&Path>, rounds: usize, ups: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home");
    let _local = LocalNode::start(bin, home.clone())?;
    let cmds: Vec<String> =
        std::iter::once(bin).chain(against).map(|b| format!("{} run -- /bin/true", b.display())).collect();
    println!("\nrun -- /bin/true (local node, hyperfine medians, {rounds} rounds of 100 runs):");
    let m = alternate(dir.path(), &home, Some("/bin/true"), &cmds, rounds)?;
    let (e, t, r) = (m[0], m[1], m[2]);
    println!(
        "run: /bin/true {t:.2} ms, empty Rust binary {e:.2} ms, `portmesh run -- /bin/true` {r:.2} ms: \
         run adds {:.2} ms = {:.2}× the empty binary's start-up",
        r - t,
        (r - t) / e
    );
    if let Some(old) = m.get(3) {
        println!(
            "run against {}: adds {:.2} ms; new/old {:.2}×",
            short(&cmds[1]),
            old - t,
            (r - t) / (old - t)
        );
    }

    let server = start_portmesh(bin, 1).await?;
    let node = server.leader_addr().to_string();
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

/// One-shot `portmesh alloc` against a warm node vs an empty Rust binary, with `hyperfine -N`:
/// through the local node (found by its `node.json`, as a developer's CLI finds it) and through
/// `--node ADDR` (as a CI job names its cluster). With `against`, that binary's too, in
/// alternating rounds.
pub(crate) async fn startup(bin: &Path, against: Option<&Path>, rounds: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home");
    let _local = LocalNode::start(bin, home.clone())?;
    let server = start_portmesh(bin, 1).await?;
    let addr = server.leader_addr();
    let bins: Vec<&Path> = std::iter::once(bin).chain(against).collect();
    let mut cmds: Vec<String> =
        bins.iter().map(|b| format!("{} alloc bench --key hyperfine", b.display())).collect();
    cmds.extend(bins.iter().map(|b| format!("{} --node {addr} alloc bench --key hyperfine", b.display())));
    println!("\nstart-up (hyperfine medians, {rounds} rounds of 100 runs):");
    let m = alternate(dir.path(), &home, None, &cmds, rounds)?;
    let e = m[0];
    let n = bins.len();
    for (i, how) in [(1, "local node"), (1 + n, "--node")] {
        println!(
            "start-up: empty Rust binary {e:.2} ms, one-shot `portmesh alloc` ({how}, warm) {:.2} ms: {:.2}×",
            m[i],
            m[i] / e
        );
        if n == 2 {
            println!("  against {}: {:.2} ms; new/old {:.2}×", short(&cmds[i]), m[i + 1], m[i] / m[i + 1]);
        }
    }
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

/// Time from `portmesh serve` on an existing one-node data directory to its "listening" line, in
/// ms: the node is started `n` times after the bootstrap that made the directory (stopped with
/// SIGTERM each time). With `against`, that binary too, on a directory of its own, the two
/// binaries alternating start by start.
pub(crate) fn restarts(bin: &Path, against: Option<&Path>, n: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bins: Vec<&Path> = std::iter::once(bin).chain(against).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    for (i, b) in bins.iter().enumerate() {
        serve_until_listening(b, &dir.path().join(format!("data{i}")), true)?;
    }
    for _ in 0..n {
        for (i, b) in bins.iter().enumerate() {
            let t = serve_until_listening(b, &dir.path().join(format!("data{i}")), false)?;
            times[i].push(t.as_secs_f64() * 1e3);
        }
    }
    println!("\nrestart of a single node, `serve` to its listening line ({n} restarts each):");
    for (b, t) in bins.iter().zip(times) {
        let min = t.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.iter().copied().fold(0.0, f64::max);
        println!("restart: {}: median {:.1} ms (min {min:.1}, max {max:.1})", b.display(), median(t));
    }
    Ok(())
}

/// Starts `bin serve` on `data` (bootstrapping it when `bootstrap`), waits for its listening line
/// on stderr, stops it with SIGTERM and waits for it to exit; the time to the line.
fn serve_until_listening(bin: &Path, data: &Path, bootstrap: bool) -> Result<Duration> {
    use std::io::BufRead;
    let home = data.with_extension("home");
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--home")
        .arg(&home)
        .args(bootstrap.then_some("--bootstrap"))
        .env("PORTMESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let listening = lines.by_ref().map_while(|l| l.ok()).any(|l| l.contains("portmesh node listening"));
    let elapsed = t0.elapsed();
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) on the pid of a child this function spawned and has not waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Drain the rest of its log so it never blocks on a full pipe while it stops.
    lines.for_each(drop);
    child.wait()?;
    if !listening {
        bail!("{} serve on {} exited before it said it listens", bin.display(), data.display());
    }
    Ok(elapsed)
}
