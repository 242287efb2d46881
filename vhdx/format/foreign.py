"""Magic numbers of the other disk formats a user may hand us by mistake, to name them in the error.

A VHD (v1) keeps its 512-byte footer (cookie ``conectix``) at the end of the file, and a copy at offset 0 when
dynamic; Virtual PC before 2004 wrote a 511-byte footer. The others announce themselves in their first bytes.
"""

from __future__ import annotations

VHD_COOKIE = b"conectix"
VHD_FOOTER_SIZES = (512, 511)
# (offset, magic, name) for formats identified by their first bytes.
HEAD_MAGICS = (
    (0, b"QFI\xfb", "a qcow2 disk"),
    (0, b"QED\x00", "a QED disk"),
    (0, b"KDMV", "a VMDK disk (sparse extent)"),
    (0, b"COWD", "a VMDK disk (ESX sparse extent)"),
    (0, b"# Disk DescriptorFile", "a VMDK descriptor"),
    (0x40, b"\x7f\x10\xda\xbe", "a VirtualBox VDI disk"),
)
# How many bytes of each end of the file ``foreign_format`` needs.
HEAD_BYTES = 512
TAIL_BYTES = max(VHD_FOOTER_SIZES)


def foreign_format(head: bytes, tail: bytes) -> str | None:
    """Name of the format HEAD (first bytes) and TAIL (last bytes) belong to, or None if none we know.

    Args:
        head: at least ``HEAD_BYTES`` from offset 0 (fewer when the file is shorter).
        tail: the last ``TAIL_BYTES`` of the file.
    """
    if head.startswith(VHD_COOKIE) or any(tail[-n:].startswith(VHD_COOKIE) for n in VHD_FOOTER_SIZES):
        return "a VHD (v1) disk"
    for offset, magic, name in HEAD_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None

# File name extensions that promise another format: a VHDX under one of these names misleads Hyper-V and qemu-img.
FOREIGN_EXTENSIONS = {
    ".vhd": "VHD (v1)", ".qcow2": "qcow2", ".qcow": "qcow", ".qed": "QED", ".vmdk": "VMDK", ".vdi": "VDI",
    ".img": "raw", ".raw": "raw", ".iso": "ISO 9660",
}
