//! Hit-ratio simulation of the two-tier option (k8s/overlays/two-tier): N cache replicas
//! behind an edge tier that routes by a consistent hash of the cache key, against one
//! unsharded cache of the same total size, and against the same N replicas behind
//! round-robin (what a plain Service gives: every replica caches the same hot set).
//!
//! The workload is a Zipf popularity over a fixed catalogue of equal-size objects; every
//! cache is an LRU bounded in entries (the filter evicts least-recently-used first). The
//! ring is built like Envoy's `ring_hash` (each host hashed onto the ring many times, a key
//! goes to the first host clockwise) with a 64-bit hash of our own, so figures are close to,
//! not identical with, Envoy's xxHash ring.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::Error;

/// What to simulate.
pub struct Params {
    /// Cache replicas (pods of the cache tier).
    pub replicas: usize,
    /// Distinct objects (cache keys) in the catalogue.
    pub objects: usize,
    /// Requests to replay; the first fifth warms the caches and is not counted.
    pub requests: usize,
    /// Zipf exponent of popularity (about 0.6 .. 1.0 for web content).
    pub zipf_s: f64,
    /// Entries each replica's cache holds.
    pub capacity_per_replica: usize,
    /// Seed of the request stream.
    pub seed: u64,
}

/// splitmix64: a small, well-mixed PRNG, plenty for a workload generator.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the bytes, then the splitmix finaliser for avalanche.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// Zipf sampler by inverse CDF over precomputed cumulative weights.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for rank in 1..=n {
            acc += 1.0 / (rank as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut SplitMix) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// An LRU set of keys bounded in entries, O(1) per access (slab-backed doubly linked list).
pub struct Lru {
    capacity: usize,
    map: HashMap<u64, usize>,
    keys: Vec<u64>,
    prev: Vec<usize>,
    next: Vec<usize>,
    head: usize,
    tail: usize,
}

const NIL: usize = usize::MAX;

impl Lru {
    /// An empty cache of `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            map: HashMap::with_capacity(capacity),
            keys: Vec::with_capacity(capacity),
            prev: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
        }
    }

    fn unlink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n] = p;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.prev[i] = NIL;
        self.next[i] = self.head;
        if self.head != NIL {
            self.prev[self.head] = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    /// Looks `key` up; on a miss stores it (evicting the least recently used). True on a hit.
    pub fn access(&mut self, key: u64) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if let Some(&i) = self.map.get(&key) {
            self.unlink(i);
            self.push_front(i);
            return true;
        }
        let i = if self.keys.len() < self.capacity {
            self.keys.push(key);
            self.prev.push(NIL);
            self.next.push(NIL);
            self.keys.len() - 1
        } else {
            let victim = self.tail;
            self.unlink(victim);
            self.map.remove(&self.keys[victim]);
            self.keys[victim] = key;
            victim
        };
        self.map.insert(key, i);
        self.push_front(i);
        false
    }
}

/// A consistent-hash ring: each host at `points` positions; a key maps to the first clockwise.
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Hosts `0..hosts`, each placed `per_host` times.
    pub fn new(hosts: usize, per_host: usize) -> Self {
        let mut points = Vec::with_capacity(hosts * per_host);
        for h in 0..hosts {
            for v in 0..per_host {
                points.push((hash(format!("cache-{h}_{v}").as_bytes()), h));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The host for a key hash.
    pub fn host(&self, key_hash: u64) -> usize {
        let i = self.points.partition_point(|&(p, _)| p < key_hash);
        self.points[i % self.points.len()].1
    }
}

/// Ring points per host for `hosts` hosts: the edge router's `minimum_ring_size: 4096`
/// (k8s/overlays/two-tier/edge-router.yaml) shared among them.
fn points_per_host(hosts: usize) -> usize {
    (4096 / hosts).max(1)
}

fn key_hash(object: usize) -> u64 {
    // The cache key is the URL; the edge tier hashes it (authority + path).
    hash(format!("http://www.example.com/objects/{object}").as_bytes())
}

struct Outcome {
    hits: u64,
    counted: u64,
    per_replica: Vec<u64>,
}

impl Outcome {
    fn ratio(&self) -> f64 {
        self.hits as f64 / self.counted.max(1) as f64
    }
}

#[derive(Clone, Copy)]
enum Routing {
    Unsharded,
    RoundRobin,
    Ring,
}

fn simulate(p: &Params, routing: Routing, stream: &[usize], hashes: &[u64]) -> Outcome {
    let replicas = match routing {
        Routing::Unsharded => 1,
        _ => p.replicas,
    };
    let capacity = match routing {
        Routing::Unsharded => p.capacity_per_replica * p.replicas,
        _ => p.capacity_per_replica,
    };
    let mut caches: Vec<Lru> = (0..replicas).map(|_| Lru::new(capacity)).collect();
    let ring = Ring::new(p.replicas, points_per_host(p.replicas));
    let warm = stream.len() / 5;
    let mut out = Outcome {
        hits: 0,
        counted: 0,
        per_replica: vec![0; replicas],
    };
    for (n, &obj) in stream.iter().enumerate() {
        let h = hashes[obj];
        let r = match routing {
            Routing::Unsharded => 0,
            Routing::RoundRobin => n % replicas,
            Routing::Ring => ring.host(h),
        };
        let hit = caches[r].access(h);
        if n >= warm {
            out.counted += 1;
            out.per_replica[r] += 1;
            if hit {
                out.hits += 1;
            }
        }
    }
    out
}

/// Share of keys that change host when the ring grows from `n` to `n + 1` hosts, and the
/// same for `hash mod n` (what a non-consistent hash would do).
fn remap_share(objects: usize, hashes: &[u64], n: usize) -> (f64, f64) {
    let before = Ring::new(n, points_per_host(n));
    let after = Ring::new(n + 1, points_per_host(n + 1));
    let mut ring_moved = 0usize;
    let mut mod_moved = 0usize;
    for h in hashes.iter().take(objects) {
        if before.host(*h) != after.host(*h) {
            ring_moved += 1;
        }
        if h % n as u64 != h % (n as u64 + 1) {
            mod_moved += 1;
        }
    }
    (
        ring_moved as f64 / objects as f64,
        mod_moved as f64 / objects as f64,
    )
}

/// Runs the three setups and returns a Markdown report.
pub fn report(p: &Params) -> Result<String, Error> {
    if p.replicas == 0 || p.objects == 0 || p.requests < 10 || p.zipf_s <= 0.0 {
        return Err(Error::Usage(
            "replicas, objects > 0, requests >= 10, zipf > 0".into(),
        ));
    }
    let zipf = Zipf::new(p.objects, p.zipf_s);
    let mut rng = SplitMix(p.seed);
    // Popularity rank is not identity: shuffle which object has which rank, so that hot
    // objects are not clustered in key space.
    let mut rank_to_obj: Vec<usize> = (0..p.objects).collect();
    for i in (1..p.objects).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        rank_to_obj.swap(i, j);
    }
    let stream: Vec<usize> = (0..p.requests)
        .map(|_| rank_to_obj[zipf.sample(&mut rng)])
        .collect();
    let hashes: Vec<u64> = (0..p.objects).map(key_hash).collect();

    let unsharded = simulate(p, Routing::Unsharded, &stream, &hashes);
    let ring = simulate(p, Routing::Ring, &stream, &hashes);
    let rr = simulate(p, Routing::RoundRobin, &stream, &hashes);
    let single = {
        let one = Params {
            replicas: 1,
            objects: p.objects,
            requests: p.requests,
            zipf_s: p.zipf_s,
            capacity_per_replica: p.capacity_per_replica,
            seed: p.seed,
        };
        simulate(&one, Routing::Unsharded, &stream, &hashes)
    };
    let imbalance = |o: &Outcome| {
        let max = *o.per_replica.iter().max().unwrap_or(&0) as f64;
        let mean = o.counted as f64 / o.per_replica.len() as f64;
        max / mean
    };
    let (ring_moved, mod_moved) = remap_share(p.objects, &hashes, p.replicas);

    let total = p.capacity_per_replica * p.replicas;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "workload: {} objects, Zipf s={}, {} requests (first 20% warm-up), seed {}",
        p.objects, p.zipf_s, p.requests, p.seed
    );
    let _ = writeln!(
        s,
        "caches: LRU by entries; {} replicas x {} entries = {} total ({:.1}% of the catalogue)\n",
        p.replicas,
        p.capacity_per_replica,
        total,
        100.0 * total as f64 / p.objects as f64
    );
    let _ = writeln!(
        s,
        "| setup | total entries | hit ratio | busiest replica / mean |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| one unsharded cache | {total} | {:.2} % | - |",
        100.0 * unsharded.ratio()
    );
    let _ = writeln!(
        s,
        "| {} replicas, consistent hash (ring) | {total} | {:.2} % | {:.2} |",
        p.replicas,
        100.0 * ring.ratio(),
        imbalance(&ring)
    );
    let _ = writeln!(
        s,
        "| {} replicas, round-robin | {total} | {:.2} % | {:.2} |",
        p.replicas,
        100.0 * rr.ratio(),
        imbalance(&rr)
    );
    let _ = writeln!(
        s,
        "| one replica alone (for reference) | {} | {:.2} % | - |",
        p.capacity_per_replica,
        100.0 * single.ratio()
    );
    let _ = writeln!(
        s,
        "\nscaling {} -> {} replicas moves {:.1} % of keys with the ring ({:.1} % with hash mod n)",
        p.replicas,
        p.replicas + 1,
        100.0 * ring_moved,
        100.0 * mod_moved
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut c = Lru::new(2);
        assert!(!c.access(1));
        assert!(!c.access(2));
        assert!(c.access(1)); // 2 is now the oldest
        assert!(!c.access(3)); // evicts 2
        assert!(c.access(1));
        assert!(!c.access(2));
        assert!(!Lru::new(0).access(1));
    }

    #[test]
    fn ring_spreads_keys_and_moves_few_on_growth() {
        let hashes: Vec<u64> = (0..20_000).map(key_hash).collect();
        let ring = Ring::new(4, 256);
        let mut counts = [0usize; 4];
        for h in &hashes {
            counts[ring.host(*h)] += 1;
        }
        for c in counts {
            assert!((3_500..6_500).contains(&c), "{counts:?}");
        }
        let (ring_moved, mod_moved) = remap_share(hashes.len(), &hashes, 4);
        assert!(ring_moved < 0.35, "{ring_moved}");
        assert!(mod_moved > 0.7, "{mod_moved}");
    }

    #[test]
    fn sharding_beats_round_robin_and_nears_unsharded() {
        let p = Params {
            replicas: 4,
            objects: 20_000,
            requests: 200_000,
            zipf_s: 0.9,
            capacity_per_replica: 500,
            seed: 1,
        };
        let zipf = Zipf::new(p.objects, p.zipf_s);
        let mut rng = SplitMix(p.seed);
        let stream: Vec<usize> = (0..p.requests).map(|_| zipf.sample(&mut rng)).collect();
        let hashes: Vec<u64> = (0..p.objects).map(key_hash).collect();
        let unsharded = simulate(&p, Routing::Unsharded, &stream, &hashes).ratio();
        let ring = simulate(&p, Routing::Ring, &stream, &hashes).ratio();
        let rr = simulate(&p, Routing::RoundRobin, &stream, &hashes).ratio();
        assert!(ring > rr + 0.05, "ring {ring} rr {rr}");
        assert!(ring > unsharded - 0.05, "ring {ring} unsharded {unsharded}");
    }
}
