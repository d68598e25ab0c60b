//! The rule engine's state, one slot per checkpoint: which rules a consumer runs (its scope),
//! the slots it holds for the partitions it reads, and their checkpoints in the store, read
//! at a (re)assignment and written by compare-and-swap so that a process that lost a
//! partition cannot overwrite the new owner's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::TenantId;
use tern_store::Store;
use uuid::Uuid;

use super::engine::{FLEET_RULES_GROUP, RULES_GROUP};
use super::model::Rule;
use super::sql::Plan;
use super::window::RuleState;

const CHECKPOINT: &str = "rule_checkpoint";

/// Which rules a consumer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scope {
    /// Every rule, on this process's own log; checkpoints keyed `{prefix}{stream}`.
    All { prefix: Arc<str> },
    /// Rules whose rows each come from one device, on the streams' partitions.
    Devices,
    /// Rules whose groups span devices, on `rules-shuffle`'s partitions.
    Fleet,
}

impl Scope {
    pub(super) fn group(&self) -> &'static str {
        match self {
            Scope::All { .. } | Scope::Devices => RULES_GROUP,
            Scope::Fleet => FLEET_RULES_GROUP,
        }
    }

    pub(super) fn includes(&self, plan: &Plan) -> bool {
        match self {
            Scope::All { .. } => true,
            Scope::Devices => plan.per_device(),
            Scope::Fleet => !plan.per_device(),
        }
    }
}

/// The rule state a consumer holds, one slot per checkpoint: a partition's, or the whole
/// stream's in a process alone on its store.
pub(super) struct Slots {
    pub(super) stream: &'static str,
    pub(super) scope: Scope,
    /// The consumer's assignment generation the slots were loaded for.
    pub(super) generation: Option<u64>,
    /// By [`Slots::number`].
    pub(super) held: HashMap<u32, Slot>,
    /// Slots another process saved since this one read them, until the next rebalance.
    pub(super) fenced: HashSet<u32>,
}

impl Slots {
    pub(super) fn new(stream: &'static str, scope: Scope) -> Self {
        Self {
            stream,
            scope,
            generation: None,
            held: HashMap::new(),
            fenced: HashSet::new(),
        }
    }

    /// The slot a record of `partition` folds into: the partition's own, or the stream's one.
    pub(super) fn number(&self, partition: u32) -> u32 {
        match self.scope {
            Scope::Devices | Scope::Fleet => partition,
            Scope::All { .. } => 0,
        }
    }

    /// The checkpoint key of a slot.
    pub(super) fn key(&self, number: u32) -> String {
        match &self.scope {
            Scope::Devices | Scope::Fleet => format!("{}/{number}", self.stream),
            Scope::All { prefix } => format!("{prefix}{}", self.stream),
        }
    }

    pub(super) fn of(&mut self, partition: u32) -> Option<&mut Slot> {
        let number = self.number(partition);
        self.held.get_mut(&number)
    }
}

pub(super) struct Slot {
    /// Its checkpoint's key in the store.
    pub(super) key: String,
    /// The last offset folded into the states, per partition.
    pub(super) applied: BTreeMap<u32, u64>,
    pub(super) running: HashMap<TenantId, Vec<Running>>,
    /// The checkpoint as this process last read or wrote it: what a save expects to replace.
    pub(super) stored: Option<Bytes>,
    /// Offsets folded in since the last save, per partition: committed once it is saved.
    pub(super) unsaved: BTreeMap<u32, u64>,
    /// `rules-shuffle` only: the last source offset folded in, per rule and source partition.
    pub(super) sources: BTreeMap<String, u64>,
}

impl Slot {
    /// Takes changed rules: an unchanged rule keeps its state, a changed one starts afresh.
    pub(super) fn reload(&mut self, rules: &[EnabledRule]) {
        self.running = assemble(
            rules,
            &mut BTreeMap::new(),
            std::mem::take(&mut self.running),
        );
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Checkpoint {
    /// The last offset folded into the states, per partition.
    applied: BTreeMap<u32, u64>,
    states: BTreeMap<Uuid, SavedState>,
    /// `rules-shuffle` only: the last offset folded in per rule and source.
    #[serde(default)]
    sources: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    version: u64,
    state: RuleState,
}

pub(super) struct Running {
    pub(super) rule: Arc<Rule>,
    pub(super) plan: Arc<Plan>,
    pub(super) state: RuleState,
}

impl Running {
    pub(super) fn lateness_ms(&self) -> i64 {
        (self.rule.allowed_lateness_secs * 1000) as i64
    }
}

/// A rule and its compiled plan.
pub(super) type EnabledRule = (Arc<Rule>, Arc<Plan>);

/// The rules by tenant, each with its state: kept from `previous` when the rule is unchanged
/// (same version), else taken from a checkpoint saved at the same version, else empty.
fn assemble(
    rules: &[EnabledRule],
    saved: &mut BTreeMap<Uuid, SavedState>,
    mut previous: HashMap<TenantId, Vec<Running>>,
) -> HashMap<TenantId, Vec<Running>> {
    let mut kept: HashMap<(Uuid, u64), RuleState> = previous
        .drain()
        .flat_map(|(_, rules)| rules)
        .map(|r| ((r.rule.id, r.rule.version), r.state))
        .collect();
    let mut running: HashMap<TenantId, Vec<Running>> = HashMap::new();
    for (rule, plan) in rules {
        let state = kept
            .remove(&(rule.id, rule.version))
            .or_else(|| {
                saved
                    .remove(&rule.id)
                    .filter(|s| s.version == rule.version)
                    .map(|s| s.state)
            })
            .unwrap_or_default();
        running.entry(rule.tenant_id).or_default().push(Running {
            rule: rule.clone(),
            plan: plan.clone(),
            state,
        });
    }
    running
}

/// A slot's state as its checkpoint left it (empty windows when there is none).
pub(super) async fn load(store: &dyn Store, key: String, rules: &[EnabledRule]) -> Slot {
    let stored = loop {
        match store.get_record(CHECKPOINT, &key).await {
            Ok(stored) => break stored,
            Err(e) => {
                tracing::error!(error = %e, checkpoint = %key, "cannot read the rule checkpoint; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut checkpoint = match stored.as_deref().map(serde_json::from_slice::<Checkpoint>) {
        Some(Ok(checkpoint)) => checkpoint,
        Some(Err(e)) => {
            tracing::error!(error = %e, checkpoint = %key, "rule checkpoint unreadable; rules start with empty windows");
            Checkpoint::default()
        }
        None => Checkpoint::default(),
    };
    Slot {
        key,
        running: assemble(rules, &mut checkpoint.states, HashMap::new()),
        applied: checkpoint.applied,
        sources: checkpoint.sources,
        stored,
        unsaved: BTreeMap::new(),
    }
}

/// Writes the slot's checkpoint if it is still the one this process read or wrote last,
/// retrying while the store cannot be reached. Returns false when another process wrote it.
pub(super) async fn save(store: &dyn Store, slot: &mut Slot) -> bool {
    #[derive(Serialize)]
    struct Saved<'a> {
        version: u64,
        state: &'a RuleState,
    }
    #[derive(Serialize)]
    struct CheckpointRef<'a> {
        applied: &'a BTreeMap<u32, u64>,
        states: BTreeMap<Uuid, Saved<'a>>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        sources: &'a BTreeMap<String, u64>,
    }
    let states = slot
        .running
        .values()
        .flatten()
        .filter(|r| r.plan.windowed.is_some())
        .map(|r| {
            (
                r.rule.id,
                Saved {
                    version: r.rule.version,
                    state: &r.state,
                },
            )
        })
        .collect();
    let checkpoint = CheckpointRef {
        applied: &slot.applied,
        states,
        sources: &slot.sources,
    };
    let bytes = match serde_json::to_vec(&checkpoint) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the rule checkpoint");
            return true;
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match store
            .compare_and_swap(
                CHECKPOINT,
                &slot.key,
                slot.stored.clone(),
                Some(bytes.clone()),
            )
            .await
        {
            Ok(true) => {
                slot.stored = Some(bytes);
                return true;
            }
            Ok(false) => return false,
            Err(e) => {
                tracing::error!(error = %e, "cannot save the rule checkpoint; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
