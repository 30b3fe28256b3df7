//! The log's write path alone, outside any node: one small entry made durable at a time, the way
//! the store does it (a sled insert, sled's flush, an `fdatasync` of sled's file) against a plain
//! append-only file (`write` + `fdatasync`) and a preallocated, zeroed one (`pwrite` +
//! `fdatasync`, no size change to record). It says what a journal of our own in front of sled
//! would save per write, before anyone builds one (docs/benchmarks.md, fourteenth slice).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;

/// One way of writing: `writes` durable writes into a directory, each one's time.
type Way = fn(&Path, usize) -> Result<Vec<Duration>>;

/// Bytes of one entry: an allocation's log entry is ~180 bytes.
const ENTRY: usize = 180;

/// `writes` durable writes per way and round, `rounds` rounds in alternating order, in a
/// temporary directory (`TMPDIR` chooses the device).
pub(crate) fn log_writes(writes: usize, rounds: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "# log writes: {writes} durable writes of {ENTRY} bytes per way and round, in {}",
        dir.path().display()
    );
    let ways: [(&str, Way); 3] = [
        ("sled insert + flush + fdatasync", sled_way),
        ("append + fdatasync", append_way),
        ("zeroed file: pwrite + fdatasync", zeroed_way),
    ];
    let mut medians: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..ways.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (name, way) = ways[i];
            let sub = dir.path().join(format!("r{round}-{i}"));
            std::fs::create_dir_all(&sub)?;
            let mut lat = way(&sub, writes)?;
            lat.sort_unstable();
            let ms = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
            println!(
                "round {} {name:<32} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms",
                round + 1,
                ms(0.5),
                ms(0.9),
                ms(0.99)
            );
            medians[i].push(ms(0.5));
            std::fs::remove_dir_all(&sub)?;
        }
    }
    for ((name, _), m) in ways.iter().zip(medians) {
        println!("{name:<32} p50 median of rounds {:.3} ms", crate::median(m));
    }
    Ok(())
}

fn timed(writes: usize, mut write: impl FnMut(usize) -> Result<()>) -> Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        write(i)?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// As the store writes one log entry: configured as `Store::open` configures sled.
fn sled_way(dir: &Path, writes: usize) -> Result<Vec<Duration>> {
    let db = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(4 << 20)
        .flush_every_ms(None)
        .mode(sled::Mode::LowSpace)
        .open()?;
    let log = db.open_tree("log")?;
    let file = std::fs::File::open(dir.join("sled").join("db"))?;
    let entry = [7u8; ENTRY];
    timed(writes, |i| {
        log.insert((i as u64).to_be_bytes(), &entry[..])?;
        db.flush()?;
        file.sync_data()?;
        Ok(())
    })
}

fn append_way(dir: &Path, writes: usize) -> Result<Vec<Duration>> {
    let mut file = std::fs::File::create(dir.join("journal"))?;
    let entry = [7u8; ENTRY];
    timed(writes, |_| {
        file.write_all(&entry)?;
        file.sync_data()?;
        Ok(())
    })
}

fn zeroed_way(dir: &Path, writes: usize) -> Result<Vec<Duration>> {
    let file = std::fs::File::create(dir.join("journal"))?;
    file.write_all_at(&vec![0u8; writes * ENTRY], 0)?;
    file.sync_all()?;
    let entry = [7u8; ENTRY];
    timed(writes, |i| {
        file.write_all_at(&entry, (i * ENTRY) as u64)?;
        file.sync_data()?;
        Ok(())
    })
}
