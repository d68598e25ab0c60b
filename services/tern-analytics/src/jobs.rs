//! Background jobs with progress:
//! - `rebuild-rollups`: a tenant's rollups from its raw points (for data stored before rollups
//!   existed, or imported around the write path);
//! - `rerun-rule`: a rule over a historical range of stored telemetry, acting on what it emits
//!   (backfill), under the live engine's idempotency keys.
//!
//! A job is a store record updated as it runs (at most once a second), so its progress can be
//! read while it runs. A job whose process stopped is marked failed (at start-up when one
//! process owns the store, else once no process has updated it for a while), and can simply be
//! started again (both kinds are idempotent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_registry::RegistryError;
use tern_store::Store;
use uuid::Uuid;

use crate::rules::{RerunProgress, Rule, RuleActions, rerun};

const JOB: &str = "job";
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub tenant_id: TenantId,
    /// `rebuild-rollups` or `rerun-rule`.
    pub kind: String,
    /// `rerun-rule`: the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<Uuid>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub state: JobState,
    /// `rebuild-rollups`: the (device, metric) series, and the points they held.
    pub series_total: u64,
    pub series_done: u64,
    pub points_read: u64,
    /// `rerun-rule`: everything before this time is replayed and acted on; the messages
    /// replayed and the rows the rule emitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_to_ms: Option<i64>,
    #[serde(default)]
    pub messages_read: u64,
    #[serde(default)]
    pub rows_emitted: u64,
    pub created_at_ms: i64,
    /// When the job was last recorded: a running job's heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Jobs {
    store: Arc<dyn Store>,
    /// What re-run rules act through; `None`: no re-runs (no rule engine).
    actions: Option<Arc<RuleActions>>,
}

fn key(tenant: TenantId, id: Uuid) -> String {
    format!("{tenant}/{id}")
}

impl Jobs {
    pub fn new(store: Arc<dyn Store>, actions: Option<Arc<RuleActions>>) -> Self {
        Self { store, actions }
    }

    fn new_job(
        tenant: TenantId,
        kind: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Job, RegistryError> {
        if from_ms >= to_ms {
            return Err(ValidationError::new("from", "`from` must be before `to`").into());
        }
        Ok(Job {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            kind: kind.into(),
            rule_id: None,
            from_ms,
            to_ms,
            state: JobState::Running,
            series_total: 0,
            series_done: 0,
            points_read: 0,
            covered_to_ms: None,
            messages_read: 0,
            rows_emitted: 0,
            created_at_ms: now_ms(),
            updated_at_ms: None,
            finished_at_ms: None,
            error: None,
        })
    }

    /// Starts re-running `rule` over `[from_ms, to_ms)`: its rows are acted on as the live
    /// engine would (alerts, commands, webhooks, republishes), with the same idempotency keys,
    /// so no command the engine already sent is sent again.
    pub async fn rerun_rule(
        self: &Arc<Self>,
        rule: Rule,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Job, RegistryError> {
        let Some(actions) = self.actions.clone() else {
            return Err(RegistryError::FailedPrecondition(
                "this process runs no rules".into(),
            ));
        };
        crate::rules::validate_replay(&rule.sql)?;
        let mut job = Self::new_job(rule.tenant_id, "rerun-rule", from_ms, to_ms)?;
        job.rule_id = Some(rule.id);
        job.covered_to_ms = Some(from_ms);
        self.save(&job).await?;
        let this = self.clone();
        let started = job.clone();
        tokio::spawn(async move {
            let mut job = started;
            let (progress, mut seen) = tokio::sync::watch::channel(RerunProgress::default());
            let work = rerun(&actions, Arc::new(rule), (from_ms, to_ms), &progress);
            tokio::pin!(work);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = tokio::time::sleep(PROGRESS_EVERY) => {
                        Self::record_rerun(&mut job, *seen.borrow_and_update());
                        if let Err(e) = this.save(&job).await {
                            tracing::warn!(job = %job.id, error = %e, "cannot record the job's progress");
                        }
                    }
                }
            };
            let outcome = outcome.map(|p| Self::record_rerun(&mut job, p));
            this.finish(job, outcome).await;
        });
        Ok(job)
    }

    fn record_rerun(job: &mut Job, progress: RerunProgress) {
        job.covered_to_ms = Some(progress.covered_to_ms);
        job.messages_read = progress.messages;
        job.rows_emitted = progress.rows;
    }

    /// Records how a job ended.
    async fn finish(&self, mut job: Job, outcome: Result<(), RegistryError>) {
        job.finished_at_ms = Some(now_ms());
        match outcome {
            Ok(()) => job.state = JobState::Succeeded,
            Err(e) => {
                tracing::error!(job = %job.id, kind = %job.kind, error = %e, "job failed");
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
            }
        }
        if let Err(e) = self.save(&job).await {
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
        }
        tracing::info!(job = %job.id, tenant = %job.tenant_id, kind = %job.kind, "job ended");
    }

    async fn save(&self, job: &Job) -> Result<(), RegistryError> {
        let job = Job {
            updated_at_ms: Some(now_ms()),
            ..job.clone()
        };
        let bytes = Bytes::from(serde_json::to_vec(&job).unwrap_or_default());
        Ok(self
            .store
            .put_record(JOB, &key(job.tenant_id, job.id), bytes)
            .await?)
    }

    /// Starts rebuilding the tenant's rollups over `[from_ms, to_ms)` (whole UTC days).
    pub async fn rebuild_rollups(
        self: &Arc<Self>,
        tenant: TenantId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Job, RegistryError> {
        let job = Self::new_job(tenant, "rebuild-rollups", from_ms, to_ms)?;
        self.save(&job).await?;
        let this = self.clone();
        let started = job.clone();
        tokio::spawn(async move { this.run(started).await });
        Ok(job)
    }

    async fn run(&self, mut job: Job) {
        let outcome = self.rebuild(&mut job).await;
        self.finish(job, outcome).await;
    }

    async fn rebuild(&self, job: &mut Job) -> Result<(), RegistryError> {
        let tenant = job.tenant_id.to_string();
        let series = self.store.series(&tenant).await?;
        job.series_total = series.len() as u64;
        let mut reported = Instant::now();
        for (device, metric) in series {
            job.points_read += self
                .store
                .rebuild_rollups(&tenant, &device, &metric, job.from_ms, job.to_ms)
                .await?;
            job.series_done += 1;
            if reported.elapsed() >= PROGRESS_EVERY {
                self.save(job).await?;
                reported = Instant::now();
            }
        }
        Ok(())
    }

    pub async fn get(&self, tenant: TenantId, id: &str) -> Result<Job, RegistryError> {
        let not_found = || RegistryError::NotFound(format!("job {id:?}"));
        let id = Uuid::parse_str(id).map_err(|_| not_found())?;
        let key = key(tenant, id);
        let bytes = self
            .store
            .get_record(JOB, &key)
            .await?
            .ok_or_else(not_found)?;
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
            key,
            reason: e.to_string(),
        })
    }

    /// A tenant's jobs, newest first.
    pub async fn list(&self, tenant: TenantId) -> Result<Vec<Job>, RegistryError> {
        let records = self
            .store
            .list_records(JOB, &format!("{tenant}/"), None, usize::MAX)
            .await?;
        let mut jobs: Vec<Job> = records
            .iter()
            .map(|(key, bytes)| {
                serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        jobs.reverse();
        Ok(jobs)
    }

    /// Marks jobs whose process stopped as failed: every running job (`None`: at start-up, when
    /// this process alone runs jobs on its store), or those not updated for `stale_after_ms`.
    pub async fn fail_interrupted(
        &self,
        stale_after_ms: Option<i64>,
    ) -> Result<usize, RegistryError> {
        let mut failed = 0;
        let now = now_ms();
        for (key, bytes) in self.store.list_records(JOB, "", None, usize::MAX).await? {
            let Ok(mut job) = serde_json::from_slice::<Job>(&bytes) else {
                continue;
            };
            let last_seen = job.updated_at_ms.unwrap_or(job.created_at_ms);
            let stopped = stale_after_ms.is_none_or(|stale| now - last_seen > stale);
            if job.state == JobState::Running && stopped {
                job.state = JobState::Failed;
                job.finished_at_ms = Some(now_ms());
                job.error = Some("interrupted by a restart; start it again".into());
                self.save(&job).await?;
                failed += 1;
                tracing::warn!(key, "job interrupted by a restart marked failed");
            }
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    /// Stores a running job last updated `age_ms` ago.
    async fn running(jobs: &Jobs, age_ms: i64) -> Job {
        let mut job =
            Jobs::new_job(TenantId::random(), "rebuild-rollups", 0, 86_400_000).expect("job");
        job.updated_at_ms = Some(now_ms() - age_ms);
        let bytes = Bytes::from(serde_json::to_vec(&job).expect("json"));
        jobs.store
            .put_record(JOB, &key(job.tenant_id, job.id), bytes)
            .await
            .expect("put");
        job
    }

    #[tokio::test]
    async fn only_jobs_nobody_updates_are_failed_when_the_store_is_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jobs = Jobs::new(
            Arc::new(EmbeddedStore::open(dir.path()).expect("store")),
            None,
        );
        let live = running(&jobs, 1_000).await;
        let abandoned = running(&jobs, 600_000).await;

        assert_eq!(
            jobs.fail_interrupted(Some(300_000)).await.expect("sweep"),
            1
        );
        let state = |job: Job| job.state;
        assert_eq!(
            state(
                jobs.get(abandoned.tenant_id, &abandoned.id.to_string())
                    .await
                    .expect("get")
            ),
            JobState::Failed
        );
        assert_eq!(
            state(
                jobs.get(live.tenant_id, &live.id.to_string())
                    .await
                    .expect("get")
            ),
            JobState::Running
        );

        // Alone on its store at start-up, a process fails every job still running.
        assert_eq!(jobs.fail_interrupted(None).await.expect("sweep"), 1);
        assert_eq!(
            state(
                jobs.get(live.tenant_id, &live.id.to_string())
                    .await
                    .expect("get")
            ),
            JobState::Failed
        );
    }
}
