"""``python -m benches --pause-page-reporting``: free page reporting is paused for the run and put back after.

The kernel's parameters are stood in for by a folder of files, as /sys/module/page_reporting/parameters is.
"""

from __future__ import annotations

import pytest

from benches import page_reporting


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    params = tmp_path / "parameters"
    params.mkdir()
    (params / "page_reporting_order").write_text("9\n")
    (params / "reported_kib").write_text("1000\n")
    buddyinfo = tmp_path / "buddyinfo"
    buddyinfo.write_text("Node 0, zone   Normal   " + " ".join(["5"] * 11) + "\n")
    monkeypatch.setattr(page_reporting, "PARAMETERS", str(params))
    monkeypatch.setattr(page_reporting, "BUDDYINFO", str(buddyinfo))
    return params


def test_block_orders_are_the_columns_of_buddyinfo(sysfs):
    assert page_reporting.block_orders() == 11


def test_paused_run_raises_the_order_past_the_largest_block_and_puts_it_back(sysfs):
    order = sysfs / "page_reporting_order"
    with page_reporting.paused(True) as seen:
        assert order.read_text().strip() == "11"
        assert not seen.active
    assert order.read_text().strip() == "9"
    assert "paused" in seen.describe() and "9 raised to 11" in seen.describe()


def test_the_order_is_put_back_when_the_run_fails(sysfs):
    with pytest.raises(RuntimeError), page_reporting.paused(True):
        raise RuntimeError("a case crashed")
    assert (sysfs / "page_reporting_order").read_text().strip() == "9"


def test_an_unpaused_run_reports_how_much_memory_went_back_to_the_host(sysfs):
    with page_reporting.paused(False) as seen:
        (sysfs / "reported_kib").write_text("1049576\n")  # 1 GiB more
    assert seen.active and seen.reported_kib == 1 << 20
    assert (sysfs / "page_reporting_order").read_text().strip() == "9"
    assert "1,024 MiB were reported" in seen.describe()


def test_a_machine_without_page_reporting_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(page_reporting, "PARAMETERS", str(tmp_path / "missing"))
    with page_reporting.paused(True) as seen:
        pass
    assert seen.order is None and seen.describe() == "no free page reporting on this machine"


def test_pausing_without_the_right_to_write_stops_with_one_line(sysfs, monkeypatch):
    def refuse(name, value):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(page_reporting, "_write", refuse)
    with pytest.raises(SystemExit, match="cannot pause free page reporting: Permission denied"), \
            page_reporting.paused(True):
        pass
    assert (sysfs / "page_reporting_order").read_text().strip() == "9"


def test_a_machine_whose_order_reports_nothing_is_not_called_active(sysfs):
    (sysfs / "page_reporting_order").write_text("11\n")
    with page_reporting.paused(False) as seen:
        pass
    assert not seen.active
    assert seen.describe() == "free page reporting to the host reports nothing (page_reporting_order 11)"
