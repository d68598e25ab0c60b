//! The PDP: defaults, validation errors, permit/forbid combining, context conditions,
//! versions and rollback, what-if, audit.

use std::collections::BTreeMap;
use std::sync::Arc;

use tern_core::TenantId;
use tern_store::{EmbeddedStore, Store};

use super::*;

/// The worked example of docs/policies.md: the maintenance app may send commands only to
/// devices labelled site=berlin, 08:00 to 18:00 UTC, from 10.20.0.0/16.
pub(crate) const MAINTENANCE: &str = r#"
forbid (principal == Client::"tern_cl_maintenance", action, resource)
unless {
  action == Action::"sendCommand" &&
  resource is Device && resource.hasTag("site") && resource.getTag("site") == "berlin" &&
  context.hour >= 8 && context.hour < 18 &&
  context has source_ip && context.source_ip.isInRange(ip("10.20.0.0/16"))
};
"#;

/// 2026-11-25 14:30 UTC.
const AFTERNOON: i64 = 1_795_617_000;

async fn pdp() -> (tempfile::TempDir, Pdp) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    (dir, Pdp::new(store).await.expect("pdp"))
}

fn device(site: &str) -> Resource {
    Resource::Device {
        id: format!("dev-{site}"),
        name: format!("boiler-{site}"),
        labels: BTreeMap::from([("site".to_string(), site.to_string())]),
        owner: Some(format!("owner-{site}")),
        management: Some("fully_managed".into()),
        groups: Default::default(),
    }
}

fn maintenance(action: &str, resource: Resource, now_s: i64, ip: &str) -> AccessRequest {
    AccessRequest {
        principal: Principal::Client {
            id: "tern_cl_maintenance".into(),
            name: "maintenance".into(),
        },
        action: action.into(),
        resource,
        environment: Environment {
            now_s,
            utc_offset_s: 0,
            source_ip: Some(ip.parse().expect("ip")),
            scopes: vec!["tern:read".into(), "tern:write".into()],
            protocol: None,
        },
    }
}

fn api_token(action: &str, scopes: &[&str]) -> AccessRequest {
    AccessRequest {
        principal: Principal::ApiToken { id: "t1".into() },
        action: action.into(),
        resource: Resource::Tenant {
            id: "acme-id".into(),
            name: "acme".into(),
        },
        environment: Environment {
            now_s: AFTERNOON,
            utc_offset_s: 0,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn defaults_follow_scopes_and_let_devices_publish() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    let read = pdp
        .authorize(t, &api_token("listDevices", &["tern:read"]))
        .await
        .expect("decide");
    assert_eq!(read.outcome, Outcome::Permit);
    assert_eq!(read.policies, vec!["api-access-by-scope"]);
    let write = pdp
        .authorize(t, &api_token("createDevice", &["tern:read"]))
        .await
        .expect("decide");
    assert_eq!(
        write.outcome,
        Outcome::NotApplicable,
        "no policy permits writing with tern:read"
    );
    let publish = AccessRequest {
        principal: Principal::Device {
            id: "d1".into(),
            name: "d1".into(),
            labels: BTreeMap::new(),
        },
        action: "publish".into(),
        resource: Resource::Topic {
            name: "telemetry".into(),
        },
        environment: Environment {
            now_s: AFTERNOON,
            utc_offset_s: 0,
            ..Default::default()
        },
    };
    assert!(pdp.authorize(t, &publish).await.expect("decide").allowed());
    let unknown = pdp
        .authorize(t, &api_token("launchRockets", &["tern:admin"]))
        .await
        .expect("decide");
    assert_eq!(unknown.outcome, Outcome::NotApplicable);
    assert!(unknown.errors[0].contains("launchRockets"), "{unknown:?}");
    let wrong_resource = AccessRequest {
        resource: device("berlin"),
        ..api_token("createDevice", &["tern:write"])
    };
    assert_eq!(
        pdp.authorize(t, &wrong_resource)
            .await
            .expect("decide")
            .outcome,
        Outcome::Indeterminate
    );
}

#[tokio::test]
async fn validation_errors_name_the_policy_and_the_place() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    let syntax = pdp
        .put_policy(
            t,
            "broken",
            "permit (principal, action, resource) when { context.hour > };",
            "alice",
        )
        .await
        .unwrap_err();
    let IdentityError::Invalid(v) = syntax else {
        panic!("{syntax:?}")
    };
    assert_eq!(v.field, "policies.broken");
    assert!(v.reason.starts_with("line 1, column "), "{}", v.reason);

    let attribute = pdp
        .put_policy(t, "typo", "permit (principal is User, action, resource) when { principal.rolez.contains(\"x\") };", "alice")
        .await
        .unwrap_err();
    let IdentityError::Invalid(v) = attribute else {
        panic!("{attribute:?}")
    };
    assert_eq!(v.field, "policies.typo");
    assert!(v.reason.contains("rolez"), "{}", v.reason);

    let action = pdp
        .put_policy(
            t,
            "nope",
            "permit (principal, action == Action::\"fly\", resource);",
            "alice",
        )
        .await
        .unwrap_err();
    assert!(action.to_string().contains("fly"), "{action}");
    let id = pdp
        .put_policy(
            t,
            "Bad Id",
            "permit (principal, action, resource);",
            "alice",
        )
        .await
        .unwrap_err();
    assert!(matches!(id, IdentityError::Invalid(ref v) if v.field == "id"));
    assert_eq!(
        pdp.current(t).await.expect("current").version,
        0,
        "nothing was saved"
    );
}

#[tokio::test]
async fn forbid_overrides_permit_and_context_conditions_decide() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    pdp.put_policy(t, "maintenance-berlin", MAINTENANCE, "alice")
        .await
        .expect("save");
    let cases = [
        (
            "sendCommand",
            "berlin",
            AFTERNOON,
            "10.20.1.5",
            Outcome::Permit,
        ),
        (
            "sendCommand",
            "hamburg",
            AFTERNOON,
            "10.20.1.5",
            Outcome::Deny,
        ),
        (
            "sendCommand",
            "berlin",
            AFTERNOON + 6 * 3600,
            "10.20.1.5",
            Outcome::Deny,
        ),
        (
            "sendCommand",
            "berlin",
            AFTERNOON,
            "192.0.2.7",
            Outcome::Deny,
        ),
        (
            "deleteDevice",
            "berlin",
            AFTERNOON,
            "10.20.1.5",
            Outcome::Deny,
        ),
    ];
    for (action, site, now, ip, expected) in cases {
        let d = pdp
            .authorize(t, &maintenance(action, device(site), now, ip))
            .await
            .expect("decide");
        assert_eq!(d.outcome, expected, "{action} {site} {now} {ip}: {d:?}");
        if expected == Outcome::Deny {
            assert_eq!(d.policies, vec!["maintenance-berlin"], "the forbid decided");
        }
    }
    // Others are not affected by the maintenance app's policy.
    let other = AccessRequest {
        principal: Principal::Client {
            id: "tern_cl_billing".into(),
            name: "billing".into(),
        },
        ..maintenance("deleteDevice", device("hamburg"), AFTERNOON, "192.0.2.7")
    };
    assert!(pdp.authorize(t, &other).await.expect("decide").allowed());
}

#[tokio::test]
async fn versions_roll_back_and_changes_take_effect_at_once() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    let request = maintenance("sendCommand", device("hamburg"), AFTERNOON, "10.20.1.5");
    assert!(
        pdp.authorize(t, &request).await.expect("decide").allowed(),
        "defaults"
    );
    let v1 = pdp
        .put_policy(t, "maintenance-berlin", MAINTENANCE, "alice")
        .await
        .expect("save");
    assert_eq!(
        (v1.version, v1.change.as_str()),
        (1, "create maintenance-berlin")
    );
    assert!(
        !pdp.authorize(t, &request).await.expect("decide").allowed(),
        "cached Permit dropped"
    );
    let v2 = pdp
        .delete_policy(t, "maintenance-berlin", "bob")
        .await
        .expect("delete");
    assert_eq!(v2.version, 2);
    assert!(pdp.authorize(t, &request).await.expect("decide").allowed());
    let v3 = pdp.rollback(t, 1, "carol").await.expect("rollback");
    assert_eq!(
        (v3.version, v3.change.as_str(), v3.author.as_str()),
        (3, "rollback to 1", "carol")
    );
    assert!(!pdp.authorize(t, &request).await.expect("decide").allowed());
    let versions = pdp.versions(t).await.expect("versions");
    let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, vec![3, 2, 1, 0]);
    // Another tenant still has the defaults.
    assert!(
        pdp.authorize(TenantId::random(), &request)
            .await
            .expect("decide")
            .allowed()
    );
}

#[tokio::test]
async fn what_if_decides_against_a_proposal_without_saving_it() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    let mut proposed = pdp.current(t).await.expect("current").policies;
    proposed.push(NamedPolicy {
        id: "maintenance-berlin".into(),
        text: MAINTENANCE.into(),
    });
    let request = maintenance("sendCommand", device("hamburg"), AFTERNOON, "10.20.1.5");
    assert_eq!(
        pdp.what_if(t, &proposed, &request)
            .await
            .expect("what if")
            .outcome,
        Outcome::Deny
    );
    assert!(
        pdp.authorize(t, &request).await.expect("decide").allowed(),
        "nothing saved"
    );
    proposed.push(NamedPolicy {
        id: "bad".into(),
        text: "permit (".into(),
    });
    assert!(pdp.what_if(t, &proposed, &request).await.is_err());
}

#[tokio::test]
async fn decisions_are_audited_in_full_or_sampled_with_every_denial() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    pdp.authorize(t, &api_token("listDevices", &["tern:read"]))
        .await
        .expect("decide");
    pdp.auditor()
        .set_config(
            t,
            AuditConfig {
                mode: AuditMode::Sampled,
                sample_rate: 0.000_001,
            },
        )
        .await
        .expect("config");
    pdp.authorize(t, &api_token("createDevice", &["tern:read"]))
        .await
        .expect("decide");
    pdp.auditor()
        .set_config(
            t,
            AuditConfig {
                mode: AuditMode::Full,
                sample_rate: 1.0,
            },
        )
        .await
        .expect("config");
    pdp.authorize(t, &api_token("getTenant", &["tern:read"]))
        .await
        .expect("decide");
    let mut records = Vec::new();
    for _ in 0..100 {
        records = pdp.auditor().recent(t, 10).await.expect("recent");
        if records.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let actions: Vec<&str> = records.iter().map(|r| r.request.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["getTenant", "createDevice"],
        "newest first; the first was not audited"
    );
    assert_eq!(records[1].decision.outcome, Outcome::NotApplicable);
    assert_eq!(records[0].decision.policies, vec!["api-access-by-scope"]);
    let err = pdp
        .auditor()
        .set_config(
            t,
            AuditConfig {
                mode: AuditMode::Sampled,
                sample_rate: 0.0,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Invalid(ref v) if v.field == "sample_rate"));
}

#[tokio::test]
async fn owners_may_manage_their_own_devices_and_levels_can_be_tested() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    pdp.put_policy(
        t,
        "owners-operate",
        "permit (principal is User, action == Action::\"operateDevice\", resource) \
         when { resource has owner && resource.owner == principal.name };",
        "alice",
    )
    .await
    .expect("owner policy");
    pdp.put_policy(
        t,
        "no-remote-wipe-of-semi-managed",
        "forbid (principal, action == Action::\"operateDevice\", resource) \
         when { resource has management && resource.management == \"semi_managed\" };",
        "alice",
    )
    .await
    .expect("level policy");
    let operate = |user: &str, resource: Resource| AccessRequest {
        principal: Principal::User {
            id: format!("u-{user}"),
            name: user.into(),
            roles: Vec::new(),
            groups: Vec::new(),
        },
        action: "operateDevice".into(),
        resource,
        environment: Environment {
            now_s: AFTERNOON,
            utc_offset_s: 0,
            ..Default::default()
        },
    };
    let decide =
        async |request: AccessRequest| pdp.authorize(t, &request).await.expect("decide").allowed();
    assert!(decide(operate("owner-berlin", device("berlin"))).await);
    assert!(
        !decide(operate("owner-berlin", device("paris"))).await,
        "not the owner"
    );
    let Resource::Device {
        id,
        name,
        labels,
        owner,
        ..
    } = device("berlin")
    else {
        unreachable!()
    };
    let semi = Resource::Device {
        id,
        name,
        labels,
        owner,
        management: Some("semi_managed".into()),
        groups: Default::default(),
    };
    assert!(
        !decide(operate("owner-berlin", semi)).await,
        "the forbid wins"
    );
}

/// A change made from a version that has since been superseded conflicts instead of becoming
/// the next version without the change in between (a lost update).
#[tokio::test]
async fn a_change_from_a_stale_version_conflicts() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    let stale = pdp.current(t).await.expect("current");
    let allow = "permit (principal, action, resource);";
    pdp.put_policy(t, "first", allow, "alice")
        .await
        .expect("first change");
    let mut policies = stale.policies;
    policies.push(NamedPolicy {
        id: "second".into(),
        text: allow.into(),
    });
    let late = pdp
        .save(
            t,
            stale.version,
            policies,
            None,
            "bob",
            "create second".into(),
        )
        .await;
    assert!(matches!(late, Err(IdentityError::Conflict(_))), "{late:?}");
    let head = pdp.current(t).await.expect("current");
    assert!(
        head.policies.iter().any(|p| p.id == "first"),
        "nothing lost"
    );
}

/// `hour` and `weekday` are in the tenant's time zone, daylight saving included; the zone is
/// part of the policy version, so a rollback restores it.
#[tokio::test]
async fn context_time_follows_the_tenants_time_zone() {
    let (_dir, pdp) = pdp().await;
    let t = TenantId::random();
    pdp.put_policy(t, "maintenance-berlin", MAINTENANCE, "test")
        .await
        .expect("put");
    // 07:30 UTC: 09:30 in Berlin in summer (UTC+2), 08:30 in winter (UTC+1); 06:30 UTC is
    // 07:30 in Berlin in winter.
    let summer = 1_782_891_000; // 2026-07-01 07:30 UTC
    let winter = 1_768_462_200; // 2026-01-15 07:30 UTC
    let winter_early = winter - 3600;
    let allowed = async |now_s| {
        let request = maintenance("sendCommand", device("berlin"), now_s, "10.20.1.5");
        pdp.authorize(t, &request).await.expect("decide").allowed()
    };
    assert!(!allowed(summer).await, "07:30 in UTC is before 08:00");
    let err = pdp
        .set_time_zone(t, Some("Europe/Atlantis"), "test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("time_zone"), "{err}");
    let zoned = pdp
        .set_time_zone(t, Some("Europe/Berlin"), "test")
        .await
        .expect("time zone");
    assert_eq!(zoned.time_zone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(
        zoned.policies.len(),
        pdp.version(t, zoned.version - 1)
            .await
            .expect("v")
            .policies
            .len()
    );
    assert!(allowed(summer).await, "09:30 in Berlin");
    assert!(allowed(winter).await, "08:30 in Berlin");
    assert!(!allowed(winter_early).await, "07:30 in Berlin");
    let request = maintenance("sendCommand", device("berlin"), summer, "10.20.1.5");
    let current = pdp.current(t).await.expect("current").policies;
    let what_if = pdp.what_if(t, &current, &request).await.expect("what if");
    assert_eq!(
        what_if.outcome,
        Outcome::Permit,
        "what-if uses the zone too"
    );

    pdp.rollback(t, zoned.version - 1, "test")
        .await
        .expect("rollback");
    assert_eq!(pdp.current(t).await.expect("current").time_zone, None);
    assert!(!allowed(summer).await, "back in UTC");
}
