"""Tern's authorization server driven by a third-party OAuth 2.0 client: Authlib (Debian's
python3-authlib), with requests playing the person's browser.

Usage: authlib_oauth.py ISSUER SERVICE_ID SERVICE_SECRET APP_ID USERNAME PASSWORD

Runs client credentials, the device authorization grant, authorization code with PKCE (and
the ID token checked against the JWKS), refresh, userinfo, introspection and revocation.
Fails with an assertion on any deviation; prints the tokens it obtained as JSON.
"""

import json
import re
import secrets
import sys
import time

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt

issuer, service_id, service_secret, app_id, username, password = sys.argv[1:7]
redirect_uri = "http://127.0.0.1:9/callback"

meta = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=10).json()
assert meta["issuer"] == issuer, meta
assert meta["code_challenge_methods_supported"] == ["S256"], meta
jwks = JsonWebKey.import_key_set(requests.get(meta["jwks_uri"], timeout=10).json())
out = {}

# --- client credentials (client_secret_basic, Authlib's default) ---
service = OAuth2Session(service_id, service_secret, scope="tern:read")
token = service.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
assert token["token_type"] == "Bearer" and token["scope"] == "tern:read", token
assert "refresh_token" not in token, token
out["service_token"] = token["access_token"]
claims = jwt.decode(token["access_token"], jwks)
claims.validate()
assert claims["aud"] == "tern-api" and claims["iss"] == issuer, claims

# Wrong secret: invalid_client, 401.
r = requests.post(meta["token_endpoint"], data={"grant_type": "client_credentials"},
                  auth=(service_id, "tern_cs_wrong"), timeout=10)
assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
assert r.headers["WWW-Authenticate"].startswith("Basic"), r.headers

# --- introspection and revocation (RFC 7662, RFC 7009) ---
info = service.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json()
assert info["active"] is True and info["client_id"] == service_id, info
service.revoke_token(meta["revocation_endpoint"], token=token["access_token"]).raise_for_status()
info = service.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json()
assert info == {"active": False}, info

# --- device authorization grant (RFC 8628) ---
device = requests.post(meta["device_authorization_endpoint"],
                       data={"client_id": app_id, "scope": "tern:read"}, timeout=10).json()
app = OAuth2Session(app_id, token_endpoint_auth_method="none")
grant = "urn:ietf:params:oauth:grant-type:device_code"
r = requests.post(meta["token_endpoint"],
                  data={"grant_type": grant, "device_code": device["device_code"], "client_id": app_id},
                  timeout=10)
assert r.json()["error"] == "authorization_pending", r.text
# The person opens the verification page and approves.
page = requests.get(device["verification_uri_complete"], timeout=10)
assert device["user_code"] in page.text and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
answer = requests.post(device["verification_uri"], timeout=10, data={
    "user_code": device["user_code"], "username": username, "password": password, "action": "approve"})
assert answer.status_code == 200 and "may now act for you" in answer.text, answer.text
time.sleep(device["interval"])
token = app.fetch_token(meta["token_endpoint"], grant_type=grant, device_code=device["device_code"])
assert token["scope"] == "tern:read" and token.get("refresh_token"), token
out["device_flow_token"] = token["access_token"]

# --- authorization code with PKCE S256, OpenID Connect ---
app = OAuth2Session(app_id, token_endpoint_auth_method="none", redirect_uri=redirect_uri,
                    scope="openid profile tern:read", code_challenge_method="S256")
verifier = secrets.token_urlsafe(48)
nonce = secrets.token_urlsafe(12)
url, state = app.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier,
                                          nonce=nonce)
browser = requests.Session()
form = browser.get(url, timeout=10)
assert form.status_code == 200, form.text
request_id = re.search(r'name="request_id" value="([^"]+)"', form.text).group(1)
signed_in = browser.post(url.split("?")[0], allow_redirects=False, timeout=10, data={
    "request_id": request_id, "username": username, "password": password, "action": "approve"})
assert signed_in.status_code == 303, signed_in.text
callback = signed_in.headers["Location"]
assert callback.startswith(redirect_uri) and f"state={state}" in callback, callback
token = app.fetch_token(meta["token_endpoint"], authorization_response=callback,
                        code_verifier=verifier)
id_claims = jwt.decode(token["id_token"], jwks)
id_claims.validate()
assert id_claims["aud"] == app_id and id_claims["nonce"] == nonce, id_claims
assert id_claims["preferred_username"] == username, id_claims
user = app.get(meta["userinfo_endpoint"]).json()
assert user["sub"] == id_claims["sub"], user

# --- refresh: rotation, and reuse revokes the family ---
first_refresh = token["refresh_token"]
rotated = app.refresh_token(meta["token_endpoint"], refresh_token=first_refresh)
assert rotated["refresh_token"] != first_refresh, rotated
r = requests.post(meta["token_endpoint"], timeout=10, data={
    "grant_type": "refresh_token", "refresh_token": first_refresh, "client_id": app_id})
assert r.json()["error"] == "invalid_grant", r.text
r = requests.post(meta["token_endpoint"], timeout=10, data={
    "grant_type": "refresh_token", "refresh_token": rotated["refresh_token"], "client_id": app_id})
assert r.json()["error"] == "invalid_grant", "the family is revoked: " + r.text
out["revoked_family_token"] = rotated["access_token"]

# The same code again: invalid_grant.
code = re.search(r"code=([^&]+)", callback).group(1)
r = requests.post(meta["token_endpoint"], timeout=10, data={
    "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
    "code_verifier": verifier, "client_id": app_id})
assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text

print(json.dumps(out))
