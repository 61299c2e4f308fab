"""`zimage-lite serve --controlnet`: a live server on the tiny synthetic model with a tiny synthetic
Fun-Controlnet-Union (diffusers' ZImageControlNetModel, tests/controlnet_fixtures.py); its images for a
control image equal Pipeline.generate's with the same control image, scale, range and seed."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from controlnet_fixtures import build, write_diffusers
from PIL import Image
from test_img2img import picture

from tests.serve_live import live_server
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-control")
    tiny = write_synthetic_model(root / "tiny", "tiny", seed=0)
    cn = write_diffusers(root / "cn", build(None, 16, [0, 1], None, n_refiner=1, seed=1))
    return tiny, cn, root


@pytest.fixture(scope="module")
def pipe(setup):
    tiny, cn, _ = setup
    return Pipeline.load(tiny, device="cpu", controlnet=cn)


@pytest.fixture(scope="module")
def server(setup):
    tiny, cn, root = setup
    args = ["--controlnet", str(cn), "--size", "32x32", "--steps", "2", "--output-dir", str(root / "out")]
    with live_server(tiny, root, *args) as live:
        yield live


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_job(url: str, job: dict) -> dict:
    deadline = time.monotonic() + 120
    while (view := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def test_info_says_controlnet(server):
    assert httpx.get(f"{server.url}/v1/info").json()["controlnet"] is True


def test_job_with_control_image_is_bit_identical_to_the_pipeline(server, pipe):
    control = picture(32, 32, 3)
    body = {"prompt": "a harbour", "seed": 5, "steps": 3, "size": "32x32", "control_image": data_url(control),
            "control_scale": 0.6, "control_start": 0.0, "control_end": 0.7}  # fmt: skip
    view = wait_job(server.url, httpx.post(f"{server.url}/v1/jobs", json=body, timeout=30).json())
    assert view["state"] == "succeeded", view
    data = httpx.get(view["results"][0]["url"]).content
    want = pipe.generate("a harbour", seed=5, steps=3, width=32, height=32, control_image=control,
                         control_scale=0.6, control_start=0.0, control_end=0.7)[0]  # fmt: skip
    assert np.array_equal(pixels(data), np.asarray(want))
    plain = pipe.generate("a harbour", seed=5, steps=3, width=32, height=32)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))  # the control changed the image
    text = Image.open(io.BytesIO(data)).text
    assert (text["control"], text["control_scale"], text["control_range"]) == ("uploaded", "0.6", "0-0.7")


def test_generations_with_control_image_and_default_scale_equal_the_pipeline(server, pipe):
    control = picture(32, 32, 4)
    body = {"prompt": "a tower", "seed": 9, "control_image": data_url(control)}
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    want = pipe.generate("a tower", seed=9, steps=2, width=32, height=32, control_image=control)[0]
    assert np.array_equal(got, np.asarray(want))


def test_edit_with_a_control_image_form_field_equals_the_pipeline(server, pipe):
    """/v1/images/edits (multipart): an init image file and control_image as base64 text in a form field."""
    init, control = picture(32, 32, 5), picture(32, 32, 6)
    png = io.BytesIO()
    init.save(png, format="PNG")
    fields = {"prompt": "a quay", "seed": "4", "strength": "0.8", "control_image": data_url(control),
              "control_scale": "1.2"}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/images/edits", data=fields, files={"image": ("i.png", png.getvalue())},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    want = pipe.generate("a quay", seed=4, steps=2, width=32, height=32, image=init, strength=0.8,
                         control_image=control, control_scale=1.2)[0]  # fmt: skip
    assert np.array_equal(got, np.asarray(want))


def test_hires_pass_keeps_the_control_as_generate_does(server, pipe):
    """The hires pass gets the same control (resized to its size), as `generate --control --hires`."""
    control = picture(32, 32, 7)
    body = {"prompt": "a dock", "seed": 2, "control_image": data_url(control), "hires": {"scale": 1.5}}
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    kw = {"seed": 2, "steps": 2, "control_image": control}
    first = pipe.generate("a dock", width=32, height=32, **kw)[0]
    want = pipe.hires_fix(first, "a dock", scale=1.5, strength=0.35, **kw)[0]
    assert got.shape == (48, 48, 3) and np.array_equal(got, np.asarray(want))


CONTROL = data_url(Image.new("RGB", (16, 16)))


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"control_scale": 0.5}, "control_image"),  # a scale without an image
        ({"control_image": "data:image/png;base64,@@@"}, "control_image"),
        ({"control_image": CONTROL, "control_start": 0.5, "control_end": 0.5}, "control_start"),
        ({"control_image": CONTROL, "control_scale": 9.0}, "control_scale"),
    ],
)
def test_bad_control_fields_get_the_error_shape(server, extra, param):
    r = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "a", **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
