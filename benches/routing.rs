//! The cost of one routing decision: `cargo bench --bench routing`. Prints nanoseconds per choice
//! for each strategy over 2, 8 and 64 replicas; asserts nothing.

use std::hint::black_box;
use std::time::Instant;

use llmesh::router::{Balancer, Candidate, Strategy};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn main() {
    let mut rng = StdRng::seed_from_u64(7);
    for replicas in [2, 8, 64] {
        let candidates: Vec<Candidate> = (0..replicas)
            .map(|i| Candidate {
                key: format!("12D3KooWpeer{i}"),
                is_local: i == 0,
                outstanding: (i % 3) as u32,
                announced_load: (i % 5) as u32,
            })
            .collect();
        for strategy in
            [Strategy::LeastLoaded, Strategy::PowerOfTwo, Strategy::RoundRobin, Strategy::LocalFirst]
        {
            let balancer = Balancer::new(strategy);
            let rounds = 1_000_000;
            let started = Instant::now();
            for _ in 0..rounds {
                black_box(balancer.choose(black_box(&candidates), &mut rng));
            }
            let nanos = started.elapsed().as_nanos() as f64 / rounds as f64;
            println!("{strategy:?} over {replicas} replicas: {nanos:.1} ns per choice");
        }
    }
}
