//! Seeds for reproducible execution (`--seed`): how one run seed becomes one seed per slot, and
//! the fixed instant a seeded slot's clocks start at.
//!
//! The rule, written once so every backend and the rollout follow it:
//! - a run seed `N` and a trajectory give a slot seed [`derive_slot_seed`]`(N, id, sample)`, so
//!   different trajectories (and the samples of one group) see different streams, and each one
//!   repeats on every run;
//! - a forked slot gets [`derive_fork_seed`]`(parent, fork_index)`, so two branches of one parent
//!   differ, and the same branch of the same parent repeats;
//! - a slot seed is used as it is: a backend never derives again from one it is given.
//!
//! Both derivations are SHA-256 over a labelled encoding of their inputs, so they do not change
//! with the Rust toolchain or a dependency's version, and a recorded slot seed can be replayed
//! by any later rollbox. docs/reproducibility.md says what a seed makes deterministic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Where a seeded slot's wall clock starts: 2025-01-01T00:00:00Z, as seconds since the Unix epoch.
pub const DEFAULT_VIRTUAL_EPOCH_SECS: u64 = 1_735_689_600;

/// The slot seed of sample `sample_index` of trajectory `trajectory_id` in a run seeded with
/// `seed`. Pure: the same inputs give the same seed on every machine and rollbox version.
///
/// ```
/// use rollbox::seed::derive_slot_seed;
/// assert_eq!(derive_slot_seed(7, "p1", 0), derive_slot_seed(7, "p1", 0));
/// assert_ne!(derive_slot_seed(7, "p1", 0), derive_slot_seed(7, "p1", 1));
/// assert_ne!(derive_slot_seed(7, "p1", 0), derive_slot_seed(8, "p1", 0));
/// ```
pub fn derive_slot_seed(seed: u64, trajectory_id: &str, sample_index: u64) -> u64 {
    // The id's length goes first so that no two (id, index) pairs encode to the same bytes.
    derive(
        b"rollbox slot seed v1",
        &[
            &seed.to_le_bytes(),
            &(trajectory_id.len() as u64).to_le_bytes(),
            trajectory_id.as_bytes(),
            &sample_index.to_le_bytes(),
        ],
    )
}

/// The seed of the `fork_index`-th fork of a slot seeded with `parent_seed`: each branch gets a
/// stream of its own, and the same branch of the same parent repeats.
///
/// ```
/// use rollbox::seed::derive_fork_seed;
/// assert_ne!(derive_fork_seed(42, 0), derive_fork_seed(42, 1));
/// assert_ne!(derive_fork_seed(42, 0), 42);
/// ```
pub fn derive_fork_seed(parent_seed: u64, fork_index: u64) -> u64 {
    derive(
        b"rollbox fork seed v1",
        &[&parent_seed.to_le_bytes(), &fork_index.to_le_bytes()],
    )
}

/// The 32-byte key of a slot's entropy stream (a ChaCha20 generator), from its slot seed.
pub fn stream_key(slot_seed: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"rollbox entropy stream v1");
    hasher.update(slot_seed.to_le_bytes());
    hasher.finalize().into()
}

fn derive(label: &[u8], parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(label);
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Parses the start of a seeded slot's wall clock: an RFC 3339 UTC instant
/// (`2025-01-01T00:00:00Z`) or whole seconds since the Unix epoch.
pub fn parse_virtual_epoch(text: &str) -> Result<SystemTime, InvalidEpoch> {
    let invalid = || InvalidEpoch(text.to_string());
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_secs(secs));
    }
    let (date, time) = text
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .ok_or_else(invalid)?;
    let number = |s: &str| s.parse::<u64>().map_err(|_| invalid());
    let date: Vec<&str> = date.split('-').collect();
    let time: Vec<&str> = time.split(':').collect();
    let ([y, mo, d], [h, mi, s]) = (date.as_slice(), time.as_slice()) else {
        return Err(invalid());
    };
    let (year, month, day) = (number(y)?, number(mo)?, number(d)?);
    let (hour, minute, second) = (number(h)?, number(mi)?, number(s)?);
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 59
    {
        return Err(invalid());
    }
    let days = days_from_civil(year, month, day);
    Ok(UNIX_EPOCH + Duration::from_secs(days * 86_400 + hour * 3_600 + minute * 60 + second))
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`, for years from 1970 on).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A virtual clock start that is neither an RFC 3339 UTC instant nor Unix seconds.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a clock start: give a UTC instant such as 2025-01-01T00:00:00Z, or seconds since the Unix epoch")]
pub struct InvalidEpoch(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_epoch_is_2025_01_01() {
        let parsed = parse_virtual_epoch("2025-01-01T00:00:00Z").expect("a valid instant");
        assert_eq!(parsed, UNIX_EPOCH + Duration::from_secs(DEFAULT_VIRTUAL_EPOCH_SECS));
        let leap = parse_virtual_epoch("2024-02-29T12:30:05Z").expect("a valid instant");
        assert_eq!(
            leap.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok(),
            Some(1_709_209_805)
        );
        assert!(parse_virtual_epoch("2025-13-01T00:00:00Z").is_err());
        assert!(parse_virtual_epoch("yesterday").is_err());
    }

    #[test]
    fn derived_seeds_are_pinned() {
        // Recorded seeds must replay on later versions: the derivation may never change.
        assert_eq!(derive_slot_seed(7, "p1", 0), 16_357_198_533_966_543_222);
        assert_eq!(derive_fork_seed(42, 0), 236_133_594_954_195_895);
        assert_ne!(derive_slot_seed(7, "p1/0", 0), derive_slot_seed(7, "p1", 0));
        assert_ne!(
            derive_fork_seed(derive_slot_seed(7, "p1", 0), 0),
            derive_slot_seed(7, "p1", 0)
        );
    }
}
