//! The configuration is the desired state. On start and on every reload, this pure
//! function decides, from the config and what the kernel and `state_dir` already hold,
//! each service's id, weight and rollout — so that nothing from an earlier config
//! surfaces, and nothing live moves that the config did not ask to move:
//!
//! - an installed service keeps its id (pinned flows and counters refer to it);
//! - a running rollout owns the weight (a restart mid-rollout changes nothing);
//! - otherwise the live weight is kept only while the config's weight is the one last
//!   applied and the rollout that may have set it is still configured; a changed
//!   config weight, a new service or a removed policy apply the config weight;
//! - a removed policy drops the rollout; a changed policy replaces a pending or
//!   finished rollout with a fresh pending one, and is adopted by a running rollout;
//! - a release that finished stays handed over (the canary backends hold the stable
//!   role, weight 0) while the config's `canary` is the released version; a config
//!   naming another canary (the next version, with the released one as `stable`)
//!   starts a fresh pending rollout and moves no open connection;
//! - services no longer configured are removed from the maps.

use std::collections::BTreeMap;

use canary_common::{ServiceKey, ServiceValue, MAX_SERVICES, ROUTING_CIDR};

use super::state::Applied;
use crate::config::ServiceConfig;
use crate::controller::Rollout;
use crate::controller::RolloutState;
use crate::datapath::{service_key_for, KernelRouting};
use crate::policy::{Policy, WeightBp};

/// The decision for one configured service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    pub id: u32,
    pub weight_bp: WeightBp,
    /// The id was free: its counters belong to no one and must be zeroed.
    pub fresh: bool,
    pub rollout: Option<Rollout>,
    /// Whether the service's rollout state on disk must be rewritten (`Some`) or
    /// deleted (`None`).
    pub rollout_changed: bool,
    /// What changed, for the log and the reload answer.
    pub notes: Vec<String>,
    /// Decided in the kernel by client address: its table goes under the generation
    /// not in force (so the switch is one write of the service's value).
    pub kernel: Option<KernelRouting>,
    /// The service's release finished: install [`ServiceConfig::released`].
    pub released: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// Installed services no longer configured.
    pub stale: Vec<ServiceKey>,
}

/// What the agent (or the previous one) left behind.
pub struct Current<'a> {
    pub installed: &'a [(ServiceKey, ServiceValue)],
    pub applied: &'a Applied,
    pub rollouts: &'a BTreeMap<String, Rollout>,
}

pub fn plan(
    configured: &[ServiceConfig],
    policies: &[Option<Policy>],
    current: &Current,
    now_ms: u64,
) -> Plan {
    let routing = |p: &Option<Policy>| p.as_ref().map(|p| p.routing.clone()).unwrap_or_default();
    let keys: Vec<ServiceKey> = configured
        .iter()
        .zip(policies)
        .map(|(svc, p)| service_key_for(svc, &routing(p)))
        .collect();
    let stale = current
        .installed
        .iter()
        .filter(|(k, _)| !keys.contains(k))
        .map(|(k, _)| *k)
        .collect();
    let kept: Vec<u32> = current
        .installed
        .iter()
        .filter(|(k, _)| keys.contains(k))
        .map(|(_, v)| v.id)
        .collect();
    let mut free = (0..MAX_SERVICES).filter(|id| !kept.contains(id));
    let services = configured
        .iter()
        .zip(&keys)
        .zip(policies)
        .map(|((svc, key), policy)| {
            let installed = current.installed.iter().find(|(k, _)| k == key);
            let (id, fresh) = match installed {
                Some((_, v)) => (v.id, false),
                None => (
                    free.next().expect("config holds at most MAX_SERVICES"),
                    true,
                ),
            };
            let mut notes = Vec::new();
            let previous = current.rollouts.get(&svc.name);
            // A finished release stays handed over under whatever policy the config gives.
            let released_before = previous.filter(|r| is_released_to(r, svc));
            let (rollout, kept_owner) = match (released_before, policy) {
                (Some(r), Some(p)) => (Some(r.clone().with_policy(p.clone())), true),
                _ => reconcile_rollout(svc, previous, policy.as_ref(), now_ms, &mut notes),
            };
            let released = rollout.as_ref().is_some_and(|r| is_released_to(r, svc));
            let rollout_changed = rollout.as_ref() != previous;
            let config_changed = current
                .applied
                .services
                .get(&svc.name)
                .is_none_or(|a| a.config_weight_bp != svc.weight_bp);
            let running = rollout.as_ref().filter(|r| r.state().is_running());
            let weight_bp = match (running, installed) {
                _ if released => 0,
                (Some(r), _) => r.weight_bp(),
                (None, Some((_, v))) if !config_changed && kept_owner => v.weight_bp,
                (None, Some((_, v))) => {
                    if v.weight_bp != svc.weight_bp {
                        notes.push(format!(
                            "weight {} -> {} (from the config)",
                            crate::policy::percent(v.weight_bp),
                            crate::policy::percent(svc.weight_bp)
                        ));
                    }
                    svc.weight_bp
                }
                (None, None) => svc.weight_bp,
            };
            if fresh {
                notes.push("installed".into());
            }
            let kernel = routing(policy).kernel_table().map(|table| KernelRouting {
                gen: match installed {
                    Some((_, v)) if v.routing == ROUTING_CIDR => 1 - v.cidr_gen,
                    _ => 0,
                },
                client_key: table.client_key,
                rolled_back: rollout
                    .as_ref()
                    .is_some_and(|r| r.state() == RolloutState::RolledBack),
            });
            ServicePlan {
                id,
                weight_bp,
                fresh,
                rollout,
                rollout_changed,
                notes,
                kernel,
                released,
            }
        })
        .collect();
    Plan { services, stale }
}

/// A finished release whose released backends are still the config's canary.
fn is_released_to(rollout: &Rollout, svc: &ServiceConfig) -> bool {
    rollout.state() == RolloutState::Finished
        && rollout.released().is_some_and(|r| {
            let canary: Vec<String> = svc.canary.iter().map(|a| a.to_string()).collect();
            r.backends == canary
        })
}

/// The rollout a service has under `policy`, and whether whatever set the live weight
/// (the previous rollout, or none) is still in place.
fn reconcile_rollout(
    svc: &ServiceConfig,
    previous: Option<&Rollout>,
    policy: Option<&Policy>,
    now_ms: u64,
    notes: &mut Vec<String>,
) -> (Option<Rollout>, bool) {
    let service = svc.name.as_str();
    match (previous, policy) {
        (Some(r), Some(p)) if r.state() == RolloutState::Finished => {
            let released = r
                .released()
                .map(|r| r.backends.join(", "))
                .unwrap_or_default();
            notes.push(format!(
                "the release of {released} finished and the config names another canary: \
                 a new pending rollout (no connection moves)"
            ));
            (Some(Rollout::new(service, p.clone())), true)
        }
        (None, None) => (None, true),
        (Some(_), None) => {
            notes.push("policy removed: rollout dropped".into());
            (None, false)
        }
        (None, Some(p)) => (Some(Rollout::new(service, p.clone())), true),
        (Some(r), Some(p)) if r.policy() == p => (Some(r.clone()), true),
        (Some(r), Some(p)) if r.state().is_running() => {
            let mut r = r.clone();
            r.adopt_policy(p.clone(), now_ms);
            notes.push(format!(
                "policy changed: the {} rollout continues under the new policy",
                r.state()
            ));
            (Some(r), true)
        }
        (Some(r), Some(p)) => {
            notes.push(format!(
                "policy changed: the {} rollout is replaced by a new pending one",
                r.state()
            ));
            (Some(Rollout::new(service, p.clone())), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::AppliedService;
    use crate::config::Config;
    use crate::controller::{Actor, AnalysisHold, Command, RolloutState};
    use crate::datapath::{encode_service, service_key};
    use std::path::Path;

    fn services(n: usize, weight: &str) -> Vec<ServiceConfig> {
        let mut text = String::from("[agent]\ninterface = \"x\"\n");
        for i in 0..n {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nlisten = \"198.19.0.{i}:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\nweight = {weight}\n"
            );
        }
        Config::parse(&text, Path::new("t.toml")).unwrap().services
    }

    fn policy() -> Policy {
        crate::policy::parse_toml(
            "step = [{ at = 0, weight = 5 }, { at = \"1m\", weight = 50 }]",
            "p.toml",
        )
        .unwrap()
    }

    fn applied(entries: &[(&str, WeightBp)]) -> Applied {
        Applied {
            services: entries
                .iter()
                .map(|(n, w)| {
                    (
                        n.to_string(),
                        AppliedService {
                            config_weight_bp: *w,
                        },
                    )
                })
                .collect(),
        }
    }

    fn run(
        cfg: &[ServiceConfig],
        policies: &[Option<Policy>],
        installed: &[(ServiceKey, ServiceValue)],
        applied: &Applied,
        rollouts: &BTreeMap<String, Rollout>,
    ) -> Plan {
        let current = Current {
            installed,
            applied,
            rollouts,
        };
        plan(cfg, policies, &current, 1_000)
    }

    #[test]
    fn fresh_services_get_config_weights_and_free_ids() {
        let cfg = services(3, "10");
        let p = run(
            &cfg,
            &[None, None, None],
            &[],
            &Applied::default(),
            &BTreeMap::new(),
        );
        let got: Vec<_> = p
            .services
            .iter()
            .map(|s| (s.id, s.weight_bp, s.fresh))
            .collect();
        assert_eq!(got, vec![(0, 1000, true), (1, 1000, true), (2, 1000, true)]);
        assert!(p.stale.is_empty());
    }

    #[test]
    fn restart_keeps_ids_and_live_weights_and_drops_stale() {
        let cfg = services(3, "10");
        let other = services(5, "10");
        let installed = vec![
            (service_key(&cfg[1]), encode_service(&cfg[1], 0, 5000).value),
            (
                service_key(&other[4]),
                encode_service(&other[4], 1, 100).value,
            ),
        ];
        let applied = applied(&[("s0", 1000), ("s1", 1000), ("s2", 1000)]);
        let p = run(
            &cfg,
            &[None, None, None],
            &installed,
            &applied,
            &BTreeMap::new(),
        );
        let got: Vec<_> = p
            .services
            .iter()
            .map(|s| (s.id, s.weight_bp, s.fresh))
            .collect();
        // s1 keeps id 0 and its live 50 % (an operator's set-weight); the others take
        // ids not kept (1 was stale).
        assert_eq!(
            got,
            vec![(1, 1000, true), (0, 5000, false), (2, 1000, true)]
        );
        assert_eq!(p.stale, vec![service_key(&other[4])]);
    }

    /// Plans the one service `s0` (config weight 10 %), installed at `live_bp`, whose
    /// last applied config weight was `applied_bp` (`None`: no record).
    fn plan_one(
        policy: Option<Policy>,
        live_bp: WeightBp,
        applied_bp: Option<WeightBp>,
        rollout: Option<Rollout>,
    ) -> ServicePlan {
        let cfg = services(1, "10");
        let installed = vec![(
            service_key(&cfg[0]),
            encode_service(&cfg[0], 0, live_bp).value,
        )];
        let applied = applied(
            &applied_bp
                .map(|w| ("s0", w))
                .into_iter()
                .collect::<Vec<_>>(),
        );
        let rollouts = rollout.map(|r| ("s0".to_string(), r)).into_iter().collect();
        run(&cfg, &[policy], &installed, &applied, &rollouts)
            .services
            .remove(0)
    }

    #[test]
    fn a_kernel_routed_table_goes_under_the_generation_not_in_force() {
        let cidr = crate::policy::parse_toml(
            "step = [{ at = 0, weight = 5 }]\n[routing]\n\
             [[routing.cohort]]\nname = \"office\"\nclient_cidr = [\"198.18.7.0/24\"]\n\
             [routing.user_cohorts]\noffice = \"canary\"\n",
            "p.toml",
        )
        .unwrap();
        let cfg = services(1, "10");
        let kernel = |installed: &[(ServiceKey, ServiceValue)], rollout: Option<Rollout>| {
            let rollouts = rollout.map(|r| ("s0".to_string(), r)).into_iter().collect();
            run(
                &cfg,
                &[Some(cidr.clone())],
                installed,
                &Applied::default(),
                &rollouts,
            )
            .services[0]
                .kernel
        };
        let fresh = kernel(&[], None).unwrap();
        assert_eq!((fresh.gen, fresh.rolled_back), (0, false));
        let mut value = encode_service(&cfg[0], 0, 1000).value;
        fresh.apply(&mut value);
        let next = kernel(&[(service_key(&cfg[0]), value)], None).unwrap();
        assert_eq!(next.gen, 1, "the installed value holds generation 0");
        let mut r = Rollout::new("s0", cidr.clone());
        let by = || Actor::Operator("t".into());
        r.apply(Command::Start, by(), 0).unwrap();
        let reason = "bad".into();
        r.apply(Command::Rollback { reason }, by(), 1).unwrap();
        let back = kernel(&[], Some(r)).unwrap();
        assert!(back.rolled_back);
        assert_eq!(plan_one(Some(policy()), 0, None, None).kernel, None);
    }

    #[test]
    fn a_changed_config_weight_applies_over_the_live_one() {
        // Last applied config said 20 %: the config now says 10 %, so 10 % applies.
        assert_eq!(plan_one(None, 0, Some(2000), None).weight_bp, 1000);
        // No record at all (state from an older agent): the config applies too.
        assert_eq!(plan_one(None, 0, None, None).weight_bp, 1000);
    }

    fn rolled_back(name: &str) -> Rollout {
        let mut r = Rollout::new(name, policy());
        r.apply(Command::Start, Actor::Operator("t".into()), 0)
            .unwrap();
        r.apply(
            Command::Rollback {
                reason: "bad".into(),
            },
            Actor::Operator("t".into()),
            10,
        )
        .unwrap();
        r
    }

    #[test]
    fn a_removed_policy_drops_the_rollout_and_its_weight() {
        // The earlier run rolled web back to 0 %; the new config has no policy and
        // the same weight: the config weight applies, the rollout is gone.
        let p = plan_one(None, 0, Some(1000), Some(rolled_back("s0")));
        assert_eq!(p.weight_bp, 1000);
        assert_eq!(p.rollout, None);
        assert!(p.rollout_changed);
    }

    #[test]
    fn a_finished_rollout_under_the_same_policy_keeps_its_weight() {
        let p = plan_one(Some(policy()), 0, Some(1000), Some(rolled_back("s0")));
        assert_eq!(p.weight_bp, 0);
        assert_eq!(
            p.rollout.as_ref().unwrap().state(),
            RolloutState::RolledBack
        );
        assert!(!p.rollout_changed);
    }

    #[test]
    fn a_changed_policy_replaces_a_finished_rollout() {
        let other = crate::policy::parse_toml("step = [{ at = 0, weight = 1 }]", "q.toml").unwrap();
        let p = plan_one(Some(other.clone()), 0, Some(1000), Some(rolled_back("s0")));
        let r = p.rollout.as_ref().unwrap();
        assert_eq!(r.state(), RolloutState::Pending);
        assert_eq!(r.policy(), &other);
        assert_eq!(p.weight_bp, 1000);
    }

    #[test]
    fn a_running_rollout_owns_the_weight_and_adopts_a_new_policy() {
        let mut r = Rollout::new("s0", policy());
        r.apply(Command::Start, Actor::Operator("t".into()), 0)
            .unwrap();
        r.tick(61_000, AnalysisHold::Clear);
        assert_eq!(r.weight_bp(), 5000);
        // Same policy, config weight changed: the rollout still owns the weight.
        let p = plan_one(Some(policy()), 5000, Some(2000), Some(r.clone()));
        assert_eq!(p.weight_bp, 5000);
        let other = crate::policy::parse_toml(
            "step = [{ at = 0, weight = 5 }, { at = \"1m\", weight = 50 }, { at = \"2m\", weight = 100 }]",
            "q.toml",
        )
        .unwrap();
        let p = plan_one(Some(other.clone()), 5000, Some(1000), Some(r));
        let r = p.rollout.as_ref().unwrap();
        assert_eq!(r.state(), RolloutState::Progressing);
        assert_eq!(r.policy(), &other);
        assert_eq!(p.weight_bp, 5000);
    }
}
