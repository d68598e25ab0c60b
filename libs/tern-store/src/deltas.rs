//! Points folded into what they add to their rollup buckets, for [`crate::Store::merge_rollups`]:
//! a consumer of the log folds many points in memory and merges each bucket once, instead of
//! a read-modify-write of three buckets per point.

use std::collections::HashMap;

use crate::keys::component;
use crate::{Point, Resolution, Rollup, StoreError};

/// What some points add to one rollup bucket of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupDelta {
    pub tenant: String,
    pub device: String,
    pub metric: String,
    pub resolution: Resolution,
    pub rollup: Rollup,
}

/// The minute, hour and day buckets that points fall into, with what each adds.
#[derive(Debug, Clone, Default)]
pub struct RollupDeltas {
    /// By series (tenant, device, metric): few buckets each, usually one per resolution.
    series: HashMap<(String, String, String), Vec<(Resolution, Rollup)>>,
    points: u64,
}

impl RollupDeltas {
    /// Adds one value to its minute, hour and day buckets; refuses what the store would refuse
    /// to write as a point, so that a merge never fails on one bad name or value.
    pub fn add(
        &mut self,
        tenant: &str,
        device: &str,
        metric: &str,
        ts_ms: i64,
        value: f64,
    ) -> Result<(), StoreError> {
        component("tenant", tenant)?;
        component("device", device)?;
        component("metric", metric)?;
        if !value.is_finite() {
            return Err(StoreError::Invalid {
                field: "value",
                reason: "must be a finite number".into(),
            });
        }
        let buckets = self
            .series
            .entry((tenant.to_string(), device.to_string(), metric.to_string()))
            .or_default();
        for resolution in Resolution::ALL {
            let one = Rollup::of(resolution.bucket_start(ts_ms), value);
            match buckets
                .iter_mut()
                .find(|(r, b)| *r == resolution && b.start_ms == one.start_ms)
            {
                Some((_, bucket)) => bucket.merge(&one),
                None => buckets.push((resolution, one)),
            }
        }
        self.points += 1;
        Ok(())
    }

    pub fn add_point(&mut self, point: &Point) -> Result<(), StoreError> {
        self.add(
            &point.tenant,
            &point.device,
            &point.metric,
            point.ts_ms,
            point.value,
        )
    }

    /// Points added so far.
    pub fn points(&self) -> u64 {
        self.points
    }

    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    pub fn into_deltas(self) -> Vec<RollupDelta> {
        self.series
            .into_iter()
            .flat_map(|((tenant, device, metric), buckets)| {
                buckets
                    .into_iter()
                    .map(move |(resolution, rollup)| RollupDelta {
                        tenant: tenant.clone(),
                        device: device.clone(),
                        metric: metric.clone(),
                        resolution,
                        rollup,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fold_into_one_delta_per_bucket() {
        let mut deltas = RollupDeltas::default();
        for (metric, ts, value) in [("m", 1_000, 2.0), ("m", 2_000, 4.0), ("m", 61_000, 9.0)] {
            deltas.add("t", "d", metric, ts, value).expect("valid");
        }
        deltas.add("t", "d", "other", 1_000, 1.0).expect("valid");
        assert!(deltas.add("t", "d", "m", 3_000, f64::NAN).is_err());
        assert!(deltas.add("t", "", "m", 3_000, 1.0).is_err());
        assert_eq!(deltas.points(), 4, "refused values add nothing");
        let mut out = deltas.into_deltas();
        out.sort_by(|a, b| {
            (&a.metric, a.resolution, a.rollup.start_ms).cmp(&(
                &b.metric,
                b.resolution,
                b.rollup.start_ms,
            ))
        });
        let summary: Vec<_> = out
            .iter()
            .map(|d| {
                (
                    d.metric.as_str(),
                    d.resolution,
                    d.rollup.start_ms,
                    d.rollup.count,
                    d.rollup.sum,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("m", Resolution::Minute, 0, 2, 6.0),
                ("m", Resolution::Minute, 60_000, 1, 9.0),
                ("m", Resolution::Hour, 0, 3, 15.0),
                ("m", Resolution::Day, 0, 3, 15.0),
                ("other", Resolution::Minute, 0, 1, 1.0),
                ("other", Resolution::Hour, 0, 1, 1.0),
                ("other", Resolution::Day, 0, 1, 1.0),
            ]
        );
        assert_eq!((out[0].rollup.min, out[0].rollup.max), (2.0, 4.0));
    }
}
