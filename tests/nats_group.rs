//! A group's leases against the real NATS server (`NATS_URL` or 127.0.0.1:4222; skipped,
//! saying so, when none answers, unless SLUICE_REQUIRE_NATS=1): two members split four
//! partitions; a member that stops renewing finds its leases lapsed after 2 lease periods,
//! before any renewal is refused, and the other takes its partitions once they expire; a
//! member that leaves hands its partitions over at once; a member given other partitions is
//! refused.

use async_nats::jetstream;
use sluice::nats::group::{Group, GroupConfig};
use std::time::{Duration, Instant};

mod real_nats;

const PARTITIONS: u32 = 4;

fn held(group: &Group) -> Vec<u32> {
    let leases = group.leases();
    (0..PARTITIONS).filter(|&p| leases.epoch(p) != 0).collect()
}

/// Ticks `group` every period until `done` holds of it, for at most `periods` periods.
async fn tick_until(group: &mut Group, periods: u32, done: impl Fn(&Group) -> bool) -> bool {
    for _ in 0..periods {
        group.tick().await;
        if done(group) {
            return true;
        }
        tokio::time::sleep(group.period()).await;
    }
    false
}

#[tokio::test]
async fn members_split_partitions_and_take_over_a_stalled_ones() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let name = format!("leases{}", std::process::id());
    let config = GroupConfig {
        server: url.clone(),
        name: name.clone(),
        partitions: PARTITIONS,
        lease: Duration::from_millis(300),
    };
    let mut a = Group::join(&js, &config, "a").await.unwrap();
    assert_eq!(a.period(), Duration::from_millis(300));
    // Nothing is taken in the first period: the others must see this member first.
    assert!(a.tick().await.gained.is_empty());
    assert!(
        tick_until(&mut a, 3, |g| held(g).len() == 4).await,
        "a alone takes all"
    );

    // b joins: a gives up two (fenced at once), b takes them.
    let mut b = Group::join(&js, &config, "b").await.unwrap();
    tokio::time::sleep(b.period()).await;
    let given = a.tick().await;
    assert_eq!(given.lost.len(), 2, "a gives up what is beyond its share");
    for &p in &given.lost {
        assert_eq!(a.leases().epoch(p), 0, "fenced before it is given up");
    }
    assert!(
        tick_until(&mut b, 3, |g| held(g).len() == 2).await,
        "b takes its share"
    );
    let (mine, theirs) = (held(&a), held(&b));
    assert!(
        mine.iter().all(|p| !theirs.contains(p)),
        "{mine:?} {theirs:?}"
    );

    // a stalls: its leases lapse (for publishing) 2 periods after its last renewal, with no
    // word from the server; b takes them once they expire there (3 periods).
    let leases = a.leases();
    let epochs: Vec<(u32, u64)> = mine.iter().map(|&p| (p, leases.epoch(p))).collect();
    assert!(epochs.iter().all(|&(p, e)| leases.holds(p, e)));
    let stalled = Instant::now();
    tokio::time::sleep(a.period() * 2 + Duration::from_millis(50)).await;
    assert!(
        epochs.iter().all(|&(p, e)| !leases.holds(p, e)),
        "lapsed after 2 periods without a renewal"
    );
    assert!(
        tick_until(&mut b, 20, |g| held(g).len() == 4).await,
        "b takes the stalled member's partitions"
    );
    assert!(
        stalled.elapsed() >= b.period() * 3,
        "taken before the leases expired"
    );
    // a wakes: its renewals are refused, it takes nothing (b holds everything).
    let woke = a.tick().await;
    assert_eq!(woke.lost, mine, "a learns it lost them");
    assert!(held(&a).is_empty());

    // b leaves: a takes everything at its next ticks, without waiting for an expiry.
    b.leave().await;
    let left = Instant::now();
    assert!(tick_until(&mut a, 3, |g| held(g).len() == 4).await);
    assert!(left.elapsed() < a.period() * 3, "{:?}", left.elapsed());
    a.leave().await;
    // A member given other partitions is refused, naming both.
    let other = GroupConfig {
        partitions: PARTITIONS + 2,
        ..config.clone()
    };
    let refused = Group::join(&js, &other, "c").await.err().expect("refused");
    assert!(
        refused.reason.contains("4 partitions") && refused.reason.contains("given 6"),
        "{refused}"
    );
    let _ = js.delete_key_value(format!("sluice_group_{name}")).await;
}
