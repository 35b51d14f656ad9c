use shoal_sim::*;
use std::num::NonZeroU8;
fn main() {
    let n: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let mode: u32 = std::env::args().nth(2).unwrap().parse().unwrap();
    for seed in 1..=6 {
    let t = std::time::Instant::now();
    let mut cfg = SimConfig::new(n, seed);
    cfg.tune = match mode { 
      1 => Some(|_, c| { c.swim.max_transmissions = NonZeroU8::new(c.swim.max_transmissions.get()*2).unwrap(); }),
      _ => None };
    let mut sim = Sim::new(cfg);
    sim.join_all();
    let r = sim.run_until(|s| s.all_see_alive(n), 600_000).unwrap();
    let a: Vec<usize> = (0..n/2).collect(); let b: Vec<usize> = (n/2..n).collect();
    sim.partition(&[a, b]);
    let d = sim.run_until(|s| s.all_see_alive(n/2), 600_000);
    for i in (0..n).step_by(10) { sim.put(i, &format!("k/{i}"), b"x").unwrap(); }
    sim.put(3, "conflict", b"A").unwrap();
    sim.run_for(1);
    sim.put(n-3, "conflict", b"B").unwrap();
    sim.run_for(10_000);
    let f = sim.converged_on("conflict", b"A");
    sim.heal();
    let t0 = sim.now();
    let eq = sim.run_until(|s| s.states_equal(), 900_000);
    let t1 = sim.now() - t0;
    let h = sim.run_until(|s| s.all_see_alive(n), 900_000);
    println!("n={n} seed={seed} alive {r} split {d:?} fA {f} equal {eq:?} alive-again {:?} wall {:?} ", h.map(|x| x + t1), t.elapsed());
    }
}
