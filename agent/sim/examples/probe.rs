use shoal_core::Status;
use shoal_sim::*;
fn main() {
    let n: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let t = std::time::Instant::now();
    let mut sim = Sim::new(SimConfig::new(n, 1));
    sim.join_all();
    let mut last = sim.net_stats().clone();
    let mut le = sim.event_counts().clone();
    for _ in 0..12 {
        sim.run_for(5000);
        let mut st = std::collections::BTreeMap::new();
        for i in sim.live() {
            for m in sim.node(i).members() {
                *st.entry(m.1).or_insert(0) += 1;
            }
        }
        let ns = sim.net_stats().clone();
        let ev = sim.event_counts().clone();
        println!("t={} wall {:.1} frames {} swimKB/node/s {:.1} syncKB/node/s {:.1} ups {} downs {} {:?} minview {}", sim.now(), t.elapsed().as_secs_f64(), ns.sent-last.sent, (ns.bytes(FrameKind::Swim)-last.bytes(FrameKind::Swim)) as f64/n as f64/5000.0, (ns.bytes(FrameKind::Sync)-last.bytes(FrameKind::Sync)) as f64/n as f64/5000.0, ev.member_up-le.member_up, ev.member_down-le.member_down, st, sim.min_view());
        last = ns;
        le = ev;
    }
}
