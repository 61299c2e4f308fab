"""The web page's files without a browser: shipped as package data, served at / whatever the model's state,
every module they import present, nothing that names another host. (The page itself: test_page.py.)"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from zimage_lite.serve.app import create_app
from zimage_lite.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "zimage_lite" / "serve" / "static"
FILES = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file())


def no_model(config):
    raise RuntimeError("no model in this test")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServeConfig(), load=no_model)) as c:
        yield c


def test_every_page_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [g.removeprefix("static/") for g in globs["zimage_lite.serve"]]
    assert FILES and all(any(fnmatch.fnmatch(f, g) for g in shipped) for f in FILES), (FILES, shipped)


@pytest.mark.parametrize("name", FILES)
def test_page_file_names_no_other_host(name):
    text = (STATIC / name).read_text()
    # a URL with a scheme or a protocol-relative one, inside quotes or url(...)
    assert not re.findall(r"""["'(]\s*(?:[a-z][a-z0-9+.-]*:)?//""", text, re.I), name


def test_page_is_served_at_root_even_before_the_model_is_ready(client):
    assert client.get("/ready").status_code == 503
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="module" src="js/main.js"' in r.text


def test_every_module_import_is_served_as_javascript(client):
    seen, todo = set(), ["js/main.js"]
    while todo:
        path = todo.pop()
        seen.add(path)
        r = client.get("/" + path)
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == "text/javascript", path
        for target in re.findall(r"""^import .* from "\./([\w.-]+\.js)";$""", r.text, re.M):
            if f"js/{target}" not in seen:
                todo.append(f"js/{target}")
    assert seen == {f for f in FILES if f.endswith(".js")}  # every module is reached, none is dead


def test_with_an_api_key_the_page_loads_and_the_api_asks_for_it():
    with TestClient(create_app(ServeConfig(api_key="k"), load=no_model)) as c:
        for path in ("/", "/index.html", "/style.css", "/js/main.js"):
            assert c.get(path).status_code == 200, path
        assert c.get("/v1/info").status_code == 401
        assert c.get("/v1/jobs/x").status_code == 401
        assert c.get("/v1/info", headers={"Authorization": "Bearer k"}).status_code == 503  # still loading
