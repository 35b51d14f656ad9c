//! Docker Compose files as shoal service specs: `shoal compose import` and
//! `shoal deploy compose.yaml`.
//!
//! The file is read as plain YAML and walked key by key, so every key is accounted
//! for: it is translated, ignored with a warning that names it (it changes nothing
//! that matters on shoal, e.g. `container_name`), or refused by name with what to do
//! instead (e.g. `volumes`, `build`). Typed Compose crates (`compose_spec`,
//! `docker-compose-types`) parse into structs whose unused fields would have to be
//! enumerated again to be refused; walking the YAML is what makes "never silently
//! dropped" hold. Each translated service is checked by shoal's own spec parser.
//! `x-` extension keys are skipped, as the Compose Specification says tools do.
//!
//! What translates: `image`, `environment` (list or map; a name without a value
//! comes from the importing shell, with a warning), `ports` (short and long syntax),
//! `depends_on` (list, or map with `condition`), `healthcheck`, `deploy.replicas`,
//! `deploy.resources` (`reservations`, else `limits`), `deploy.update_config`
//! (`parallelism`, `order`, `monitor`), `deploy.placement` (`constraints` on
//! `node.labels.*`, `preferences` spread), `deploy.restart_policy`, `restart`,
//! `network_mode: host`. This module only translates text; it does no I/O.

use serde_norway::Value;
use shoal_orch::{HealthFile, PortFile, ResourcesFile, Scalar, ServiceSpec, SpecFile, UpdateFile};

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    /// One spec per service, by name, in file order.
    pub specs: Vec<SpecFile>,
    /// Keys that were ignored or changed in meaning, by name.
    pub warnings: Vec<String>,
}

/// Service keys shoal cannot honour, with what to do instead.
const REFUSED: &[(&str, &str)] = &[
    ("build", "shoal uses no registry and builds nothing: build the image, `shoal image push` it, and set `image`"),
    ("command", "shoal runs the image's own command: build an image whose CMD is this command"),
    ("entrypoint", "shoal runs the image's own entrypoint: build an image with this one"),
    ("env_file", "put the variables under `environment`"),
    ("volumes", "shoal has no volumes: replicas move between nodes"),
    ("volumes_from", "shoal has no volumes"),
    ("tmpfs", "not supported"),
    ("devices", "not supported"),
    ("cap_add", "not supported"),
    ("cap_drop", "not supported"),
    ("privileged", "not supported"),
    ("user", "set the user in the image"),
    ("working_dir", "set the working directory in the image"),
    ("extra_hosts", "not supported; services reach each other as <service>.service.shoal"),
    ("dns", "not supported"),
    ("dns_search", "not supported"),
    ("dns_opt", "not supported"),
    ("ulimits", "not supported"),
    ("sysctls", "not supported"),
    ("security_opt", "not supported"),
    ("ipc", "not supported"),
    ("pid", "not supported"),
    ("uts", "not supported"),
    ("userns_mode", "not supported"),
    ("shm_size", "not supported"),
    ("read_only", "not supported"),
    ("stdin_open", "not supported"),
    ("tty", "not supported"),
    ("platform", "not supported"),
    ("init", "not supported"),
    ("links", "services reach each other as <service>.service.shoal"),
    ("external_links", "services reach each other as <service>.service.shoal"),
    ("cgroup_parent", "not supported"),
    ("isolation", "not supported"),
    ("secrets", "shoal has no secrets store"),
    ("configs", "shoal has no configs store"),
    ("profiles", "import the services you want; profiles are not supported"),
    ("mem_limit", "use deploy.resources"),
    ("mem_reservation", "use deploy.resources"),
    ("memswap_limit", "use deploy.resources"),
    ("cpus", "use deploy.resources"),
    ("cpu_shares", "use deploy.resources"),
    ("cpu_quota", "use deploy.resources"),
    ("cpuset", "not supported"),
    ("oom_kill_disable", "not supported"),
    ("oom_score_adj", "not supported"),
    ("group_add", "not supported"),
    ("mac_address", "not supported"),
    ("blkio_config", "not supported"),
    ("device_cgroup_rules", "not supported"),
    ("storage_opt", "not supported"),
    ("extends", "flatten the file first (`docker compose config`)"),
    ("annotations", "not supported"),
    ("attach", "not supported"),
    ("develop", "not supported"),
    ("gpus", "not supported"),
    ("post_start", "not supported"),
    ("pre_stop", "not supported"),
    ("domainname", "not supported"),
    ("runtime", "not supported"),
    ("credential_spec", "not supported"),
    ("label_file", "not supported"),
    ("models", "not supported"),
    ("provider", "not supported"),
];

/// Service keys that change nothing that matters on shoal, ignored with a warning.
const IGNORED: &[(&str, &str)] = &[
    ("container_name", "replicas get generated names"),
    ("hostname", "replicas get generated names"),
    ("labels", "not carried over"),
    (
        "logging",
        "shoal keeps each replica's output (`shoal logs`)",
    ),
    (
        "networks",
        "shoal has no networks; services reach each other as <service>.service.shoal",
    ),
    (
        "expose",
        "shoal discovery hands out the ports under `ports`",
    ),
    ("stop_grace_period", "shoal sends SIGKILL 5 s after SIGTERM"),
    ("stop_signal", "shoal stops with SIGTERM"),
    ("pull_policy", "images come from `shoal image push`"),
    ("scale", "use deploy.replicas"),
];

/// Walks one file; on any refusal returns every refusal found, by name.
pub fn import(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Imported, Vec<String>> {
    let doc: Value =
        serde_norway::from_str(text).map_err(|e| vec![format!("not valid YAML: {e}")])?;
    let Value::Mapping(top) = doc else {
        return Err(vec!["a compose file is a mapping with `services`".into()]);
    };
    let mut cx = Cx::default();
    let mut services = None;
    for (k, v) in &top {
        let key = key_str(k);
        match key.as_str() {
            "services" => services = Some(v),
            "version" => cx.warn("`version`: obsolete in the Compose Specification; ignored"),
            "name" => cx.warn("`name` (the project name): ignored; shoal services are cluster-wide"),
            "networks" => cx.warn("`networks`: ignored; shoal has no networks, services reach each other as <service>.service.shoal"),
            "volumes" | "configs" | "secrets" if is_empty(v) => {}
            "volumes" | "configs" | "secrets" => cx.refuse(format!("`{key}`: shoal has no {key}")),
            k if k.starts_with("x-") => {}
            other => cx.refuse(format!("`{other}`: not a top-level key of a compose file")),
        }
    }
    let mut specs = Vec::new();
    match services {
        Some(Value::Mapping(list)) if !list.is_empty() => {
            for (name, body) in list {
                let name = key_str(name);
                if let Some(spec) = cx.service(&name, body, env) {
                    specs.push(spec);
                }
            }
        }
        _ => cx.refuse("`services`: the file defines no service".into()),
    }
    if !cx.refused.is_empty() {
        return Err(cx.refused);
    }
    Ok(Imported {
        specs,
        warnings: cx.warnings,
    })
}

/// Renders a spec as the TOML `shoal deploy` reads.
pub fn to_toml(spec: &SpecFile) -> String {
    // Through a TOML value, so plain keys come before tables whatever the field order.
    match toml::Value::try_from(spec) {
        Ok(v) => toml::to_string(&v).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[derive(Default)]
struct Cx {
    warnings: Vec<String>,
    refused: Vec<String>,
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => scalar_text(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Mapping(m) => m.is_empty(),
        Value::Sequence(s) => s.is_empty(),
        _ => false,
    }
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().map(scalar_text).collect(),
        other => scalar_text(other).map(|s| vec![s]),
    }
}

impl Cx {
    fn warn(&mut self, w: &str) {
        self.warnings.push(w.to_string());
    }
    fn refuse(&mut self, r: String) {
        self.refused.push(r);
    }

    fn service(
        &mut self,
        name: &str,
        body: &Value,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<SpecFile> {
        let before = self.refused.len();
        let Value::Mapping(m) = body else {
            self.refuse(format!("service {name}: must be a mapping"));
            return None;
        };
        let mut f = SpecFile {
            name: name.to_string(),
            driver: "docker".into(),
            ..SpecFile::default()
        };
        for (k, v) in m {
            let key = key_str(k);
            let at = format!("service {name}: `{key}`");
            if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
                self.refuse(format!("{at}: {why}"));
                continue;
            }
            if let Some((_, why)) = IGNORED.iter().find(|(k, _)| *k == key) {
                if key == "scale" {
                    f.replicas = v.as_i64();
                }
                self.warnings.push(format!("{at}: ignored ({why})"));
                continue;
            }
            match key.as_str() {
                "image" => f.image = scalar_text(v),
                "environment" => self.environment(&at, v, env, &mut f),
                "ports" => self.ports(&at, v, &mut f),
                "depends_on" => self.depends_on(&at, v, &mut f),
                "healthcheck" => self.healthcheck(&at, v, &mut f),
                "deploy" => self.deploy(&at, v, &mut f),
                "restart" => self.restart(&at, v, &mut f),
                "network_mode" => match scalar_text(v).as_deref() {
                    Some("host") => f.network = Some("host".into()),
                    Some("bridge") => {}
                    other => self.refuse(format!(
                        "{at}: {other:?} is not supported (only host and bridge)"
                    )),
                },
                k if k.starts_with("x-") => {}
                other => self.refuse(format!(
                    "service {name}: `{other}` is not a Compose service key"
                )),
            }
        }
        if f.image.is_none() && !m.iter().any(|(k, _)| key_str(k) == "build") {
            self.refuse(format!("service {name}: `image` is required"));
        }
        if self.refused.len() > before {
            return None;
        }
        // shoal's own checks (name, units, ports, constraints) name the field.
        match ServiceSpec::try_from(f.clone()) {
            Ok(_) => Some(f),
            Err(e) => {
                self.refuse(format!("service {name}: {e}"));
                None
            }
        }
    }

    fn environment(
        &mut self,
        at: &str,
        v: &Value,
        env: &dyn Fn(&str) -> Option<String>,
        f: &mut SpecFile,
    ) {
        let mut pairs: Vec<(String, Option<String>)> = Vec::new();
        match v {
            Value::Mapping(m) => {
                for (k, v) in m {
                    pairs.push((key_str(k), if v.is_null() { None } else { scalar_text(v) }));
                }
            }
            Value::Sequence(s) => {
                for item in s {
                    let Some(text) = scalar_text(item) else {
                        self.refuse(format!("{at}: entries are NAME=value strings"));
                        continue;
                    };
                    match text.split_once('=') {
                        Some((k, val)) => pairs.push((k.to_string(), Some(val.to_string()))),
                        None => pairs.push((text, None)),
                    }
                }
            }
            _ => self.refuse(format!("{at}: a list or a mapping")),
        }
        for (k, val) in pairs {
            let val = match val {
                Some(v) => v,
                None => match env(&k) {
                    Some(v) => {
                        self.warnings.push(format!(
                            "{at}: {k} has no value here; taken from your environment, as compose would"
                        ));
                        v
                    }
                    None => {
                        self.refuse(format!(
                            "{at}: {k} has no value and is not set in your environment"
                        ));
                        continue;
                    }
                },
            };
            f.env.insert(k, Scalar::Text(val));
        }
    }

    fn ports(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Sequence(list) = v else {
            self.refuse(format!("{at}: a list"));
            return;
        };
        for p in list {
            let (target, published, protocol) = match p {
                Value::Mapping(m) => {
                    let mut target = None;
                    let mut published = None;
                    let mut protocol = None;
                    for (k, v) in m {
                        match key_str(k).as_str() {
                            "target" => target = v.as_u64(),
                            "published" => {
                                published = scalar_text(v).and_then(|s| s.parse::<u64>().ok())
                            }
                            "protocol" => protocol = scalar_text(v),
                            "mode" | "name" | "app_protocol" => {}
                            "host_ip" => self.warnings.push(format!(
                                "{at}: host_ip ignored; shoal publishes on the node's address"
                            )),
                            other => self.refuse(format!("{at}: `{other}` is not supported")),
                        }
                    }
                    (target, published, protocol)
                }
                other => {
                    let Some(text) = scalar_text(other) else {
                        self.refuse(format!("{at}: {other:?} is not a port"));
                        continue;
                    };
                    let (spec, protocol) = match text.split_once('/') {
                        Some((s, p)) => (s.to_string(), Some(p.to_string())),
                        None => (text.clone(), None),
                    };
                    if spec.contains('-') {
                        self.refuse(format!("{at}: port ranges ({text}) are not supported"));
                        continue;
                    }
                    let parts: Vec<&str> = spec.split(':').collect();
                    let (host, container) = match parts.as_slice() {
                        [c] => (None, *c),
                        [h, c] => (Some(*h), *c),
                        [_ip, h, c] => {
                            self.warnings.push(format!(
                                "{at}: the address in {text} is ignored; shoal publishes on the node's address"
                            ));
                            (Some(*h), *c)
                        }
                        _ => {
                            self.refuse(format!("{at}: {text:?} is not a port mapping"));
                            continue;
                        }
                    };
                    let published = match host.filter(|h| !h.is_empty()) {
                        None => None,
                        Some(h) => match h.parse::<u64>() {
                            Ok(h) => Some(h),
                            Err(_) => {
                                self.refuse(format!("{at}: {text:?}: {h:?} is not a port"));
                                continue;
                            }
                        },
                    };
                    (container.parse::<u64>().ok(), published, protocol)
                }
            };
            let Some(target) = target else {
                self.refuse(format!("{at}: a port without a container port"));
                continue;
            };
            let name = match protocol.as_deref() {
                Some("udp") => format!("p{target}-udp"),
                _ => format!("p{target}"),
            };
            f.ports.push(PortFile {
                name,
                container_port: target as i64,
                host_port: published.map(|h| h as i64),
                protocol,
            });
        }
    }

    fn depends_on(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        match v {
            Value::Sequence(_) => f.depends_on = strings(v).unwrap_or_default(),
            Value::Mapping(m) => {
                for (dep, opts) in m {
                    let dep = key_str(dep);
                    let mut condition = "service_started".to_string();
                    if let Value::Mapping(o) = opts {
                        for (k, v) in o {
                            match key_str(k).as_str() {
                                "condition" => condition = scalar_text(v).unwrap_or_default(),
                                "restart" => self.warnings.push(format!(
                                    "{at}: {dep}: `restart` ignored; shoal does not restart dependants"
                                )),
                                "required" => {}
                                other => {
                                    self.refuse(format!("{at}: {dep}: `{other}` is not supported"))
                                }
                            }
                        }
                    }
                    match condition.as_str() {
                        "service_healthy" => {}
                        "service_started" => self.warnings.push(format!(
                            "{at}: {dep}: shoal waits for a healthy replica of it (as service_healthy), not just a started one"
                        )),
                        other => {
                            self.refuse(format!("{at}: {dep}: condition {other} is not supported"));
                            continue;
                        }
                    }
                    f.depends_on.push(dep);
                }
            }
            _ => self.refuse(format!("{at}: a list or a mapping")),
        }
    }

    fn healthcheck(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        let mut h = HealthFile::default();
        let mut disabled = false;
        for (k, v) in m {
            let key = key_str(k);
            match key.as_str() {
                "test" => match strings(v) {
                    Some(t) if t.first().map(String::as_str) == Some("NONE") => disabled = true,
                    Some(t) if t.first().map(String::as_str) == Some("CMD") && t.len() > 1 => {
                        h.command = Some(t[1..].to_vec())
                    }
                    Some(t)
                        if t.first().map(String::as_str) == Some("CMD-SHELL") && t.len() == 2 =>
                    {
                        h.command = Some(vec!["sh".into(), "-c".into(), t[1].clone()])
                    }
                    Some(t) if t.len() == 1 && !v.is_sequence() => {
                        h.command = Some(vec!["sh".into(), "-c".into(), t[0].clone()])
                    }
                    _ => self.refuse(format!(
                        "{at}: `test` is not CMD, CMD-SHELL, NONE or a string"
                    )),
                },
                "interval" => h.interval = scalar_text(v).map(Scalar::Text),
                "timeout" => h.timeout = scalar_text(v).map(Scalar::Text),
                "retries" => h.retries = v.as_i64(),
                "start_period" => h.grace = scalar_text(v).map(Scalar::Text),
                "start_interval" => self.warnings.push(format!(
                    "{at}: start_interval ignored; shoal probes every `interval` from the start"
                )),
                "disable" => disabled = v.as_bool().unwrap_or(false),
                other => self.refuse(format!("{at}: `{other}` is not supported")),
            }
        }
        if !disabled && h.command.is_some() {
            f.health = Some(h);
        }
    }

    fn restart(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let text = scalar_text(v).unwrap_or_default();
        let (mode, max) = match text.split_once(':') {
            Some((m, n)) => (m.to_string(), Some(n.to_string())),
            None => (text.clone(), None),
        };
        f.restart = Some(
            match mode.as_str() {
                "no" => "never",
                "always" => "always",
                "on-failure" => "on-failure",
                "unless-stopped" => {
                    self.warnings.push(format!(
                        "{at}: unless-stopped is always on shoal (`shoal rm` stops a service)"
                    ));
                    "always"
                }
                other => {
                    self.refuse(format!(
                        "{at}: {other:?} is not no, always, on-failure or unless-stopped"
                    ));
                    return;
                }
            }
            .into(),
        );
        if max.is_some() {
            self.warnings.push(format!(
                "{at}: the retry limit in {text} is ignored; shoal retries with growing backoff"
            ));
        }
    }

    fn deploy(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        for (k, v) in m {
            let key = key_str(k);
            let at = format!("{at}.{key}");
            match key.as_str() {
                "mode" => match scalar_text(v).as_deref() {
                    Some("replicated") | None => {}
                    Some(other) => self.refuse(format!(
                        "{at}: {other} is not supported; shoal runs a replica count (deploy.replicas)"
                    )),
                },
                "replicas" => f.replicas = v.as_i64(),
                "resources" => self.resources(&at, v, f),
                "update_config" => self.update_config(&at, v, f),
                "rollback_config" => self.warnings.push(format!(
                    "{at}: ignored; a stalled shoal rollout keeps the old replicas, and `shoal rollback` undoes it"
                )),
                "placement" => self.placement(&at, v, f),
                "restart_policy" => self.restart_policy(&at, v, f),
                "labels" => self.warnings.push(format!("{at}: ignored (not carried over)")),
                "endpoint_mode" => self.warnings.push(format!(
                    "{at}: ignored; shoal discovery hands out every healthy replica"
                )),
                other => self.refuse(format!("{at}: `{other}` is not a deploy key")),
            }
        }
    }

    fn resources(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        let mut limits = None;
        let mut reservations = None;
        for (k, v) in m {
            match key_str(k).as_str() {
                "limits" => limits = Some(v),
                "reservations" => reservations = Some(v),
                other => self.refuse(format!("{at}: `{other}` is not supported")),
            }
        }
        let read = |cx: &mut Cx, which: &str, v: &Value| -> ResourcesFile {
            let mut r = ResourcesFile::default();
            if let Value::Mapping(m) = v {
                for (k, v) in m {
                    match key_str(k).as_str() {
                        "cpus" => r.cpu = scalar_text(v).map(Scalar::Text),
                        "memory" => {
                            r.memory = scalar_text(v).map(|s| Scalar::Text(compose_size(&s)))
                        }
                        other => cx.refuse(format!("{at}.{which}: `{other}` is not supported")),
                    }
                }
            }
            r
        };
        let limits = limits.map(|v| read(self, "limits", v));
        let reservations = reservations.map(|v| read(self, "reservations", v));
        f.resources = match (reservations, limits) {
            (Some(r), Some(l)) => {
                if r != l {
                    self.warnings.push(format!(
                        "{at}: shoal reserves `reservations` and enforces them as the limit; `limits` ignored"
                    ));
                }
                Some(r)
            }
            (Some(r), None) => Some(r),
            (None, Some(l)) => {
                self.warnings.push(format!(
                    "{at}: `limits` become shoal's reservation (what the scheduler counts and the node enforces)"
                ));
                Some(l)
            }
            (None, None) => None,
        };
    }

    fn update_config(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        let mut parallelism = 1;
        let mut start_first = false;
        let mut u = UpdateFile::default();
        for (k, v) in m {
            match key_str(k).as_str() {
                "parallelism" => parallelism = v.as_i64().unwrap_or(1).max(1),
                "order" => match scalar_text(v).as_deref() {
                    Some("start-first") => start_first = true,
                    Some("stop-first") => {}
                    other => self.refuse(format!("{at}: order {other:?} is not start-first or stop-first")),
                },
                "monitor" => u.healthy_deadline = scalar_text(v).map(Scalar::Text),
                "delay" => self.warnings.push(format!(
                    "{at}: delay ignored; the next replica is updated once the last is healthy"
                )),
                "failure_action" => self.warnings.push(format!(
                    "{at}: failure_action ignored; a failing shoal rollout pauses (stalls), keeping the old replicas"
                )),
                "max_failure_ratio" => self.warnings.push(format!(
                    "{at}: max_failure_ratio ignored; one replica not healthy in time stalls the rollout"
                )),
                other => self.refuse(format!("{at}: `{other}` is not supported")),
            }
        }
        if start_first {
            u.max_surge = Some(parallelism);
            u.max_unavailable = Some(0);
        } else {
            u.max_unavailable = Some(parallelism);
        }
        f.update = Some(u);
    }

    fn placement(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        for (k, v) in m {
            match key_str(k).as_str() {
                "constraints" => {
                    for c in strings(v).unwrap_or_default() {
                        let op = ["==", "!="].into_iter().find(|op| c.contains(op));
                        let parsed = op.and_then(|op| {
                            let (l, r) = c.split_once(op)?;
                            let label = l.trim().strip_prefix("node.labels.")?;
                            Some(format!("{label} {op} {}", r.trim()))
                        });
                        match parsed {
                            Some(p) => f.constraints.push(p),
                            None => self.refuse(format!(
                                "{at}: constraint {c:?}: only node.labels.<key> == / != <value> translates (shoal nodes have labels, not roles)"
                            )),
                        }
                    }
                }
                "preferences" => {
                    let spread = match v {
                        Value::Sequence(s) => s.iter().find_map(|p| match p {
                            Value::Mapping(pm) => pm.iter().find_map(|(k, v)| {
                                (key_str(k) == "spread").then(|| scalar_text(v)).flatten()
                            }),
                            _ => None,
                        }),
                        _ => None,
                    };
                    match spread.as_deref().and_then(|s| s.strip_prefix("node.labels.")) {
                        Some(label) => f.spread = Some(label.to_string()),
                        None => self.refuse(format!(
                            "{at}: preferences: only spread: node.labels.<key> translates"
                        )),
                    }
                }
                "max_replicas_per_node" => self.refuse(format!(
                    "{at}: max_replicas_per_node is not supported (anti_affinity = [\"service:<name>\"] keeps one per node)"
                )),
                other => self.refuse(format!("{at}: `{other}` is not supported")),
            }
        }
    }

    fn restart_policy(&mut self, at: &str, v: &Value, f: &mut SpecFile) {
        let Value::Mapping(m) = v else {
            self.refuse(format!("{at}: a mapping"));
            return;
        };
        for (k, v) in m {
            match key_str(k).as_str() {
                "condition" => {
                    f.restart = match scalar_text(v).as_deref() {
                        Some("none") => Some("never".into()),
                        Some("on-failure") => Some("on-failure".into()),
                        Some("any") => Some("always".into()),
                        other => {
                            self.refuse(format!(
                                "{at}: condition {other:?} is not none, on-failure or any"
                            ));
                            None
                        }
                    }
                }
                "delay" => f.restart_backoff = scalar_text(v).map(Scalar::Text),
                "max_attempts" | "window" => self.warnings.push(format!(
                    "{at}: {} ignored; shoal retries with growing backoff",
                    key_str(k)
                )),
                other => self.refuse(format!("{at}: `{other}` is not supported")),
            }
        }
    }
}

/// Compose sizes (`512m`, `1g`, `100k`, bytes) in shoal's units.
fn compose_size(s: &str) -> String {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    for (suffix, unit) in [
        ("kb", "Ki"),
        ("mb", "Mi"),
        ("gb", "Gi"),
        ("k", "Ki"),
        ("m", "Mi"),
        ("g", "Gi"),
        ("b", ""),
    ] {
        if let Some(n) = lower.strip_suffix(suffix) {
            if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return format!("{n}{unit}");
            }
        }
    }
    t.to_string()
}

/// Parses `text` and refuses it with every reason at once.
pub fn import_or_explain(file: &str, text: &str) -> anyhow::Result<Imported> {
    import(text, &|k| std::env::var(k).ok()).map_err(|refused| {
        anyhow::anyhow!(
            "{file} cannot run on shoal as it is:\n  {}",
            refused.join("\n  ")
        )
    })
}

/// Env lookups for tests.
#[cfg(test)]
fn no_env(_: &str) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
version: "3.9"
name: shop
x-common: &common
  restart: always
services:
  db:
    image: postgres:16
    environment:
      POSTGRES_PASSWORD: example
      PGDATA: /tmp/pg
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 5s
      timeout: 3s
      retries: 5
      start_period: 10s
    deploy:
      resources:
        reservations: { cpus: "0.5", memory: 512m }
      placement:
        constraints: ["node.labels.disk == ssd"]
  web:
    image: shop/web:1.2
    ports: ["8080:80", "9000", { target: 53, protocol: udp }]
    environment: ["MODE=prod", "FROM_SHELL"]
    depends_on:
      db: { condition: service_healthy }
    container_name: web1
    deploy:
      replicas: 3
      resources:
        limits: { cpus: "1", memory: 1g }
      update_config: { parallelism: 2, order: start-first, monitor: 30s }
      placement:
        preferences: [ { spread: node.labels.zone } ]
      restart_policy: { condition: on-failure, delay: 2s, max_attempts: 3 }
    networks: [front]
networks:
  front: {}
"#;

    #[test]
    fn a_full_file_translates_with_every_change_named() {
        let env = |k: &str| (k == "FROM_SHELL").then(|| "yes".to_string());
        let out = import(FULL, &env).unwrap();
        let names: Vec<&str> = out.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        let db = &out.specs[0];
        assert_eq!(
            db.health.as_ref().unwrap().command.as_deref().unwrap(),
            ["sh", "-c", "pg_isready -U postgres"]
        );
        assert_eq!(
            db.resources.as_ref().unwrap().memory,
            Some(Scalar::Text("512Mi".into()))
        );
        assert_eq!(db.constraints, ["disk == ssd"]);
        let web = &out.specs[1];
        assert_eq!(web.replicas, Some(3));
        assert_eq!(web.depends_on, ["db"]);
        assert_eq!(web.spread.as_deref(), Some("zone"));
        assert_eq!(web.restart.as_deref(), Some("on-failure"));
        let ports: Vec<(i64, Option<i64>)> = web
            .ports
            .iter()
            .map(|p| (p.container_port, p.host_port))
            .collect();
        assert_eq!(ports, [(80, Some(8080)), (9000, None), (53, None)]);
        assert_eq!(web.ports[2].protocol.as_deref(), Some("udp"));
        let u = web.update.as_ref().unwrap();
        assert_eq!((u.max_surge, u.max_unavailable), (Some(2), Some(0)));
        assert_eq!(web.env.get("FROM_SHELL"), Some(&Scalar::Text("yes".into())));
        let w = out.warnings.join("\n");
        for named in [
            "`version`",
            "`name`",
            "container_name",
            "`networks`",
            "FROM_SHELL",
            "max_attempts",
            "`limits` become",
        ] {
            assert!(w.contains(named), "no warning about {named}:\n{w}");
        }
        // Every spec is one `shoal deploy` accepts.
        for s in &out.specs {
            let text = to_toml(s);
            ServiceSpec::from_toml(&format!("{}.toml", s.name), &text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
    }

    #[test]
    fn what_shoal_cannot_honour_is_refused_by_name_all_at_once() {
        let text = r#"
services:
  app:
    build: .
    command: ["serve"]
    volumes: ["data:/data"]
    environment: [MISSING]
    ports: ["8000-8010:8000-8010"]
    depends_on: { job: { condition: service_completed_successfully } }
    deploy: { mode: global, placement: { constraints: ["node.role == manager"] } }
    frobnicate: 1
volumes:
  data: {}
"#;
        let refused = import(text, &no_env).unwrap_err().join("\n");
        for named in [
            "`build`",
            "`command`",
            "`volumes`",
            "MISSING",
            "port ranges",
            "service_completed_successfully",
            "global",
            "node.role",
            "`frobnicate`",
            "shoal has no volumes",
        ] {
            assert!(refused.contains(named), "{named} not refused:\n{refused}");
        }
        assert!(import("services: {}\n", &no_env).is_err());
        assert!(import("- a\n- b\n", &no_env).is_err());
        assert!(import(":\n  - [", &no_env).unwrap_err()[0].starts_with("not valid YAML"));
        // shoal's own spec checks apply too.
        let bad = import("services:\n  Web_1:\n    image: x\n", &no_env).unwrap_err();
        assert!(bad[0].contains("service Web_1"), "{bad:?}");
    }

    #[test]
    fn sizes_translate() {
        assert_eq!(compose_size("512m"), "512Mi");
        assert_eq!(compose_size("1G"), "1Gi");
        assert_eq!(compose_size("100kb"), "100Ki");
        assert_eq!(compose_size("1024"), "1024");
        assert_eq!(compose_size("2048b"), "2048");
    }
}
