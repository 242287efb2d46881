"""``serve`` (nbdkit) and ``mount`` (FUSE) export the virtual disk read-only, end to end with real clients."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import vhdx
from tests.forensics.helpers import FileGuard
from vhdx.errors import VhdxError
from vhdx.forensics import nbd

pytestmark = pytest.mark.peer


def vhdx_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from vhdx_cli.main import cli; cli()", *map(str, args)]


def wait_for(predicate, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"server exited early ({proc.returncode}): {err.strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not become ready")
        time.sleep(0.05)


def stop(proc) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def reference_raw(path, tmp_path, layer: int = 0):
    with vhdx.open(path) as image:
        return image.layers[layer].read(0, image.layers[layer].virtual_size)


@pytest.fixture
def nbdkit_ready():
    try:
        nbd.check_nbdkit()
    except VhdxError as exc:
        pytest.skip(str(exc))
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io are not installed (apt-get install qemu-utils)")


@pytest.mark.parametrize("layer", [0, 1])
def test_serve_exports_the_disk_at_a_layer_read_only_over_nbd(small_chain, tmp_path, nbdkit_ready, layer):
    guard = FileGuard(small_chain)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(vhdx_cmd("serve", small_chain[-1], "--at", layer, "--unix", sock, "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.exists, proc)
        uri = f"nbd+unix:///?socket={sock}"
        out = tmp_path / "out.raw"
        done = subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == reference_raw(small_chain[-1], tmp_path, layer)
        write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", uri], capture_output=True, text=True,
                               timeout=60)
        assert write.returncode != 0 or "error" in (write.stdout + write.stderr).lower()
        assert "permission denied" in (write.stdout + write.stderr).lower() or "read-only" in (
            write.stdout + write.stderr).lower()
    finally:
        code = stop(proc)
    stdout, _ = proc.communicate()
    assert code == 0
    assert json.loads(stdout)["read_only"] is True
    assert not sock.exists()  # the socket is removed when the server stops
    guard.assert_unchanged()


def test_serve_binds_tcp_to_loopback_only(small_chain):
    argv = nbd.nbdkit_command("nbdkit", str(small_chain[-1]), port=10999)
    assert argv[argv.index("--ipaddr") + 1] == "127.0.0.1" and "--readonly" in argv


def test_serve_plugin_refuses_writes_without_nbdkit(small_chain):
    nbd._config.update({"file": str(small_chain[-1]), "at": 2})
    handle = nbd.open(True)
    try:
        assert nbd.can_write(handle) is False
        assert not hasattr(nbd, "pwrite") and not hasattr(nbd, "zero") and not hasattr(nbd, "trim")
        buf = bytearray(4096)
        nbd.pread(handle, buf, 0, 0)
        assert bytes(buf) == reference_raw(small_chain[-1], None, 2)[:4096]
    finally:
        nbd.close(handle)
        nbd._config.pop("file")


def test_serve_cli_rejects_a_missing_layer(small_chain, nbdkit_ready, tmp_path):
    done = subprocess.run(vhdx_cmd("serve", small_chain[-1], "--at", 7, "--unix", tmp_path / "s"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "layer 7 does not exist" in done.stderr


def fuse_usable() -> str | None:
    try:
        from vhdx.forensics.fuse import load_fuse

        load_fuse()
    except VhdxError as exc:
        return str(exc)
    return None


def test_mount_exposes_one_read_only_raw_file(small_chain, tmp_path):
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    guard = FileGuard(small_chain)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(vhdx_cmd("mount", small_chain[-1], mnt, "--at", 1, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    exposed = mnt / "layer1.raw"
    try:
        wait_for(exposed.exists, proc)
        assert exposed.read_bytes() == reference_raw(small_chain[-1], tmp_path, 1)
        with pytest.raises(OSError) as err:
            open(exposed, "r+b")  # noqa: SIM115 - the open itself must fail
        assert err.value.errno in (errno.EROFS, errno.EACCES)
    finally:
        if proc.poll() is None:
            umount = shutil.which("fusermount3") or shutil.which("fusermount")
            subprocess.run([umount, "-u", str(mnt)] if umount else ["umount", str(mnt)], capture_output=True)
        code = proc.wait(timeout=20)
    stdout, stderr = proc.communicate()
    if code != 0 and "cannot mount" in stderr:
        pytest.skip(stderr.strip())
    assert code == 0, stderr
    assert json.loads(stdout)["file"] == str(exposed)
    assert os.listdir(mnt) == []
    guard.assert_unchanged()


def test_mount_cli_error_is_one_line_when_the_mountpoint_is_not_empty(small_chain, tmp_path):
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    done = subprocess.run(vhdx_cmd("mount", small_chain[-1], tmp_path / "busy"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not empty" in done.stderr
