"""Every link the hub writes points where it is served (issue 9), with and without BASE_URL.

Without BASE_URL the base is derived per request from its scheme, Host and the /fhir mount;
X-Forwarded-Proto/Host/Prefix (or Forwarded) count only from a peer in TRUSTED_PROXIES.
Real servers on random ports (tests/conftest.py LiveServer with ``base_url=None``), one
real ``hub serve --port`` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, LiveServer, _free_port, auth_env

HUB = str(Path(sys.executable).parent / "hub")
FORGED = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/x"}
PROXIED = {"X-Forwarded-Host": "hub.example.vn", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/ehr"}


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


@pytest.fixture(scope="module")
def unset(fresh_database_url: Any) -> Iterator[LiveServer]:
    """A hub without BASE_URL on a random port; no trusted proxies."""
    with LiveServer(fresh_database_url("base_unset"), base_url=None) as server:
        yield server


@pytest.fixture(scope="module")
def proxied(fresh_database_url: Any) -> Iterator[LiveServer]:
    """A hub without BASE_URL behind a trusted proxy (127.0.0.1: the test client)."""
    with LiveServer(
        fresh_database_url("base_proxied"), base_url=None, trusted_proxies=["127.0.0.1/32"]
    ) as server:
        yield server


def _root(server: LiveServer) -> str:
    return server.base.removesuffix("/fhir")


def test_links_point_at_the_port_served(unset: LiveServer) -> None:
    base = unset.base
    assert ":8000" not in base
    family = f"Base{uuid.uuid4().hex[:8]}"
    with unset.admin_client() as client:
        created = client.post("/Patient", json=_patient(family))
        assert created.status_code == 201, created.text
        assert created.headers["Location"].startswith(f"{base}/Patient/")
        client.post("/Patient", json=_patient(family)).raise_for_status()

        page = client.get("/Patient", params={"family": family, "_count": 1, "_total": "accurate"}).json()
        assert page["total"] == 2
        assert page["entry"][0]["fullUrl"].startswith(f"{base}/Patient/")
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert links["self"].startswith(f"{base}/Patient?") and links["next"].startswith(f"{base}/Patient?")
        following = client.get(links["next"])  # the next link answers, on this server
        assert following.status_code == 200 and len(following.json()["entry"]) == 1

        history = client.get(f"/Patient/{created.headers['Location'].split('/')[-3]}/_history").json()
        assert history["entry"][0]["fullUrl"].startswith(f"{base}/Patient/")

        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                    "resource": _patient(family),
                    "request": {"method": "POST", "url": "Patient"},
                }
            ],
        }
        done = client.post("", json=bundle)
        assert done.status_code == 200, done.text
        assert done.json()["entry"][0]["response"]["location"].startswith(f"{base}/Patient/")

        statement = client.get("/metadata").json()
        assert statement["implementation"]["url"] == base
        security = statement["rest"][0]["security"]["extension"][0]["extension"]
        assert {"url": "token", "valueUri": f"{_root(unset)}/auth/token"} in security


def test_absolute_references_under_the_request_base_match(unset: LiveServer) -> None:
    """Search criteria may name a reference under the base the client uses, in a search and
    in a transaction's ifNoneExist alike."""
    code = uuid.uuid4().hex[:12]
    with unset.admin_client() as client:
        patient = client.post("/Patient", json=_patient("Referenced")).headers["Location"].split("/")[-3]
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "urn:test", "code": code}]},
            "subject": {"reference": f"Patient/{patient}"},
        }
        client.post("/Observation", json=observation).raise_for_status()
        criteria = f"subject={unset.base}/Patient/{patient}&code=urn:test|{code}"
        assert client.get(f"/Observation?{criteria}&_total=accurate").json()["total"] == 1
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": observation,
                    "request": {"method": "POST", "url": "Observation", "ifNoneExist": criteria},
                }
            ],
        }
        done = client.post("", json=bundle)
        assert done.status_code == 200, done.text
        assert done.json()["entry"][0]["response"]["status"].startswith("200")  # found, not created
        assert (
            client.get("/Observation", params={"code": f"urn:test|{code}", "_total": "accurate"}).json()[
                "total"
            ]
            == 1
        )


def test_smart_configuration_endpoints_are_reachable(unset: LiveServer) -> None:
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        config = httpx.get(f"{_root(unset)}{path}").json()
        assert config["token_endpoint"] == f"{_root(unset)}/auth/token"
        assert config["jwks_uri"] == f"{_root(unset)}/auth/jwks.json"
        # The issuer is the iss of the hub's tokens (AUTH_ISSUER), an identifier, not a link.
        assert config["issuer"] == unset.settings.auth_issuer
    keys = httpx.get(config["jwks_uri"])
    assert keys.status_code == 200 and keys.json()["keys"]


def test_export_urls_point_at_the_port_served(unset: LiveServer) -> None:
    base = unset.base
    with unset.admin_client() as client:
        client.post("/Patient", json=_patient("Exported")).raise_for_status()
        kick_off = client.get("/$export", params={"_type": "Patient"}, headers={"Prefer": "respond-async"})
        assert kick_off.status_code == 202, kick_off.text
        status_url = kick_off.headers["Content-Location"]
        assert status_url.startswith(f"{base}/$export-status/")
        deadline = time.monotonic() + 30
        while (status := client.get(status_url)).status_code == 202:
            assert time.monotonic() < deadline, "the export did not finish within 30 s"
            time.sleep(0.05)
        assert status.status_code == 200, status.text
        manifest = status.json()
        assert manifest["request"].startswith(f"{base}/$export")
        assert manifest["output"] and all(
            o["url"].startswith(f"{base}/$export-file/") for o in manifest["output"]
        )
        assert client.get(manifest["output"][0]["url"]).status_code == 200
        client.delete(status_url)

        # _typeFilter criteria may name references under the base too (checked by the job).
        patient = client.post("/Patient", json=_patient("Filtered")).headers["Location"].split("/")[-3]
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "filtered"},
            "subject": {"reference": f"Patient/{patient}"},
        }
        client.post("/Observation", json=observation).raise_for_status()
        params = {"_type": "Observation", "_typeFilter": f"Observation?subject={base}/Patient/{patient}"}
        kick_off = client.get("/$export", params=params, headers={"Prefer": "respond-async"})
        assert kick_off.status_code == 202, kick_off.text
        while (status := client.get(kick_off.headers["Content-Location"])).status_code == 202:
            assert time.monotonic() < deadline + 30, "the export did not finish"
            time.sleep(0.05)
        assert [o["count"] for o in status.json()["output"]] == [1]
        client.delete(kick_off.headers["Content-Location"])


def test_forwarded_headers_of_an_untrusted_peer_are_ignored(unset: LiveServer) -> None:
    with unset.admin_client(headers=FORGED) as client:
        created = client.post("/Patient", json=_patient("Forged"))
        assert created.headers["Location"].startswith(f"{unset.base}/Patient/")
        assert client.get("/metadata").json()["implementation"]["url"] == unset.base
        assert client.get("/.well-known/smart-configuration").json()["token_endpoint"] == (
            f"{_root(unset)}/auth/token"
        )
    forwarded = {"Forwarded": 'for=1.2.3.4;proto=https;host="evil.example"'}
    with unset.admin_client(headers=forwarded) as client:
        assert client.get("/metadata").json()["implementation"]["url"] == unset.base


def test_forwarded_headers_of_a_trusted_proxy_make_the_base(proxied: LiveServer) -> None:
    public = "https://hub.example.vn/ehr/fhir"
    with proxied.admin_client(headers=PROXIED) as client:
        created = client.post("/Patient", json=_patient("Proxied"))
        assert created.status_code == 201, created.text
        assert created.headers["Location"].startswith(f"{public}/Patient/")
        assert client.get("/metadata").json()["implementation"]["url"] == public
        config = client.get("/.well-known/smart-configuration").json()
        assert config["token_endpoint"] == "https://hub.example.vn/ehr/auth/token"
        assert config["jwks_uri"] == "https://hub.example.vn/ehr/auth/jwks.json"
    forwarded = {"Forwarded": 'for=1.2.3.4;proto=https;host="fwd.example.vn"'}
    with proxied.admin_client(headers=forwarded) as client:
        assert client.get("/metadata").json()["implementation"]["url"] == "https://fwd.example.vn/fhir"
    with proxied.admin_client() as client:  # no forwarding headers: where the client connected
        assert client.get("/metadata").json()["implementation"]["url"] == proxied.base
    # Something that is no host name is never echoed into links.
    with proxied.admin_client(headers={"X-Forwarded-Host": 'a"b/c'}) as client:
        assert client.get("/metadata").json()["implementation"]["url"] == "http://localhost/fhir"


def test_base_url_when_set_wins(live_server: LiveServer) -> None:
    """The shared test server has BASE_URL (its own port): forwarded headers change nothing."""
    with live_server.admin_client(headers=PROXIED) as client:
        created = client.post("/Patient", json=_patient("Configured"))
        assert created.headers["Location"].startswith(f"{live_server.settings.base_url}/Patient/")
        assert client.get("/metadata").json()["implementation"]["url"] == live_server.settings.base_url


def test_hub_serve_port_without_base_url(fresh_database_url: Any) -> None:
    """The one real-process check: `hub serve --port P` writes links to port P."""
    url = fresh_database_url("base_serve")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "BASE_URL"}
    env.update({"DATABASE_URL": url, **auth_env()})
    migrated = subprocess.run(
        [HUB, "db", "upgrade"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert migrated.returncode == 0, migrated.stderr
    server = subprocess.Popen(
        [HUB, "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                metadata = httpx.get(f"{base}/metadata")
                if metadata.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "hub serve did not answer"
            time.sleep(0.2)
        assert metadata.json()["implementation"]["url"] == base
        config = httpx.get(f"http://127.0.0.1:{port}/.well-known/smart-configuration").json()
        assert config["token_endpoint"] == f"http://127.0.0.1:{port}/auth/token"
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"FHIR base: {base}" in out
