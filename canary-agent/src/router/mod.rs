//! Request-aware routing for `protocol = "http"` services: the connection is accepted
//! on the node, its first request head read (bounded), a version decided by the
//! policy's rules (`decide`), and the client spliced to a backend of that version.

pub mod decide;

use crate::config::{Protocol, ServiceConfig};
use crate::policy::Policy;

/// Request rules need the request head, so they are only for `http` services.
pub fn check_service(svc: &ServiceConfig, policy: &Policy) -> Result<(), String> {
    if policy.routing.is_empty() || svc.protocol == Protocol::Http {
        return Ok(());
    }
    let protocol = match svc.protocol {
        Protocol::Tcp => "tcp",
        _ => "udp",
    };
    Err(format!(
        "service {:?} is protocol = \"{protocol}\" but its policy {} has request routing rules: \
         set protocol = \"http\" (HTTP/1.x) on the service or remove the rules",
        svc.name,
        svc.policy
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string())
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn agent_config(dir: &Path, protocol: &str) -> std::path::PathBuf {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/routing.scm");
        let path = dir.join(format!("agent-{protocol}.toml"));
        std::fs::write(
            &path,
            format!(
                "[agent]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\n\
                 listen = \"198.19.0.10:80\"\nprotocol = \"{protocol}\"\n\
                 stable = [\"198.18.2.2:8080\"]\ncanary = [\"198.18.3.2:8080\"]\n\
                 policy = {:?}\n",
                fixture.display().to_string()
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn request_rules_need_an_http_service_and_check_prints_the_plan() {
        let dir = std::env::temp_dir().join(format!("canary-router-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for protocol in ["tcp", "udp"] {
            let err = crate::cli::check(&agent_config(&dir, protocol))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("service \"web\" is protocol = \"{protocol}\""))
                    && err.contains("routing.scm has request routing rules"),
                "{err}"
            );
        }
        let plan = crate::cli::check(&agent_config(&dir, "http")).unwrap();
        assert!(
            plan.contains("Routing (decided once per connection"),
            "{plan}"
        );
        assert!(
            plan.contains("beta-users       header X-User-Group is \"beta\" -> canary"),
            "{plan}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
