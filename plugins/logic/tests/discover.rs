//! Built-in zone-aware discovery.

use std::collections::BTreeMap;

use shoal_policy_logic::{discover, Caller, DiscoveryInput, Endpoint, Ranked};

fn ep(zone: &str, region: &str, healthy: bool, load: f64) -> Endpoint {
    Endpoint {
        address: format!("10.0.0.{}", zone.len()),
        port: 80,
        zone: zone.into(),
        region: region.into(),
        healthy,
        load,
        ..Endpoint::default()
    }
}

fn input(endpoints: Vec<Endpoint>) -> DiscoveryInput {
    DiscoveryInput {
        service: "api".into(),
        caller: Caller {
            node: "n1".into(),
            labels: BTreeMap::from([
                ("zone".to_string(), "a".to_string()),
                ("region".to_string(), "eu".to_string()),
            ]),
        },
        endpoints,
        params: BTreeMap::new(),
    }
}

#[test]
fn same_zone_then_same_region_then_the_rest_healthy_only() {
    let i = input(vec![
        ep("b", "eu", true, 0.0),  // 0: same region
        ep("a", "eu", true, 0.0),  // 1: same zone
        ep("c", "us", true, 0.0),  // 2: elsewhere
        ep("a", "eu", false, 0.0), // 3: unhealthy
        ep("a", "eu", true, 1.0),  // 4: same zone, loaded
    ]);
    let r = discover(&i).unwrap();
    assert_eq!(
        r,
        vec![
            Ranked {
                index: 1,
                weight: 100
            },
            Ranked {
                index: 4,
                weight: 50
            },
            Ranked {
                index: 0,
                weight: 100
            },
            Ranked {
                index: 2,
                weight: 100
            },
        ]
    );
}

#[test]
fn weights_fall_with_load_and_respect_configured_weights() {
    let mut e = ep("a", "eu", true, 3.0);
    e.weight = 400;
    let odd = ep("a", "eu", true, f64::NAN);
    let r = discover(&input(vec![e, odd, ep("a", "eu", true, 1e12)])).unwrap();
    assert_eq!(
        r,
        vec![
            Ranked {
                index: 1,
                weight: 100
            },
            Ranked {
                index: 0,
                weight: 100
            },
            Ranked {
                index: 2,
                weight: 1
            }
        ]
    );
}

#[test]
fn limit_and_label_params() {
    let mut i = input(vec![ep("x", "eu", true, 0.0), ep("a", "eu", true, 0.0)]);
    i.params.insert("limit".into(), "1".into());
    assert_eq!(
        discover(&i).unwrap(),
        vec![Ranked {
            index: 1,
            weight: 100
        }]
    );
    i.params.insert("zone-label".into(), "rack".into());
    i.caller.labels.insert("rack".into(), "x".into());
    assert_eq!(discover(&i).unwrap()[0].index, 0);
    i.params.insert("limit".into(), "few".into());
    assert!(discover(&i).is_err());
    assert!(
        discover(&input(vec![ep("a", "eu", false, 0.0)]))
            .unwrap()
            .is_empty(),
        "no healthy endpoint: none"
    );
}
