"""The OpenAPI document is valid OpenAPI 3.1 and describes every /api/v1 route of the app."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from aios.config import load_settings
from webapi.app import create_app
from webapi.openapi import API_PREFIX, OPERATIONS, build_document, undocumented

JWT_SECRET = "unit-test-jwt-secret-" + "x" * 48


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("openapi")
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(Path(__file__).resolve().parents[2] / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": f"sqlite:///{tmp}/t.db",
            "AIOS_BROKER__DATA_DIR": str(tmp / "broker"),
            "AIOS_SECURITY__JWT_SECRET": JWT_SECRET,
            "AIOS_METRICS__MULTIPROC_DIR": str(tmp / "prometheus"),
            "AIOS_LOGGING__DIR": str(tmp / "logs"),
        }
    )
    return create_app(settings, check_schema=False)


def test_the_document_is_valid_openapi(app: Any) -> None:
    document = build_document(app)
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises OpenAPIValidationError naming the first fault


def test_every_api_route_and_method_has_an_operation(app: Any) -> None:
    assert undocumented(app) == [], "add these endpoints to webapi.openapi.OPERATIONS"
    paths = build_document(app)["paths"]
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX):
            continue
        path = re.sub(r"<(?:[a-z_]+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths.get(path, {}), f"{method} {path} is missing from the document"


def test_no_operation_is_declared_for_a_route_that_does_not_exist(app: Any) -> None:
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert sorted(set(OPERATIONS) - endpoints) == []


def test_operations_carry_their_roles_security_and_error_schema(app: Any) -> None:
    paths = build_document(app)["paths"]
    submit = paths["/api/v1/tasks"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/TaskRequest"}
    assert set(submit["x-aios-roles"]) == {"admin", "operator"}
    assert "security" not in submit  # the document's default: an API key or a bearer token
    assert submit["responses"]["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert paths["/api/v1/openapi.json"]["get"]["security"] == []
    assert paths["/api/v1/openapi.json"]["get"]["x-aios-roles"] == ["public"]
    listing = {p["name"]: p for p in paths["/api/v1/tasks"]["get"]["parameters"]}
    assert listing["limit"]["in"] == "query" and listing["limit"]["schema"]["type"] == "integer"
    assert listing["sort"]["schema"]["enum"]
    read = paths["/api/v1/agents/{name}"]["get"]
    assert read["parameters"][0] == {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }
    assert "404" in read["responses"]


def test_the_document_is_served_without_credentials(app: Any) -> None:
    answer = app.test_client().get("/api/v1/openapi.json")
    assert answer.status_code == 200
    assert answer.get_json()["paths"].keys() == build_document(app)["paths"].keys()
