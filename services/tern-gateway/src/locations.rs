//! `GET /api/v1/tenants/{tenant}/devices/{device}/locations`: where a device has been. A
//! position is telemetry: the metrics `lat` and `lon` (degrees, WGS 84), and optionally
//! `accuracy_m`, in one message, as tern-agent's `locate` records it and any device may
//! publish it. Samples of the same time are joined into one position.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use tern_store::LatestValue;

use crate::auth::Authenticated;
use crate::extract::ApiQuery;
use crate::routes::{RangeParams, device_for};
use crate::{ApiError, Gateway};

const LAT: &str = "lat";
const LON: &str = "lon";
const ACCURACY: &str = "accuracy_m";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Position {
    ts: i64,
    lat: f64,
    lon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy_m: Option<f64>,
}

#[derive(Serialize)]
pub(crate) struct Locations {
    device_id: String,
    positions: Vec<Position>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocationParams {
    /// Milliseconds since the epoch, inclusive; default 24 hours ago.
    from: Option<i64>,
    /// Milliseconds since the epoch, exclusive; default unbounded.
    to: Option<i64>,
    limit: Option<usize>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
}

pub(crate) async fn history(
    State(gw): State<Arc<Gateway>>,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<LocationParams>,
) -> Result<Json<Locations>, ApiError> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let query = RangeParams {
        from: params.from,
        to: params.to,
        limit: params.limit,
        order: params.order,
        ..Default::default()
    }
    .query(&device)?;
    let series = |points: Vec<tern_store::Point>| -> BTreeMap<i64, f64> {
        points.into_iter().map(|p| (p.ts_ms, p.value)).collect()
    };
    let lat = series(gw.store.points(&query, LAT).await?);
    let lon = series(gw.store.points(&query, LON).await?);
    let accuracy = series(gw.store.points(&query, ACCURACY).await?);
    let mut positions = join(&lat, &lon, &accuracy);
    if query.descending {
        positions.reverse();
    }
    Ok(Json(Locations {
        device_id: device.id.to_string(),
        positions,
    }))
}

/// The newest position among a device's latest values, for its status.
pub(crate) fn last_position(latest: &[LatestValue]) -> Option<Position> {
    let value = |metric: &str| latest.iter().find(|v| v.metric == metric);
    let (lat, lon) = (value(LAT)?, value(LON)?);
    // Both from the same message, or they describe no one place.
    (lat.ts_ms == lon.ts_ms).then(|| Position {
        ts: lat.ts_ms,
        lat: lat.value,
        lon: lon.value,
        accuracy_m: value(ACCURACY)
            .filter(|a| a.ts_ms == lat.ts_ms)
            .map(|a| a.value),
    })
}

/// Positions where a latitude and a longitude share a timestamp, oldest first.
fn join(
    lat: &BTreeMap<i64, f64>,
    lon: &BTreeMap<i64, f64>,
    accuracy: &BTreeMap<i64, f64>,
) -> Vec<Position> {
    lat.iter()
        .filter_map(|(ts, lat)| {
            Some(Position {
                ts: *ts,
                lat: *lat,
                lon: *lon.get(ts)?,
                accuracy_m: accuracy.get(ts).copied(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_join_samples_of_the_same_time() {
        let lat = BTreeMap::from([(1, 52.5), (2, 48.1), (3, 40.0)]);
        let lon = BTreeMap::from([(1, 13.4), (2, 11.6)]);
        let accuracy = BTreeMap::from([(2, 8.0)]);
        let positions = join(&lat, &lon, &accuracy);
        assert_eq!(positions.len(), 2, "no longitude at 3: no position");
        assert_eq!((positions[0].lat, positions[0].lon), (52.5, 13.4));
        assert_eq!(positions[0].accuracy_m, None);
        assert_eq!(positions[1].accuracy_m, Some(8.0));

        let latest = |metric: &str, ts, value| LatestValue {
            metric: metric.into(),
            ts_ms: ts,
            value,
        };
        let now = [
            latest("lat", 5, 1.0),
            latest("lon", 5, 2.0),
            latest("temp", 9, 20.0),
        ];
        assert_eq!(last_position(&now).map(|p| (p.ts, p.lon)), Some((5, 2.0)));
        let torn = [latest("lat", 5, 1.0), latest("lon", 6, 2.0)];
        assert_eq!(last_position(&torn), None, "from two messages");
    }
}
