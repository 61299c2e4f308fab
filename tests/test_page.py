"""The web page on `zimage-lite serve`, driven in Debian's Chromium by Playwright against a live server on
the tiny synthetic model: prompt to picture, init image and painted mask, cancel, the server's errors next
to their control, no request to another host, keyboard use and a 390-pixel screen.

One server and one browser per module; each test gets a fresh browser context (no shared page state) and
saves a screenshot under its tmp folder. Skipped where /usr/bin/chromium or playwright is missing (`.ci/run`
installs chromium)."""

from __future__ import annotations

import base64
import io
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from PIL import Image
from playwright import sync_api
from safetensors.torch import save_file

from tests.serve_live import live_server
from zimage_lite.synthetic import write_synthetic_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
SMALL = {"width": "64", "height": "64", "steps": "4"}  # the tiny model runs this in about a second
LONG = {"width": "256", "height": "256", "steps": "100"}  # long enough to cancel mid-run
KEY = "s3cret"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def write_lora(path: Path) -> None:
    """A rank-4 PEFT-layout LoRA on one attention projection of the tiny model (64 wide)."""
    gen = torch.Generator().manual_seed(0)
    key = "transformer.layers.0.attention.to_q"
    tensors = {
        f"{key}.lora_A.weight": torch.randn(4, 64, generator=gen),
        f"{key}.lora_B.weight": torch.randn(64, 4, generator=gen),
    }
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("page-model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("page-server")
    loras = root / "loras"
    loras.mkdir()
    write_lora(loras / "film-grain.safetensors")
    with live_server(model, root, "--output-dir", str(root / "out"), "--lora-dir", str(loras)) as live:
        yield live.url


@pytest.fixture(scope="module")
def base_server(model, tmp_path_factory):
    """A second server: the same tiny weights run as the base variant (guidance 4 by default), behind a key."""
    root = tmp_path_factory.mktemp("page-base-server")
    args = ["--variant", "base", "--api-key", KEY, "--output-dir", str(root / "out")]
    with live_server(model, root, *args) as live:
        yield live.url


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """A tiny Fun-Controlnet-Union (diffusers' ZImageControlNetModel, random weights) for the tiny model."""
    from tests.controlnet_fixtures import build, write_diffusers  # diffusers: imported only when needed

    return write_diffusers(
        tmp_path_factory.mktemp("page-cn") / "cn", build(None, 16, [0, 1], None, n_refiner=1)
    )


@pytest.fixture(scope="module")
def control_server(model, controlnet, tmp_path_factory):
    """A third server: the same tiny weights with the ControlNet loaded."""
    root = tmp_path_factory.mktemp("page-control-server")
    with live_server(model, root, "--controlnet", str(controlnet), "--output-dir", str(root / "out")) as live:
        yield live.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Visit:
    """A page in its own browser context; every request URL is logged, any to another host refused."""

    def __init__(self, browser, server: str, tmp_path: Path, width=1280, height=900, ready=True):
        self.server = server
        self.tmp_path = tmp_path
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(server + "/")
        if ready:  # the page has the server's /v1/info
            self.page.wait_for_function("document.getElementById('model-info').textContent.includes('·')")

    def _route(self, route):
        self.urls.append(route.request.url)
        if self.foreign([route.request.url]):
            route.abort()
        else:
            route.continue_()

    def foreign(self, urls) -> list[str]:
        ours = urlsplit(self.server).netloc
        return [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != ours]

    def fill(self, **fields: str) -> None:
        p = self.page
        if "prompt" in fields:
            p.get_by_label("Prompt", exact=True).fill(fields.pop("prompt"))
        if "width" in fields or "height" in fields:
            p.get_by_label("Size preset").select_option("custom")
        for name, value in fields.items():
            p.locator(f"#{name}").fill(value)

    def shot(self, name: str) -> Path:
        path = self.tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser, server, tmp_path, request):
    v = Visit(browser, server, tmp_path)
    yield v
    v.shot(request.node.name)
    v.close()
    assert not v.errors, f"JavaScript errors on the page: {v.errors}"


def watch_progress(page) -> None:
    """Records every value the progress bar takes (the SSE step events set it) in window.__progress.

    A MutationObserver's callback runs once for all the changes made in one task (several step events
    read in one chunk), so each record's old value is kept too: reading only the bar's value then would
    see the last of them."""
    page.evaluate(
        """() => {
        window.__progress = [];
        const bar = document.getElementById('progress');
        new MutationObserver(records => {
            for (const r of records) {
                if (r.attributeName === 'value' && r.oldValue !== null) {
                    window.__progress.push([Number(r.oldValue), bar.max]);
                }
            }
            window.__progress.push([bar.value, bar.max]);
        }).observe(bar, {attributes: true, attributeOldValue: true, attributeFilter: ['value', 'max']});
    }"""
    )


def png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return dict(im.text)


def test_prompt_generate_progress_reaches_the_end_and_the_image_appears(visit, server):
    p = visit.page
    visit.fill(prompt="a lighthouse on a cliff at dusk", **{**SMALL, "steps": "20"})
    watch_progress(p)
    # The tiny model takes a few milliseconds a step: alone, the job can end before the page's event
    # stream opens, and the page would rightly see only the result. Behind another client's job the
    # stream is open before the first step, so the steps it shows are the server's live events.
    with running_job(server):
        with p.expect_response(lambda r: r.url.endswith("/events")):
            p.get_by_role("button", name="Generate").click()
    img = p.locator("#gallery li img").first
    img.wait_for(timeout=60_000)
    seen = [value for value, bar_max in p.evaluate("window.__progress") if bar_max == 20 and value > 0]
    assert seen == sorted(seen) and seen[-1] == 20, seen  # forward only, to the end
    assert any(0 < v < 20 for v in seen), seen  # and live: steps before the end came from the events
    assert p.locator("#progress").evaluate("b => [b.value, b.max]") == [20, 20]
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    assert p.locator("#current-img").is_visible()


def test_lora_gallery_download_is_the_servers_png_and_click_restores_settings(visit):
    p = visit.page
    visit.fill(prompt="a red bicycle", **SMALL)
    p.get_by_label("Fixed").check()
    p.get_by_label("Seed value").fill("1234")
    p.get_by_label("film-grain", exact=True).check()
    p.get_by_label("film-grain scale").fill("0.5")
    with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        p.get_by_role("button", name="Generate").click()
    assert req.value.post_data_json["loras"] == [{"name": "film-grain", "scale": 0.5}]
    p.locator("#gallery li").first.wait_for(timeout=60_000)
    with p.expect_download() as dl:
        p.get_by_role("link", name="Download PNG").first.click()
    data = Path(dl.value.path()).read_bytes()
    text = png_text(data)  # the server's own PNG text, so the bytes are the server's
    assert (text["prompt"], text["seed"], text["loras"]) == ("a red bicycle", "1234", "film-grain:0.5"), text

    visit.fill(prompt="something else", width="128", height="96", steps="2")
    p.get_by_label("Random").check()
    p.get_by_label("film-grain", exact=True).uncheck()
    p.locator("#gallery li button").first.click()
    assert p.get_by_label("Prompt", exact=True).input_value() == "a red bicycle"
    assert [p.locator(f"#{k}").input_value() for k in ("width", "height", "steps")] == ["64", "64", "4"]
    assert p.get_by_label("Fixed").is_checked() and p.get_by_label("Seed value").input_value() == "1234"
    assert p.get_by_label("film-grain", exact=True).is_checked()
    assert p.get_by_label("film-grain scale").input_value() == "0.5"


def test_batch_of_two_and_reuse_this_seed(visit):
    p = visit.page
    visit.fill(prompt="a fox", n="2", **SMALL)
    with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        p.get_by_role("button", name="Generate").click()
    sent = req.value.post_data_json["seed"]
    p.locator("#progress-label", has_text="Done: 2 images").wait_for(timeout=60_000)
    captions = p.locator("#gallery .caption").all_text_contents()
    assert len(captions) == 2 and "image 1 of 2" in captions[0] and "image 2 of 2" in captions[1], captions
    p.get_by_role("button", name="Reuse this seed").click()
    assert p.get_by_label("Fixed").is_checked()
    assert p.get_by_label("Seed value").input_value() == str(sent)
    thumbs = p.locator("#gallery li img")
    assert p.locator("#current-img").get_attribute("src") == thumbs.nth(0).get_attribute("src")
    p.locator("#gallery li button").nth(1).click()  # the second image: shown large, its settings back
    assert p.locator("#current-img").get_attribute("src") == thumbs.nth(1).get_attribute("src")
    assert "image 2 of 2" in p.locator("#current-caption").text_content()


def init_png(path: Path) -> Path:
    # a top-to-bottom ramp: a real picture, not noise, so the preview is recognisable in the screenshot
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(path)
    return path


def data_url_bytes(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head
    return base64.b64decode(data)


def drag(page, points) -> None:
    """A mouse stroke over the mask canvas through `points` (fractions of its width and height)."""
    page.wait_for_function(
        "() => { const i = document.getElementById('init-preview'); return i.complete && i.height > 0; }"
    )
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()  # laid out over the preview, now that it has loaded
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + points[0][0] * box["width"], y0 + points[0][1] * box["height"])
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(x0 + fx * box["width"], y0 + fy * box["height"], steps=5)
    page.mouse.up()


def test_init_image_painted_mask_generates_inpainting(visit, tmp_path):
    p = visit.page
    visit.fill(prompt="a sign that says OPEN")
    p.get_by_label("Choose an image or drop one here").set_input_files(init_png(tmp_path / "init.png"))
    canvas = p.get_by_label("Mask: paint where the image is re-generated")
    canvas.wait_for()
    assert [p.locator(f"#{k}").input_value() for k in ("width", "height")] == ["64", "64"]
    p.get_by_label("Brush", exact=True).fill("8")
    drag(p, [(0.1, 0.2), (0.9, 0.2)])  # a stroke across the top
    drag(p, [(0.5, 0.5), (0.5, 0.9)])  # and one down the middle, then erase its end
    p.get_by_label("Eraser").check()
    drag(p, [(0.3, 0.85), (0.7, 0.85)])
    visit.shot("mask-painted")
    visit.fill(steps="4")
    with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        p.get_by_role("button", name="Generate").click()
    p.locator("#gallery li img").first.wait_for(timeout=60_000)
    body = req.value.post_data_json
    with Image.open(io.BytesIO(data_url_bytes(body["mask"]))) as m:
        alpha = m.convert("RGBA").getchannel("A")  # OpenAI's convention: transparent = re-generate
    assert alpha.size == (64, 64)
    painted = lambda fx, fy: alpha.getpixel((int(fx * 63), int(fy * 63))) < 128
    assert painted(0.5, 0.2) and painted(0.15, 0.2) and painted(0.5, 0.6)
    assert not painted(0.5, 0.86)  # erased
    assert not painted(0.2, 0.6) and not painted(0.8, 0.95)  # never painted
    assert data_url_bytes(body["image"]) == (tmp_path / "init.png").read_bytes()  # the file as chosen
    assert body["strength"] == pytest.approx(0.6)
    with p.expect_download() as dl:
        p.get_by_role("link", name="Download PNG").first.click()
    text = png_text(Path(dl.value.path()).read_bytes())
    assert (text["init_image"], text["mask"], text["strength"]) == ("uploaded", "uploaded", "0.6"), text

    p.get_by_role("button", name="Invert").click()
    assert mask_alpha(p, 0.2, 0.6) == 255 and mask_alpha(p, 0.5, 0.2) == 0  # kept <-> painted
    p.get_by_role("button", name="Clear").click()
    assert mask_alpha(p, 0.5, 0.2) == 0 and mask_alpha(p, 0.2, 0.6) == 0

    p.locator("#gallery li button").first.click()  # the gallery entry brings its mask back
    p.wait_for_function(
        "() => { const c = document.getElementById('mask-canvas');"
        " return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v); }"
    )
    assert mask_alpha(p, 0.5, 0.2) == 255 and mask_alpha(p, 0.2, 0.6) == 0


def mask_alpha(page, fx: float, fy: float) -> int:
    return page.evaluate(
        """([fx, fy]) => { const c = document.getElementById('mask-canvas');
        return c.getContext('2d').getImageData(Math.floor(fx * c.width), Math.floor(fy * c.height), 1, 1).data[3]; }""",
        [fx, fy],
    )


def test_a_photo_turned_by_exif_is_sent_as_shown(visit, tmp_path):
    """Browsers show a JPEG turned by its EXIF orientation; PIL on the server reads the stored pixels. The
    page sends an upright copy, so the mask painted over what is shown fits the image the server gets."""
    stored = Image.linear_gradient("L").resize((64, 32)).convert("RGB")  # stored 64 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: 32 wide, 64 high
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    p = visit.page
    visit.fill(prompt="a portrait photo")
    p.get_by_label("Choose an image or drop one here").set_input_files(tmp_path / "phone.jpg")
    p.wait_for_function("document.getElementById('width').value === '32'")
    assert p.locator("#height").input_value() == "64"
    drag(p, [(0.2, 0.2), (0.8, 0.2)])
    visit.fill(steps="2")
    with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        p.get_by_role("button", name="Generate").click()
    p.wait_for_function("/^(Done|Failed)/.test(document.getElementById('progress-label').textContent)")
    errors = p.locator(".error:visible").all_text_contents()
    assert p.locator("#progress-label").text_content() == "Done: 1 image", errors  # the mask fit the image
    img = p.locator("#gallery li img").first
    body = req.value.post_data_json
    with Image.open(io.BytesIO(data_url_bytes(body["image"]))) as sent:
        assert sent.size == (32, 64) and sent.getexif().get(0x0112, 1) == 1
    with Image.open(io.BytesIO(data_url_bytes(body["mask"]))) as mask:
        assert mask.size == (32, 64)
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 64]


def test_drop_an_image_on_the_drop_zone(visit, tmp_path):
    p = visit.page
    data = init_png(tmp_path / "init.png").read_bytes()
    p.evaluate(
        """(bytes) => {
        const file = new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'});
        const dt = new DataTransfer();
        dt.items.add(file);
        const zone = document.getElementById('drop-zone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""",
        list(data),
    )
    p.get_by_role("img", name="The init image").wait_for()
    assert p.locator("#init-preview").evaluate("i => i.complete && i.naturalWidth") == 64


def api(server: str, method: str, path: str, body: dict | None = None) -> dict:
    r = httpx.request(method, server + path, json=body, timeout=10)
    r.raise_for_status()
    return r.json()


@contextmanager
def running_job(server: str):
    """Another client's job, running on the server's one worker until the block ends (then cancelled).

    1024x1024 x 4 images x 100 steps takes the tiny model minutes, so it cannot end on its own first."""
    job = api(
        server, "POST", "/v1/jobs", {"prompt": "another client", "size": "1024x1024", "n": 4, "steps": 100}
    )
    try:
        for _ in range(600):  # bounded: 60 s
            if api(server, "GET", f"/v1/jobs/{job['id']}")["state"] == "running":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the other client's job never started")
        yield job
    finally:
        api(server, "DELETE", f"/v1/jobs/{job['id']}")


def test_queue_position_then_cancel_the_running_job(visit, server):
    p = visit.page
    with running_job(server):
        visit.fill(prompt="a slow one", **LONG)
        with p.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as resp:
            p.get_by_role("button", name="Generate").click()
        job_id = resp.value.json()["id"]
        p.get_by_text("Next in the queue").wait_for(timeout=30_000)  # behind the other client's job
    p.wait_for_function("document.getElementById('progress').value >= 1", timeout=60_000)
    assert p.locator("#queue").text_content() == ""
    p.get_by_role("button", name="Cancel").click()
    p.locator("#progress-label", has_text="Cancelled").wait_for(timeout=30_000)
    job = api(server, "GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "cancelled" and job["step"] < 100
    assert p.get_by_role("button", name="Generate").is_enabled()
    assert p.locator("#gallery li").count() == 0


def test_bad_size_shows_the_servers_message_next_to_size_and_nothing_typed_is_lost(visit):
    p = visit.page
    visit.fill(prompt="a cat", width="100", height="64", steps="1")
    with p.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as resp:
        p.get_by_role("button", name="Generate").click()
    assert resp.value.status == 400
    message = resp.value.json()["error"]["message"]
    error = p.locator("#size-field .error")
    error.wait_for()
    assert error.text_content() == message
    assert p.locator("#width").get_attribute("aria-invalid") == "true"
    assert p.locator("#form-error").is_hidden()
    assert p.get_by_label("Prompt", exact=True).input_value() == "a cat"  # nothing lost
    p.reload()  # not even on a reload
    p.wait_for_function("document.getElementById('prompt').value === 'a cat'")
    assert [p.locator(f"#{k}").input_value() for k in ("width", "height", "steps")] == ["100", "64", "1"]


def test_no_request_goes_to_another_host(visit, tmp_path):
    p = visit.page
    visit.fill(prompt="a quiet street", **SMALL)
    p.get_by_label("Choose an image or drop one here").set_input_files(init_png(tmp_path / "init.png"))
    p.get_by_role("button", name="Generate").click()
    p.locator("#gallery li img").first.wait_for(timeout=60_000)
    paths = {urlsplit(u).path for u in visit.urls}
    assert {"/", "/style.css", "/js/main.js", "/v1/info", "/v1/jobs"} <= paths  # the log sees everything
    assert any(path.endswith("/events") for path in paths) and any(
        path.startswith("/v1/files/") for path in paths
    )
    assert visit.foreign(visit.urls) == []

    # the log would have caught one: a request the page did not make, to another host
    p.evaluate(
        "() => { const i = new Image(); i.src = 'http://192.0.2.1/probe.png'; document.body.append(i); }"
    )
    p.wait_for_function("() => [...document.images].some(i => i.src.includes('probe') && i.complete)")
    assert visit.foreign(visit.urls) == ["http://192.0.2.1/probe.png"]


def test_every_control_has_a_label_and_the_keyboard_alone_generates_with_hires(visit):
    p = visit.page
    unlabelled = p.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, canvas, progress')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.textContent.trim())
            .map(el => el.id || el.outerHTML)"""
    )
    assert unlabelled == []
    p.keyboard.press("Tab")  # the first stop is the prompt
    assert p.evaluate("document.activeElement.id") == "prompt"
    p.keyboard.type("a bridge in fog")
    p.keyboard.press("Tab")
    p.keyboard.press("End")  # the size preset: Custom
    for value in ("32", "32", "2"):  # width, height, steps
        p.keyboard.press("Tab")
        p.keyboard.press("Control+A")
        p.keyboard.type(value)
    p.get_by_label("Hires fix").focus()
    p.keyboard.press("Space")
    p.get_by_label("Prompt", exact=True).focus()
    p.keyboard.press("Control+Enter")
    img = p.locator("#gallery li img").first
    img.wait_for(timeout=60_000)
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [48, 48]  # 32 x 1.5, the hires pass
    assert "2 steps" in p.locator("#gallery .caption").first.text_content()


def test_works_at_390_px(browser, server, tmp_path):
    v = Visit(browser, server, tmp_path, width=390, height=844)
    try:
        p = v.page
        v.fill(prompt="a lighthouse on a cliff at dusk", **SMALL)
        p.get_by_label("Choose an image or drop one here").set_input_files(init_png(tmp_path / "init.png"))
        p.get_by_role("button", name="Generate").click()
        p.locator("#gallery li img").first.wait_for(timeout=60_000)
        assert p.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        outside = p.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button, canvas, a, progress')]
                .filter(el => el.offsetParent !== null)  // shown
                .filter(el => { const r = el.getBoundingClientRect(); return r.left < 0 || r.right > 390; })
                .map(el => el.id || el.outerHTML.slice(0, 80))"""
        )
        assert outside == []  # every shown control, the mask tools included, fits the width
        v.shot("phone")
        assert not v.errors
    finally:
        v.close()


def enter_key(page, key: str) -> None:
    field = page.get_by_label("API key")
    field.wait_for()  # the page loads without the key, then asks for it
    field.fill(key)
    page.get_by_role("button", name="Connect").click()


def test_api_key_asked_for_wrong_one_said_next_to_it_right_one_generates(browser, base_server, tmp_path):
    v = Visit(browser, base_server, tmp_path, ready=False)
    try:
        p = v.page
        enter_key(p, "wrong")
        error = p.locator("#api-key-error")
        error.wait_for()
        assert "API key" in error.text_content()
        enter_key(p, KEY)
        p.wait_for_function("document.getElementById('model-info').textContent.includes('·')")
        assert p.get_by_label("API key").is_hidden()
        v.fill(prompt="behind a key", **SMALL)
        p.get_by_role("button", name="Generate").click()
        p.locator("#gallery li img").first.wait_for(timeout=60_000)
        v.shot("api-key")
        assert v.foreign(v.urls) == [] and not v.errors
    finally:
        v.close()


def test_base_model_shows_negative_prompt_and_guidance_and_they_reach_the_png(
    browser, server, base_server, tmp_path
):
    v = Visit(browser, server, tmp_path)  # Turbo: neither is offered
    try:
        assert (
            v.page.get_by_label("Negative prompt").is_hidden() and v.page.get_by_label("Guidance").is_hidden()
        )
    finally:
        v.close()
    v = Visit(browser, base_server, tmp_path, ready=False)
    try:
        p = v.page
        enter_key(p, KEY)
        p.wait_for_function("document.getElementById('model-info').textContent.includes('base')")
        assert p.get_by_label("Guidance").input_value() == "4"  # the base variant's default, from /v1/info
        v.fill(prompt="a harbour at noon", negative_prompt="blurry, text", guidance="3.5", **SMALL)
        with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
            p.get_by_role("button", name="Generate").click()
        assert (req.value.post_data_json["negative_prompt"], req.value.post_data_json["guidance"]) == (
            "blurry, text",
            3.5,
        )
        p.locator("#gallery li").first.wait_for(timeout=60_000)
        with p.expect_download() as dl:
            p.get_by_role("link", name="Download PNG").first.click()
        text = png_text(Path(dl.value.path()).read_bytes())
        assert (text["negative_prompt"], text["guidance"]) == ("blurry, text", "3.5"), text
        v.shot("base")
        assert not v.errors
    finally:
        v.close()


def test_control_image_and_scale_make_the_image_the_pipeline_makes(browser, control_server, model, controlnet,
                                                                   tmp_path):  # fmt: skip
    """On a server started with --controlnet, the page shows the control image and scale; what it sends
    generates, and the downloaded PNG is the one Pipeline.generate makes with that control image, scale and
    seed."""
    from zimage_lite.pipeline import Pipeline

    v = Visit(browser, control_server, tmp_path)
    try:
        p = v.page
        p.get_by_label("Control image").wait_for()
        v.fill(prompt="a harbour", **SMALL)
        p.get_by_label("Fixed").check()
        p.get_by_label("Seed value").fill("77")
        edges = init_png(tmp_path / "edges.png")
        p.get_by_label("Control image").set_input_files(edges)
        p.locator("#control-scale").fill("0.5")
        with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
            p.get_by_role("button", name="Generate").click()
        body = req.value.post_data_json
        assert body["control_scale"] == 0.5 and data_url_bytes(body["control_image"]) == edges.read_bytes()
        p.locator("#gallery li").first.wait_for(timeout=60_000)
        with p.expect_download() as dl:
            p.get_by_role("link", name="Download PNG").first.click()
        data = Path(dl.value.path()).read_bytes()
        text = png_text(data)
        assert (text["control"], text["control_scale"], text["seed"]) == ("uploaded", "0.5", "77"), text
        assert not p.locator("#control-field .error").is_visible()
        pipe = Pipeline.load(model, device="cpu", controlnet=controlnet)
        want = pipe.generate("a harbour", seed=77, steps=4, width=64, height=64,
                             control_image=Image.open(edges), control_scale=0.5)[0]  # fmt: skip
        got = Image.open(io.BytesIO(data)).convert("RGB")
        assert got.tobytes() == want.tobytes()
        v.shot("control")
        assert not v.errors
    finally:
        v.close()


def test_without_a_controlnet_the_servers_refusal_lands_next_to_the_control(visit, tmp_path):
    """The page shows a ControlNet image and scale only when /v1/info reports a ControlNet. Here the server
    has none, so the real /v1/info answer is altered in flight to claim one; the request then goes to the
    real server, whose refusal (a 400 naming control_image) must land next to that control."""
    p = visit.page
    assert p.get_by_label("Control image").is_hidden()

    def claim_controlnet(route):
        route.fulfill(json={**route.fetch().json(), "controlnet": True})

    p.route("**/v1/info", claim_controlnet)
    p.reload()
    p.get_by_label("Control image").wait_for()
    visit.fill(prompt="a harbour", **SMALL)
    p.get_by_label("Control image").set_input_files(init_png(tmp_path / "edges.png"))
    with p.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        p.get_by_role("button", name="Generate").click()
    body = req.value.post_data_json
    assert body["control_scale"] == 0.75 and data_url_bytes(body["control_image"]).startswith(b"\x89PNG")
    error = p.locator("#control-field .error")
    error.wait_for()
    assert "control_image" in error.text_content() and "no ControlNet" in error.text_content()
    assert p.locator("#control-image").get_attribute("aria-invalid") == "true"
