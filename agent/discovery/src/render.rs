//! Templates over every service's endpoints, for `shoal render` (what
//! consul-template does for Consul): typically an nginx `upstream` block per service.
//!
//! Templates are [minijinja](https://docs.rs/minijinja) (Jinja2 syntax). They see:
//!
//! - `services`: a map from service name to its endpoints, best first;
//! - `service(name)`: one service's endpoints (an empty list if it does not exist);
//! - `generation`, `caller` (`caller.node`, `caller.labels`).
//!
//! Each endpoint has `address`, `port` (its first), `ports` (by name), `node`,
//! `zone`, `region`, `weight`, `alloc_id` and `slot`. Undefined names are errors, so a
//! typo fails the render instead of writing a broken config.

use minijinja::{Environment, UndefinedBehavior, Value};

use crate::view::{CatalogView, EndpointView};

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// A parsed template.
pub struct Template {
    env: Environment<'static>,
    name: String,
}

impl Template {
    /// Parses `source` (named `name` in errors).
    pub fn parse(name: &str, source: &str) -> Result<Template, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Configs, not HTML: nothing is escaped.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| RenderError(format!("template {name}: {}", describe(&e))))?;
        Ok(Template {
            env,
            name: name.to_string(),
        })
    }

    /// Renders against `catalog`.
    pub fn render(&self, catalog: &CatalogView) -> Result<String, RenderError> {
        let services: std::collections::BTreeMap<String, Vec<EndpointView>> = catalog
            .services
            .iter()
            .map(|(n, a)| (n.clone(), a.endpoints.clone()))
            .collect();
        let lookup = services.clone();
        let mut env = self.env.clone();
        env.add_function("service", move |name: String| -> Value {
            Value::from_serialize(lookup.get(&name).cloned().unwrap_or_default())
        });
        let tmpl = env
            .get_template(&self.name)
            .map_err(|e| RenderError(describe(&e)))?;
        tmpl.render(minijinja::context! {
            services => Value::from_serialize(&services),
            generation => catalog.generation,
            caller => Value::from_serialize(&catalog.caller),
        })
        .map_err(|e| RenderError(format!("rendering {}: {}", self.name, describe(&e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::AnswerView;

    fn catalog() -> CatalogView {
        let ep = |addr: &str, port: u16, node: &str| EndpointView {
            address: addr.into(),
            port,
            ports: [("http".to_string(), port)].into(),
            node: node.into(),
            zone: "a".into(),
            region: String::new(),
            weight: 100,
            healthy: true,
            alloc_id: format!("web-{port}"),
            slot: 0,
        };
        let answer = |svc: &str, eps: Vec<EndpointView>| AnswerView {
            service: svc.into(),
            endpoints: eps,
            decided_by: "built-in zone-aware".into(),
            fallback_reason: None,
        };
        CatalogView {
            generation: 3,
            caller: Default::default(),
            services: [
                (
                    "web".to_string(),
                    answer(
                        "web",
                        vec![ep("10.0.0.1", 3001, "n1"), ep("10.0.0.2", 3002, "n2")],
                    ),
                ),
                ("idle".to_string(), answer("idle", vec![])),
            ]
            .into(),
        }
    }

    #[test]
    fn renders_upstreams_from_every_service() {
        let t = Template::parse(
            "up.j2",
            "{% for name, eps in services|items %}upstream {{ name }} {\n\
             {% for e in eps %}  server {{ e.address }}:{{ e.ports.http }} weight={{ e.weight }};\n{% endfor %}\
             {% if not eps %}  server 127.0.0.1:1 down;\n{% endif %}}\n{% endfor %}",
        )
        .unwrap();
        let out = t.render(&catalog()).unwrap();
        assert_eq!(
            out,
            "upstream idle {\n  server 127.0.0.1:1 down;\n}\nupstream web {\n  server 10.0.0.1:3001 weight=100;\n  server 10.0.0.2:3002 weight=100;\n}\n"
        );
    }

    /// The shipped nginx template: an upstream per service with ports, a `down`
    /// placeholder for one without healthy replicas, nothing for one without ports.
    #[test]
    fn the_nginx_example_renders_valid_upstreams() {
        let src = include_str!("../../../examples/nginx/upstreams.conf.j2");
        let mut cat = catalog();
        cat.services.insert(
            "worker".into(),
            AnswerView {
                service: "worker".into(),
                endpoints: vec![EndpointView {
                    port: 0,
                    ports: Default::default(),
                    ..cat.services["web"].endpoints[0].clone()
                }],
                decided_by: String::new(),
                fallback_reason: None,
            },
        );
        let out = Template::parse("upstreams.conf.j2", src)
            .unwrap()
            .render(&cat)
            .unwrap();
        let lines: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            lines,
            vec![
                "upstream idle {",
                "server 127.0.0.1:1 down;",
                "}",
                "upstream web {",
                "server 10.0.0.1:3001 weight=100;  # n1 slot 0",
                "server 10.0.0.2:3002 weight=100;  # n2 slot 0",
                "}",
            ],
            "{out}"
        );
    }

    #[test]
    fn service_function_and_missing_services() {
        let t = Template::parse(
            "t",
            "{{ service('web')|length }} {{ service('nope')|length }} {{ generation }}",
        )
        .unwrap();
        assert_eq!(t.render(&catalog()).unwrap(), "2 0 3");
    }

    #[test]
    fn errors_name_the_template_and_the_problem() {
        let e = Template::parse("bad.j2", "{% for x in %}").err().unwrap();
        assert!(e.to_string().contains("bad.j2"), "{e}");
        let t = Template::parse("typo.j2", "{{ servces }}").unwrap();
        let e = t.render(&catalog()).unwrap_err();
        assert!(
            e.to_string().contains("typo.j2") && e.to_string().contains("undefined"),
            "{e}"
        );
    }
}
