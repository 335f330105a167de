"""The viewer page's routes: the page and its files, and the example-tile API."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import page


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    app.include_router(page.router)
    return TestClient(app)


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A split folder: a.jpg+a.png, b.png without a mask, and things that must be skipped."""
    root = tmp_path / "TEST_SET"
    (root / "IMAGES").mkdir(parents=True)
    (root / "MASKS").mkdir()
    (root / "IMAGES" / "a.jpg").write_bytes(b"jpeg a")
    (root / "IMAGES" / "b.png").write_bytes(b"png b")
    (root / "IMAGES" / "notes.txt").write_text("not an image")
    (root / "IMAGES" / ".hidden.jpg").write_bytes(b"dotfile")
    (root / "IMAGES" / "folder.jpg").mkdir()
    (root / "MASKS" / "a.png").write_bytes(b"mask a")
    (root / "MASKS" / "orphan.png").write_bytes(b"mask without image")
    (tmp_path / "secret.png").write_bytes(b"outside the split")
    monkeypatch.setenv(page.EXAMPLES_ENV, str(root))
    return root


class _Refs(HTMLParser):
    """Collects every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def test_index_is_html_with_a_content_security_policy(client: TestClient) -> None:
    res = client.get("/")
    assert res.status_code == 200
    assert res.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in res.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in res.text


def test_page_loads_nothing_from_another_origin(client: TestClient) -> None:
    parser = _Refs()
    parser.feed(client.get("/").text)
    assert "/static/app.js" in parser.refs and "/static/style.css" in parser.refs
    for ref in parser.refs:
        assert ref.startswith(("/", "#", "data:")), ref
    # The stylesheet pulls no fonts or images from anywhere either.
    css = client.get("/static/style.css").text
    assert "url(" not in css and "@import" not in css
    js = client.get("/static/app.js").text
    assert not re.search(r"https?://", js)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")],
)
def test_static_files_have_their_content_type(
    client: TestClient, name: str, content_type: str
) -> None:
    res = client.get(f"/static/{name}")
    assert res.status_code == 200
    assert res.headers["content-type"] == content_type
    assert res.headers["x-content-type-options"] == "nosniff"
    assert res.content == (page.STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "name", ["index.html", "page.py", "..%2Fpage.py", "%2e%2e%2fpage.py", "APP.JS", ""]
)
def test_static_serves_only_its_allow_list(client: TestClient, name: str) -> None:
    res = client.get(f"/static/{name}")
    assert res.status_code == 404
    assert b"APIRouter" not in res.content and b"<html" not in res.content


def test_examples_list_pairs_by_stem(client: TestClient, examples: Path) -> None:
    res = client.get("/examples")
    assert res.status_code == 200
    assert res.json() == [
        {
            "name": "a",
            "image_url": "/examples/a/image",
            "mask_url": "/examples/a/mask",
            "thumbnail_url": "/examples/a/thumbnail",
        },
        {
            "name": "b",
            "image_url": "/examples/b/image",
            "mask_url": None,
            "thumbnail_url": "/examples/b/thumbnail",
        },
    ]


def test_example_files_come_back_as_stored(client: TestClient, examples: Path) -> None:
    image = client.get("/examples/a/image")
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content == b"jpeg a"
    mask = client.get("/examples/a/mask")
    assert mask.headers["content-type"] == "image/png"
    assert mask.content == b"mask a"
    assert client.get("/examples/b/image").headers["content-type"] == "image/png"


def test_picture_thumbnails_are_the_files_as_stored(client: TestClient, examples: Path) -> None:
    thumbnail = client.get("/examples/a/thumbnail")
    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.content == b"jpeg a"


def test_a_multi_band_tiff_thumbnail_shows_its_red_green_blue_bands(
    client: TestClient, examples: Path
) -> None:
    """Bands stored blue, relief, red, green: the thumbnail picks them by name, not position."""
    import io

    import numpy as np
    import rasterio
    from PIL import Image

    rng = np.random.default_rng(3)
    bands = rng.integers(0, 256, size=(4, 20, 30), dtype=np.uint8)
    names = ("blue", "relief", "red", "green")
    with rasterio.open(
        examples / "IMAGES" / "c.tif",
        "w",
        driver="GTiff",
        width=30,
        height=20,
        count=4,
        dtype="uint8",
        photometric="MINISBLACK",  # GDAL's default for 4 uint8 bands is RGBA: band 4 alpha
    ) as dst:
        dst.write(bands)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    thumbnail = client.get("/examples/c/thumbnail")
    assert thumbnail.status_code == 200, thumbnail.text
    assert thumbnail.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(thumbnail.content)))
    np.testing.assert_array_equal(shown, bands[[2, 3, 0]].transpose(1, 2, 0))


def test_an_unreadable_tiff_thumbnail_is_a_422_naming_the_example(
    client: TestClient, examples: Path
) -> None:
    (examples / "IMAGES" / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    res = client.get("/examples/broken/thumbnail")
    assert res.status_code == 422
    error = res.json()["error"]
    assert error["code"] == "unreadable_example" and "'broken'" in error["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/examples/b/mask",  # listed, but it has no mask
        "/examples/orphan/image",  # a mask without an image is not an example
        "/examples/notes/image",
        "/examples/.hidden/image",
        "/examples/folder/image",
        "/examples/..%2F..%2Fsecret/image",
        "/examples/..%2Fsecret/mask",
        "/examples/%2e%2e/image",
        "/examples/secret/mask",
    ],
)
def test_unknown_or_escaping_example_names_are_404(
    client: TestClient, examples: Path, path: str
) -> None:
    res = client.get(path)
    assert res.status_code == 404
    assert b"outside the split" not in res.content
    # "%2F" is decoded before routing, so "../x" never even reaches the route; names that do
    # reach it get the service's error body.
    if "%2F" not in path:
        assert res.json()["error"]["code"] == "example_not_found"


def test_examples_are_empty_without_the_folder(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(page.EXAMPLES_ENV, str(tmp_path / "not-there"))
    assert client.get("/examples").json() == []
    res = client.get("/examples/a/image")
    assert res.status_code == 404
    assert res.json()["error"]["code"] == "example_not_found"


def test_page_explains_how_to_create_the_examples(client: TestClient) -> None:
    assert "python -m trainer.prepare bluemarble --out data/bluemarble" in client.get("/").text


def test_default_examples_folder_is_the_bundled_test_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(page.EXAMPLES_ENV, raising=False)
    assert page.examples_dir() == Path("data/bluemarble/TEST_SET")


def test_example_names_with_odd_characters_are_quoted(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "IMAGES").mkdir()
    (tmp_path / "IMAGES" / "tile #1.png").write_bytes(b"png")
    monkeypatch.setenv(page.EXAMPLES_ENV, str(tmp_path))
    [example] = client.get("/examples").json()
    assert example["image_url"] == "/examples/tile%20%231/image"
    assert client.get(example["image_url"]).content == b"png"


def test_examples_are_documented_and_the_page_is_not(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/examples", "/examples/{name}/image", "/examples/{name}/mask"} <= set(paths)
    assert "/" not in paths and "/static/{name}" not in paths


@pytest.fixture
def keyed_client(tmp_path: Path) -> TestClient:
    """The service's own app with an API key set (no lifespan: the model never loads)."""
    from service.app import create_app
    from service.settings import Settings

    return TestClient(create_app(Settings(checkpoint=tmp_path / "none.pt", api_keys=["k"])))


def test_with_api_keys_the_page_files_and_examples_stay_open(
    keyed_client: TestClient, examples: Path
) -> None:
    assert keyed_client.get("/static/app.js").status_code == 200
    assert keyed_client.get("/examples").json()[0]["name"] == "a"
    assert keyed_client.get("/examples/a/image").content == b"jpeg a"
    # ...and opening them opens nothing else.
    for path in ("/model", "/readyz/../model"):
        assert keyed_client.get(path).status_code == 401
    assert keyed_client.post("/segment").status_code == 401


def test_with_api_keys_the_page_itself_is_open(keyed_client: TestClient) -> None:
    assert keyed_client.get("/").status_code == 200
