//! Background jobs with progress. Today one kind: rebuilding a tenant's rollups from its raw
//! points (for data stored before rollups existed, or imported around the write path).
//!
//! A job is a store record updated as it runs (at most once a second), so its progress can be
//! read while it runs; a job that a restart interrupted is marked failed when the process
//! starts again, and can simply be started again (a rebuild is idempotent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_registry::RegistryError;
use tern_store::Store;
use uuid::Uuid;

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
    /// `rebuild-rollups`.
    pub kind: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub state: JobState,
    pub series_total: u64,
    pub series_done: u64,
    pub points_read: u64,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Jobs {
    store: Arc<dyn Store>,
}

fn key(tenant: TenantId, id: Uuid) -> String {
    format!("{tenant}/{id}")
}

impl Jobs {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    async fn save(&self, job: &Job) -> Result<(), RegistryError> {
        let bytes = Bytes::from(serde_json::to_vec(job).unwrap_or_default());
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
        if from_ms >= to_ms {
            return Err(ValidationError::new("from", "`from` must be before `to`").into());
        }
        let job = Job {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            kind: "rebuild-rollups".into(),
            from_ms,
            to_ms,
            state: JobState::Running,
            series_total: 0,
            series_done: 0,
            points_read: 0,
            created_at_ms: now_ms(),
            finished_at_ms: None,
            error: None,
        };
        self.save(&job).await?;
        let this = self.clone();
        let started = job.clone();
        tokio::spawn(async move { this.run(started).await });
        Ok(job)
    }

    async fn run(&self, mut job: Job) {
        let outcome = self.rebuild(&mut job).await;
        job.finished_at_ms = Some(now_ms());
        match outcome {
            Ok(()) => job.state = JobState::Succeeded,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "rollup rebuild failed");
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
            }
        }
        if let Err(e) = self.save(&job).await {
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
        }
        tracing::info!(job = %job.id, tenant = %job.tenant_id, series = job.series_done, points = job.points_read, "rollup rebuild ended");
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

    /// Marks jobs that were running when the process stopped as failed; run at start-up.
    pub async fn fail_interrupted(&self) -> Result<usize, RegistryError> {
        let mut failed = 0;
        for (key, bytes) in self.store.list_records(JOB, "", None, usize::MAX).await? {
            let Ok(mut job) = serde_json::from_slice::<Job>(&bytes) else {
                continue;
            };
            if job.state == JobState::Running {
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
