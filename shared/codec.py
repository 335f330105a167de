"""Masks to bytes: the encoding half of the seam, shared by the service and ``trainer.predict``.

``(H, W)`` uint8 class-id masks (and ``(C, H, W)`` uint8 probabilities) become a palette PNG,
per-class COCO RLE, a COG of class ids or of probabilities, or GeoJSON polygons;
:class:`CogWriter` and :class:`PolygonWriter` take a scene a band of rows at a time. What each
output holds: docs/inference-path.md, "Writing".
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes
from rasterio.transform import Affine, from_gcps
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely import affinity
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from shared import rle
from shared.files import atomic_path
from shared.geotiff import GeoImage
from shared.imaging import encode_png
from shared.labels import LabelMap
from shared.pipeline import Band
from shared.raster import Georef, georef_of

COG_BLOCK = 512
# GDAL keeps written blocks in its cache (by default 5% of RAM) until it must flush them; a
# scene written band by band needs little, and a small cache keeps memory flat.
WRITE_CACHE_BYTES = 128 * 1024 * 1024
GEOJSON_CRS = ("raster", "EPSG:4326")


def mask_to_png(mask: np.ndarray, label_map: LabelMap) -> bytes:
    """``(H, W)`` uint8 class ids -> single-channel 'P' PNG whose palette is the label colours."""
    return encode_png(mask, palette=label_map.palette())


def mask_to_geotiff(mask: np.ndarray, geo: GeoImage, label_map: LabelMap) -> bytes:
    """``(H, W)`` uint8 class ids -> single-band uint8 COG with ``geo``'s CRS, transform (or
    GCPs) and size, the label colours as its colour table.

    ``ignore_index`` is declared nodata only when the input had nodata pixels, so a mask of a
    fully valid scene carries no nodata value that GIS tools would hide.
    """
    nodata = label_map.ignore_index if geo.valid is not None else None
    return _in_memory(
        lambda path: CogWriter(path, mask.shape, georef_of(geo), label_map, nodata=nodata),
        mask,
        None,
    )


def probabilities_to_cog(
    probabilities: np.ndarray, georef: Georef, label_map: LabelMap, mask: np.ndarray
) -> bytes:
    """``(C, H, W)`` uint8 probabilities -> a C-band uint8 COG, band i = class i (described by
    its name), on ``georef`` (pixel grid only when it places nothing)."""
    return _in_memory(
        lambda path: CogWriter(
            path, mask.shape, georef, label_map, kind="probabilities", nodata=None
        ),
        mask,
        probabilities,
    )


def mask_to_rle(mask: np.ndarray, label_map: LabelMap) -> dict[str, Any]:
    """``(H, W)`` uint8 class ids -> ``{"height", "width", "classes": mask_to_classes(...)}``."""
    return {
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "classes": mask_to_classes(mask, label_map),
    }


def mask_to_classes(mask: np.ndarray, label_map: LabelMap) -> list[dict[str, Any]]:
    """One entry per class of ``label_map`` (in its order, absent classes included)::

        {"id", "name", "area", "fraction", "rle": {"size": [h, w], "counts": str}}

    ``area`` counts from one bincount over the mask, not one pass per class.
    """
    height, width = mask.shape
    total = max(height * width, 1)
    counts = np.bincount(mask.ravel(), minlength=256)
    out = []
    for cls in label_map.classes:
        area = int(counts[cls.id])
        out.append(
            {
                "id": cls.id,
                "name": cls.name,
                "area": area,
                "fraction": area / total,
                "rle": rle.encode(mask == cls.id),
            }
        )
    return out


def mask_to_geojson(
    mask: np.ndarray,
    georef: Georef,
    label_map: LabelMap,
    *,
    crs: str = "raster",
    min_area: float = 0.0,
    simplify: float = 0.0,
) -> dict[str, Any]:
    """``(H, W)`` uint8 class ids -> a GeoJSON FeatureCollection (see :class:`PolygonWriter`)."""
    writer = PolygonWriter(georef, label_map, crs=crs, min_area=min_area, simplify=simplify)
    writer.write(Band(0, mask, None, np.empty((0, 0, 3), np.uint8)))
    return writer.close()


class CogWriter:
    """A Cloud Optimized GeoTIFF written a band of rows at a time.

    Rows go into a tiled GeoTIFF beside ``path``; :meth:`close` has GDAL's COG driver copy it
    to ``path`` with overviews (mode of class ids for masks, average for probabilities) and
    removes it. Nothing is left at ``path`` unless :meth:`close` succeeds.

    Args:
        path: the output file.
        shape: ``(H, W)`` of the scene.
        georef: CRS, transform or GCPs of the input.
        label_map: colours (colour table of a mask) and names (band tags and descriptions).
        kind: "mask" (one band of class ids) or "probabilities" (one uint8 band per class).
        nodata: the mask's nodata value (``ignore_index`` when the input had nodata), or None.
    """

    def __init__(
        self,
        path: str | Path,
        shape: tuple[int, int],
        georef: Georef,
        label_map: LabelMap,
        *,
        kind: Literal["mask", "probabilities"] = "mask",
        nodata: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.label_map = label_map
        height, width = shape
        count = 1 if kind == "mask" else label_map.num_classes
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tif"
        )
        os.close(fd)
        self._tmp = Path(tmp)
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": count,
            "dtype": "uint8",
            "crs": georef.crs,
            "transform": georef.transform,
            "nodata": nodata if kind == "mask" else None,
            "tiled": True,
            "blockxsize": COG_BLOCK,
            "blockysize": COG_BLOCK,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        with warnings.catch_warnings(), _small_cache():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._dst = rasterio.open(self._tmp, "w", **profile)
        if georef.gcps:
            self._dst.gcps = (list(georef.gcps), georef.gcps_crs or georef.crs)
        classes = label_map.classes
        if kind == "mask":
            self._dst.write_colormap(1, {c.id: (*c.color, 255) for c in classes})
            self._dst.update_tags(1, **{f"CLASS_{c.id}": c.name for c in classes})
            self._dst.set_band_description(1, "class id")
        else:
            for c in classes:
                self._dst.set_band_description(c.id + 1, f"{c.name} probability x 255")

    def write(self, band: Band) -> None:
        height, width = band.mask.shape
        window = Window(0, band.row, width, height)
        with _small_cache():
            if self.kind == "mask":
                self._dst.write(band.mask, 1, window=window)
            else:
                if band.probabilities is None:
                    raise ValueError("a probabilities COG needs bands with probabilities")
                self._dst.write(band.probabilities, window=window)

    def close(self) -> Path:
        """Finish the COG; returns its path."""
        try:
            with _small_cache():
                self._dst.close()
            resampling = "MODE" if self.kind == "mask" else "AVERAGE"
            # Copied beside the target and renamed: a run stopped half-way leaves no partial COG.
            with atomic_path(self.path) as partial, warnings.catch_warnings(), _small_cache():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                rasterio.shutil.copy(
                    self._tmp,
                    partial,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    BLOCKSIZE=COG_BLOCK,
                    OVERVIEW_RESAMPLING=resampling,
                    BIGTIFF="IF_SAFER",
                )
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop the intermediate file (after :meth:`close`, or on failure)."""
        if not self._dst.closed:
            self._dst.close()
        self._tmp.unlink(missing_ok=True)


class PolygonWriter:
    """GeoJSON polygons per class, from a scene's bands of rows.

    Each band is vectorised with ``rasterio.features.shapes`` (4-connected, exact pixel edges);
    polygons of one class cut by band boundaries are merged with ``shapely.ops.unary_union`` at
    :meth:`close`. ``ignore_index`` (nodata) is not vectorised.

    Args:
        georef: where the pixels lie; without one, coordinates are pixels (x column, y row).
        label_map: class names for the features' properties.
        crs: "raster" (the raster's own CRS) or "EPSG:4326" (longitude, latitude).
        min_area: polygons smaller than this many pixels are dropped (holes are kept).
        simplify: Douglas-Peucker tolerance in pixels (topology preserved); 0 keeps every
            pixel edge.
    """

    def __init__(
        self,
        georef: Georef,
        label_map: LabelMap,
        *,
        crs: str = "raster",
        min_area: float = 0.0,
        simplify: float = 0.0,
    ) -> None:
        if crs not in GEOJSON_CRS:
            raise ValueError(f"crs must be one of {', '.join(GEOJSON_CRS)}; got {crs!r}")
        if not (math.isfinite(min_area) and min_area >= 0):
            raise ValueError(f"min_area must be >= 0 pixels, got {min_area}")
        if not (math.isfinite(simplify) and simplify >= 0):
            raise ValueError(f"simplify must be >= 0 pixels, got {simplify}")
        self.georef = georef
        self.label_map = label_map
        self.crs = crs
        self.min_area = min_area
        self.simplify = simplify
        if crs == "EPSG:4326" and _crs_of(georef) is None:
            raise ValueError("crs=EPSG:4326 needs a georeferenced raster with a CRS")
        self._parts: dict[int, list[BaseGeometry]] = {c.id: [] for c in label_map.classes}

    def write(self, band: Band) -> None:
        known = np.isin(band.mask, list(self._parts))
        offset = Affine.translation(0, band.row)
        for geom, value in shapes(band.mask, mask=known, connectivity=4, transform=offset):
            self._parts[int(value)].append(shape(geom))

    def close(self) -> dict[str, Any]:
        """The FeatureCollection: one Polygon feature per connected region, properties
        ``class_id``, ``class_name`` and ``area_px``."""
        features = []
        to_map = self._to_map()
        for cls in self.label_map.classes:
            parts = self._parts[cls.id]
            if not parts:
                continue
            merged = unary_union(parts)
            polygons = getattr(merged, "geoms", [merged])
            for polygon in polygons:
                area = float(polygon.area)
                if area < self.min_area:
                    continue
                if self.simplify > 0:
                    polygon = polygon.simplify(self.simplify, preserve_topology=True)
                features.append(
                    {
                        "type": "Feature",
                        "properties": {
                            "class_id": cls.id,
                            "class_name": cls.name,
                            "area_px": area,
                        },
                        "geometry": to_map(polygon),
                    }
                )
        collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
        crs = _crs_of(self.georef)
        if self.crs == "raster" and crs is not None and crs.to_epsg() != 4326:
            # RFC 7946 knows only WGS 84; GDAL and QGIS read this older member for others.
            name = f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.to_wkt()
            collection["crs"] = {"type": "name", "properties": {"name": name}}
        return collection

    def _to_map(self) -> Any:
        transform = self.georef.transform
        if self.georef.gcps and transform == Affine.identity():
            transform = from_gcps(self.georef.gcps)
        coefficients = [transform.a, transform.b, transform.d, transform.e, transform.c]
        coefficients.append(transform.f)
        src_crs = _crs_of(self.georef)

        def convert(polygon: BaseGeometry) -> Mapping[str, Any]:
            placed = affinity.affine_transform(polygon, coefficients)
            geometry = mapping(placed)
            if self.crs == "EPSG:4326" and src_crs is not None:
                geometry = transform_geom(src_crs, "EPSG:4326", geometry)
            return _plain(geometry)

        return convert


def jsonable(value: Any) -> Any:
    """Checkpoint metadata -> something ``json.dumps(allow_nan=False)`` accepts.

    Non-finite floats become ``None``; tensors, arrays and numpy scalars become lists and
    numbers; anything else unknown becomes its ``str``.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


# -- internals ---------------------------------------------------------------------------------


def _small_cache() -> rasterio.Env:
    # Entered around each GDAL call, in the calling thread (GDAL environments are per thread).
    return rasterio.Env(GDAL_CACHEMAX=WRITE_CACHE_BYTES)


def _crs_of(georef: Georef) -> Any:
    return georef.crs if georef.crs is not None else georef.gcps_crs


def _plain(geometry: Mapping[str, Any]) -> dict[str, Any]:
    # Tuples -> lists, so the result compares and serialises as plain JSON.
    def walk(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        return value

    return {"type": geometry["type"], "coordinates": walk(geometry["coordinates"])}


def _in_memory(make: Any, mask: np.ndarray, probabilities: np.ndarray | None) -> bytes:
    """Run a :class:`CogWriter` over one whole-scene band, in a temporary folder; its bytes."""
    with tempfile.TemporaryDirectory(prefix="satseg-cog-") as folder:
        writer = make(Path(folder) / "out.tif")
        try:
            writer.write(Band(0, mask, probabilities, np.empty((0, 0, 3), np.uint8)))
        except BaseException:
            writer.abort()
            raise
        return writer.close().read_bytes()
