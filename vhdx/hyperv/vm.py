r"""A Hyper-V VM read offline from its folder: configuration, checkpoint tree, and the disk chains it uses.

``load_folder(path)`` reads every VM configuration (``Virtual Machines\<id>.vmcx`` or ``.xml``) and every
checkpoint configuration (``Snapshots\<id>.vmcx``) under the folder, maps the Windows paths they name to
local files (the way parent locators are resolved: relative to the VM folder first, then by file name in the
folder tree, never outside it unless a search folder is given), and opens each drive's chain read-only.

What the configuration says is reported as such; what is derived is named in ``derived``:

* the checkpoint tree (a checkpoint's parent is the checkpoint whose disk is the nearest ancestor of its own
  disk: each checkpoint's drive is the parent of the next one's), because the configuration keys that hold
  the parent are not known with certainty;
* standard vs production (a standard checkpoint keeps saved memory in ``Snapshots\<id>.vmrs``), unless the
  configuration names a Recovery, Planned or Replica checkpoint (``Microsoft:Hyper-V:Snapshot:<kind>``).

References: HYPERV-NOTES §4.2 (where configurations live), §4.3 (production vs standard).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field

import vhdx
from vhdx.errors import FormatError, VhdxError
from vhdx.hyperv.config import ConfigFile, lookup, read_config
from vhdx.hyperv.models import checkpoint_kind

IDE_CONTROLLER = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI_CONTROLLER = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
GUEST_STATE_DEVICE = "917bd8cb-3bb6-4124-9383-b7d21ac07f79"  # its StateFilePath names the .vmgs
CONTROLLER_TYPES = {IDE_CONTROLLER: "IDE", SCSI_CONTROLLER: "SCSI"}
GENERATIONS = {0: 1, 1: 2}  # configuration.properties.subtype
SNAPSHOT_TYPE_RE = re.compile(r"Microsoft:Hyper-V:Snapshot:(Realized|Recovery|Planned|Replica)", re.IGNORECASE)
DISK_SUFFIXES = (".vhdx", ".avhdx")
CONFIG_DIR = "virtual machines"
SNAPSHOT_DIR = "snapshots"
FILETIME_EPOCH = dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)
MAX_FOLDER_ENTRIES = 100_000  # a VM folder holds dozens; walking a whole volume by mistake is refused


def filetime(value) -> dt.datetime | None:
    """A FILETIME (100 ns since 1601, an integer or 8 little-endian bytes) as UTC; None for 0 or nonsense."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 8:
        value = int.from_bytes(value, "little")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    try:
        return FILETIME_EPOCH + dt.timedelta(microseconds=value // 10)
    except OverflowError:
        return None


@dataclass(frozen=True)
class Drive:
    """A drive of a VM or checkpoint configuration.

    Attributes:
        controller_type: IDE or SCSI.
        controller: controller number (IDE channel, or the SCSI controller's order in the manifest).
        location: drive number on the controller.
        kind: VHD, ISO or NONE (as configured).
        path: the Windows path the configuration names ('' when empty).
        local: the local file it maps to, or None.
        found_by: how ``local`` was found (relative to the VM folder, by file name, ...), or why not.
    """

    controller_type: str
    controller: int
    location: int
    kind: str
    path: str
    local: str | None = None
    found_by: str | None = None

    @property
    def slot(self) -> str:
        return f"{self.controller_type} {self.controller}:{self.location}"

    @property
    def is_disk(self) -> bool:
        return self.kind.upper() == "VHD" and bool(self.path)


@dataclass(frozen=True)
class StateFile:
    kind: str  # vmrs | vmgs | bin | vsv
    path: str
    size: int


@dataclass
class ChainInfo:
    """A drive's chain as opened (read-only): layers leaf first, or the error that stopped it."""

    layers: list[dict] = field(default_factory=list)  # path, disk_type, file_size, virtual_size, parent, dirty_log
    error: str | None = None


@dataclass
class CheckpointConfig:
    id: str
    name: str
    config_path: str
    created: dt.datetime | None
    kind: str  # standard | production | recovery | planned | replica
    kind_from: str  # "configuration" or "derived"
    parent_id: str | None = None
    drives: list[Drive] = field(default_factory=list)
    state_files: list[StateFile] = field(default_factory=list)
    replayed_log_entries: int = 0

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "config": self.config_path,
                "created": self.created.isoformat() if self.created else None, "type": self.kind,
                "type_from": self.kind_from, "parent_id": self.parent_id, "parent_from": "derived",
                "drives": [drive_json(d) for d in self.drives],
                "state_files": [vars(s) for s in self.state_files],
                "replayed_log_entries": self.replayed_log_entries}


@dataclass
class VirtualMachine:
    name: str
    id: str
    config_path: str
    format: str  # vmcx | xml
    generation: int | None
    version: str | None
    created: dt.datetime | None
    state_changed: dt.datetime | None
    notes: str
    drives: list[Drive] = field(default_factory=list)
    state_files: list[StateFile] = field(default_factory=list)
    checkpoints: list[CheckpointConfig] = field(default_factory=list)
    now_parent_id: str | None = None  # the checkpoint the running state derives from (derived)
    listed_checkpoints: int | None = None  # global_settings.snapshots.list.size
    replayed_log_entries: int = 0
    derived: tuple[str, ...] = ("checkpoint parents", "checkpoint types without a configured type")

    def children(self, parent_id: str | None) -> list[CheckpointConfig]:
        return sorted((c for c in self.checkpoints if c.parent_id == parent_id),
                      key=lambda c: (c.created or FILETIME_EPOCH, c.name))

    def to_json(self) -> dict:
        return {"name": self.name, "id": self.id, "config": self.config_path, "format": self.format,
                "generation": self.generation, "version": self.version,
                "created": self.created.isoformat() if self.created else None,
                "state_changed": self.state_changed.isoformat() if self.state_changed else None,
                "notes": self.notes, "drives": [drive_json(d) for d in self.drives],
                "state_files": [vars(s) for s in self.state_files],
                "checkpoints": [c.to_json() for c in self.checkpoints], "now_parent_id": self.now_parent_id,
                "listed_checkpoints": self.listed_checkpoints, "replayed_log_entries": self.replayed_log_entries,
                "derived": list(self.derived)}


def drive_json(d: Drive) -> dict:
    return {"slot": d.slot, "controller_type": d.controller_type, "controller": d.controller,
            "location": d.location, "type": d.kind, "path": d.path, "local": d.local, "found_by": d.found_by}


# --- reading one configuration -------------------------------------------------------------------------


def _child(node, name: str):
    """A key of ``node`` compared without case (XML writes instance GUIDs in lower case, vmcx in either)."""
    if not isinstance(node, dict):
        return None
    if name in node:
        return node[name]
    folded = name.casefold()
    return next((v for k, v in node.items() if k.casefold() == folded), None)


def config_drives(root: dict) -> list[Drive]:
    """The IDE and SCSI drives a configuration tree names, in manifest order."""
    conf = root.get("configuration")
    manifest = lookup(root, "configuration.manifest", {})
    if not isinstance(conf, dict) or not isinstance(manifest, dict):
        return []
    devices = [(str(v.get("device", "")).strip("{}").lower(), str(v.get("instance", v.get("device", ""))).strip("{}"))
               for k, v in sorted(manifest.items()) if k.startswith("vdev") and isinstance(v, dict)]
    # Server 2012 XML leaves the emulated IDE controller out of the manifest; its node is there all the same.
    if not any(d == IDE_CONTROLLER for d, _ in devices):
        devices.insert(0, (IDE_CONTROLLER, IDE_CONTROLLER))
    drives, scsi_seen = [], 0
    for device, instance in devices:
        if device not in CONTROLLER_TYPES:
            continue
        node = _child(conf, f"_{instance}_")
        ctype = CONTROLLER_TYPES[device]
        if ctype == "SCSI":
            number, scsi_seen = scsi_seen, scsi_seen + 1
        for ckey in sorted(k for k in (node or {}) if re.fullmatch(r"controller\d+", k)):
            for dkey in sorted((k for k in node[ckey] or {} if re.fullmatch(r"drive\d+", k)), key=lambda k: int(k[5:])):
                drive = node[ckey][dkey]
                if not isinstance(drive, dict) or "type" not in drive:
                    continue
                controller = int(ckey[10:]) if ctype == "IDE" else number
                drives.append(Drive(ctype, controller, int(dkey[5:]), str(drive.get("type", "")),
                                    str(drive.get("pathname", "") or "")))
    return drives


def snapshot_kind(config: ConfigFile) -> str | None:
    """recovery/planned/replica/realized when a properties string names the snapshot type, else None."""
    props = config.get("configuration.properties", {})
    for value in (props.values() if isinstance(props, dict) else ()):
        if isinstance(value, str):
            m = SNAPSHOT_TYPE_RE.search(value)
            if m:
                return m.group(1).lower()
    return None


# --- mapping Windows paths to local files --------------------------------------------------------------------


def _parts(win_path: str) -> list[str]:
    return [p for p in re.split(r"[\\/]+", win_path) if p and not re.fullmatch(r"[A-Za-z]:", p)]


class FileIndex:
    """Every regular file under the VM folder (symlinks that leave it are skipped), by file name."""

    def __init__(self, root: str, search_dirs=()) -> None:
        self.root = os.path.realpath(root)
        self.search_dirs = [os.path.realpath(d) for d in search_dirs]
        self.by_name: dict[str, list[str]] = {}
        seen = 0
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            seen += len(files) + len(dirs)
            if seen > MAX_FOLDER_ENTRIES:
                raise VhdxError(f"more than {MAX_FOLDER_ENTRIES} files under it: is this a VM folder? Give the "
                                "VM's own folder (the one holding Virtual Machines and Virtual Hard Disks)",
                                path=self.root)
            for name in sorted(files):
                path = os.path.join(folder, name)
                if self.inside(path, self.root) and os.path.isfile(path):
                    self.by_name.setdefault(name.casefold(), []).append(path)

    @staticmethod
    def inside(path: str, folder: str) -> bool:
        real = os.path.realpath(path)
        return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)

    def disks(self) -> list[str]:
        return sorted(p for name, paths in self.by_name.items() if name.endswith(DISK_SUFFIXES) for p in paths)

    def resolve(self, win_path: str, config_dir: str) -> tuple[str | None, str]:
        """(local file, how it was found) for a configured path; (None, what was tried) when not found."""
        parts = _parts(win_path)
        if not parts:
            return None, "empty path"
        if not re.match(r"^([A-Za-z]:|[\\/]{2})", win_path):  # relative to the configuration's folder
            candidate = os.path.join(config_dir, *parts)
            if os.path.isfile(candidate) and self.inside(candidate, self.root):
                return candidate, "relative to the configuration"
        tail = [p.casefold() for p in parts]
        best, best_len = None, 0
        for path in self.by_name.get(tail[-1], []):
            rel = [p.casefold() for p in os.path.relpath(path, self.root).split(os.sep)]
            n = 0
            while n < min(len(rel), len(tail)) and rel[-1 - n] == tail[-1 - n]:
                n += 1
            if n > best_len:
                best, best_len = path, n
        if best is not None:
            return best, "relative to the VM folder" if best_len > 1 else "by file name in the VM folder"
        for folder in self.search_dirs:
            try:
                names = {n.casefold(): n for n in os.listdir(folder)}
            except OSError:
                continue
            if tail[-1] in names:
                path = os.path.join(folder, names[tail[-1]])
                if os.path.isfile(path) and self.inside(path, folder):
                    return path, f"by file name in {folder}"
        return None, f"not found under {self.root}" + (" or the search folders" if self.search_dirs else "")


# --- loading a folder --------------------------------------------------------------------------------------


def _state_files(config_path: str, ident: str) -> list[StateFile]:
    folder, out = os.path.dirname(config_path), []
    candidates = [("vmrs", os.path.join(folder, ident + ".vmrs")), ("vmgs", os.path.join(folder, ident + ".vmgs")),
                  ("bin", os.path.join(folder, ident, ident + ".bin")),
                  ("vsv", os.path.join(folder, ident, ident + ".vsv"))]
    for kind, path in candidates:
        match = _case_insensitive(path)
        if match is not None and os.path.isfile(match):
            out.append(StateFile(kind, match, os.path.getsize(match)))
    return out


def _case_insensitive(path: str) -> str | None:
    if os.path.exists(path):
        return path
    folder, name = os.path.split(path)
    folder = _case_insensitive(folder) if folder and not os.path.isdir(folder) else folder
    if not folder or not os.path.isdir(folder):
        return None
    match = next((n for n in os.listdir(folder) if n.casefold() == name.casefold()), None)
    return os.path.join(folder, match) if match else None


def _ident(config: ConfigFile) -> str:
    stem = os.path.splitext(os.path.basename(config.path))[0]
    return str(config.get("configuration.properties.global_id") or stem).strip("{}").upper()


def _version(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return f"{value >> 8}.{value & 0xFF}"


def _map_drives(drives: list[Drive], index: FileIndex, config_dir: str) -> list[Drive]:
    out = []
    for d in drives:
        if not d.is_disk:
            out.append(d)
            continue
        local, how = index.resolve(d.path, config_dir)
        out.append(Drive(d.controller_type, d.controller, d.location, d.kind, d.path, local, how))
    return out


def _is_config_file(path: str) -> bool:
    return path.lower().endswith((".vmcx", ".xml"))


def find_configs(index: FileIndex) -> tuple[list[str], list[str]]:
    """(VM configurations, checkpoint configurations) in the folder, by the folder they sit in."""
    vms, snaps = [], []
    for path in sorted(p for paths in index.by_name.values() for p in paths):
        if not _is_config_file(path):
            continue
        kind = os.path.basename(os.path.dirname(path)).casefold()
        if kind == CONFIG_DIR:
            vms.append(path)
        elif kind == SNAPSHOT_DIR:
            snaps.append(path)
    return vms, snaps


@dataclass
class Folder:
    """Everything read from a VM folder."""

    root: str
    vms: list[VirtualMachine]
    index: FileIndex
    chains: dict[str, ChainInfo]  # local disk path -> its chain
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # configurations that did not parse


def host_inventory(config: ConfigFile) -> list[tuple[str, str]] | None:
    """(VM id, configuration path) of each VM a host's ``data.vmcx`` registers; None for other files."""
    vms = config.get("Configurations.VirtualMachines")
    if not isinstance(vms, dict):
        return None
    return [(k.strip("_").upper(), str(v)) for k, v in vms.items() if isinstance(v, str)]


def load_folder(path: str, search_dirs=()) -> Folder:
    """Read the VM(s) at ``path`` (a VM folder, or one ``.vmcx``/``.xml`` configuration) and open their disks."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        config_dir = os.path.dirname(path)
        root = os.path.dirname(config_dir) if os.path.basename(config_dir).casefold() == CONFIG_DIR else config_dir
        index = FileIndex(root, search_dirs)
        vm_paths, snap_paths = [path], find_configs(index)[1]
    elif os.path.isdir(path):
        root = path
        index = FileIndex(root, search_dirs)
        vm_paths, snap_paths = find_configs(index)
    else:
        raise VhdxError("no such file or folder", path=path)
    unreadable: list[tuple[str, str]] = []
    vms = []
    for p in vm_paths:
        config = read_config(p)  # the configuration asked for must read; errors name the file and offset
        if config.get("configuration.properties") is None:
            raise FormatError("holds no VM configuration (configuration.properties is missing)", path=p)
        vms.append(_vm_from(config, index))
    if not vms:
        raise VhdxError("no VM configuration (Virtual Machines\\<id>.vmcx or .xml) in this folder", path=path)
    for p in snap_paths:
        try:
            config = read_config(p)
        except VhdxError as exc:
            unreadable.append((p, str(exc)))
            continue
        owner_id = str(config.get("configuration.settings.global.logical_id") or "").strip("{}").upper()
        owner = next((v for v in vms if v.id == owner_id), vms[0] if len(vms) == 1 else None)
        if owner is None:
            unreadable.append((p, f"checkpoint of VM {owner_id or '(no settings.global.logical_id)'}, which has "
                                  "no configuration in this folder"))
            continue
        owner.checkpoints.append(_checkpoint_from(config, index))
    chains = open_chains(vms, index)
    for vm in vms:
        derive_tree(vm, chains)
    return Folder(root, vms, index, chains, unreadable)


def _vm_from(config: ConfigFile, index: FileIndex) -> VirtualMachine:
    ident = _ident(config)
    props = config.get("configuration.properties", {})
    guest_state = lookup(_child(config.root.get("configuration"), f"_{GUEST_STATE_DEVICE}_") or {}, "StateFilePath")
    states = _state_files(config.path, ident)
    if isinstance(guest_state, str) and guest_state and not any(s.kind == "vmgs" for s in states):
        local, _how = index.resolve(guest_state, os.path.dirname(config.path))
        if local:
            states.append(StateFile("vmgs", local, os.path.getsize(local)))
    listed = config.get("configuration.global_settings.snapshots.list.size")
    return VirtualMachine(
        name=str(props.get("name", "")), id=ident, config_path=config.path, format=config.format,
        generation=GENERATIONS.get(props.get("subtype")), version=_version(props.get("version")),
        created=filetime(props.get("creation_time")), state_changed=filetime(props.get("last_state_change_time")),
        notes=str(props.get("notes", "") or ""),
        drives=_map_drives(config_drives(config.root), index, os.path.dirname(config.path)), state_files=states,
        listed_checkpoints=listed if isinstance(listed, int) and not isinstance(listed, bool) else None,
        replayed_log_entries=config.replayed_entries)


def _checkpoint_from(config: ConfigFile, index: FileIndex) -> CheckpointConfig:
    ident = _ident(config)
    props = config.get("configuration.properties", {}) or {}
    states = _state_files(config.path, ident)
    configured = snapshot_kind(config)
    saved = sum(s.size for s in states if s.kind in ("vmrs", "bin"))
    if configured in ("recovery", "planned", "replica"):
        kind, kind_from = configured, "configuration"
    else:
        kind, kind_from = checkpoint_kind("Standard", saved), "derived"
    return CheckpointConfig(
        id=ident, name=str(props.get("name", "") or ident), config_path=config.path,
        created=filetime(props.get("creation_time")), kind=kind, kind_from=kind_from,
        drives=_map_drives(config_drives(config.root), index, os.path.dirname(config.path)), state_files=states,
        replayed_log_entries=config.replayed_entries)


# --- joining with the disks ------------------------------------------------------------------------------------


def open_chain(local: str, search_dirs) -> ChainInfo:
    """The chain below ``local``, opened read-only; a chain that stops early records why."""
    info = ChainInfo()
    try:
        with vhdx.open(local, search_dirs=search_dirs) as image:
            try:
                image.layers  # noqa: B018 - opens every ancestor
            except VhdxError as exc:
                info.error = str(exc)  # the layers that did open are still this chain's
            info.layers = [_layer_json(layer) for layer in image.layers_opened()]
    except VhdxError as exc:
        info.error = str(exc)
    return info


def _layer_json(layer) -> dict:
    parent = layer.params.parent_locator if layer.has_parent else None
    return {"path": os.path.abspath(layer.path), "disk_type": layer.disk_type.name.lower(),
            "file_size": os.path.getsize(layer.path), "virtual_size": layer.virtual_size,
            "parent": _locator_path(parent), "dirty_log": layer.log.is_dirty}


def _locator_path(locator) -> str | None:
    if locator is None:
        return None
    return next((locator.get(k) for k in ("relative_path", "absolute_win32_path", "volume_path") if locator.get(k)),
                None)


def search_dirs_for(index: FileIndex) -> list[str]:
    """Folders of the VM tree that hold disks (parents are looked up there by file name), then --search-dir."""
    dirs = sorted({os.path.dirname(p) for p in index.disks()})
    return dirs + [d for d in index.search_dirs if d not in dirs]


def open_chains(vms: list[VirtualMachine], index: FileIndex) -> dict[str, ChainInfo]:
    dirs, chains = search_dirs_for(index), {}
    for vm in vms:
        for drive in vm.drives + [d for c in vm.checkpoints for d in c.drives]:
            if drive.local and drive.local not in chains:
                chains[drive.local] = open_chain(drive.local, dirs)
    return chains


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def layer_owners(vm: VirtualMachine) -> dict[str, list[str]]:
    """Real path of each disk file -> names of the checkpoints whose configuration names it ("Now": the VM)."""
    owners: dict[str, list[str]] = {}
    for name, drives in [("Now", vm.drives)] + [(c.name, c.drives) for c in vm.checkpoints]:
        for d in drives:
            if d.local:
                owners.setdefault(os.path.realpath(d.local), []).append(name)
    return owners


def derive_tree(vm: VirtualMachine, chains: dict[str, ChainInfo]) -> None:
    """Parent of each checkpoint: the checkpoint whose disk is the nearest ancestor of one of its disks."""

    def owner_below(local: str, exclude: CheckpointConfig | None) -> str | None:
        layers = chains.get(local, ChainInfo()).layers
        for layer in layers[1:]:
            for c in vm.checkpoints:
                if c is not exclude and any(d.local and _same(d.local, layer["path"]) for d in c.drives):
                    return c.id
        return None

    for c in vm.checkpoints:
        c.parent_id = next((p for d in c.drives if d.local for p in [owner_below(d.local, c)] if p), None)
    vm.now_parent_id = next((p for d in vm.drives if d.local for p in [owner_below(d.local, None)] if p), None)
