//! The process's allocator: jemalloc, and the one thing the binary asks of it beyond
//! allocating.

use std::time::Instant;

use tikv_jemalloc_ctl::{Access, AsName as _, arenas, epoch, stats};

/// Gives back to the system, now, the pages the start-up load freed.
///
/// Loading a million customers parses about a gigabyte that is freed once the table is
/// compiled. Left to the background thread, that memory is purged about ten seconds
/// into serving, in one pass that holds the arenas' locks for 170–480 ms; every
/// allocation of a large block meanwhile (a customer write rebuilds a shard of the
/// customer table) waits for it (`bash benches/write_load.sh`). Purging before the
/// first request moves that pause into start-up, where nothing waits on it.
///
/// jemalloc purges an arena's dirty pages at once when its decay time is set to 0;
/// the time is then set back, so later frees are returned on the usual timer.
pub fn give_back_start_up_memory() {
    let started = Instant::now();
    let resident = || {
        epoch::advance().ok()?;
        stats::resident::read().ok()
    };
    let before = resident();
    let arenas = match arenas::narenas::read() {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "allocator arenas not readable; start-up memory left to the background purge");
            return;
        }
    };
    for arena in 0..arenas {
        for kind in ["dirty", "muzzy"] {
            let name = format!("arena.{arena}.{kind}_decay_ms\0");
            let key = name.as_str().name();
            // Arenas not initialised yet answer an error: nothing to purge there.
            if let Ok(decay) = Access::<isize>::read(key)
                && decay != 0
            {
                let _ = key.write(0isize);
                let _ = key.write(decay);
            }
        }
    }
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        resident_before_mb = before.map(|b| b >> 20),
        resident_after_mb = resident().map(|b| b >> 20),
        "start-up memory given back to the system"
    );
}
