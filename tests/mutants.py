"""The mutant check: break a protection on purpose and watch the tests that guard it fail.

``python -m tests.mutants`` (or ``make mutants``) copies the tracked tree (``git ls-files``)
to a temporary folder, and for each mutant below replaces one exact piece of text in one file,
runs only the tests named for it against the copy, and puts the text back. A mutant is
*killed* when those tests fail, *survived* when they pass; a mutant whose text is not found
exactly once could not be applied (the code moved on: update the mutant). Exit status 1 if any
mutant survived, could not be applied, or its tests did not run.

    python -m tests.mutants                  # every mutant
    python -m tests.mutants --list           # names, files and reasons
    python -m tests.mutants pixel-cap page-router  # a subset, by name
    python -m tests.mutants --rev HEAD       # the committed tree, not the working tree
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds one mutant's tests may run; a mutant that hangs them counts as not killed.
TIMEOUT_S = 300


@dataclass(frozen=True)
class Mutant:
    """One deliberate break: ``old`` -> ``new`` in ``path``, caught by ``tests`` (pytest args)."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    breaks: str  # what a user would see go wrong


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "batching-cross-talk",
        "service/engine.py",
        "_resolve(job, result=logits[start : start + job.size])",
        "_resolve(job, result=logits[0 : job.size])",
        ("tests/service/test_engine.py", "-k", "different_images"),
        "every request of a shared forward pass gets the first request's logits",
    ),
    Mutant(
        "restore-no-op",
        "trainer/resume.py",
        "def restore(run: Run, ckpt: dict[str, Any]) -> None:",
        "def restore(run: Run, ckpt: dict[str, Any]) -> None:\n    return",
        ("tests/trainer/test_resume.py", "-k", "continues_rather_than_restarts"),
        "a resumed run silently restarts from scratch",
    ),
    Mutant(
        "lovasz-pooled",
        "trainer/build.py",
        "lovasz_per_image=cfg.train.lovasz_per_image,",
        "",
        ("tests/trainer/test_build.py",),
        "train.lovasz_per_image is ignored: the quick recipe pools the Lovasz term over the batch",
    ),
    Mutant(
        "lovasz-counts-ignored",
        "trainer/losses.py",
        "errors = (fg - probs).abs() * valid",
        "errors = (fg - probs).abs()",
        ("tests/trainer/test_losses.py", "-k", "lovasz"),
        "ignore_index pixels (nodata, padding) add to the Lovasz term as if they were background",
    ),
    Mutant(
        "base-replaces",
        "trainer/overrides.py",
        "if isinstance(value, dict) and isinstance(merged.get(key), dict):",
        "if False:",
        ("tests/trainer/test_overrides.py", "tests/trainer/test_config.py", "-k", "base"),
        "a config's section replaces its base file's section whole: the base's other keys are lost",
    ),
    Mutant(
        "pixel-cap",
        "shared/imaging.py",
        "if width * height > max_pixels:",
        "if False:",
        ("tests/shared/test_imaging.py", "-k", "cap"),
        "an image over SATSEG_MAX_PIXELS (under Pillow's own limit) is decoded",
    ),
    Mutant(
        "body-size-middleware",
        "service/app.py",
        "app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)",
        "pass",
        ("tests/service/test_limits.py", "-k", "honest_content_length or mid_stream"),
        "request bodies of any size reach the route",
    ),
    Mutant(
        "body-size-counted",
        "service/limits.py",
        "if received > self.max_body_bytes:",
        "if False:",
        ("tests/service/test_limits.py", "-k", "mid_stream"),
        "a body without an honest Content-Length is read whole",
    ),
    Mutant(
        "page-router",
        "service/app.py",
        "(routes.router, frozenset()), (page.router, frozenset(page.PUBLIC_PATHS))]",
        "(routes.router, frozenset())]",
        ("tests/service/test_app.py", "-k", "viewer_page"),
        "GET / is a 404: the viewer page is gone",
    ),
    Mutant(
        "api-key-check",
        "service/limits.py",
        "if key_matches(key, self._keys):",
        "if key is not None:",
        ("tests/service/test_security.py", "-k", "wrong_key or valid_key"),
        "any key opens the API",
    ),
    Mutant(
        "api-key-compare",
        "service/limits.py",
        "found |= hmac.compare_digest(given, key)",
        "found |= key.startswith(given)",
        ("tests/service/test_security.py", "-k", "matches_only_itself"),
        "a prefix of a key (or an empty one) is accepted",
    ),
    Mutant(
        "public-path-prefixes",
        "service/app.py",
        "return path in exact or path.startswith(prefixes)",
        "return path.startswith(tuple(exact) + prefixes)",
        ("tests/service/test_security.py", "-k", "public_paths"),
        'with API keys set, every path opens ("/" would be a prefix of all)',
    ),
    Mutant(
        "overload-503",
        "service/engine.py",
        "if self._in_flight >= self.settings.max_queue:",
        "if False:",
        ("tests/service/test_engine.py", "-k", "full_queue"),
        "requests pile up without bound instead of a 503 with Retry-After",
    ),
    Mutant(
        "deadline-504",
        "service/errors.py",
        "status = 504",
        "status = 503",
        ("tests/service/test_engine.py", "-k", "past_its_deadline"),
        "a request past its deadline is not answered 504",
    ),
    Mutant(
        "expired-tiles-computed",
        "service/engine.py",
        "if time.monotonic() >= job.deadline:",
        "if False:",
        ("tests/service/test_engine.py", "-k", "expired"),
        "the batcher spends the device on requests that already gave up",
    ),
    Mutant(
        "out-of-memory-tiled",
        "service/engine.py",
        "if is_out_of_memory(exc):  # the blend accumulator",
        "if False:  # the blend accumulator",
        ("tests/service/test_engine.py", "-k", "tiled_path"),
        "device out of memory outside the forward pass is a 500 instead of a 503",
    ),
    Mutant(
        "unsafe-checkpoint",
        "shared/checkpoint.py",
        "payload = torch.load(path, map_location=map_location, weights_only=True)",
        "payload = torch.load(path, map_location=map_location, weights_only=False)",
        ("tests/shared/test_checkpoint.py", "-k", "unsafe"),
        "a tampered checkpoint runs code when loaded",
    ),
    Mutant(
        "atomic-checkpoint-write",
        "shared/files.py",
        'fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)',
        "fd, tmp_name = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
        ("tests/shared/test_checkpoint.py", "-k", "failed_write or interrupted_serialisation"),
        "a failed or killed write destroys the previous checkpoint",
    ),
    Mutant(
        "rle-column-order",
        "shared/rle.py",
        'flat = mask.ravel(order="F")',
        'flat = mask.ravel(order="C")',
        ("tests/shared/test_rle.py",),
        "RLE counts run row-major: pycocotools decodes a transposed mask",
    ),
    Mutant(
        "iou-null-for-absent-class",
        "shared/metrics.py",
        '"iou": _ratio(t, s + p - t),',
        '"iou": _ratio(t, s + p - t) or 0.0,',
        ("tests/shared/test_metrics.py",),
        "a class absent from truth and prediction scores IoU 0 and drags mIoU down",
    ),
    Mutant(
        "ignore-index-counted",
        "shared/metrics.py",
        "keep = t != self.ignore_index",
        "keep = t == t",
        ("tests/shared/test_metrics.py",),
        "ignore_index pixels count as errors in the scores",
    ),
    Mutant(
        "nodata-255",
        "shared/geotiff.py",
        "out[~geo.valid] = fill",
        "out[~geo.valid] = 0",
        ("tests/service/test_geotiff.py", "-k", "nodata"),
        "nodata pixels of a GeoTIFF are predicted as class 0 instead of ignore_index",
    ),
    Mutant(
        "nodata-255-multiband",
        "shared/pipeline.py",
        "mask_np[~valid] = self.ignore_index",
        "mask_np[~valid] = mask_np[~valid]",
        ("tests/service/test_bands.py", "-k", "collar"),
        "a multi-band scene's nodata collar is answered with the model's guesses, not 255",
    ),
    Mutant(
        "collar-per-window",
        "shared/raster.py",
        "nodata = nodata_mask(values, self.nodata, collar=collar, **inputs)",
        "nodata = nodata_mask(values, self.nodata, **inputs)",
        ("tests/shared/test_raster.py", "-k", "collar"),
        "a dark lake touching a window's edge is taken for the scene's fill collar",
    ),
    Mutant(
        "nodata-any-band",
        "shared/bands.py",
        "mask |= (data == value).all(axis=0)",
        "mask |= (data == value).any(axis=0)",
        ("tests/shared/test_raster.py", "-k", "every_band"),
        "a pixel with one band at the nodata value (pure red) is thrown away as nodata",
    ),
    Mutant(
        "label-colours-png",
        "shared/labels.py",
        "flat[: self.num_classes] = self.colors",
        "flat[: self.num_classes] = self.colors[::-1]",
        ("tests/shared/test_labels.py",),
        "the PNG palette paints classes in each other's colours",
    ),
    Mutant(
        "label-colours-rgb",
        "shared/labels.py",
        "lut[: self.num_classes] = self.colors",
        "lut[: self.num_classes] = self.colors[::-1]",
        ("tests/shared/test_labels.py",),
        "colour masks paint classes in each other's colours",
    ),
    Mutant(
        "file-bands-batched-across",
        "shared/pipeline.py",
        "in_memory = isinstance(source, ArrayRaster)",
        "in_memory = True",
        ("tests/shared/test_pipeline.py", "-k", "file_is_read"),
        "a scene read from a file holds two bands of full-width rows at once",
    ),
    Mutant(
        "block-own-grid",
        "shared/blocks.py",
        "origins=block.origins,",
        "origins=None,",
        ("tests/shared/test_blocks.py",),
        "a Ray block tiles its window on a grid of its own: its core differs from one process's",
    ),
    Mutant(
        "tile-grid-unaligned",
        "shared/tiling.py",
        "unit = ALIGN if stride % ALIGN == 0 else 1",
        "unit = 1",
        ("tests/shared/test_tiling.py",),
        "tiles off the 32 px grid see shifted feature cells: more disagreement with one pass",
    ),
    Mutant(
        "tile-blending-weights",
        "shared/tiling.py",
        "ramp = ((distance + 0.5) / overlap).clamp(max=1.0)",
        "ramp = torch.ones(tile)",
        ("tests/shared/test_tiling.py",),
        "overlapping tiles are averaged flat: seams at tile edges",
    ),
    Mutant(
        "byte-budget-removed",
        "shared/imaging.py",
        "if max_decoded_bytes is not None and size.nbytes > max_decoded_bytes:",
        "if False:",
        ("tests/service/test_memory_budget.py", "-k", "byte_budget"),
        "a 62 MP float64 4-band upload under the pixel cap is decoded: 2 GB for one request",
    ),
    Mutant(
        "memory-admission-removed",
        "service/engine.py",
        "while not budget.try_reserve(nbytes, timeout=0):",
        "while False:",
        ("tests/service/test_memory_budget.py", "-k", "memory_admission"),
        "requests are admitted whatever memory the ones already running hold",
    ),
    Mutant(
        "reload-unpinned-model",
        "service/engine.py",
        "predictor = ticket.model.predictor",
        "predictor = self.predictor",
        ("tests/service/test_reload.py", "-k", "in_flight"),
        "a request in flight during a model swap is finished by the new model",
    ),
    Mutant(
        "logit-offsets-ignored",
        "shared/inference.py",
        "                logits = logits + self._offsets",
        "                pass",
        ("tests/shared/test_inference.py", "-k", "logit_offsets"),
        "a model trained with class weights serves swollen rare classes: lakes widen",
    ),
    Mutant(
        "gate-blind-to-logit-offsets",
        "shared/acceleration.py",
        "expected.append((logits + offsets).argmax(dim=1))",
        "expected.append(logits.argmax(dim=1))",
        ("tests/shared/test_acceleration.py", "-k", "gate"),
        "the int8 gate judges decisions the service never makes: int8 refused or passed wrongly",
    ),
    Mutant(
        "best-by-ignored",
        "trainer/fit.py",
        'if run.cfg.train.best_by == "last_epoch":',
        "if False:",
        ("tests/trainer/test_fit.py", "-k", "best_by"),
        "best.pt keeps a noisy validation pick where the recipe asked for its final weights",
    ),
    Mutant(
        "precise-bn-skipped",
        "trainer/fit.py",
        "            recompute_batchnorm(run, epoch)\n",
        "",
        ("tests/trainer/test_fit.py", "-k", "precise_bn"),
        "the saved average keeps BatchNorm statistics of other weights; some runs call seas lake",
    ),
    Mutant(
        "precise-bn-draws-training-rng",
        "trainer/batchnorm.py",
        "with torch.random.fork_rng(devices=cuda):",
        "with torch.random.fork_rng(devices=cuda, enabled=False):",
        ("tests/trainer/test_fit.py", "-k", "precise_bn"),
        "turning precise BN on changes the training that follows it",
    ),
    Mutant(
        "caspian-kept-as-lake",
        "trainer/prepare.py",
        'if options.sea_like_lakes == "ignore":',
        "if False:",
        ("tests/trainer/test_prepare.py", "-k", "real_default_build"),
        "the bundled masks teach that the open sea's blue enclosed by land is lake",
    ),
    Mutant(
        "val-every-skips-the-last-epoch",
        "trainer/fit.py",
        "        if last or (epoch + 1) % cfg.train.val_every == 0:",
        "        if (epoch + 1) % cfg.train.val_every == 0:",
        ("tests/trainer/test_fit.py", "-k", "val_every"),
        "best.pt holds an earlier epoch's weights, not the last one trained",
    ),
    Mutant(
        "stride-1-decoder-drops-full-resolution",
        "shared/model.py",
        "            full = self.full(stem)",
        "            full = 0 * self.full(stem)",
        ("tests/shared/test_model.py", "-k", "stride_1"),
        "the stride-1 decoder blurs one-pixel lakes like the stride-2 one",
    ),
    Mutant(
        "request-cut-by-shutdown-gets-plain-500",
        "service/access.py",
        "                if not exchange.response_started:\n                    await _stopped",
        "                if False:\n                    await _stopped",
        ("tests/service/test_shutdown.py", "-k", "grace_period"),
        "a request cut by the shutdown grace period gets the server's plain-text 500",
    ),
    Mutant(
        "uvicorn-invalid-setting-traceback",
        "service/app.py",
        "    except ValidationError as exc:\n        # uvicorn",
        "    except ImportError as exc:\n        # uvicorn",
        ("tests/service/test_app.py", "-k", "uvicorn"),
        "`uvicorn service.app:app` with a bad SATSEG_* value ends in pydantic's traceback",
    ),
    Mutant(
        "lean-aspp-rates-on-padding",
        "shared/model.py",
        '"mobilenet_v3_large_deeplabv3plus_s1_aspp160": _Decoder(1, "15", (2, 4, 6), 0.0)',
        '"mobilenet_v3_large_deeplabv3plus_s1_aspp160": _Decoder(1, "15", _DEEPLAB_RATES, 0.0)',
        ("tests/shared/test_model.py", "-k", "aspp_tap"),
        "the quick model's ASPP dilated past a 192 px crop's 12x12 map: two branches never train",
    ),
    Mutant(
        "backbone-alias-wrong-model",
        "shared/model.py",
        '    "mobilenet_v3_large_lean1": "mobilenet_v3_large_deeplabv3plus_s1_aspp160",',
        '    "mobilenet_v3_large_lean1": "mobilenet_v3_large_deeplabv3plus_s1_aspp960",',
        ("tests/shared/test_model.py", "-k", "old_backbone_id"),
        "an old backbone id builds another model: checkpoints saved under it no longer load",
    ),
    Mutant(
        "old-backbone-checkpoint-refused",
        "shared/checkpoint.py",
        'if arch.get("backbone") not in BACKBONE_IDS:',
        'if arch.get("backbone") not in BACKBONES:',
        ("tests/shared/test_checkpoint.py", "-k", "old_backbone_id"),
        "a checkpoint saved under a backbone's old id is refused as an unknown backbone",
    ),
    Mutant(
        "resume-compares-raw-backbone-ids",
        "trainer/build.py",
        'if canonical_backbone(ckpt["arch"]["backbone"]) != cfg.model.backbone:',
        'if ckpt["arch"]["backbone"] != cfg.model.backbone:',
        ("tests/trainer/test_build.py", "-k", "old_id"),
        "a run saved under a backbone's old id cannot be resumed under the same model",
    ),
)


def tracked_files(root: Path, untracked: bool = False) -> list[str]:
    """``git ls-files``; with ``untracked``, new files git does not ignore as well."""
    extra = ["--cached", "--others", "--exclude-standard"] if untracked else []
    out = subprocess.run(
        ["git", "ls-files", "-z", *extra], cwd=root, check=True, capture_output=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, dest: Path, rev: str | None = None, untracked: bool = False) -> None:
    """The tracked files as they are in the working tree (uncommitted edits included; new files
    too with ``untracked``), or as committed at ``rev``."""
    if rev is not None:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=root, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return
    for name in tracked_files(root, untracked):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def test_env(copy: Path) -> dict[str, str]:
    """The copy first on the path (ahead of the editable install), no bytecode (a mutant and the
    original can share a size and an mtime second), and no SATSEG_* from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATSEG_")}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path, env: dict[str, str]) -> None:
    """Fail unless the copy's packages are the ones imported there."""
    packages = ("service", "shared", "trainer", "tests")
    probe = f"import {', '.join(packages)}; print({', '.join(p + '.__file__' for p in packages)})"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    outside = [p for p in out if not Path(p).resolve().is_relative_to(copy.resolve())]
    if outside:
        raise SystemExit(f"the copy imports code from outside it: {outside}")


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # killed, survived, could not be applied, no tests, timeout (or, with
    # --baseline: passes, fails)
    seconds: float
    detail: str


def apply(mutant: Mutant, copy: Path) -> str | None:
    """Mutate the copy; the original text, or None if ``old`` is not there exactly once."""
    path = copy / mutant.path
    if not path.is_file():
        return None
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return None
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def run_one(mutant: Mutant, copy: Path, env: dict[str, str], baseline: bool = False) -> Outcome:
    """Apply ``mutant`` to ``copy``, run its tests, restore the file. With ``baseline`` the
    tests run on the unmutated copy (they must pass there, or a kill proves nothing)."""
    start = time.monotonic()
    path = copy / mutant.path
    original = path.read_text() if baseline and path.is_file() else apply(mutant, copy)
    if original is None or (baseline and original.count(mutant.old) != 1):
        where = f"{mutant.path}: text not found exactly once: {mutant.old!r}"
        return Outcome(mutant, "could not be applied", 0.0, where)
    missing = [t for t in mutant.tests if t.startswith("tests/") and not (copy / t).exists()]
    try:
        if missing:
            return Outcome(mutant, "no tests", 0.0, f"missing: {', '.join(missing)}")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        try:
            proc = subprocess.run(
                cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "timeout", time.monotonic() - start, f"over {TIMEOUT_S} s")
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    if proc.returncode in (0, 1):
        passed = proc.returncode == 0
        verdict = (
            ("passes" if passed else "fails") if baseline else ("survived" if passed else "killed")
        )
        return Outcome(mutant, verdict, seconds, _summary(proc.stdout, passed))
    # 2: interrupted (a collection error), 4: usage, 5: nothing collected.
    detail = f"pytest exit {proc.returncode}: " + _last_line(proc.stdout + proc.stderr)
    return Outcome(mutant, "no tests", seconds, detail)


def _summary(output: str, passed: bool) -> str:
    """The first failing test (pytest's short summary), else the final count line."""
    if not passed:
        for line in output.splitlines():
            if re.match(r"(FAILED|ERROR) tests/", line):
                return line[:160]
    return _last_line(output)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def run_all(
    mutants: list[Mutant], rev: str | None, jobs: int, baseline: bool, untracked: bool = False
) -> list[Outcome]:
    """Each worker owns one copy of the tree, so mutants never see each other's changes."""
    with tempfile.TemporaryDirectory(prefix="satseg-mutants-") as tmp:
        copies: queue.Queue[tuple[Path, dict[str, str]]] = queue.Queue()
        for i in range(jobs):
            copy = Path(tmp) / f"tree{i}"
            copy_tree(ROOT, copy, rev, untracked)
            env = test_env(copy)
            check_imports_from(copy, env)
            copies.put((copy, env))

        def work(mutant: Mutant) -> Outcome:
            copy, env = copies.get()
            try:
                outcome = run_one(mutant, copy, env, baseline)
            finally:
                copies.put((copy, env))
            line = f"{outcome.verdict:>20}  {mutant.name:26} {outcome.seconds:5.1f} s"
            print(f"{line}  {outcome.detail}", flush=True)
            return outcome

        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(work, mutants))


def markdown(outcomes: list[Outcome]) -> str:
    rows = [
        "| mutant | file | what breaks | result | first failing test | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        m = o.mutant
        caught = re.match(r"(?:FAILED|ERROR) (tests/\S+)", o.detail)
        test = f"`{caught.group(1).rsplit('/', 1)[1]}`" if caught else o.detail
        rows.append(
            f"| `{m.name}` | `{m.path}` | {m.breaks} | {o.verdict} | {test} | {o.seconds:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.mutants", description=__doc__.split("\n")[0]
    )
    parser.add_argument("names", nargs="*", help="run only these mutants (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--rev", help="test the tree as committed at this git revision (default: working tree)"
    )
    parser.add_argument(
        "--untracked",
        action="store_true",
        help="copy new files git does not ignore too (a test not yet committed)",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="run each mutant's tests on the unmutated tree instead (they must all pass)",
    )
    parser.add_argument("--markdown", action="store_true", help="end with a Markdown table")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}; see --list")
    chosen = [known[n] for n in args.names] if args.names else list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name:26} {m.path:20} {m.breaks}\n{'':26} tests: {' '.join(m.tests)}")
        return 0

    start = time.monotonic()
    outcomes = run_all(chosen, args.rev, max(1, args.jobs), args.baseline, args.untracked)
    good = "passes" if args.baseline else "killed"
    bad = [o for o in outcomes if o.verdict != good]
    print(
        f"\n{len(outcomes) - len(bad)}/{len(outcomes)} "
        + ("baselines pass" if args.baseline else "mutants killed")
        + f" in {time.monotonic() - start:.0f} s with {args.jobs} jobs"
        + (f"; not {good}: {', '.join(o.mutant.name for o in bad)}" if bad else "")
    )
    if args.markdown:
        print("\n" + markdown(outcomes))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
