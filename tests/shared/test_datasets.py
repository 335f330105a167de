from __future__ import annotations

from shared import acceleration
from shared.datasets import (
    BLUEMARBLE_SHAPE,
    MAX_ABS_LAT,
    TEST_BAND_LON,
    lat_band_rows,
    lat_rows,
    lon_columns,
)


def test_default_bands_on_the_real_grid() -> None:
    assert lat_rows(2700, 70) == (300, 2400)  # 15 px per degree
    assert lon_columns(5400, 100, 180) == (4200, 5400)
    assert lon_columns(5400, 100.01, 179.99) == (4201, 5399)  # only whole pixels inside
    assert lat_band_rows(2700, 36.4, 47.5) == (638, 804)  # the Caspian's box: 47.5N is row 637.5
    assert lat_band_rows(2700, -70, 70) == lat_rows(2700, 70)


def test_calibration_keeps_clear_of_the_bundled_test_band() -> None:
    rows = lat_rows(BLUEMARBLE_SHAPE[0], MAX_ABS_LAT)
    test_first, test_stop = lon_columns(BLUEMARBLE_SHAPE[1], *TEST_BAND_LON)
    assert (rows[0], test_first, rows[1], test_stop) == acceleration.TEST_REGION
    top, left, bottom, right = acceleration.CALIBRATION_REGION
    assert (top, bottom) == rows and right <= test_first  # no test column is calibrated on
    assert acceleration.TEST_REGION == (300, 4200, 2400, 5400)
