//! Model placement, decided by the leader: a model whose loaded copies are
//! all busy for a while gets one more node (one that has it on disk), and a
//! model that stays quiet gives the extra nodes back. Plain data in, at
//! most one [`Command`] out; the hysteresis timers live in [`Planner`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use llmesh_proto::{Command, NodeState, Placement, SetPlacement, command};

use super::state::ClusterState;

/// When the leader adds and drops model copies.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementConfig {
    /// Whether the leader manages placement at all.
    pub enabled: bool,
    /// Busy requests per loaded slot at or above which a model is hot.
    pub hot_pressure: f64,
    /// Pressure at or below which a model is cool.
    pub cool_pressure: f64,
    /// How long a model must stay hot before it gets another node.
    pub hot_for: Duration,
    /// How long a model must stay cool before it gives a node back.
    pub cool_for: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            enabled: true,
            hot_pressure: 1.0,
            cool_pressure: 0.25,
            hot_for: Duration::from_secs(3),
            cool_for: Duration::from_secs(300),
        }
    }
}

/// The leader's placement memory between rounds.
#[derive(Debug)]
pub struct Planner {
    config: PlacementConfig,
    hot_since: HashMap<String, Instant>,
    cool_since: HashMap<String, Instant>,
}

/// What the planner knows about one model across the mesh.
#[derive(Debug, Default)]
struct ModelView {
    busy: f64,
    loaded_slots: f64,
    loaded_on: BTreeSet<String>,
    on_disk: Vec<(String, f64)>,
}

impl Planner {
    /// A planner with no history.
    pub fn new(config: PlacementConfig) -> Planner {
        Planner { config, hot_since: HashMap::new(), cool_since: HashMap::new() }
    }

    /// Busy requests per loaded slot for every model any live node knows.
    fn survey(state: &ClusterState, nodes: &[&NodeState]) -> BTreeMap<String, ModelView> {
        let mut models: BTreeMap<String, ModelView> = BTreeMap::new();
        for node in nodes {
            let in_service = node.backend_healthy && !node.draining && !state.is_out_of_service(&node.node_id);
            let slots = f64::from(node.parallel_slots.max(1));
            let load = f64::from(node.in_flight) / slots;
            for model in &node.models {
                let view = models.entry(model.name.clone()).or_default();
                if model.loaded {
                    view.loaded_on.insert(node.node_id.clone());
                    view.loaded_slots += slots;
                } else if in_service {
                    view.on_disk.push((node.node_id.clone(), load));
                }
            }
            for load in &node.model_load {
                let view = models.entry(load.model.clone()).or_default();
                view.busy += f64::from(load.in_flight) + f64::from(load.queued);
            }
        }
        models
    }

    /// One planning round over the live nodes' gossiped state (the
    /// leader's own included); a [`Command`] when placement should change.
    pub fn plan(&mut self, state: &ClusterState, nodes: &[&NodeState], now: Instant) -> Option<Command> {
        if !self.config.enabled {
            return None;
        }
        let live: BTreeSet<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
        let mut desired: BTreeMap<String, BTreeSet<String>> = state
            .placement
            .iter()
            .map(|(m, ns)| {
                let kept = ns.iter().filter(|n| live.contains(n.as_str()) && !state.is_out_of_service(n)).cloned();
                (m.clone(), kept.collect::<BTreeSet<_>>())
            })
            .filter(|(_, ns)| !ns.is_empty())
            .collect();
        for (model, view) in Self::survey(state, nodes) {
            let pressure = if view.loaded_slots > 0.0 {
                view.busy / view.loaded_slots
            } else if view.busy > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            if pressure >= self.config.hot_pressure {
                self.cool_since.remove(&model);
                let since = *self.hot_since.entry(model.clone()).or_insert(now);
                if now.duration_since(since) < self.config.hot_for {
                    continue;
                }
                let entry = desired.entry(model.clone()).or_default();
                let mut candidates: Vec<&(String, f64)> =
                    view.on_disk.iter().filter(|(n, _)| !entry.contains(n) && !view.loaded_on.contains(n)).collect();
                candidates.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
                if let Some((node, _)) = candidates.first() {
                    entry.extend(view.loaded_on.iter().filter(|n| live.contains(n.as_str())).cloned());
                    entry.insert(node.clone());
                    // The next copy needs another full hot period.
                    self.hot_since.insert(model.clone(), now);
                }
            } else {
                self.hot_since.remove(&model);
                if pressure <= self.config.cool_pressure {
                    let since = *self.cool_since.entry(model.clone()).or_insert(now);
                    if now.duration_since(since) >= self.config.cool_for && desired.remove(&model).is_some() {
                        self.cool_since.remove(&model);
                    }
                } else {
                    self.cool_since.remove(&model);
                }
            }
        }
        desired.retain(|_, ns| !ns.is_empty());
        if desired == state.placement {
            return None;
        }
        let placement = desired
            .into_iter()
            .map(|(model, nodes)| Placement { model, node_ids: nodes.into_iter().collect() })
            .collect();
        Some(Command { kind: Some(command::Kind::SetPlacement(SetPlacement { placement })) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::{ModelInfo, ModelLoad};

    fn node(id: &str, loaded: &[&str], on_disk: &[&str], busy: &[(&str, u32)]) -> NodeState {
        let mut models: Vec<ModelInfo> =
            loaded.iter().map(|m| ModelInfo { name: m.to_string(), loaded: true, ..ModelInfo::default() }).collect();
        models.extend(on_disk.iter().map(|m| ModelInfo { name: m.to_string(), ..ModelInfo::default() }));
        NodeState {
            node_id: id.into(),
            backend_healthy: true,
            parallel_slots: 2,
            in_flight: busy.iter().map(|b| b.1).sum(),
            models,
            model_load: busy
                .iter()
                .map(|(m, n)| ModelLoad { model: m.to_string(), in_flight: *n, ..ModelLoad::default() })
                .collect(),
            ..NodeState::default()
        }
    }

    fn config() -> PlacementConfig {
        PlacementConfig { hot_for: Duration::from_secs(2), cool_for: Duration::from_secs(10), ..Default::default() }
    }

    fn placed(command: Option<Command>) -> BTreeMap<String, Vec<String>> {
        match command.and_then(|c| c.kind) {
            Some(command::Kind::SetPlacement(set)) => {
                set.placement.into_iter().map(|p| (p.model, p.node_ids)).collect()
            }
            other => panic!("expected a placement, got {other:?}"),
        }
    }

    #[test]
    fn a_model_hot_for_long_enough_gets_a_second_node() {
        let mut planner = Planner::new(config());
        let mut state = ClusterState::default();
        let a = node("a", &["m"], &[], &[("m", 2)]);
        let b = node("b", &[], &["m"], &[]);
        let c = node("c", &[], &[], &[]);
        let t0 = Instant::now();
        assert!(planner.plan(&state, &[&a, &b, &c], t0).is_none(), "hot, but not for long yet");
        let plan = placed(planner.plan(&state, &[&a, &b, &c], t0 + Duration::from_secs(3)));
        assert_eq!(plan.get("m"), Some(&vec!["a".to_string(), "b".to_string()]));
        // Once applied, the same view proposes nothing new (only b and c had it).
        state
            .apply(&Command {
                kind: Some(command::Kind::SetPlacement(SetPlacement {
                    placement: vec![Placement { model: "m".into(), node_ids: vec!["a".into(), "b".into()] }],
                })),
            })
            .expect("applies");
        assert!(planner.plan(&state, &[&a, &b, &c], t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn a_quiet_model_gives_its_nodes_back_after_the_cool_period() {
        let mut planner = Planner::new(config());
        let mut state = ClusterState::default();
        state
            .apply(&Command {
                kind: Some(command::Kind::SetPlacement(SetPlacement {
                    placement: vec![Placement { model: "m".into(), node_ids: vec!["a".into(), "b".into()] }],
                })),
            })
            .expect("applies");
        let a = node("a", &["m"], &[], &[]);
        let b = node("b", &["m"], &[], &[]);
        let t0 = Instant::now();
        assert!(planner.plan(&state, &[&a, &b], t0).is_none());
        assert!(planner.plan(&state, &[&a, &b], t0 + Duration::from_secs(5)).is_none(), "hysteresis");
        assert!(placed(planner.plan(&state, &[&a, &b], t0 + Duration::from_secs(11))).is_empty());
    }

    #[test]
    fn drained_and_dead_nodes_are_never_chosen() {
        let mut planner = Planner::new(PlacementConfig { hot_for: Duration::ZERO, ..config() });
        let mut state = ClusterState::default();
        state
            .apply(&Command {
                kind: Some(command::Kind::SetDrained(llmesh_proto::SetDrained { node_id: "b".into(), drained: true })),
            })
            .expect("applies");
        let a = node("a", &["m"], &[], &[("m", 4)]);
        let b = node("b", &[], &["m"], &[]);
        assert!(planner.plan(&state, &[&a, &b], Instant::now()).is_none());
    }
}
